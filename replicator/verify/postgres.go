package verify

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/xdcr/xdcr/replicator/change"
)

// sessionParams fix every text form that is hashed, identically on both
// sides (the same settings apply uses). search_path is pg_catalog only, so
// format_type qualifies every other type and nothing in a table's schema
// can shadow the functions the queries call.
var sessionParams = map[string]string{
	"DateStyle":          "ISO, MDY",
	"IntervalStyle":      "postgres",
	"extra_float_digits": "3",
	"bytea_output":       "hex",
	"TimeZone":           "UTC",
	"search_path":        "pg_catalog",
	"application_name":   "xdcr-verify",
}

func connect(ctx context.Context, dsn string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("parse postgres connection string: %w", err)
	}
	for k, v := range sessionParams {
		cfg.RuntimeParams[k] = v
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to postgres %s:%d: %w", cfg.Host, cfg.Port, err)
	}
	return conn, nil
}

var snapshot = pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}

// inSnapshot runs fn in a REPEATABLE READ READ ONLY transaction: every
// statement sees the snapshot its first statement took. Nothing is locked
// beyond what a plain SELECT takes.
func inSnapshot(ctx context.Context, conn *pgx.Conn, fn func(pgx.Tx) error) error {
	tx, err := conn.BeginTx(ctx, snapshot)
	if err != nil {
		return err
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) // a no-op after Commit
	if err := fn(tx); err != nil {
		return err
	}
	return tx.Commit(ctx)
}

// source is the primary's connection, shared by every table and site.
type source struct {
	conn               *pgx.Conn
	site               string
	blockSize, segSize uint64
}

