package replicator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/xdcr/xdcr/internal/wait"
	"github.com/xdcr/xdcr/replicator/change"
)

// publisher is what capture needs from the transport.
type publisher interface {
	// Resume starts a publishing session. It returns the last batch the
	// stream holds from this publisher in epoch (nil when there is none),
	// so capture knows what was already published, and arms the publisher
	// so that the next batch can only be stored directly after the
	// stream's last message.
	Resume(ctx context.Context, epoch uint64) (*change.Batch, error)
	// Publish sends b without waiting for its acknowledgement; it blocks
	// while too many publishes are in flight. The channel yields exactly one
	// value: nil once the stream has stored b, or the error. Batches are
	// stored in the order they were published, with no gaps: once one fails,
	// every later one fails too, and the caller must Resume.
	Publish(ctx context.Context, b *change.Batch) (<-chan error, error)
}

// CaptureConfig configures the capture of one primary site.
type CaptureConfig struct {
	Cluster string
	Site    string // the origin recorded in every batch
	Epoch   uint64 // the fencing token recorded in every batch
	DSN     string // the site's PostgreSQL (a normal connection string)
	Tables  []Table
	// MaxBatchBytes bounds one published message (approximately: the sum
	// of the values plus a small per-change overhead).
	MaxBatchBytes int
	// FlushInterval paces the messages of whole transactions: a run of
	// committed transactions goes out once FlushInterval has passed since
	// the last publish, so a transaction waits at most that long to share
	// a message with later ones, and an isolated one does not wait.
	FlushInterval time.Duration
	// StatusInterval is the cadence of standby status updates to PostgreSQL.
	StatusInterval time.Duration
	// MaxInFlight bounds unacknowledged publishes; their size is bounded
	// too (maxInFlightBytes), because the client keeps each until its
	// acknowledgement and a large transaction's chunks are MaxBatchBytes
	// each.
	MaxInFlight int
	// HeartbeatInterval is how often an idle capture publishes a heartbeat,
	// so replicas can tell "idle" from "stalled".
	HeartbeatInterval time.Duration
	// ReadGulp is how long each read of the replication stream waits for
	// the source to send more while the source is far ahead (catch-up):
	// one read then takes in many changes instead of one. Negative turns
	// it off; it never applies once caught up.
	ReadGulp time.Duration
	// CatchUpRange is how much WAL the first range of catch-up through
	// SQL covers (see captureSession.catchUp); negative means the backlog
	// is always read through the replication protocol.
	CatchUpRange int64
	// Sequences are the previous primary's sequence values, which the
	// first start of a new epoch advances this site's sequences past.
	Sequences map[string]int64
}

func (c *CaptureConfig) withDefaults() CaptureConfig {
	out := *c
	if out.MaxBatchBytes <= 0 {
		out.MaxBatchBytes = 1 << 20
	}
	if out.FlushInterval <= 0 {
		out.FlushInterval = 5 * time.Millisecond
	}
	if out.StatusInterval <= 0 {
		out.StatusInterval = time.Second
	}
	if out.MaxInFlight <= 0 {
		out.MaxInFlight = 256
	}
	if out.HeartbeatInterval <= 0 {
		out.HeartbeatInterval = time.Second
	}
	if out.ReadGulp == 0 {
		out.ReadGulp = defaultReadGulp
	}
	if out.CatchUpRange == 0 {
		out.CatchUpRange = defaultCatchUpRange
	}
	return out
}

// Capture streams the changes of a primary site's PostgreSQL into the
// change stream. Run it only while this site is the primary of Epoch.
type Capture struct {
	cfg   CaptureConfig
	pub   publisher
	lease lease
	log   *slog.Logger
	obs   Observer

	mu      sync.Mutex
	drainTo change.LSN    // 0, or the WAL position to publish up to before stopping
	drained chan struct{} // closed once the drain is done
	handoff change.LSN    // the commit LSN of the last published transaction, once drained
}

// lease tells capture whether its site may still publish as the primary of
// its epoch.
type lease interface {
	// Valid reports whether Raft confirmed the site as the primary of the
	// epoch recently enough (a majority accepted one of its reports).
	Valid() bool
}

// ErrLeaseLost stops capture when its lease ran out: the site could not
// confirm through Raft that it is still the primary. It must not publish
// (and should fence its database) until it can.
var ErrLeaseLost = errors.New("the primary's lease ran out")

