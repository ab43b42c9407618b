package cache

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/xdcr/xdcr/replicator/change"
)

// stream is what the tail needs from the transport.
type stream interface {
	// Subscribe delivers the messages of stream after sequence afterSeq,
	// in order (see replicator's subscriber). stop ends the subscription
	// and returns why it ended; it may be called twice.
	Subscribe(ctx context.Context, stream string, afterSeq uint64) (msgs <-chan change.Delivery, stop func() error, err error)
	// LastSeq returns the sequence of the last message the stream holds
	// (0 when it is empty).
	LastSeq(ctx context.Context, stream string) (uint64, error)
}

// TailConfig configures the tail of one site.
type TailConfig struct {
	Cluster string
	Site    string
	DSN     string // the site's PostgreSQL, which holds the outbox
	Stream  string // the stream this site publishes to while it is primary
}

// Tail invalidates the primary site's own cache. The primary applies
// nothing, so there is no apply transaction to write its outbox rows in;
// instead the tail follows the site's own change stream (on the site's own
// NATS, so it works while every WAN link is down) and, for each batch,
// writes the batch's invalidations into the site's xdcr.cache_outbox
// together with the stream sequence it has reached
// (xdcr.cache_position), in one transaction of the site's database. The
// site's [Worker] then drains them as it drains apply's rows. A crash
// between the two repeats the batch (at least once); the data itself
// committed on the primary before capture ever saw it.
//
// The tail runs on every site whatever its role: on a replica its own
// stream is idle, and once the site is promoted it picks up the first batch
// the site publishes.
//
// One tail per site reads at a time (a session advisory lock); a second
// agent of the site stands by.
type Tail struct {
	cfg    TailConfig
	stream stream
	keys   *Keys
	wake   func()
	log    *slog.Logger
}

// NewTail returns the tail of a site; wake is called after every commit
// that queued invalidations (the worker's Wake). Nothing runs until Run.
func NewTail(cfg TailConfig, s stream, keys *Keys, wake func(), log *slog.Logger) *Tail {
	if wake == nil {
		wake = func() {}
	}
	return &Tail{cfg: cfg, stream: s, keys: keys, wake: wake, log: log.With("component", "cache-tail", "stream", cfg.Stream)}
}

// Init records where the tail starts when this site has never run one: just
// after the last message its stream holds now. Whatever the site publishes
// later is invalidated. It is a no-op once a position exists. Call it
// before capture may start, so no batch slips in between.
func (t *Tail) Init(ctx context.Context) error {
	conn, err := connect(ctx, t.cfg.DSN, "xdcr-cache")
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if err := ensureSchema(ctx, conn); err != nil {
		return err
	}
	_, err = t.position(ctx, conn)
	return err
}

// position reads the stored position, creating it at the stream's end.
func (t *Tail) position(ctx context.Context, conn *pgx.Conn) (uint64, error) {
	var seq int64
	err := conn.QueryRow(ctx, `SELECT stream_seq FROM xdcr.cache_position WHERE cluster = $1 AND stream = $2`,
		t.cfg.Cluster, t.cfg.Stream).Scan(&seq)
	if err == nil {
		return uint64(seq), nil
	}
	if !isNoRows(err) {
		return 0, fmt.Errorf("read xdcr.cache_position: %w", err)
	}
	last, err := t.stream.LastSeq(ctx, t.cfg.Stream)
	if err != nil {
		return 0, fmt.Errorf("read the end of stream %s: %w", t.cfg.Stream, err)
	}
	_, err = conn.Exec(ctx, `INSERT INTO xdcr.cache_position (cluster, stream, stream_seq) VALUES ($1, $2, $3)
		ON CONFLICT (cluster, stream) DO NOTHING`, t.cfg.Cluster, t.cfg.Stream, int64(last))
	if err != nil {
		return 0, fmt.Errorf("create xdcr.cache_position: %w", err)
	}
	t.log.Info("cache tail starts at the end of the site's stream", "after_seq", last)
	err = conn.QueryRow(ctx, `SELECT stream_seq FROM xdcr.cache_position WHERE cluster = $1 AND stream = $2`,
		t.cfg.Cluster, t.cfg.Stream).Scan(&seq)
	if err != nil {
		return 0, fmt.Errorf("read xdcr.cache_position: %w", err)
	}
	return uint64(seq), nil
}

