package replicator

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

const (
	// defaultCatchUpRound is CaptureConfig.CatchUpRound's default.
	defaultCatchUpRound = 500_000
	// sqlCatchUpLag is how far the slot must be behind the source's WAL
	// for a session to begin with catch-up through SQL.
	sqlCatchUpLag = 16 << 20
)

// catchUp reads a large backlog through pg_logical_slot_peek_binary_changes
// before the session starts streaming. The walsender sends every pgoutput
// message as a network write of its own; the SQL function decodes the same
// messages into one query result, sent in full buffers, which costs the
// source a fraction of the CPU (PERFORMANCE.md measured the decode of a
// pgbench backlog 8x faster this way).
//
// A round peeks at most CatchUpRound messages from the slot's confirmed
// position (a peek ends at a transaction's end), runs them through the same
// decoder and publishing as the stream, waits until the stream has
// acknowledged all of it, and only then advances the slot: a crash at any
// point re-reads from the slot what the stream may lack, and the duplicate
// check on publish (s.published) skips what it already holds — exactly as
// when a streaming session restarts. Rounds go on while the slot is more than
// sqlCatchUpLag behind and a round comes back full; then the session
// streams (the walsender also moves the slot past WAL that holds nothing
// to publish, which a peek cannot).
func (s *captureSession) catchUp(ctx context.Context) error {
	var peek *pgx.Conn
	defer func() {
		if peek != nil {
			peek.Close(context.WithoutCancel(ctx))
		}
	}()
	slot := SlotName(s.cfg.Cluster)
	start, rounds, messages := time.Now(), 0, 0
	for s.drainTarget() == 0 {
		// the slot is at s.advanced: where the session found it, or where
		// the last round moved it
		wal, err := s.report(ctx)
		if err != nil {
			return err
		}
		behind := int64(wal) - int64(s.advanced)
		if behind < sqlCatchUpLag {
			break
		}
		if peek == nil {
			s.log.Info("capture catching up through SQL", "slot", slot, "behind_bytes", behind, "round", s.cfg.CatchUpRound)
			s.obs.State(StateStreaming, nil)
			if peek, err = connectPeek(ctx, s.cfg.DSN); err != nil {
				return err
			}
		}
		n, err := s.peekRound(ctx, peek, slot)
		if err != nil {
			return err
		}
		rounds++
		messages += n
		if n < s.cfg.CatchUpRound {
			break
		}
	}
	if rounds > 0 {
		s.log.Info("capture caught up through SQL", "rounds", rounds, "messages", messages,
			"duration", time.Since(start).Round(time.Millisecond), "confirmed_lsn", s.confirmed)
	}
	return nil
}

// peekRound decodes and publishes one round; it returns how many messages
// the peek returned.
func (s *captureSession) peekRound(ctx context.Context, peek *pgx.Conn, slot string) (int, error) {
	// stage times of the round, for its log line: the peek decodes the
	// whole round in the source before the first row arrives
	var t roundTimes
	t.start = time.Now()
	rows, err := peek.Query(ctx, `SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2,
		'proto_version', '1', 'publication_names', $3)`, slot, s.cfg.CatchUpRound, PublicationName(s.cfg.Cluster))
	if err != nil {
		return 0, fmt.Errorf("peek at slot %s: %w", slot, err)
	}
	n := 0
	for rows.Next() {
		if n == 0 {
			t.firstRow = time.Now()
		}
		n++
		// the decoder copies what it keeps out of the row
		ev, err := s.dec.decode(ctx, rows.RawValues()[0])
		if err == nil {
			err = s.handle(ctx, ev)
		}
		if err == nil && n%1024 == 0 {
			err = s.reapAcks(ctx, false)
		}
		if err != nil {
			rows.Close()
			return n, err
		}
	}
	if err := rows.Err(); err != nil {
		return n, fmt.Errorf("peek at slot %s: %w", slot, err)
	}
	if s.cur != nil {
		return n, fmt.Errorf("%w: a peek at slot %s ended inside transaction %d", ErrProtocol, slot, s.cur.Xid)
	}
	t.lastRow = time.Now()
	if n == 0 {
		t.firstRow = t.lastRow
	}
	if err := s.flushRun(ctx); err != nil {
		return n, err
	}
	if err := s.awaitAcks(ctx); err != nil {
		return n, err
	}
	t.acked = time.Now()
	if s.confirmed > s.advanced {
		// the stream holds everything up to confirmed
		if _, err := s.meta.Exec(ctx, "SELECT pg_replication_slot_advance($1, $2::pg_lsn)", slot, s.confirmed.String()); err != nil {
			return n, fmt.Errorf("advance slot %s to %s: %w", slot, s.confirmed, err)
		}
		s.advanced = s.confirmed
	}
	s.log.Info("catch-up round", "messages", n, "confirmed_lsn", s.confirmed,
		"until_first_row", t.firstRow.Sub(t.start), "rows", t.lastRow.Sub(t.firstRow),
		"until_acked", t.acked.Sub(t.lastRow), "advance", time.Since(t.acked))
	return n, nil
}

// roundTimes marks the stages of a catch-up round.
type roundTimes struct{ start, firstRow, lastRow, acked time.Time }

// connectPeek opens the connection catch-up decodes on, with the session
// settings of the replication connection: pgoutput writes values with
// their types' output functions, which follow the session's settings
// (DateStyle, search_path for reg* types, …), and a value must read the
// same whichever way it was decoded.
func connectPeek(ctx context.Context, dsn string) (*pgx.Conn, error) {
	return connectSession(ctx, dsn, "xdcr-capture", nil)
}