// ErrDrained stops capture once a drain is done (see [Capture.Drain]).
var ErrDrained = errors.New("capture drained")

// NewCapture returns a capture; nothing runs until Run. obs and lease may
// be nil (no lease: always valid).
func NewCapture(cfg CaptureConfig, pub publisher, l lease, log *slog.Logger, obs Observer) *Capture {
	if obs == nil {
		obs = NopObserver{}
	}
	return &Capture{cfg: cfg.withDefaults(), pub: pub, lease: l, log: log.With("component", "capture"), obs: obs,
		drained: make(chan struct{})}
}

// Drain asks the running capture to publish every transaction that
// commits before WAL position upTo, then stop; it returns the commit LSN of
// the last transaction published (the handoff), once the stream has
// acknowledged it. The database must already refuse writes (fenced), or
// transactions after upTo would be left behind. Drain blocks until Run has
// done so or ctx ends.
func (c *Capture) Drain(ctx context.Context, upTo change.LSN) (change.LSN, error) {
	c.mu.Lock()
	c.drainTo = max(upTo, 1)
	c.mu.Unlock()
	select {
	case <-c.drained:
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.handoff, nil
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

func (c *Capture) drainTarget() change.LSN {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.drainTo
}

func (c *Capture) finishDrain(handoff change.LSN) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.handoff = handoff
	close(c.drained)
}

// Run captures until ctx ends (it then returns ctx.Err()) or a problem that
// a retry cannot fix: a lost slot or a table that cannot be replicated.
// Connection failures and refused publishes restart the session from the
// slot's confirmed position after a backoff.
func (c *Capture) Run(ctx context.Context) error {
	backoff := newBackoff(500*time.Millisecond, 15*time.Second)
	for {
		err := c.session(ctx)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, ErrDrained) || errors.Is(err, ErrLeaseLost) {
			return err
		}
		var perm *PermanentError
		if errors.As(err, &perm) {
			c.obs.State(StatePaused, err)
			c.log.Error("capture stopped", "err", err)
			return err
		}
		c.obs.State(StateReconnecting, err)
		delay := backoff.next()
		c.log.Warn("capture session ended; restarting", "err", err, "retry_in", delay)
		if err := wait.Sleep(ctx, delay); err != nil {
			return err
		}
	}
}

// session runs one replication connection from the slot's confirmed
// position. It always returns an error; ctx.Err() when it was stopped.
func (c *Capture) session(ctx context.Context) error {
	meta, err := ConnectMeta(ctx, c.cfg.DSN)
	if err != nil {
		return err
	}
	defer meta.Close(context.WithoutCancel(ctx))

	if err := preflightSource(ctx, meta, c.cfg); err != nil {
		return err
	}
	last, err := c.pub.Resume(ctx, c.cfg.Epoch)
	if err != nil {
		return fmt.Errorf("read the end of the change stream: %w", err)
	}
	published := publishedUpTo(last, c.cfg.Site, c.cfg.Epoch)
	slot, err := c.ensureSlot(ctx, meta, last, published)
	if err != nil {
		return err
	}
	// the slot exists: every write from now on is captured
	if err := Unfence(ctx, meta, c.cfg.Tables); err != nil {
		return err
	}

	s := &captureSession{
		Capture:   c,
		meta:      meta,
		dec:       newDecoder(typeNames{meta}),
		confirmed: slot.confirmed,
		advanced:  slot.confirmed,
		published: published,
		seenEnd:   slot.confirmed,
	}
	s.acked = lastStored(last, published)
	if c.cfg.CatchUpRange > 0 {
		if err := s.catchUp(ctx); err != nil {
			return err
		}
	}

	repl, sock, err := connectReplication(ctx, c.cfg.DSN, max(c.cfg.ReadGulp, 0))
	if err != nil {
		return err
	}
	defer repl.Close(context.WithoutCancel(ctx))
	// the loop reads without a context: ending the session interrupts it
	defer context.AfterFunc(ctx, sock.Interrupt)()
	s.repl, s.sock = repl, sock
	args := []string{"proto_version '1'", fmt.Sprintf("publication_names '%s'", PublicationName(c.cfg.Cluster))}
	if err := pglogrepl.StartReplication(ctx, repl, SlotName(c.cfg.Cluster), 0,
		pglogrepl.StartReplicationOptions{PluginArgs: args}); err != nil {
		return fmt.Errorf("start replication from slot %s: %w", SlotName(c.cfg.Cluster), err)
	}
	c.log.Info("capture streaming", "slot", SlotName(c.cfg.Cluster), "confirmed_lsn", s.confirmed,
		"published_lsn", s.published, "epoch", c.cfg.Epoch)
	c.obs.State(StateStreaming, nil)
	return s.loop(ctx)
}

