package cache

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5"
)

// WorkerConfig configures the outbox worker of one site.
type WorkerConfig struct {
	Cluster string
	Site    string
	DSN     string // the site's PostgreSQL, which holds the outbox
	// MaxOutboxRows bounds the backlog: beyond it, the worker collapses
	// the outbox into a flush of the tables it names. Default 100000.
	MaxOutboxRows int
	// Interval is how often the worker looks at the outbox when nothing
	// wakes it. Default 1s.
	Interval time.Duration
	// BatchRows is how many outbox rows one round handles. Default 256.
	BatchRows int
}

func (c WorkerConfig) withDefaults() WorkerConfig {
	if c.MaxOutboxRows <= 0 {
		c.MaxOutboxRows = 100_000
	}
	if c.Interval <= 0 {
		c.Interval = time.Second
	}
	if c.BatchRows <= 0 {
		c.BatchRows = 256
	}
	return c
}

// Observer receives what the worker does, for metrics. Its methods must
// not block; they are called from the worker's goroutine.
type Observer interface {
	// Invalidated reports one round of deletes on a backend ("redis",
	// "memcached"), or of events published ("nats"): how many keys or
	// events (a table flush counts as one), how long it took, and the
	// error if it failed.
	Invalidated(backend string, n int, took time.Duration, err error)
	// OutboxRows reports the rows waiting in the outbox.
	OutboxRows(n int64)
}

// Worker drains a site's outbox of invalidations (xdcr.cache_outbox,
// written by apply in the same transaction as the data, or by the
// primary's [Tail]): oldest rows first, a batch at a time, it deletes their
// keys from the site's cache, publishes them as [Event]s on the site's NATS
// subject, and only then deletes the rows. Invalidation thus happens only
// after the data committed, and at least once: a crash or an error before
// the rows are deleted leaves them for the next round, which deletes the
// keys again (deleting is idempotent).
//
// A cache (or NATS, or the database) that fails never stops replication:
// the rows wait, the worker retries with a growing pause (up to 15 s),
// logs once when the outage starts and once when it ends, and reports the
// backlog through [Observer]. When the backlog exceeds MaxOutboxRows it is
// collapsed into one row that flushes every table it names (docs/cache.md
// says what a flush deletes).
//
// Only one worker per site drains the outbox at a time (a session advisory
// lock); another waits.
type Worker struct {
	cfg     WorkerConfig
	keys    *Keys
	backend Backend // nil: the site has no cache store
	pub     Publisher
	obs     Observer
	log     *slog.Logger
	subject string

	wake chan struct{}

	// owned by Run's goroutine
	conn   *pgx.Conn
	down   bool // in an outage: logged once
	failed int  // failed rounds in the current outage
	warned map[string]bool
}

// NewWorker returns the worker of a site. backend may be nil (no cache
// store: only events), obs may be nil. Nothing runs until Run.
func NewWorker(cfg WorkerConfig, keys *Keys, backend Backend, pub Publisher, obs Observer, log *slog.Logger) *Worker {
	if obs == nil {
		obs = nopObserver{}
	}
	cfg = cfg.withDefaults()
	return &Worker{
		cfg:     cfg,
		keys:    keys,
		backend: backend,
		pub:     pub,
		obs:     obs,
		log:     log.With("component", "cache"),
		subject: Subject(cfg.Cluster, cfg.Site),
		wake:    make(chan struct{}, 1),
		warned:  make(map[string]bool),
	}
}

type nopObserver struct{}

func (nopObserver) Invalidated(string, int, time.Duration, error) {}
func (nopObserver) OutboxRows(int64)                              {}

// Wake makes the worker look at the outbox now (after a commit). It never
// blocks and is safe for concurrent use.
func (w *Worker) Wake() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// errBusy means another worker holds the site's outbox.
var errBusy = errors.New("another agent drains this site's cache outbox")

// Run drains the outbox until ctx ends, then returns ctx.Err(). It never
// returns another error: failures are retried.
func (w *Worker) Run(ctx context.Context) error {
	defer w.closeConn()
	var backoff, pause time.Duration // pause: backoff with jitter
	for {
		err := w.round(ctx)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		switch {
		case errors.Is(err, errBusy):
			if !w.warned["busy"] {
				w.warned["busy"] = true
				w.log.Info("another agent of this site drains the cache outbox; standing by")
			}
			pause = 5 * w.cfg.Interval
		case err != nil:
			backoff = w.failure(err, backoff)
			pause = backoff/2 + rand.N(backoff/2+1)
		default:
			w.recovered()
			backoff, pause = 0, 0
		}
		wait := w.cfg.Interval
		if pause > 0 {
			wait = pause
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-w.wake:
			if pause > 0 {
				// in an outage, a commit does not shorten the pause
				select {
				case <-t.C:
				case <-ctx.Done():
					return ctx.Err()
				}
			}
		case <-t.C:
		}
		t.Stop()
	}
}

// failure logs the first failure of an outage and returns the next
// backoff: 250 ms, doubling up to 15 s.
func (w *Worker) failure(err error, backoff time.Duration) time.Duration {
	w.failed++
	if !w.down {
		w.down = true
		w.log.Warn("cache invalidation failing; invalidations wait in the outbox and are retried", "err", err)
	} else {
		w.log.Debug("cache invalidation still failing", "err", err, "attempts", w.failed)
	}
	if backoff == 0 {
		return 250 * time.Millisecond
	}
	return min(2*backoff, 15*time.Second)
}

func (w *Worker) recovered() {
	if w.down {
		w.log.Info("cache invalidation recovered", "failed_attempts", w.failed)
	}
	w.down, w.failed = false, 0
}

func (w *Worker) closeConn() {
	if w.conn != nil {
		w.conn.Close(context.Background())
		w.conn = nil
	}
}