func openSource(ctx context.Context, site, dsn string) (*source, error) {
	conn, err := connect(ctx, dsn)
	if err != nil {
		return nil, fmt.Errorf("primary %s: %w", site, err)
	}
	s := &source{conn: conn, site: site}
	err = conn.QueryRow(ctx, `SELECT current_setting('wal_block_size')::int8, pg_size_bytes(current_setting('wal_segment_size'))`).
		Scan(&s.blockSize, &s.segSize)
	if err != nil {
		conn.Close(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("primary %s: read the WAL geometry: %w", site, err)
	}
	return s, nil
}

// position reads, inside the snapshot just taken, a WAL position that
// every transaction the snapshot sees committed before. A transaction is
// visible only after its commit record is inserted, so the insert position
// is past it even when that record is not flushed yet
// (synchronous_commit = off); pg_current_wal_lsn(), the write position,
// would not be.
func (s *source) position(ctx context.Context, tx pgx.Tx) (change.LSN, error) {
	var text string
	if err := tx.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text`).Scan(&text); err != nil {
		return 0, fmt.Errorf("read the primary's WAL position: %w", err)
	}
	lsn, err := change.ParseLSN(text)
	if err != nil {
		return 0, err
	}
	return recordEnd(lsn, s.blockSize, s.segSize), nil
}

// Page header sizes of PostgreSQL's WAL on 64-bit platforms
// (SizeOfXLogShortPHD, SizeOfXLogLongPHD).
const (
	shortPageHeader = 24
	longPageHeader  = 40
)

// recordEnd turns an insert position into the form the end of the last
// record has. Right after a page (or segment) boundary the insert position
// points past the new page's header, while the record before it ends at
// the boundary, and that is as far as the walsender, and so a caught-up
// replica, reports.
func recordEnd(lsn change.LSN, blockSize, segSize uint64) change.LSN {
	switch {
	case segSize > 0 && uint64(lsn)%segSize == longPageHeader:
		return lsn - longPageHeader
	case blockSize > 0 && uint64(lsn)%blockSize == shortPageHeader && (segSize == 0 || uint64(lsn)%segSize != shortPageHeader):
		return lsn - shortPageHeader
	}
	return lsn
}

// LaggingError means a replica did not apply the primary's position within
// [Config].Wait, so its tables could not be compared at a matching state.
type LaggingError struct {
	Site string
	Want change.LSN    // the primary's position
	Have change.LSN    // the most the site was seen to have applied; 0 if nothing known
	Wait time.Duration // how long verify waited
	Why  string        // why no position was known, if none was
}

func (e *LaggingError) Error() string {
	msg := fmt.Sprintf("site %s did not apply the primary's position %s within %s", e.Site, e.Want, e.Wait)
	if e.Have != 0 {
		msg += fmt.Sprintf(" (it had applied up to %s)", e.Have)
	}
	if e.Why != "" {
		msg += " (" + e.Why + ")"
	}
	return msg
}

// target is a replica site's connection and what is known of its applied
// position, shared by its tables.
type target struct {
	conn    *pgx.Conn
	site    string
	cfg     *Config
	log     *slog.Logger
	reached change.LSN // the site has applied everything before this
	why     string     // why its stored position does not count, if it does not
}

// storedPosition reads xdcr.apply_position. It counts only when it is the
// current primary's history (and epoch, when known): LSNs of another
// primary's WAL do not compare.
func (r *target) storedPosition(ctx context.Context) (change.LSN, error) {
	var (
		origin string
		epoch  uint64
		text   string
	)
	err := r.conn.QueryRow(ctx, `SELECT origin, epoch, lsn::text FROM xdcr.apply_position WHERE cluster = $1`, r.cfg.Cluster).
		Scan(&origin, &epoch, &text)
	var pgErr *pgconn.PgError
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		r.why = "it has no row in xdcr.apply_position"
		return 0, nil
	case errors.As(err, &pgErr) && pgErr.Code == "42P01":
		r.why = "it has no xdcr.apply_position: no apply agent ever ran there"
		return 0, nil
	case err != nil:
		return 0, fmt.Errorf("read the applied position of %s: %w", r.site, err)
	}
	if origin != r.cfg.Primary.Name || (r.cfg.Epoch != 0 && epoch != r.cfg.Epoch) {
		r.why = fmt.Sprintf("its xdcr.apply_position is of origin %s epoch %d, not of primary %s", origin, epoch, r.cfg.Primary.Name)
		if r.cfg.Epoch != 0 {
			r.why += fmt.Sprintf(" epoch %d", r.cfg.Epoch)
		}
		return 0, nil
	}
	r.why = ""
	return change.ParseLSN(text)
}

// await waits until the site has applied everything the primary committed
// before want: its stored position (the commit LSN of the last transaction
// it applied, committed with the data) is at least want, or the cluster
// status reports it there (after an idle period the status carries the
// source's heartbeat position, which the stored position never does).
func (r *target) await(ctx context.Context, want change.LSN) error {
	if r.reached >= want {
		return nil
	}
	start := time.Now()
	delay := 10 * time.Millisecond
	var asked time.Time
	for {
		have, err := r.storedPosition(ctx)
		if err != nil {
			return err
		}
		r.reached = max(r.reached, have)
		if r.reached < want && r.cfg.ReportedLSN != nil && time.Since(asked) >= 200*time.Millisecond {
			asked = time.Now()
			sctx, cancel := context.WithDeadline(ctx, start.Add(r.cfg.Wait))
			lsn, err := r.cfg.ReportedLSN(sctx, r.site)
			cancel()
			if err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				r.log.Debug("cluster status unavailable", "err", err)
			}
			r.reached = max(r.reached, lsn)
		}
		if r.reached >= want {
			if d := time.Since(start); d > time.Second {
				r.log.Debug("waited for the replica", "lsn", want.String(), "waited", d)
			}
			return nil
		}
		if time.Since(start) >= r.cfg.Wait {
			return &LaggingError{Site: r.site, Want: want, Have: r.reached, Wait: r.cfg.Wait, Why: r.why}
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		delay = min(2*delay, 200*time.Millisecond)
	}
}

// pgPair is the [pair] of one table between the primary and one replica.
type pgPair struct {
	src *source
	dst *target
	t   *table
}

func (p *pgPair) primary(ctx context.Context, fn func(reader) error) (change.LSN, error) {
	var lsn change.LSN
	err := inSnapshot(ctx, p.src.conn, func(tx pgx.Tx) error {
		var err error
		if lsn, err = p.src.position(ctx, tx); err != nil {
			return err
		}
		return fn(&pgReader{q: tx, t: p.t, side: "primary " + p.src.site})
	})
	return lsn, err
}

func (p *pgPair) replica(ctx context.Context, lsn change.LSN, fn func(reader) error) error {
	if err := p.dst.await(ctx, lsn); err != nil {
		return err
	}
	return inSnapshot(ctx, p.dst.conn, func(tx pgx.Tx) error {
		return fn(&pgReader{q: tx, t: p.t, side: "replica " + p.dst.site})
	})
}

func (p *pgPair) splitPoints(ctx context.Context, onReplica bool, r Range, every int64) ([]Key, error) {
	s := &pgReader{q: p.src.conn, t: p.t, side: "primary " + p.src.site}
	if onReplica {
		s = &pgReader{q: p.dst.conn, t: p.t, side: "replica " + p.dst.site}
	}
	return s.splitPoints(ctx, r, every)
}