const (
	// defaultReadGulp is CaptureConfig.ReadGulp's default.
	defaultReadGulp = 2 * time.Millisecond
	// maxInFlightBytes bounds the unacknowledged publishes by size (as
	// changeSize counts it); one publish always goes.
	maxInFlightBytes = 32 << 20
	// catchUpLag is how far behind the source's WAL end (sampled at each
	// status report) the stream must be for reads to be gathered (see
	// streamConn); a commit decoded within freshCommit of its time ends
	// that at once.
	catchUpLag  = 1 << 20
	freshCommit = 20 * time.Millisecond
)

type slotState struct {
	confirmed change.LSN
}

// ensureSlot checks the slot, or creates it on the very first start. A slot
// that vanished after changes were published is never recreated: the changes
// between its last confirmed position and now would be lost without a trace.
func (c *Capture) ensureSlot(ctx context.Context, meta *pgx.Conn, last *change.Batch, published change.LSN) (slotState, error) {
	name := SlotName(c.cfg.Cluster)
	var (
		plugin    string
		walStatus *string
		confirmed *string
	)
	stored, err := captureEpoch(ctx, meta, c.cfg.Cluster)
	if err != nil {
		return slotState{}, err
	}
	if stored > c.cfg.Epoch {
		return slotState{}, fmt.Errorf("this site captured epoch %d already, but was asked to capture epoch %d", stored, c.cfg.Epoch)
	}
	// this site's first term as primary of its epoch after another site's
	newEpoch := stored < c.cfg.Epoch && (stored != 0 || c.cfg.Epoch > 1)
	err = meta.QueryRow(ctx, `SELECT plugin, wal_status, confirmed_flush_lsn::text
		FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()`, name).
		Scan(&plugin, &walStatus, &confirmed)
	if err == nil && newEpoch {
		// a slot from an earlier time this site was primary: it would
		// replay what apply wrote here since, as this site's changes
		if _, err := meta.Exec(ctx, `SELECT pg_drop_replication_slot($1)`, name); err != nil {
			return slotState{}, fmt.Errorf("drop replication slot %s left from an earlier epoch: %w", name, err)
		}
		c.log.Info("dropped the replication slot of an earlier epoch", "slot", name, "epoch", c.cfg.Epoch)
		err = pgx.ErrNoRows
	}
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		if stored == c.cfg.Epoch || (last != nil && last.Origin == c.cfg.Site && last.Epoch == c.cfg.Epoch) {
			return slotState{}, permanent(fmt.Errorf("%w: replication slot %s is missing on site %s, but the change stream "+
				"already holds epoch %d up to %s: the changes committed since the slot's last confirmed position "+
				"cannot be recovered", ErrSlotLost, name, c.cfg.Site, c.cfg.Epoch, published),
				"do not recreate the slot by hand; re-seed every replica with `xdcr sync SITE` (or promote another site), then restart this agent")
		}
		var lsn string
		if err := meta.QueryRow(ctx, `SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')`, name).Scan(&lsn); err != nil {
			return slotState{}, fmt.Errorf("create replication slot %s: %w", name, err)
		}
		at, err := change.ParseLSN(lsn)
		if err != nil {
			return slotState{}, err
		}
		c.log.Info("created replication slot", "slot", name, "lsn", at)
		if newEpoch {
			// logical replication carries column values, not sequences:
			// start them above what the old primary handed out
			set, err := AdvanceSequences(ctx, meta, c.cfg.Tables, c.cfg.Sequences)
			if err != nil {
				return slotState{}, err
			}
			if len(set) > 0 {
				c.log.Info("advanced sequences for the new epoch", "epoch", c.cfg.Epoch, "sequences", set)
			}
		}
		// Mark the start of this epoch's history in the stream, so that a
		// slot that disappears later is recognised as lost.
		done, err := c.pub.Publish(ctx, &change.Batch{Origin: c.cfg.Site, Epoch: c.cfg.Epoch,
			Heartbeat: &change.Heartbeat{WALEnd: at, LastLSN: published, Time: time.Now().UTC()}})
		if err == nil {
			err = waitAck(ctx, done)
		}
		if err != nil {
			return slotState{}, fmt.Errorf("publish the start of epoch %d: %w", c.cfg.Epoch, err)
		}
		if _, err := c.pub.Resume(ctx, c.cfg.Epoch); err != nil {
			return slotState{}, fmt.Errorf("read the end of the change stream: %w", err)
		}
		if err := setCaptureEpoch(ctx, meta, c.cfg.Cluster, c.cfg.Epoch, at); err != nil {
			return slotState{}, err
		}
		return slotState{confirmed: at}, nil
	case err != nil:
		return slotState{}, fmt.Errorf("read replication slot %s: %w", name, err)
	}
	if plugin != "pgoutput" {
		return slotState{}, permanent(fmt.Errorf("replication slot %s uses plugin %q, not pgoutput", name, plugin),
			"the slot name is reserved for xdcr: drop that slot (SELECT pg_drop_replication_slot('"+name+"')) and restart")
	}
	if walStatus != nil && *walStatus == "lost" {
		return slotState{}, permanent(fmt.Errorf("%w: replication slot %s on site %s was invalidated (wal_status lost): "+
			"PostgreSQL removed WAL that the change stream still needed (max_slot_wal_keep_size), so the replicas "+
			"miss transactions that cannot be recovered from here and must be re-synced", ErrSlotLost, name, c.cfg.Site),
			"re-seed every replica site: run `xdcr sync SITE --config FILE` for each one (the first replaces the invalidated slot "+
				"with a new one), then restart this agent; raise max_slot_wal_keep_size (or set capture.max_retained_wal to be "+
				"warned well before it) so that it does not happen again")
	}
	if stored == 0 {
		// a slot made before capture ever ran here (by xdcr sync)
		if err := setCaptureEpoch(ctx, meta, c.cfg.Cluster, c.cfg.Epoch, 0); err != nil {
			return slotState{}, err
		}
	}
	var st slotState
	if confirmed != nil {
		if st.confirmed, err = change.ParseLSN(*confirmed); err != nil {
			return slotState{}, err
		}
	}
	return st, nil
}

