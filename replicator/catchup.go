package replicator

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/xdcr/xdcr/replicator/change"
)

const (
	// defaultCatchUpRange is CaptureConfig.CatchUpRange's default.
	defaultCatchUpRange = 96 << 20
	// sqlCatchUpLag is how far the slot must be behind the source's WAL
	// for a session to begin with catch-up through SQL; a range that
	// would leave less than this behind it takes the rest.
	sqlCatchUpLag = 16 << 20
	// maxRangeGrowth bounds how far catchUp grows a range: a range's
	// result is materialized in the source (in temp files past work_mem)
	// before its first row is sent, so its size bounds the source's temp
	// space and how long publishing waits for it.
	maxRangeGrowth = 4
)

// CatchUpSlots is how many ranges catch-up through SQL has in the source
// at once, one being read and published while the next is decoded, each
// on a connection with a temporary replication slot of its own: the
// replication slots it needs free on the source.
const CatchUpSlots = 2

// catchUp reads a large backlog through pg_logical_slot_peek_binary_changes
// before the session starts streaming. The walsender sends every pgoutput
// message as a network write of its own; the SQL function decodes the same
// messages into one query result, sent in full buffers, which costs the
// source a fraction of the CPU (PERFORMANCE.md measured the decode of a
// pgbench backlog 8x faster this way).
//
// The backlog is read in consecutive ranges of WAL, each peeked on a
// connection of its own from a temporary copy of the slot, so that the
// source decodes the next range while this one is published: a peek
// returns nothing until it has decoded its whole range. A range [from,
// upto) holds exactly the transactions whose commit record begins in it:
// a peek up to upto decodes every record that begins before it, and a
// slot confirmed at from skips every commit that begins before from. The
// slot itself only advances to what the stream has acknowledged, so a
// crash at any point re-reads from the slot what the stream may lack, and
// the duplicate check on publish (s.published) skips what it already
// holds — exactly as when a streaming session restarts.
//
// Ranges go on until one ends at the source's WAL flush position with
// less than sqlCatchUpLag written since; the slot then advances to it,
// past WAL that held nothing to publish. That matters for what comes
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
	s.log.Info("capture catching up through SQL", "slot", slot, "behind_bytes", behind, "range_bytes", s.cfg.CatchUpRange)
	s.obs.State(StateStreaming, nil)

	ctx, cancel := context.WithCancel(ctx)
	var (
		free    []*peeker
		pending []*peekRange // scheduled, in WAL order
	)
	defer func() {
		cancel()
		for _, r := range pending {
			<-r.ready
			free = append(free, r.p)
		}
		for _, p := range free {
			p.close()
		}
	}()
	for range CatchUpSlots {
		p, err := openPeeker(ctx, s.cfg.DSN, slot)
		if errors.Is(err, errNoFreeSlot) {
			// decode with the peekers there are, or stream if none
			s.log.Warn("catch-up through SQL has fewer connections than it could use", "peekers", len(free), "want", CatchUpSlots, "err", err)
			break
		}
		if err != nil {
			return err
		}
		free = append(free, p)
		if p.at != s.advanced {
			return fmt.Errorf("%w: slot %s moved from %s to %s while capture started", ErrProtocol, slot, s.advanced, p.at)
		}
	}
	if len(free) == 0 {
		return nil
	}

	start, ranges, messages := time.Now(), 0, 0
	next, size := s.advanced, s.cfg.CatchUpRange
	for {
		for len(free) > 0 && s.drainTarget() == 0 {
			flushed, err := s.flushPosition(ctx)
			if err != nil {
				return err
			}
			upto, ok := nextRange(next, flushed, size, len(pending) == 0 && ranges == 0)
			if !ok {
				break
			}
			r := &peekRange{p: free[0], from: next, upto: upto, last: upto == flushed, ready: make(chan struct{})}
			free = free[1:]
			pending = append(pending, r)
			go r.run(ctx, PublicationName(s.cfg.Cluster))
			next, size = upto, min(2*size, maxRangeGrowth*s.cfg.CatchUpRange)
		}
		if len(pending) == 0 {
			break
		}
		r := pending[0]
		<-r.ready
		pending = pending[1:]
		free = append(free, r.p)
		n, err := s.readRange(ctx, r)
		if err != nil {
			return err
		}
		ranges++
		messages += n
		if _, err := s.report(ctx); err != nil { // how far capture has come, for lag
			return err
		}
		if s.confirmed-s.advanced >= change.LSN(maxRangeGrowth*s.cfg.CatchUpRange) {
			if err := s.advanceSlot(ctx, slot); err != nil {
				return err
			}
		}
	}
	if err := s.awaitAcks(ctx); err != nil { // and, once idle, confirms seenEnd
		return err
	}
	if err := s.advanceSlot(ctx, slot); err != nil {
		return err
	}
	s.log.Info("capture caught up through SQL", "ranges", ranges, "messages", messages,
		"duration", time.Since(start).Round(time.Millisecond), "confirmed_lsn", s.confirmed)
	return nil
}