// Run follows the stream until ctx ends, then returns ctx.Err(). Failures
// are logged and retried with a growing pause; they never reach
// replication.
func (t *Tail) Run(ctx context.Context) error {
	var (
		backoff time.Duration
		down    bool
		standby bool
	)
	for {
		progressed, err := t.session(ctx)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, errTailBusy) {
			if !standby {
				standby = true
				t.log.Info("another agent of this site tails its stream; standing by")
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(5 * time.Second):
			}
			continue
		}
		if progressed {
			if down {
				t.log.Info("cache tail recovered")
			}
			backoff, down = 0, false
		}
		if backoff == 0 {
			backoff = 250 * time.Millisecond
		} else {
			backoff = min(2*backoff, 15*time.Second)
		}
		if !down {
			down = true
			t.log.Warn("cache tail stopped; retrying (the primary's cache invalidations wait in its stream)", "err", err)
		} else {
			t.log.Debug("cache tail still failing", "err", err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff/2 + rand.N(backoff/2+1)):
		}
	}
}

// errTailBusy means another agent of the site runs the tail.
var errTailBusy = errors.New("another agent tails this site's stream")

// tailGroup bounds the messages one transaction of the tail covers.
const tailGroup = 256

// session reads the stream from the stored position until something
// fails. It reports whether it stored any progress.
func (t *Tail) session(ctx context.Context) (progressed bool, err error) {
	conn, err := connect(ctx, t.cfg.DSN, "xdcr-cache-tail")
	if err != nil {
		return false, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if err := ensureSchema(ctx, conn); err != nil {
		return false, err
	}
	// one tail per site: the lock goes with the session's connection
	var locked bool
	if err := conn.QueryRow(ctx, "SELECT pg_try_advisory_lock(hashtext('xdcr.cache_tail'), hashtext($1))", t.cfg.Cluster).Scan(&locked); err != nil {
		return false, fmt.Errorf("lock the cache tail: %w", err)
	}
	if !locked {
		return false, errTailBusy
	}
	pos, err := t.position(ctx, conn)
	if err != nil {
		return false, err
	}
	if last, err := t.stream.LastSeq(ctx, t.cfg.Stream); err != nil {
		return false, fmt.Errorf("read the end of stream %s: %w", t.cfg.Stream, err)
	} else if last < pos {
		// The stream was recreated or lost messages: what it held after
		// the last one left is unknown, so flush everything.
		if err := t.restart(ctx, conn, last); err != nil {
			return false, err
		}
		t.log.Warn("the site's stream ends before the cache tail's position; flushed every cached table and starting over at its end",
			"position", pos, "stream_last_seq", last)
		pos = last
		progressed = true
	}
	msgs, stop, err := t.stream.Subscribe(ctx, t.cfg.Stream, pos)
	if err != nil {
		return progressed, fmt.Errorf("subscribe to stream %s: %w", t.cfg.Stream, err)
	}
	defer stop()
	st := &tailState{stored: pos, wrote: time.Now()}
	for {
		group, err := t.receive(ctx, msgs, stop)
		if err != nil {
			return progressed, err
		}
		wrote, err := t.store(ctx, conn, st, group)
		if err != nil {
			return progressed, err
		}
		progressed = progressed || wrote
	}
}

// tailState is what a session has stored.
type tailState struct {
	stored uint64    // the position in xdcr.cache_position
	wrote  time.Time // when it was last written
}

// positionEvery is how often the tail records its position while the
// transactions it reads touch no cached table.
const positionEvery = 10 * time.Second

// receive waits for one delivery and takes those already waiting behind
// it.
func (t *Tail) receive(ctx context.Context, msgs <-chan change.Delivery, stop func() error) ([]change.Delivery, error) {
	var group []change.Delivery
	for len(group) < tailGroup {
		var (
			d  change.Delivery
			ok bool
		)
		if len(group) == 0 {
			select {
			case d, ok = <-msgs:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		} else {
			select {
			case d, ok = <-msgs:
			default:
				return group, nil
			}
		}
		if !ok {
			if len(group) > 0 {
				return group, nil
			}
			if err := stop(); err != nil {
				return nil, fmt.Errorf("stream %s: %w", t.cfg.Stream, err)
			}
			return nil, errors.New("stream subscription ended")
		}
		group = append(group, d)
	}
	return group, nil
}

// store writes the invalidations of group and the new position in one
// transaction, and reports whether it wrote. Without invalidations it
// writes the position only every positionEvery: reading such messages
// again after a restart costs nothing.
func (t *Tail) store(ctx context.Context, conn *pgx.Conn, st *tailState, group []change.Delivery) (bool, error) {
	type row struct {
		lsn     change.LSN
		ct      time.Time
		entries []byte
	}
	var rows []row
	var last change.LSN
	for _, d := range group {
		if d.Err != nil {
			t.log.Error("skipped a message of the site's stream that cannot be decoded", "seq", d.Seq, "err", d.Err)
			continue
		}
		for i := range d.Batch.Txns {
			txn := &d.Batch.Txns[i]
			last = txn.LSN
			inv := t.keys.Invalidations(txn.Changes)
			if len(inv) == 0 {
				continue
			}
			entries, err := json.Marshal(inv)
			if err != nil {
				return false, fmt.Errorf("encode cache invalidations: %w", err)
			}
			rows = append(rows, row{lsn: txn.LSN, ct: txn.CommitTime, entries: entries})
		}
	}
	if len(rows) == 0 && (last == 0 || time.Since(st.wrote) < positionEvery) {
		return false, nil
	}
	from, to := st.stored, group[len(group)-1].Seq
	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		batch := &pgx.Batch{}
		for _, r := range rows {
			var ct any
			if !r.ct.IsZero() {
				ct = r.ct
			}
			batch.Queue(`INSERT INTO xdcr.cache_outbox (cluster, lsn, commit_time, entries) VALUES ($1, $2::pg_lsn, $3, $4::jsonb)`,
				t.cfg.Cluster, r.lsn.String(), ct, string(r.entries))
		}
		batch.Queue(`UPDATE xdcr.cache_position SET stream_seq = $3, lsn = $4::pg_lsn, updated_at = now()
			WHERE cluster = $1 AND stream = $2 AND stream_seq = $5`, t.cfg.Cluster, t.cfg.Stream, int64(to), last.String(), int64(from))
		br := tx.SendBatch(ctx, batch)
		for range rows {
			if _, err := br.Exec(); err != nil {
				br.Close()
				return fmt.Errorf("queue invalidations in xdcr.cache_outbox: %w", err)
			}
		}
		tag, err := br.Exec()
		if err == nil && tag.RowsAffected() != 1 {
			err = fmt.Errorf("xdcr.cache_position of stream %s is no longer at seq %d (another agent of this site?)", t.cfg.Stream, from)
		}
		if cerr := br.Close(); err == nil {
			err = cerr
		}
		return err
	})
	if err != nil {
		return false, err
	}
	st.stored, st.wrote = to, time.Now()
	if len(rows) > 0 {
		t.wake()
	}
	return true, nil
}

// restart flushes every cached table and moves the position to seq.
func (t *Tail) restart(ctx context.Context, conn *pgx.Conn, seq uint64) error {
	var names []string
	for _, tb := range t.keys.tables {
		names = append(names, tb.Name)
	}
	return pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if err := insertFlush(ctx, tx, t.cfg.Cluster, "restart", 0, names); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `UPDATE xdcr.cache_position SET stream_seq = $3, updated_at = now() WHERE cluster = $1 AND stream = $2`,
			t.cfg.Cluster, t.cfg.Stream, int64(seq))
		return err
	})
}