// captureSchema records, in the primary's own database, which epoch its
// capture slot belongs to: a site that becomes primary again in a later
// epoch must start from a new slot, and a slot that vanished within its
// epoch is lost. It is not in the publication, so it is not replicated.
const captureSchema = `
CREATE SCHEMA IF NOT EXISTS xdcr;
CREATE TABLE IF NOT EXISTS xdcr.capture_state (
	cluster    text PRIMARY KEY,
	epoch      bigint      NOT NULL,
	slot_lsn   pg_lsn,
	started_at timestamptz NOT NULL DEFAULT now()
);`

func captureEpoch(ctx context.Context, conn *pgx.Conn, cluster string) (uint64, error) {
	if _, err := conn.Exec(ctx, captureSchema); err != nil {
		return 0, permanent(fmt.Errorf("create xdcr.capture_state: %w", err),
			"the agent's role needs CREATE on the database (or create schema xdcr and its objects as the owner)")
	}
	var epoch uint64
	err := conn.QueryRow(ctx, `SELECT epoch FROM xdcr.capture_state WHERE cluster = $1`, cluster).Scan(&epoch)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("read xdcr.capture_state: %w", err)
	}
	return epoch, nil
}

func setCaptureEpoch(ctx context.Context, conn *pgx.Conn, cluster string, epoch uint64, slot change.LSN) error {
	_, err := conn.Exec(ctx, `INSERT INTO xdcr.capture_state (cluster, epoch, slot_lsn) VALUES ($1, $2, $3::pg_lsn)
		ON CONFLICT (cluster) DO UPDATE SET epoch = $2, slot_lsn = $3::pg_lsn, started_at = now()`, cluster, epoch, slot.String())
	if err != nil {
		return fmt.Errorf("record the capture's epoch: %w", err)
	}
	return nil
}