// nextRange is where the range that begins at from ends, given the
// source's WAL flush position and the range's size; false when no range
// is worth it: less than sqlCatchUpLag is left (the first range is always
// taken). A range that would leave less than sqlCatchUpLag takes the rest.
func nextRange(from, flushed change.LSN, size int64, first bool) (change.LSN, bool) {
	left := int64(flushed) - int64(from)
	if left <= 0 || left < sqlCatchUpLag && !first {
		return 0, false
	}
	if left-size < sqlCatchUpLag {
		return flushed, true
	}
	return from + change.LSN(size), true
}

// flushPosition reads the source's WAL flush position.
func (s *captureSession) flushPosition(ctx context.Context) (change.LSN, error) {
	var flushed string
	if err := s.meta.QueryRow(ctx, "SELECT pg_current_wal_flush_lsn()::text").Scan(&flushed); err != nil {
		return 0, fmt.Errorf("read the WAL flush position: %w", err)
	}
	return change.ParseLSN(flushed)
}

// advanceSlot moves the slot to what the stream has acknowledged.
func (s *captureSession) advanceSlot(ctx context.Context, slot string) error {
	if s.confirmed <= s.advanced {
		return nil
	}
	if _, err := s.meta.Exec(ctx, "SELECT pg_replication_slot_advance($1, $2::pg_lsn)", slot, s.confirmed.String()); err != nil {
		return fmt.Errorf("advance slot %s to %s: %w", slot, s.confirmed, err)
	}
	s.advanced = s.confirmed
	return nil
}

// readRange decodes and publishes the transactions of one range; it
// returns how many messages the peek returned.
func (s *captureSession) readRange(ctx context.Context, r *peekRange) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	waited := time.Now()
	n := 0
	var firstRow time.Time
	for r.rows.Next() {
		if n == 0 {
			firstRow = time.Now()
		}
		n++
		// the decoder copies what it keeps out of the row
		ev, err := s.dec.decode(ctx, r.rows.RawValues()[0])
		if err == nil {
			err = s.handle(ctx, ev)
		}
		if err == nil && n%1024 == 0 {
			err = s.reapAcks(ctx, false)
		}
		if err != nil {
			r.rows.Close()
			return n, err
		}
	}
	if err := r.rows.Err(); err != nil {
		return n, fmt.Errorf("peek at slot %s up to %s: %w", r.p.slot, r.upto, err)
	}
	if s.cur != nil {
		return n, fmt.Errorf("%w: a peek at slot %s ended inside transaction %d", ErrProtocol, r.p.slot, s.cur.Xid)
	}
	lastRow := time.Now()
	if n == 0 {
		firstRow = lastRow
	}
	// every transaction whose commit the slot would decode before upto
	// was handed to the publisher
	s.seenEnd = max(s.seenEnd, r.upto)
	if err := s.flushRun(ctx); err != nil {
		return n, err
	}
	if err := s.reapAcks(ctx, false); err != nil {
		return n, err
	}
	s.log.Info("catch-up range", "from_lsn", r.from, "upto_lsn", r.upto, "messages", n, "last", r.last,
		"until_first_row", firstRow.Sub(r.began), "waited", max(firstRow.Sub(waited), 0),
		"rows", lastRow.Sub(firstRow))
	return n, nil
}