// db returns the worker's connection, opening it (and taking the site's
// outbox lock) when needed.
func (w *Worker) db(ctx context.Context) (*pgx.Conn, error) {
	if w.conn != nil && !w.conn.IsClosed() {
		return w.conn, nil
	}
	w.closeConn()
	conn, err := connect(ctx, w.cfg.DSN, "xdcr-cache")
	if err != nil {
		return nil, err
	}
	if err := ensureSchema(ctx, conn); err != nil {
		conn.Close(context.WithoutCancel(ctx))
		return nil, err
	}
	var locked bool
	err = conn.QueryRow(ctx, "SELECT pg_try_advisory_lock(hashtext('xdcr.cache_worker'), hashtext($1))", w.cfg.Cluster).Scan(&locked)
	if err != nil || !locked {
		conn.Close(context.WithoutCancel(ctx))
		if err != nil {
			return nil, fmt.Errorf("lock the cache outbox: %w", err)
		}
		return nil, errBusy
	}
	w.conn = conn
	return conn, nil
}

// round handles everything in the outbox.
func (w *Worker) round(ctx context.Context) (err error) {
	defer func() {
		if err != nil && w.conn != nil && w.conn.IsClosed() {
			w.closeConn()
		}
	}()
	conn, err := w.db(ctx)
	if err != nil {
		return err
	}
	n, err := countOutbox(ctx, conn, w.cfg.Cluster)
	if err != nil {
		return err
	}
	w.obs.OutboxRows(n)
	if n > int64(w.cfg.MaxOutboxRows) {
		tables, gone, err := collapseOutbox(ctx, conn, w.cfg.Cluster)
		if err != nil {
			return err
		}
		w.log.Warn("cache outbox over its bound: collapsed the backlog into a flush of every key of the tables it touched",
			"rows", gone, "max_outbox_rows", w.cfg.MaxOutboxRows, "tables", tables)
	}
	for {
		rows, err := readOutbox(ctx, conn, w.cfg.Cluster, w.cfg.BatchRows)
		if err != nil {
			return err
		}
		if len(rows) == 0 {
			break
		}
		if err := w.handle(ctx, conn, rows); err != nil {
			return err
		}
		ids := make([]int64, len(rows))
		for i, r := range rows {
			ids[i] = r.id
		}
		if err := deleteOutbox(ctx, conn, w.cfg.Cluster, ids); err != nil {
			return err
		}
		if len(rows) < w.cfg.BatchRows {
			break
		}
	}
	if n, err = countOutbox(ctx, conn, w.cfg.Cluster); err == nil {
		w.obs.OutboxRows(n)
	}
	return err
}

// handle invalidates what rows name: the backend first, then the events.
func (w *Worker) handle(ctx context.Context, conn *pgx.Conn, rows []outboxRow) error {
	var (
		keys    []string
		seen    = make(map[string]bool)
		flushes []string
		flushed = make(map[string]bool)
		events  []Event
	)
	for _, r := range rows {
		if r.bad != nil {
			w.log.Error("dropped an outbox row that is not a list of invalidations", "id", r.id, "err", r.bad)
			continue
		}
		for _, e := range r.entries {
			if e.Flush && !flushed[e.Table] {
				flushed[e.Table] = true
				flushes = append(flushes, e.Table)
			}
			for _, k := range e.Keys {
				if !seen[k] {
					seen[k] = true
					keys = append(keys, k)
				}
			}
			events = append(events, Event{Table: e.Table, Op: e.Op, Keys: e.Keys, Flush: e.Flush, LSN: r.lsn, CommitTime: utc(r.commitTime)})
		}
	}
	if w.backend != nil && (len(keys) > 0 || len(flushes) > 0) {
		start := time.Now()
		err := w.invalidate(ctx, conn, keys, flushes)
		w.obs.Invalidated(w.backend.Name(), len(keys)+len(flushes), time.Since(start), err)
		if err != nil {
			return err
		}
	}
	start := time.Now()
	n, err := publishEvents(ctx, w.pub, w.subject, events)
	if n > 0 || err != nil {
		w.obs.Invalidated("nats", n, time.Since(start), err)
	}
	return err
}

func utc(t *time.Time) *time.Time {
	if t == nil {
		return nil
	}
	u := t.UTC()
	return &u
}

func (w *Worker) invalidate(ctx context.Context, conn *pgx.Conn, keys, flushes []string) error {
	for _, name := range flushes {
		t := w.keys.table(name)
		if t == nil {
			if !w.warned["flush:"+name] {
				w.warned["flush:"+name] = true
				w.log.Warn("the outbox asks to flush a table that has no cache templates (any more); skipped", "table", name)
			}
			continue
		}
		if err := flushTable(ctx, w.backend, conn, t); err != nil {
			return err
		}
	}
	return w.backend.Delete(ctx, keys)
}

// flushTable deletes every key t's templates can produce. On Redis that is
// a SCAN of each template's pattern ({column} as '*'), which also finds
// keys of rows that are gone; memcached cannot list keys, so there it
// deletes the keys of the rows the site's database holds now (read through
// conn).
func flushTable(ctx context.Context, b Backend, conn *pgx.Conn, t *table) error {
	pd, ok := b.(patternDeleter)
	if !ok {
		return scanKeys(ctx, conn, t, func(keys []string, _ int64) error { return b.Delete(ctx, keys) })
	}
	if fixed := t.fixedKeys(); len(fixed) > 0 {
		if err := b.Delete(ctx, fixed); err != nil {
			return err
		}
	}
	for _, tpl := range t.templates {
		if len(tpl.Columns()) == 0 {
			continue
		}
		if _, err := pd.DeletePattern(ctx, tpl.Pattern()); err != nil {
			return err
		}
	}
	return nil
}