// lastStored is the header of the last whole transaction the stream holds
// (published is publishedUpTo(last, …)), which a new session reports as
// the source's last commit until it publishes more. When the stream ends
// in a heartbeat or in a transaction cut short, only its LSN is known (the
// commit time stays zero). Left empty after such an end, the report kept
// the last commit of the session before, which a session that lost its
// lease may never have reported: a stopped replica then showed 0 s of lag
// until the next write on the primary.
func lastStored(last *change.Batch, published change.LSN) change.Txn {
	if published == 0 {
		return change.Txn{}
	}
	if last.Heartbeat == nil && (last.Chunk == nil || last.Chunk.Final) {
		return header(&last.Txns[len(last.Txns)-1])
	}
	return change.Txn{LSN: published}
}

// publishedUpTo is the commit LSN of the last whole transaction the stream
// holds for this origin and epoch, read from the last batch in the stream.
func publishedUpTo(last *change.Batch, origin string, epoch uint64) change.LSN {
	if last == nil || last.Origin != origin || last.Epoch != epoch {
		return 0
	}
	switch {
	case last.Heartbeat != nil:
		return last.Heartbeat.LastLSN
	case last.Chunk != nil && !last.Chunk.Final:
		// A transaction was cut short: it will be published again, whole.
		return last.Txns[0].PrevLSN
	default:
		return last.LastLSN()
	}
}

// captureSession is the state of one replication connection.
type captureSession struct {
	*Capture
	repl *pgconn.PgConn
	sock *streamConn
	meta *pgx.Conn
	dec  *decoder

	confirmed change.LSN // what the slot may advance to: everything up to it is stored in the stream
	advanced  change.LSN // where catch-up through SQL last moved the slot
	restart   change.LSN // the slot's restart_lsn at the last report; 0 when it has none
	seenEnd   change.LSN // end of the last commit (or keepalive position) processed
	received  change.LSN // how far the walsender has read the WAL, as far as its messages tell
	published change.LSN // commit LSN of the last transaction handed to the publisher

	// the run of whole transactions waiting to be published
	run      []change.Txn
	runBytes int
	runEnd   change.LSN // end LSN of the run's last transaction

	// the transaction being decoded
	cur       *change.Txn
	curBytes  int
	curChunks uint32 // chunks of cur already published
	skip      bool   // cur is already in the stream

	dry         bool // the last read found nothing more to decode
	inflight    []inflight
	flying      int        // bytes of the inflight publishes
	acked       change.Txn // header of the last transaction the stream acknowledged
	lastPublish time.Time  // when anything was last handed to the publisher
}

type inflight struct {
	done    <-chan error
	confirm change.LSN // slot position this batch completes, 0 for a partial chunk
	last    change.Txn // header of the batch's last complete transaction (zero if none)
	txns    int        // complete transactions in the batch
	changes int
	bytes   int // size of the batch's changes
}

func (s *captureSession) loop(ctx context.Context) error {
	now := time.Now()
	nextStatus := now
	s.lastPublish = now
	for {
		if err := s.reapAcks(ctx, false); err != nil {
			return err
		}
		now = time.Now()
		// a run goes out once the flush interval since the last publish has
		// passed and everything received has been decoded (see streamConn)
		if len(s.run) > 0 && s.dry && now.Sub(s.lastPublish) >= s.cfg.FlushInterval {
			if err := s.flushRun(ctx); err != nil {
				return err
			}
		}
		if target := s.drainTarget(); target != 0 {
			if err := s.drain(ctx, target); err != nil {
				return err
			}
		}
		if s.idle() && now.Sub(s.lastPublish) >= s.cfg.HeartbeatInterval {
			if err := s.heartbeat(ctx, now); err != nil {
				return err
			}
		}
		if !now.Before(nextStatus) {
			if err := s.sendStatus(ctx, false); err != nil {
				return err
			}
			if _, err := s.report(ctx); err != nil {
				return err
			}
			nextStatus = now.Add(s.cfg.StatusInterval)
		}
		deadline := nextStatus
		if t := s.lastPublish.Add(s.cfg.HeartbeatInterval); t.Before(deadline) && s.idle() {
			deadline = t
		}
		if len(s.run) > 0 {
			if t := s.lastPublish.Add(s.cfg.FlushInterval); t.Before(deadline) {
				deadline = t
			}
		}
		if s.drainTarget() != 0 {
			if t := now.Add(50 * time.Millisecond); t.Before(deadline) {
				deadline = t
			}
		}
		if len(s.inflight) > 0 {
			// come back soon to collect acknowledgements
			if t := now.Add(5 * time.Millisecond); t.Before(deadline) {
				deadline = t
			}
		}
		if !deadline.After(now) {
			deadline = now.Add(time.Millisecond)
		}
		s.sock.Pace(s.lastPublish.Add(s.cfg.FlushInterval), len(s.run) > 0)
		// no context per message: a timer for each would cost more than
		// decoding it
		if err := s.sock.ReadBy(now, deadline); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("replication connection: %w", err)
		}
		raw, err := s.repl.ReceiveMessage(context.Background())
		s.dry = err != nil
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if pgconn.Timeout(err) {
				continue
			}
			return fmt.Errorf("receive from replication slot: %w", err)
		}
		switch m := raw.(type) {
		case *pgproto3.CopyData:
			if err := s.handleCopyData(ctx, m.Data); err != nil {
				return err
			}
		case *pgproto3.ErrorResponse:
			return fmt.Errorf("replication stream: %w", pgconn.ErrorResponseToPgError(m))
		}
	}
}

