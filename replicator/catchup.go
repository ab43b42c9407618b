package replicator

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/xdcr/xdcr/replicator/change"
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
// A round peeks at most CatchUpRound messages (later rounds may take
// more: see nextRound) from the slot's confirmed position up to the
// source's WAL flush position when the round began (a peek ends at a
// transaction's end), runs them through the same decoder and publishing
// as the stream, waits until the stream has acknowledged all of it, and
// only then advances the slot: a crash at any point
// re-reads from the slot what the stream may lack, and the duplicate check
// on publish (s.published) skips what it already holds — exactly as when
// a streaming session restarts. Rounds go on until one comes back short:
// it read everything up to that flush position, and the slot advances to
// it, past WAL that held nothing to publish. That matters for what comes
// next: every peek, advance and START_REPLICATION decodes again from the
// slot's restart_lsn, which only moves at a running-transactions record
// the decoder passed and the slot's position is beyond (they are logged
// at checkpoints and every 15 s of activity). A backlog written in a burst
// holds few, and stopping at the last commit decoded would leave the
// streaming session to decode the whole backlog again before its first
// new change.
func (s *captureSession) catchUp(ctx context.Context) error {
	wal, err := s.report(ctx)
	if err != nil {
		return err
	}
	behind := int64(wal) - int64(s.advanced) // the slot is where the session found it
	if behind < sqlCatchUpLag || s.drainTarget() != 0 {
		return nil
	}
	slot := SlotName(s.cfg.Cluster)
	s.log.Info("capture catching up through SQL", "slot", slot, "behind_bytes", behind, "round", s.cfg.CatchUpRound)
	s.obs.State(StateStreaming, nil)
	peek, err := connectPeek(ctx, s.cfg.DSN)
	if err != nil {
		return err
	}
	defer peek.Close(context.WithoutCancel(ctx))
	start, rounds, messages := time.Now(), 0, 0
	size, restart := s.cfg.CatchUpRound, s.restart
	for s.drainTarget() == 0 {
		n, complete, err := s.peekRound(ctx, peek, slot, size)
		if err != nil {
			return err
		}
		rounds++
		messages += n
		if complete {
			break
		}
		if _, err := s.report(ctx); err != nil { // and reads restart_lsn
			return err
		}
		size = nextRound(s.cfg.CatchUpRound, size, s.restart > restart)
		restart = s.restart
	}
	s.log.Info("capture caught up through SQL", "rounds", rounds, "messages", messages,
		"duration", time.Since(start).Round(time.Millisecond), "confirmed_lsn", s.confirmed)
	return nil
}

// maxRoundGrowth bounds how far nextRound grows a round: a round's result
// is materialized in the source (in temp files past work_mem) before its
// first row is sent, so its size bounds the source's temp space and how
// long publishing waits.
const maxRoundGrowth = 4

// nextRound is the size of the round after one of size last. Every round
// decodes from the slot's restart_lsn, and while that stays put (a backlog
// written in a burst has no running-transactions record for it to move
// to) each round first decodes again everything the earlier ones
// published: the work grows with the square of the number of rounds. So
// while it stays put the rounds double, up to maxRoundGrowth times base;
// once it moves they are base again.
func nextRound(base, last int, restartMoved bool) int {
	if restartMoved {
		return base
	}
	return min(2*last, maxRoundGrowth*base)
}

// peekRound decodes and publishes one round of at most size messages; it
// returns how many messages the peek returned and whether they were all
// there was up to the flush position the round began at.
func (s *captureSession) peekRound(ctx context.Context, peek *pgx.Conn, slot string, size int) (int, bool, error) {
	// stage times of the round, for its log line: the peek decodes the
	// whole round in the source before the first row arrives
	var t roundTimes
	t.start = time.Now()
	var flushed string
	if err := peek.QueryRow(ctx, "SELECT pg_current_wal_flush_lsn()::text").Scan(&flushed); err != nil {
		return 0, false, fmt.Errorf("read the WAL flush position: %w", err)
	}
	upto, err := change.ParseLSN(flushed)
	if err != nil {
		return 0, false, err
	}
	rows, err := peek.Query(ctx, `SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2::pg_lsn, $3,
		'proto_version', '1', 'publication_names', $4)`, slot, flushed, size, PublicationName(s.cfg.Cluster))
	if err != nil {
		return 0, false, fmt.Errorf("peek at slot %s: %w", slot, err)
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
			return n, false, err
		}
	}
	if err := rows.Err(); err != nil {
		return n, false, fmt.Errorf("peek at slot %s: %w", slot, err)
	}
	if s.cur != nil {
		return n, false, fmt.Errorf("%w: a peek at slot %s ended inside transaction %d", ErrProtocol, slot, s.cur.Xid)
	}
	t.lastRow = time.Now()
	if n == 0 {
		t.firstRow = t.lastRow
	}
	// Fewer messages than asked for: the peek decoded every record that
	// begins before upto (it stops at the first that ends at or after it,
	// or at the flush position, which is past upto), so every transaction
	// whose commit the slot would still decode before upto was published.
	complete := n < size
	if complete {
		s.seenEnd = max(s.seenEnd, upto)
	}
	if err := s.flushRun(ctx); err != nil {
		return n, false, err
	}
	if err := s.awaitAcks(ctx); err != nil { // and, once idle, confirms seenEnd
		return n, false, err
	}
	t.acked = time.Now()
	if s.confirmed > s.advanced {
		// the stream holds everything up to confirmed
		if _, err := s.meta.Exec(ctx, "SELECT pg_replication_slot_advance($1, $2::pg_lsn)", slot, s.confirmed.String()); err != nil {
			return n, false, fmt.Errorf("advance slot %s to %s: %w", slot, s.confirmed, err)
		}
		s.advanced = s.confirmed
	}
	s.log.Info("catch-up round", "size", size, "messages", n, "confirmed_lsn", s.confirmed, "complete", complete,
		"until_first_row", t.firstRow.Sub(t.start), "rows", t.lastRow.Sub(t.firstRow),
		"until_acked", t.acked.Sub(t.lastRow), "advance", time.Since(t.acked))
	return n, complete, nil
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