// A peekRange is one range of the backlog being decoded by a peeker.
type peekRange struct {
	p          *peeker
	from, upto change.LSN
	last       bool // upto was the source's WAL flush position
	began      time.Time
	rows       pgx.Rows
	err        error
	ready      chan struct{} // closed once rows or err is set
}

// run moves the peeker's slot to the range's start and starts the peek;
// its rows arrive once the source has decoded the whole range.
func (r *peekRange) run(ctx context.Context, publication string) {
	defer close(r.ready)
	r.began = time.Now()
	p := r.p
	if r.from < p.at {
		r.err = fmt.Errorf("%w: slot %s is at %s, past the range from %s", ErrProtocol, p.slot, p.at, r.from)
		return
	}
	if r.from > p.at {
		if _, err := p.conn.Exec(ctx, "SELECT pg_replication_slot_advance($1, $2::pg_lsn)", p.slot, r.from.String()); err != nil {
			r.err = fmt.Errorf("advance slot %s to %s: %w", p.slot, r.from, err)
			return
		}
		p.at = r.from
	}
	r.rows, r.err = p.conn.Query(ctx, `SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2::pg_lsn, NULL,
		'proto_version', '1', 'publication_names', $3)`, p.slot, r.upto.String(), publication)
	if r.err != nil {
		r.err = fmt.Errorf("peek at slot %s up to %s: %w", p.slot, r.upto, r.err)
	}
}

// A peeker is a connection that peeks at a temporary copy of the
// capture slot, its own: the copy moves ahead of what the stream has
// acknowledged, the slot never does. The copy goes when the connection
// does.
type peeker struct {
	conn *pgx.Conn
	slot string
	at   change.LSN // the copy's confirmed position
}

// openPeeker opens a connection with the session settings of the
// replication connection (pgoutput writes values with their types' output
// functions, which follow the session's settings, and a value must read
// the same whichever way it was decoded) and copies slot for it.
func openPeeker(ctx context.Context, dsn, slot string) (*peeker, error) {
	conn, err := connectSession(ctx, dsn, "xdcr-capture", nil)
	if err != nil {
		return nil, err
	}
	p := &peeker{conn: conn, slot: fmt.Sprintf("%.40s_peek_%d", slot, conn.PgConn().PID())}
	var at string
	err = conn.QueryRow(ctx, `SELECT lsn::text FROM pg_copy_logical_replication_slot($1, $2, true)`, slot, p.slot).Scan(&at)
	if err == nil {
		p.at, err = change.ParseLSN(at)
	}
	if err != nil {
		p.close()
		err = fmt.Errorf("copy slot %s to the temporary slot %s for catch-up: %w", slot, p.slot, err)
		if pgErr := (*pgconn.PgError)(nil); errors.As(err, &pgErr) && pgErr.Code == "53400" {
			// configuration_limit_exceeded: all replication slots are in use
			err = fmt.Errorf("%w (%w): raise max_replication_slots on the primary by %d for the fastest catch-up", errNoFreeSlot, err, CatchUpSlots)
		}
		return nil, err
	}
	return p, nil
}

// errNoFreeSlot is why a peeker could not be opened: the source has no
// replication slot left for its temporary copy.
var errNoFreeSlot = errors.New("no free replication slot")

func (p *peeker) close() { p.conn.Close(context.Background()) }