func (s *captureSession) handleCopyData(ctx context.Context, data []byte) error {
	if len(data) == 0 {
		return nil
	}
	switch data[0] {
	case pglogrepl.PrimaryKeepaliveMessageByteID:
		ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(data[1:])
		if err != nil {
			return fmt.Errorf("%w: %w", ErrProtocol, err)
		}
		if s.cur == nil {
			s.seenEnd = max(s.seenEnd, change.LSN(ka.ServerWALEnd))
		}
		// the walsender has read the WAL up to here (other databases'
		// writes too): the stream is not behind by what it skipped
		s.received = max(s.received, change.LSN(ka.ServerWALEnd))
		if ka.ReplyRequested {
			return s.sendStatus(ctx, false)
		}
		return nil
	case pglogrepl.XLogDataByteID:
		xld, err := pglogrepl.ParseXLogData(data[1:])
		if err != nil {
			return fmt.Errorf("%w: %w", ErrProtocol, err)
		}
		s.received = max(s.received, change.LSN(xld.WALStart))
		ev, err := s.dec.decode(ctx, xld.WALData)
		if err != nil {
			return err
		}
		return s.handle(ctx, ev)
	}
	return nil
}

func (s *captureSession) handle(ctx context.Context, ev event) error {
	switch ev.kind {
	case evBegin:
		txn := ev.begin
		txn.PrevLSN = s.published
		s.cur, s.curBytes, s.curChunks = &txn, 0, 0
		s.skip = txn.LSN <= s.published
	case evChange:
		if s.skip {
			return nil
		}
		s.cur.Changes = append(s.cur.Changes, ev.change)
		s.curBytes += changeSize(&ev.change)
		if s.curBytes >= s.cfg.MaxBatchBytes {
			return s.publishChunk(ctx, false, 0)
		}
	case evCommit:
		s.seenEnd = max(s.seenEnd, ev.commit.endLSN)
		if s.sock != nil && s.cur != nil && time.Since(s.cur.CommitTime) < freshCommit {
			s.sock.Behind(false) // caught up: read eagerly
		}
		if s.curChunks > 0 && !s.skip {
			err := s.publishChunk(ctx, true, ev.commit.endLSN)
			s.cur = nil
			return err
		}
		txn := s.cur
		s.cur = nil
		switch {
		case s.skip:
		case len(txn.Changes) == 0:
			// nothing of ours changed; the slot may pass it once idle
		default:
			if len(s.run) > 0 && s.runBytes+s.curBytes > s.cfg.MaxBatchBytes {
				if err := s.flushRun(ctx); err != nil {
					return err
				}
			}
			s.run = append(s.run, *txn)
			s.runBytes += s.curBytes
			s.runEnd = ev.commit.endLSN
			s.published = txn.LSN
			if s.runBytes >= s.cfg.MaxBatchBytes {
				return s.flushRun(ctx)
			}
		}
	}
	return nil
}

// publishChunk publishes the changes of cur gathered so far as its next
// chunk. Whole transactions waiting in the run go first, to keep order.
func (s *captureSession) publishChunk(ctx context.Context, final bool, endLSN change.LSN) error {
	if err := s.flushRun(ctx); err != nil {
		return err
	}
	b := &change.Batch{
		Origin: s.cfg.Site,
		Epoch:  s.cfg.Epoch,
		Txns:   []change.Txn{*s.cur},
		Chunk:  &change.Chunk{Index: s.curChunks, Final: final},
	}
	s.curChunks++
	var (
		confirm change.LSN
		f       = inflight{changes: len(b.Txns[0].Changes), bytes: s.curBytes}
	)
	s.curBytes = 0
	if final {
		confirm = endLSN
		s.published = s.cur.LSN
		f.last, f.txns = header(s.cur), 1
	}
	err := s.publish(ctx, b, confirm, f)
	// Publish encoded b before it returned: the next chunk gathers into the
	// same array (a large transaction's chunks each grew one from nothing:
	// a quarter of the agent's CPU in a bulk catch-up)
	s.cur.Changes = s.cur.Changes[:0]
	return err
}

func (s *captureSession) flushRun(ctx context.Context) error {
	if len(s.run) == 0 {
		return nil
	}
	b := &change.Batch{Origin: s.cfg.Site, Epoch: s.cfg.Epoch, Txns: s.run}
	f := inflight{last: header(&s.run[len(s.run)-1]), txns: len(s.run), bytes: s.runBytes}
	for i := range s.run {
		f.changes += len(s.run[i].Changes)
	}
	// The run stays buffered while publish waits for room in the window,
	// so an acknowledgement that empties the window meanwhile does not
	// confirm the slot past it (idleConfirm).
	err := s.publish(ctx, b, s.runEnd, f)
	clear(s.run) // Publish encoded b before it returned: the array holds the next run
	s.run, s.runBytes = s.run[:0], 0
	return err
}

// publish hands b to the publisher; f describes what its acknowledgement
// completes.
func (s *captureSession) publish(ctx context.Context, b *change.Batch, confirm change.LSN, f inflight) error {
	if s.lease != nil && !s.lease.Valid() {
		return ErrLeaseLost
	}
	for len(s.inflight) >= s.cfg.MaxInFlight || len(s.inflight) > 0 && s.flying+f.bytes > maxInFlightBytes {
		if err := s.reapAcks(ctx, true); err != nil {
			return err
		}
	}
	done, err := s.pub.Publish(ctx, b)
	if err != nil {
		return fmt.Errorf("publish transactions up to %s: %w", b.LastLSN(), err)
	}
	f.done, f.confirm = done, confirm
	s.inflight = append(s.inflight, f)
	s.flying += f.bytes
	s.lastPublish = time.Now()
	return nil
}

// reapAcks collects acknowledgements in publish order and advances the
// position the slot may be confirmed to. With block set it waits for at
// least the oldest one.
func (s *captureSession) reapAcks(ctx context.Context, block bool) error {
	for len(s.inflight) > 0 {
		head := s.inflight[0]
		var err error
		if block {
			select {
			case err = <-head.done:
			case <-ctx.Done():
				return ctx.Err()
			}
			block = false
		} else {
			select {
			case err = <-head.done:
			default:
				return s.idleConfirm()
			}
		}
		if err != nil {
			return fmt.Errorf("publish to the change stream: %w", err)
		}
		s.confirmed = max(s.confirmed, head.confirm)
		if head.txns > 0 {
			s.acked = head.last
		}
		if head.txns > 0 || head.changes > 0 {
			s.obs.Published(head.txns, head.changes)
		}
		s.flying -= head.bytes
		s.inflight[0] = inflight{}
		s.inflight = s.inflight[1:]
	}
	return s.idleConfirm()
}

// awaitAcks waits for the acknowledgement of everything in flight.
func (s *captureSession) awaitAcks(ctx context.Context) error {
	for len(s.inflight) > 0 {
		if err := s.reapAcks(ctx, true); err != nil {
			return err
		}
	}
	return s.idleConfirm()
}

// idleConfirm lets the slot pass transactions that had nothing to publish,
// but only while nothing is buffered or in flight.
func (s *captureSession) idleConfirm() error {
	if len(s.inflight) == 0 && len(s.run) == 0 && s.cur == nil {
		s.confirmed = max(s.confirmed, s.seenEnd)
	}
	return nil
}

func (s *captureSession) sendStatus(ctx context.Context, reply bool) error {
	err := pglogrepl.SendStandbyStatusUpdate(ctx, s.repl, pglogrepl.StandbyStatusUpdate{
		WALWritePosition: pglogrepl.LSN(s.confirmed),
		ReplyRequested:   reply,
	})
	if err != nil {
		return fmt.Errorf("send standby status: %w", err)
	}
	return nil
}

// drain works towards a drain to WAL position target: it publishes what
// is buffered at once and, once every transaction before target is
// acknowledged, publishes a last heartbeat naming the handoff and stops.
func (s *captureSession) drain(ctx context.Context, target change.LSN) error {
	if s.cur != nil {
		return nil // a transaction is being decoded: finish it first
	}
	if err := s.flushRun(ctx); err != nil {
		return err
	}
	if s.seenEnd < target {
		// ask the walsender where it is: its keepalive moves seenEnd
		return s.sendStatus(ctx, true)
	}
	if err := s.awaitAcks(ctx); err != nil {
		return err
	}
	hb := &change.Heartbeat{WALEnd: s.seenEnd, LastLSN: s.published, Time: time.Now().UTC()}
	done, err := s.pub.Publish(ctx, &change.Batch{Origin: s.cfg.Site, Epoch: s.cfg.Epoch, Heartbeat: hb})
	if err != nil {
		return fmt.Errorf("publish the handoff: %w", err)
	}
	if err := waitAck(ctx, done); err != nil {
		return fmt.Errorf("publish the handoff: %w", err)
	}
	s.confirmed = max(s.confirmed, s.seenEnd)
	if err := s.sendStatus(ctx, false); err != nil {
		return err
	}
	s.log.Info("capture drained", "handoff_lsn", s.published, "wal_lsn", s.seenEnd)
	s.finishDrain(s.published)
	return ErrDrained
}

// idle reports whether nothing is being decoded, buffered or published.
func (s *captureSession) idle() bool {
	return s.cur == nil && len(s.run) == 0 && len(s.inflight) == 0
}

// heartbeat publishes the source's position while nothing else is
// published, and asks the walsender for its position for the next one.
func (s *captureSession) heartbeat(ctx context.Context, now time.Time) error {
	hb := &change.Heartbeat{WALEnd: s.seenEnd, LastLSN: s.published, Time: now.UTC()}
	if err := s.publish(ctx, &change.Batch{Origin: s.cfg.Site, Epoch: s.cfg.Epoch, Heartbeat: hb}, s.seenEnd, inflight{}); err != nil {
		return err
	}
	return s.sendStatus(ctx, true)
}

// report tells the observer where capture stands; it returns the source's
// WAL insert position.
func (s *captureSession) report(ctx context.Context) (change.LSN, error) {
	var (
		wal     string
		restart *string
	)
	err := s.meta.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text,
			(SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1)`,
		SlotName(s.cfg.Cluster)).Scan(&wal, &restart)
	if err != nil {
		return 0, fmt.Errorf("read the WAL position: %w", err)
	}
	p := SourceProgress{SentLSN: s.seenEnd, LastCommitLSN: s.acked.LSN, LastCommitTime: s.acked.CommitTime}
	if p.WALLSN, err = change.ParseLSN(wal); err != nil {
		return 0, err
	}
	s.restart = 0
	if restart != nil {
		if s.restart, err = change.ParseLSN(*restart); err != nil {
			return 0, err
		}
		p.RetainedWALBytes = int64(p.WALLSN) - int64(s.restart)
	}
	if s.sock != nil {
		s.sock.Behind(p.WALLSN > s.received+catchUpLag)
	}
	s.obs.Source(p)
	return p.WALLSN, nil
}

// changeSize approximates the encoded size of a change.
func changeSize(c *change.Change) int {
	n := 8
	for _, v := range c.Old {
		n += 5 + len(v.Data)
	}
	for _, v := range c.New {
		n += 5 + len(v.Data)
	}
	return n + 4*len(c.Truncated)
}

// header is a transaction without its changes.
func header(t *change.Txn) change.Txn {
	h := *t
	h.Changes = nil
	return h
}

func waitAck(ctx context.Context, done <-chan error) error {
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}
