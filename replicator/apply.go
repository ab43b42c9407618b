package replicator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/xdcr/xdcr/internal/wait"
	"github.com/xdcr/xdcr/replicator/change"
	"github.com/xdcr/xdcr/transport"
)

// subscriber is what apply needs from the transport.
type subscriber interface {
	// Subscribe delivers the messages of stream that come after sequence
	// afterSeq, in stream order, without gaps other than deleted messages.
	// The channel is closed when the subscription ends; stop ends it and
	// returns the error that ended it, if any. stop may be called twice.
	Subscribe(ctx context.Context, stream string, afterSeq uint64) (msgs <-chan change.Delivery, stop func() error, err error)
}

// ApplyConfig configures the apply pipeline of one replica site.
type ApplyConfig struct {
	Cluster string
	Site    string
	DSN     string // the site's PostgreSQL
	// Primary and Epoch name the current primary.
	Primary string
	Epoch   uint64
	// History says how earlier epochs ended, oldest first. A site applies
	// each epoch it missed from that epoch's primary's stream, up to the
	// epoch's handoff, before it follows the next primary.
	History []EpochEnd
	// StreamOf names the local stream that holds a site's changes.
	StreamOf func(site string) string
	// MaxBatchTxns and MaxBatchBytes bound how many source transactions
	// (and how many bytes of messages) one target transaction may group.
	MaxBatchTxns  int
	MaxBatchBytes int
	// SynchronousCommit keeps the replica server's synchronous_commit for
	// apply's session (on by default: every target commit waits for its
	// WAL flush); false turns it off. Off is safe for exactly-once (the
	// position commits with the data, so a crash loses both together and
	// they are applied again), but readers of the replica see its data go
	// back after a crash of its PostgreSQL until apply writes it again.
	SynchronousCommit bool
	// AutoAddColumns adds a column the source has and the replica lacks
	// (nullable, no default) instead of pausing on the difference.
	AutoAddColumns bool
}

// EpochEnd says how an epoch ended (see checkpoints.EpochEnd).
type EpochEnd struct {
	Epoch     uint64
	Primary   string
	Successor string
	// EndLSN is the commit LSN of the epoch's last transaction that the
	// successor applied: every site applies the epoch up to exactly here.
	EndLSN change.LSN
}

// errEpochDone ends a session that applied an ended epoch up to its
// handoff: the next session follows the next primary.
var errEpochDone = errors.New("epoch applied up to its handoff")

// DivergedError says a site applied transactions of an ended epoch beyond
// the handoff: they were lost in a failover, and the site must be re-seeded.
type DivergedError struct {
	Site    string
	Epoch   uint64
	Primary string
	Applied change.LSN
	EndLSN  change.LSN
}

func (e *DivergedError) Error() string {
	return fmt.Sprintf("site %s applied %s's transactions of epoch %d up to %s, but that epoch ended at %s: "+
		"the transactions after it were lost in a failover and the site has diverged; fix: re-seed it with `xdcr sync %s`",
		e.Site, e.Primary, e.Epoch, e.Applied, e.EndLSN, e.Site)
}

// following is the epoch a session applies: the stream of origin, the
// transactions of epoch, up to end (0 for the current, open epoch).
type following struct {
	origin string
	epoch  uint64
	end    change.LSN
	open   bool
}

// follow decides which epoch's stream a site at pos reads next.
func (c *ApplyConfig) follow(pos AppliedPosition) (following, error) {
	if pos.Origin == "" || pos.Epoch >= c.Epoch {
		return following{origin: c.Primary, epoch: c.Epoch, open: true}, nil
	}
	ends := make(map[uint64]EpochEnd, len(c.History))
	for _, e := range c.History {
		ends[e.Epoch] = e
	}
	origin, lsn := pos.Origin, pos.LSN
	for epoch := pos.Epoch; epoch < c.Epoch; epoch++ {
		end, ok := ends[epoch]
		if !ok {
			return following{}, fmt.Errorf("site %s is at epoch %d, but the cluster's history does not say how that epoch ended", c.Site, epoch)
		}
		if epoch == pos.Epoch && origin != end.Primary {
			return following{}, fmt.Errorf("site %s applied epoch %d from %s, but %s was the primary of that epoch", c.Site, epoch, origin, end.Primary)
		}
		switch {
		case lsn > end.EndLSN:
			return following{}, permanent(&DivergedError{Site: c.Site, Epoch: epoch, Primary: end.Primary, Applied: lsn, EndLSN: end.EndLSN}, "")
		case lsn < end.EndLSN:
			return following{origin: end.Primary, epoch: epoch, end: end.EndLSN}, nil
		}
		origin, lsn = end.Successor, 0
	}
	return following{origin: c.Primary, epoch: c.Epoch, open: true}, nil
}

func (c *ApplyConfig) withDefaults() ApplyConfig {
	out := *c
	if out.MaxBatchTxns <= 0 {
		out.MaxBatchTxns = 1000
	}
	if out.MaxBatchBytes <= 0 {
		out.MaxBatchBytes = 8 << 20
	}
	return out
}

// AppliedPosition is how far a replica has applied the change stream. It is
// stored in xdcr.apply_position in the same transaction as the data.
type AppliedPosition struct {
	change.Position
	CommitTime time.Time // the source commit time of the transaction at LSN
	Stream     string    // the stream Seq refers to
	Seq        uint64    // the last stream message fully applied
	// Generation changes when `xdcr sync` changes what apply must do.
	Generation int64
}

// Apply applies the change stream to a replica site's PostgreSQL, exactly
// once and in source commit order.
type Apply struct {
	cfg  ApplyConfig
	sub  subscriber
	log  *slog.Logger
	obs  Observer
	keys cacheKeys
}

// cacheKeys is what apply needs from cache invalidation.
type cacheKeys interface {
	// Invalidations returns what the changes of one source transaction
	// (or one chunk of it) make stale in the site's caches; nil when
	// nothing. It must be fast and must not do I/O: it runs on the apply
	// path.
	Invalidations(changes []change.Change) []change.Invalidation
}

// NewApply returns an apply pipeline; nothing runs until Run. obs may be
// nil. With keys, every target transaction also writes the cache keys it
// makes stale into xdcr.cache_outbox, committed with the data, for a cache
// worker to delete once it has committed (at least once, even across a
// crash).
func NewApply(cfg ApplyConfig, sub subscriber, log *slog.Logger, obs Observer, keys cacheKeys) *Apply {
	if obs == nil {
		obs = NopObserver{}
	}
	return &Apply{cfg: cfg.withDefaults(), sub: sub, log: log.With("component", "apply"), obs: obs, keys: keys}
}

// Run applies until ctx ends, then returns ctx.Err(). Nothing is applied
// partially: a source transaction is committed whole or not at all. A
// problem an operator must fix (a missing table or column, a malformed
// message, a gap in the stream, a row the replica lacks) pauses apply; it
// logs what is wrong and how to fix it and tries again with a growing
// pause, so it resumes by itself once the fix is in.
func (a *Apply) Run(ctx context.Context) error {
	backoff := newBackoff(500*time.Millisecond, 30*time.Second)
	for {
		a.obs.State(StateStarting, nil)
		progressed, err := a.session(ctx)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if progressed {
			backoff.reset()
		}
		if errors.Is(err, errEpochDone) {
			a.log.Info("applied an ended epoch up to its handoff; following the next primary")
			backoff.reset()
			continue
		}
		var syncing *SyncingError
		if errors.As(err, &syncing) {
			a.obs.State(StateSyncing, err)
			backoff.reset()
			if err := wait.Sleep(ctx, time.Second); err != nil {
				return err
			}
			continue
		}
		delay := backoff.next()
		if isPermanent(err) {
			a.obs.State(StatePaused, err)
			a.log.Error("apply paused", "err", err, "retry_in", delay)
		} else {
			a.obs.State(StateReconnecting, err)
			a.log.Warn("apply session ended; restarting", "err", err, "retry_in", delay)
		}
		if err := wait.Sleep(ctx, delay); err != nil {
			return err
		}
	}
}

// session applies from the stored position until something fails. It
// reports whether it committed anything.
func (a *Apply) session(ctx context.Context) (bool, error) {
	conn, err := connectApply(ctx, a.cfg)
	if err != nil {
		return false, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var syncCommit string // what the session ended up with, for the log
	if err := conn.QueryRow(ctx, "SHOW synchronous_commit").Scan(&syncCommit); err != nil {
		return false, fmt.Errorf("read synchronous_commit of the apply session: %w", err)
	}
	meta, err := ConnectMeta(ctx, a.cfg.DSN)
	if err != nil {
		return false, err
	}
	defer meta.Close(context.WithoutCancel(ctx))

	if err := EnsureApplySchema(ctx, conn); err != nil {
		return false, err
	}
	pos, err := loadPosition(ctx, conn, a.cfg.Cluster)
	if err != nil {
		return false, err
	}
	syncs, err := ReadTableSyncs(ctx, conn, a.cfg.Cluster)
	if err != nil {
		return false, err
	}
	f, err := a.cfg.follow(pos)
	if err != nil {
		return false, err
	}
	stream := a.cfg.StreamOf(f.origin)
	after := pos.Seq
	if pos.Stream != stream {
		// another stream (another epoch): read it whole, positions decide
		after = 0
	}
	msgs, stop, err := a.sub.Subscribe(ctx, stream, after)
	if err != nil {
		return false, fmt.Errorf("subscribe to stream %s: %w", stream, err)
	}
	defer stop()
	a.log.Info("apply streaming", "stream", stream, "after_seq", after, "position", pos.Position,
		"epoch", f.epoch, "origin", f.origin, "epoch_ends_at", f.end, "synchronous_commit", syncCommit)
	a.obs.State(StateStreaming, nil)

	w := &applier{
		cfg:     a.cfg,
		stream:  stream,
		follow:  f,
		conn:    conn,
		meta:    meta,
		log:     a.log,
		obs:     a.obs,
		keys:    a.keys,
		backlog: func() int { return len(msgs) },
		pos:     pos,
		head:    pos,
		prefix:  pos,
		upTo:    pos.LSN,
		asOf:    pos.CommitTime,
		syncs:   syncs,
		targets: make(map[string]*target),
	}
	defer w.abortCopy(errCopyAbandoned)
	defer w.land() // before the COPY is abandoned and the connection closed
	var progressed bool
	for {
		d, err := receive(ctx, msgs, stop, false)
		if err == nil && d == nil {
			// nothing more is here: finish the group in flight, so that
			// what it applied is reported, before waiting for more
			if err := w.settle(); err != nil {
				return progressed, err
			}
			progressed = w.pos != pos
			d, err = receive(ctx, msgs, stop, true)
		}
		if err != nil {
			return progressed, err
		}
		if err := w.add(ctx, d); err != nil {
			return progressed, err
		}
		// group what is already here, within the bounds
		for w.chunk == nil && !w.full() {
			d, err := receive(ctx, msgs, stop, false)
			if err != nil {
				return progressed, err
			}
			if d == nil {
				break
			}
			if err := w.add(ctx, d); err != nil {
				return progressed, err
			}
		}
		if w.chunk == nil {
			if err := w.commitGroup(ctx); err != nil {
				return progressed, err
			}
		}
		if !f.open {
			if err := w.settle(); err != nil {
				return progressed, err
			}
		}
		progressed = w.pos != pos
		if !f.open && w.pos.Epoch == f.epoch && w.pos.LSN >= f.end {
			return progressed, errEpochDone
		}
	}
}

// receive takes the next delivery. Without block it returns nil when none
// is waiting.
func receive(ctx context.Context, msgs <-chan change.Delivery, stop func() error, block bool) (*change.Delivery, error) {
	var (
		d  change.Delivery
		ok bool
	)
	if block {
		select {
		case d, ok = <-msgs:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	} else {
		select {
		case d, ok = <-msgs:
		default:
			return nil, nil
		}
	}
	if !ok {
		if err := stop(); err != nil {
			return nil, fmt.Errorf("change stream subscription ended: %w", err)
		}
		return nil, errors.New("change stream subscription ended")
	}
	return &d, nil
}

// applier builds target transactions from deliveries.
type applier struct {
	cfg     ApplyConfig
	stream  string    // the stream this session reads
	follow  following // the epoch it applies
	conn    *pgx.Conn
	meta    *pgx.Conn
	log     *slog.Logger
	obs     Observer
	keys    cacheKeys  // nil without cache invalidation
	backlog func() int // messages waiting to be read

	// what has been applied, for reports
	upTo    change.LSN
	asOf    time.Time
	origin  string // origin and epoch of the last batch or heartbeat read
	epoch   uint64
	hb      *change.Heartbeat // read while transactions before it are still queued
	started time.Time         // when the group's first statement was queued
	changes int               // changes queued in the group (or the open large transaction)

	pos  AppliedPosition // committed in the replica
	head AppliedPosition // after everything queued

	// the group of whole transactions being built
	queued  []stmt
	mark    int             // len(queued) after the last whole transaction
	prefix  AppliedPosition // head after the last whole transaction
	txns    int
	bytes   int
	lastSeq uint64 // last delivery folded into the group

	chunk *openChunk // a large transaction open in the replica

	syncs map[string]TableSync // tables `xdcr sync` copies or copied

	targets map[string]*target // by relationKey
	rels    map[*change.Relation]*target
	nstmt   int

	copying *openCopy // a COPY in progress on conn
	spare   [][]byte  // buffers of rows for the next COPY

	flight     *sentGroup // the group the replica is running, if any
	failed     error      // why a group in flight failed: nothing more is sent
	spareQueue []stmt     // the queue of the last group that landed, for reuse
}

type openChunk struct {
	txn  change.Txn // header of the transaction (no changes)
	next uint32     // index of the chunk expected next
}

// stmt is one statement of a target transaction and what it stands for.
type stmt struct {
	sd      *pgconn.StatementDescription // prepared, or nil for sql
	sql     string
	params  [][]byte
	formats []int16
	rows    int64 // rows it must affect; -1 for any

	seq uint64
	txn change.LSN
	c   *change.Change

	// row names the row a change writes, on tables whose whole-row updates
	// may be superseded ("" otherwise); whole marks such an update.
	row   string
	whole bool
	// copy is the insert's table when the row can go by COPY
	copy *target
}

func (w *applier) full() bool {
	return w.txns >= w.cfg.MaxBatchTxns || w.bytes >= w.cfg.MaxBatchBytes
}

// add folds one delivery into the current group, or into the open large
// transaction.
func (w *applier) add(ctx context.Context, d *change.Delivery) error {
	if d.Err != nil {
		fix := fmt.Sprintf("inspect it with `nats stream get %s %d`; if xdcr did not publish it, delete it from this site's stream "+
			"(`nats stream rmm %s %d`); apply resumes by itself", w.stream, d.Seq, w.stream, d.Seq)
		if errors.Is(d.Err, transport.ErrUnsupportedVersion) {
			// a newer agent's message: deleting it would lose a transaction
			fix = fmt.Sprintf("a newer xdcr on the primary published it: upgrade this site's agent to the primary's version (it resumes from here, "+
				"nothing is lost); delete the message (`nats stream rmm %s %d`) only if xdcr did not publish it", w.stream, d.Seq)
		}
		return permanent(fmt.Errorf("stream %s seq %d: %w", w.stream, d.Seq, d.Err), fix)
	}
	b := d.Batch
	w.rels = make(map[*change.Relation]*target)
	if b.Epoch != w.follow.epoch || b.Origin != w.follow.origin {
		// another epoch's (the origin's earlier or later terms as primary),
		// or a publisher this epoch does not belong to: not applied here
		if b.Epoch < w.follow.epoch || b.Origin != w.follow.origin {
			w.obs.Dropped(b.Origin, b.Epoch)
			w.log.Debug("dropped a batch of another epoch", "stream", w.stream, "seq", d.Seq,
				"epoch", b.Epoch, "origin", b.Origin, "following_epoch", w.follow.epoch, "following_origin", w.follow.origin)
		}
		w.lastSeq = d.Seq
		return nil
	}
	if b.Heartbeat != nil {
		w.lastSeq = d.Seq
		return w.heartbeat(ctx, d)
	}
	if len(b.Txns) == 0 {
		w.lastSeq = d.Seq
		return nil
	}
	if b.Chunk != nil {
		return w.addChunk(ctx, d)
	}
	if w.chunk != nil {
		return w.gap(d, fmt.Sprintf("a whole transaction arrived while chunk %d of transaction %s was expected",
			w.chunk.next, w.chunk.txn.LSN))
	}
	for i := range b.Txns {
		txn := &b.Txns[i]
		skip, err := w.check(d, b, txn)
		if err == nil && !skip {
			err = w.queueTxn(ctx, d.Seq, txn)
		}
		if err != nil {
			// apply what came before the transaction that cannot be applied
			if perr := w.commitPrefix(ctx); perr != nil {
				return errors.Join(err, perr)
			}
			return err
		}
		if skip {
			continue
		}
		w.mark = len(w.queued)
		w.head = AppliedPosition{
			Position:   change.Position{Origin: b.Origin, Epoch: b.Epoch, LSN: txn.LSN},
			CommitTime: txn.CommitTime,
			Stream:     w.stream,
			Generation: w.pos.Generation,
		}
		w.prefix = w.head
		w.txns++
	}
	w.bytes += d.Size
	w.lastSeq = d.Seq
	return nil
}

// check decides whether txn was applied already, and stops on a gap.
func (w *applier) check(d *change.Delivery, b *change.Batch, txn *change.Txn) (skip bool, err error) {
	inEpoch := b.Epoch == w.head.Epoch && b.Origin == w.head.Origin
	switch {
	case inEpoch && txn.LSN <= w.head.LSN:
		return true, nil
	case !inEpoch && txn.PrevLSN != 0 && w.head.Origin == "":
		return false, w.notSeeded(d, txn.PrevLSN)
	// a predecessor beyond what was applied is missing; one at or before it
	// is fine (after a sync, the position is where the copy ends). The
	// first transaction of an epoch has none.
	case inEpoch && txn.PrevLSN > w.head.LSN, !inEpoch && txn.PrevLSN != 0:
		return false, &GapError{Stream: w.stream, Seq: d.Seq,
			Applied: w.head.Position.String(),
			Prev:    change.Position{Origin: b.Origin, Epoch: b.Epoch, LSN: txn.PrevLSN}.String()}
	case !w.follow.open && txn.LSN > w.follow.end:
		// after the handoff of an ended epoch: lost in a failover
		return true, nil
	}
	return false, nil
}

// notSeeded refuses to start a site that never applied anything in the
// middle of the stream: it would miss everything before.
func (w *applier) notSeeded(d *change.Delivery, prev change.LSN) error {
	return permanent(fmt.Errorf("stream %s seq %d: site %s has never applied anything and the stream does not start "+
		"at the beginning of the primary's history (the first message follows %s)", w.stream, d.Seq, w.cfg.Site, prev),
		fmt.Sprintf("copy the tables into %s with `xdcr sync %s`; apply continues from where the copy ends", w.cfg.Site, w.cfg.Site))
}

func (w *applier) gap(d *change.Delivery, what string) error {
	return permanent(fmt.Errorf("stream %s seq %d: %s", w.stream, d.Seq, what),
		"a message is missing from this site's stream; check the stream with `nats stream info` and re-seed the site with `xdcr sync` if messages were lost")
}

func (w *applier) addChunk(ctx context.Context, d *change.Delivery) error {
	b := d.Batch
	txn := &b.Txns[0]
	if w.chunk != nil && b.Chunk.Index == 0 && txn.LSN == w.chunk.txn.LSN {
		// the publisher restarted this transaction from its first chunk
		w.log.Info("large transaction republished; starting it over", "lsn", txn.LSN, "seq", d.Seq)
		if err := w.settle(); err != nil {
			return err
		}
		w.abortCopy(errRepublished)
		if _, err := w.conn.Exec(ctx, "ROLLBACK"); err != nil {
			return fmt.Errorf("roll back the partial transaction %s: %w", txn.LSN, err)
		}
		w.chunk, w.head = nil, w.pos
	}
	if w.chunk == nil {
		if b.Chunk.Index != 0 {
			skip, err := w.check(d, b, txn)
			if err != nil || skip {
				return err
			}
			return w.gap(d, fmt.Sprintf("chunk %d of transaction %s arrived without its first chunk", b.Chunk.Index, txn.LSN))
		}
		skip, err := w.check(d, b, txn)
		if err != nil {
			return err
		}
		if skip {
			w.lastSeq = d.Seq
			return nil
		}
		// whole transactions before it commit on their own, and the
		// position the chunks start from is theirs
		if err := w.commitGroup(ctx); err != nil {
			return err
		}
		if err := w.settle(); err != nil {
			return err
		}
		hdr := *txn
		hdr.Changes = nil
		w.chunk = &openChunk{txn: hdr}
		w.queued = append(w.queued,
			stmt{sql: "BEGIN", rows: -1, seq: d.Seq, txn: txn.LSN},
			stmt{sql: "SELECT 1 FROM xdcr.apply_position WHERE cluster = $1 AND epoch = $2 AND lsn = $3::pg_lsn AND stream_seq = $4 AND generation = $5 FOR UPDATE",
				params: [][]byte{[]byte(w.cfg.Cluster), itoa(w.pos.Epoch), []byte(w.pos.LSN.String()), itoa(w.pos.Seq),
					strconv.AppendInt(nil, w.pos.Generation, 10)},
				rows: 1, seq: d.Seq, txn: txn.LSN})
	} else if txn.LSN != w.chunk.txn.LSN || b.Chunk.Index != w.chunk.next {
		return w.gap(d, fmt.Sprintf("chunk %d of transaction %s arrived while chunk %d of transaction %s was expected",
			b.Chunk.Index, txn.LSN, w.chunk.next, w.chunk.txn.LSN))
	}
	if err := w.queueTxn(ctx, d.Seq, txn); err != nil {
		return err
	}
	w.chunk.next++
	if b.Chunk.Final {
		w.head = AppliedPosition{
			Position:   change.Position{Origin: b.Origin, Epoch: b.Epoch, LSN: txn.LSN},
			CommitTime: txn.CommitTime,
			Stream:     w.stream,
			Seq:        d.Seq,
			Generation: w.pos.Generation,
		}
		w.lastSeq = d.Seq
		w.queued = append(w.queued, w.advanceStmt(w.pos, d.Seq), stmt{sql: "COMMIT", rows: -1, seq: d.Seq, txn: txn.LSN})
	}
	if err := w.exec(ctx); err != nil {
		return err
	}
	if b.Chunk.Final {
		w.chunk = nil
		w.committed(w.head, 1, w.changes, w.started)
		w.changes = 0
	}
	return nil
}

// commitPrefix commits the transactions queued before the current one,
// which failed to queue.
func (w *applier) commitPrefix(ctx context.Context) error {
	clear(w.queued[w.mark:]) // let the failed transaction's deliveries go
	w.queued = w.queued[:w.mark]
	w.head = w.prefix
	if err := w.commitGroup(ctx); err != nil {
		return err
	}
	return w.settle() // the caller stops: what the prefix applied is reported now
}

// commitGroup sends the queued whole transactions as one target
// transaction together with the new position, and returns without waiting
// for the replica to run it: the caller goes on reading and arranging the
// next group meanwhile (see sentGroup). Whatever uses the connection next
// waits for it first (settle).
func (w *applier) commitGroup(ctx context.Context) error {
	if len(w.queued) == 0 {
		return nil
	}
	w.head.Seq = w.lastSeq
	// the position goes first: its row lock keeps a second agent of the
	// same site from applying the same transactions concurrently. It moves
	// from where the group in flight, if any, leaves it.
	from := w.pos
	if w.flight != nil {
		from = w.flight.head
	}
	w.queued = slices.Insert(w.queued, 0, w.advanceStmt(from, w.lastSeq))
	if w.chunk != nil {
		// a large transaction is open on the connection (a prefix
		// committed before a gap): its statements go as they are, in it
		if err := w.exec(ctx); err != nil {
			return err
		}
		w.committed(w.head, w.txns, w.changes, w.started)
		w.txns, w.bytes, w.changes = 0, 0, 0
		return nil
	}
	g := &sentGroup{
		queued:  w.queued,
		parts:   plan(w.queued, false),
		head:    w.head,
		txns:    w.txns,
		changes: w.changes,
		started: w.started,
		done:    make(chan struct{}),
	}
	if err := w.settle(); err != nil {
		return err
	}
	go func() {
		defer close(g.done)
		g.err = w.send(ctx, g.parts, false)
	}()
	w.flight = g
	w.queued, w.spareQueue, w.mark = w.spareQueue[:0], nil, 0
	w.txns, w.bytes, w.changes = 0, 0, 0
	return nil
}

// committed takes in a target commit that applied everything up to head:
// txns source transactions with changes changes, queued since started.
func (w *applier) committed(head AppliedPosition, txns, changes int, started time.Time) {
	w.pos = head
	w.upTo = w.pos.LSN
	if w.pos.CommitTime.After(w.asOf) {
		w.asOf = w.pos.CommitTime
	}
	if w.hb != nil {
		w.absorb(w.hb)
		w.hb = nil
	}
	w.report(txns, changes, time.Since(started))
}

// heartbeat takes in a heartbeat: the source had published nothing after
// the transaction it names. Once everything before it is applied, the
// replica is caught up as of the heartbeat's WAL position and time.
func (w *applier) heartbeat(ctx context.Context, d *change.Delivery) error {
	// what it says holds once everything before it is applied
	if err := w.settle(); err != nil {
		return err
	}
	b, hb := d.Batch, d.Batch.Heartbeat
	// a heartbeat of the epoch this session follows, while nothing of it
	// was applied yet: the epoch starts here (LastLSN 0), or its first
	// transactions are missing
	fresh := w.head.Origin != b.Origin || w.head.Epoch != b.Epoch
	if fresh && hb.LastLSN != 0 {
		if w.head.Origin == "" {
			return w.notSeeded(d, hb.LastLSN)
		}
		return &GapError{Stream: w.stream, Seq: d.Seq, Applied: w.head.Position.String(),
			Prev: change.Position{Origin: b.Origin, Epoch: b.Epoch, LSN: hb.LastLSN}.String()}
	}
	if hb.LastLSN > w.head.LSN {
		err := &GapError{Stream: w.stream, Seq: d.Seq, Applied: w.head.Position.String(),
			Prev: change.Position{Origin: b.Origin, Epoch: b.Epoch, LSN: hb.LastLSN}.String()}
		if perr := w.commitPrefix(ctx); perr != nil {
			return errors.Join(err, perr)
		}
		return err
	}
	w.origin, w.epoch = b.Origin, b.Epoch
	if fresh {
		w.head.Origin, w.head.Epoch, w.head.LSN = b.Origin, b.Epoch, 0
		w.prefix = w.head
	}
	if len(w.queued) > 0 || w.chunk != nil {
		w.hb = hb
		return nil
	}
	w.absorb(hb)
	w.report(0, 0, 0)
	return nil
}

func (w *applier) absorb(hb *change.Heartbeat) {
	w.upTo = max(w.upTo, hb.WALEnd)
	if hb.Time.After(w.asOf) {
		w.asOf = hb.Time
	}
}

func (w *applier) report(txns, changes int, d time.Duration) {
	p := ApplyProgress{
		Position:   w.pos,
		UpTo:       max(w.upTo, w.pos.LSN),
		AsOf:       w.asOf,
		CatchingUp: w.backlog() > 0,
		Txns:       txns,
		Changes:    changes,
		Duration:   d,
	}
	switch {
	case w.head.Epoch > w.pos.Epoch && w.head.LSN == 0 && len(w.queued) == 0:
		// a new epoch's first heartbeat: nothing of it to apply yet, and
		// everything before it applied
		p.Position.Origin, p.Position.Epoch, p.Position.LSN = w.head.Origin, w.head.Epoch, 0
	case p.Position.Origin == "":
		p.Position.Origin, p.Position.Epoch = w.origin, w.epoch
	}
	w.obs.Applied(p)
}

// advanceStmt moves the stored position from from to head, and fails the
// transaction if the stored position is not from any more.
func (w *applier) advanceStmt(from AppliedPosition, seq uint64) stmt {
	var ct []byte
	if !w.head.CommitTime.IsZero() {
		ct = []byte(w.head.CommitTime.Format(time.RFC3339Nano))
	}
	return stmt{
		sql: "SELECT xdcr.advance($1, $2, $3::pg_lsn, $4, $5, $6, $7, $8::pg_lsn, $9::timestamptz, $10, $11)",
		params: [][]byte{
			[]byte(w.cfg.Cluster), itoa(from.Epoch), []byte(from.LSN.String()), itoa(from.Seq),
			strconv.AppendInt(nil, from.Generation, 10),
			[]byte(w.head.Origin), itoa(w.head.Epoch), []byte(w.head.LSN.String()), ct,
			[]byte(w.stream), itoa(seq),
		},
		rows: 1, seq: seq, txn: w.head.LSN,
	}
}

func itoa(n uint64) []byte { return strconv.AppendUint(nil, n, 10) }

func (w *applier) stmtError(s *stmt, err error) error {
	where := fmt.Sprintf("stream %s seq %d, source transaction %s", w.stream, s.seq, s.txn)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "XD001" {
		return fmt.Errorf("%s: %w (another agent is applying to site %s?)", where, err, w.cfg.Site)
	}
	what := "apply"
	if s.c != nil {
		what = s.c.Op.String()
		if s.c.Rel != nil {
			what += " on " + s.c.Rel.String()
		}
	}
	if errors.As(err, &pgErr) && permanentSQLState(pgErr.Code) {
		return permanent(fmt.Errorf("%s: %s: %w", where, what, err),
			"make the replica's table accept the primary's rows (compare both definitions); apply resumes by itself")
	}
	return fmt.Errorf("%s: %s: %w", where, what, err)
}

func (w *applier) rowsError(s *stmt, got int64) error {
	where := fmt.Sprintf("stream %s seq %d, source transaction %s", w.stream, s.seq, s.txn)
	if s.c == nil {
		// the position row: it moved, or was never created
		return fmt.Errorf("%s: the applied position of cluster %s changed underneath this agent (another agent applying to site %s?)",
			where, w.cfg.Cluster, w.cfg.Site)
	}
	key := ""
	if s.c.Rel != nil {
		vals := s.c.Old
		if vals == nil {
			vals = s.c.New
		}
		key = " " + describeKey(s.c.Rel, keyIndexes(s.c.Rel), vals)
	}
	return permanent(fmt.Errorf("%s: %s on %s%s changed %d rows on replica site %s, want 1: the replica has diverged from the primary",
		where, s.c.Op, s.c.Rel, key, got, w.cfg.Site),
		"find out what changed the replica directly (only xdcr may write to it), then re-seed it with `xdcr sync "+w.cfg.Site+"`")
}

func keyIndexes(rel *change.Relation) []int {
	var keys []int
	for i, c := range rel.Columns {
		if c.Key {
			keys = append(keys, i)
		}
	}
	return keys
}

// permanentSQLState says whether an error class needs an operator: data
// exceptions, integrity violations, undefined objects, privileges.
func permanentSQLState(code string) bool {
	if len(code) < 2 {
		return false
	}
	switch code[:2] {
	case "22", "23", "42", "0A", "2B", "44":
		return true
	}
	return false
}

// queueTxn turns a transaction's changes into statements.
func (w *applier) queueTxn(ctx context.Context, seq uint64, txn *change.Txn) error {
	if len(w.queued) == 0 {
		w.started = time.Now()
	}
	w.changes += len(txn.Changes)
	for i := range txn.Changes {
		c, err := w.synced(&txn.Changes[i], txn.LSN)
		if err != nil {
			return err
		}
		if c == nil {
			continue // in a table's copy already
		}
		s, err := w.statement(ctx, c)
		if err != nil {
			var schema *SchemaError
			if errors.As(err, &schema) {
				return fmt.Errorf("stream %s seq %d, source transaction %s: %w", w.stream, seq, txn.LSN, err)
			}
			return err
		}
		s.seq, s.txn, s.c = seq, txn.LSN, c
		w.queued = append(w.queued, s)
	}
	return w.queueInvalidations(seq, txn)
}

// synced filters a change through the copy states of its tables: it
// returns nil for a change that a table's copy already holds, and a
// SyncingError while a table is being copied.
func (w *applier) synced(c *change.Change, lsn change.LSN) (*change.Change, error) {
	if len(w.syncs) == 0 {
		return c, nil
	}
	keep := func(r *change.Relation) (bool, error) {
		ts, ok := w.syncs[r.String()]
		switch {
		case !ok:
			return true, nil
		case ts.Copying:
			return false, w.syncingError()
		}
		return lsn >= ts.LSN, nil
	}
	if c.Op != change.Truncate {
		ok, err := keep(c.Rel)
		if err != nil || !ok {
			return nil, err
		}
		return c, nil
	}
	out := *c
	out.Truncated = nil
	for _, r := range c.Truncated {
		ok, err := keep(r)
		if err != nil {
			return nil, err
		}
		if ok {
			out.Truncated = append(out.Truncated, r)
		}
	}
	if len(out.Truncated) == 0 {
		return nil, nil
	}
	return &out, nil
}

func (w *applier) syncingError() error {
	e := &SyncingError{Site: w.cfg.Site}
	for _, ts := range w.syncs {
		if ts.Copying {
			e.Tables = append(e.Tables, ts)
		}
	}
	slices.SortFunc(e.Tables, func(a, b TableSync) int { return strings.Compare(a.Table, b.Table) })
	return e
}

// queueInvalidations writes what txn makes stale in the site's caches into
// the outbox, in the same target transaction as its changes.
func (w *applier) queueInvalidations(seq uint64, txn *change.Txn) error {
	if w.keys == nil {
		return nil
	}
	inv := w.keys.Invalidations(txn.Changes)
	if len(inv) == 0 {
		return nil
	}
	entries, err := json.Marshal(inv)
	if err != nil {
		return fmt.Errorf("encode cache invalidations: %w", err)
	}
	var ct []byte
	if !txn.CommitTime.IsZero() {
		ct = []byte(txn.CommitTime.Format(time.RFC3339Nano))
	}
	w.queued = append(w.queued, stmt{
		sql:    "INSERT INTO xdcr.cache_outbox (cluster, lsn, commit_time, entries) VALUES ($1, $2::pg_lsn, $3::timestamptz, $4::jsonb)",
		params: [][]byte{[]byte(w.cfg.Cluster), []byte(txn.LSN.String()), ct, entries},
		rows:   1, seq: seq, txn: txn.LSN,
	})
	return nil
}

func (w *applier) target(ctx context.Context, rel *change.Relation) (*target, error) {
	if t, ok := w.rels[rel]; ok {
		return t, nil
	}
	key := relationKey(rel)
	t, ok := w.targets[key]
	if !ok {
		var err error
		var add addColumnsFunc
		if w.cfg.AutoAddColumns {
			add = w.addColumns
		}
		if t, err = resolveTarget(ctx, w.meta, rel, w.cfg.Site, add); err != nil {
			return nil, err
		}
		w.targets[key] = t
	}
	w.rels[rel] = t
	return t, nil
}

// addColumns adds the source's new columns to the replica's table, as
// schema.auto_add_columns allows.
//
// A short lock timeout keeps the ALTER from waiting behind the site's own
// long transactions; on a timeout apply pauses like on any schema
// difference and tries again. When a large source transaction is open on
// the apply connection it may already hold locks on t, so the columns are
// added inside it and commit (or roll back) with it.
func (w *applier) addColumns(ctx context.Context, t Table, cols []change.Column) error {
	alter := addColumnsSQL(t, cols)
	conn, sql := w.meta.PgConn(), "SET LOCAL lock_timeout = '5s'; "+alter
	if w.chunk != nil && w.chunk.next > 0 {
		var err error
		if conn, err = w.idle(); err != nil {
			return err
		}
		sql += "; SET LOCAL lock_timeout = DEFAULT"
	}
	if _, err := conn.Exec(ctx, sql).ReadAll(); err != nil {
		return &SchemaError{
			Table:   t.String(),
			Problem: fmt.Sprintf("lacks columns of the primary on replica site %s, and adding them failed: %v", w.cfg.Site, err),
			Fix:     fmt.Sprintf("run %s on %s yourself; apply resumes by itself", alter, w.cfg.Site),
		}
	}
	for _, c := range cols {
		w.log.Warn("added a column the primary has to the replica (schema.auto_add_columns)",
			"table", t.String(), "column", c.Name, "type", c.Type)
	}
	return nil
}

// prepared returns the statement for key, preparing sql on first use.
func (w *applier) prepared(ctx context.Context, t *target, key string, sql func() string) (*pgconn.StatementDescription, error) {
	if sd, ok := t.stmts[key]; ok {
		return sd, nil
	}
	w.nstmt++
	text := sql()
	if err := w.settle(); err != nil {
		return nil, err
	}
	conn, err := w.idle()
	if err != nil {
		return nil, err
	}
	sd, err := conn.Prepare(ctx, "xdcr_"+strconv.Itoa(w.nstmt), text, nil)
	if err != nil {
		return nil, fmt.Errorf("prepare %q on replica site %s: %w", text, w.cfg.Site, err)
	}
	t.stmts[key] = sd
	return sd, nil
}

func (w *applier) statement(ctx context.Context, c *change.Change) (stmt, error) {
	if c.Op == change.Truncate {
		return stmt{sql: truncateSQL(c), rows: -1}, nil
	}
	t, err := w.target(ctx, c.Rel)
	if err != nil {
		return stmt{}, err
	}
	switch c.Op {
	case change.Insert:
		sd, err := w.prepared(ctx, t, "i", t.insertSQL)
		if err != nil {
			return stmt{}, err
		}
		s := stmt{sd: sd, rows: 1}
		s.params, s.formats = params(c.New, nil)
		if t.supersede {
			s.row = rowName(t, c.New)
		}
		if copyable(c.New) {
			s.copy = t
		}
		return s, nil
	case change.Update:
		var set []int
		for i, v := range c.New {
			if v.Kind != change.Unchanged {
				set = append(set, i)
			}
		}
		keyVals := c.Old
		if keyVals == nil {
			keyVals = c.New
		}
		where, err := whereColumns(t, c, keyVals)
		if err != nil {
			return stmt{}, err
		}
		if len(set) == 0 {
			// nothing but unchanged TOAST values: the row stays as it is
			set = where[:0:0]
		}
		key := "u" + mask(set) + "|" + mask(where)
		sd, err := w.prepared(ctx, t, key, func() string {
			if len(set) == 0 {
				return "SELECT 1 FROM " + t.table.Quoted() + " WHERE " + whereOnly(t, where)
			}
			return t.updateSQL(set, where)
		})
		if err != nil {
			return stmt{}, err
		}
		s := stmt{sd: sd, rows: 1}
		s.params, s.formats = params(pick(c.New, set), pick(keyVals, where))
		if t.supersede {
			s.row = rowName(t, keyVals)
			s.whole = c.Old == nil && len(set) == len(c.New)
		}
		return s, nil
	case change.Delete:
		where, err := whereColumns(t, c, c.Old)
		if err != nil {
			return stmt{}, err
		}
		key := "d" + mask(where)
		sd, err := w.prepared(ctx, t, key, func() string { return t.deleteSQL(where) })
		if err != nil {
			return stmt{}, err
		}
		s := stmt{sd: sd, rows: 1}
		s.params, s.formats = params(pick(c.Old, where), nil)
		if t.supersede {
			s.row = rowName(t, c.Old)
		}
		return s, nil
	}
	return stmt{}, fmt.Errorf("%w: change of kind %v", ErrProtocol, c.Op)
}

func whereOnly(t *target, where []int) string {
	var b strings.Builder
	t.writeWhere(&b, where, 0)
	return b.String()
}

// whereColumns picks the identity columns that locate the row: all key
// columns for a key identity; for FULL, every old value that was sent.
func whereColumns(t *target, c *change.Change, vals []change.Value) ([]int, error) {
	if vals == nil {
		return nil, fmt.Errorf("%w: %s on %s carries no row identity", ErrProtocol, c.Op, c.Rel)
	}
	var where []int
	for _, k := range t.keys {
		switch vals[k].Kind {
		case change.Unchanged:
			if !t.full {
				return nil, fmt.Errorf("%w: %s on %s has an unchanged-TOAST key column %s",
					ErrProtocol, c.Op, c.Rel, c.Rel.Columns[k].Name)
			}
		case change.Null:
			if !t.full {
				return nil, fmt.Errorf("%w: %s on %s has a NULL key column %s",
					ErrProtocol, c.Op, c.Rel, c.Rel.Columns[k].Name)
			}
			where = append(where, k)
		default:
			where = append(where, k)
		}
	}
	if len(where) == 0 {
		return nil, fmt.Errorf("%w: %s on %s carries no usable identity value", ErrProtocol, c.Op, c.Rel)
	}
	return where, nil
}

func mask(cols []int) string {
	b := make([]byte, 0, 2*len(cols))
	for _, c := range cols {
		b = strconv.AppendInt(b, int64(c), 36)
		b = append(b, ',')
	}
	return string(b)
}

func pick(vals []change.Value, cols []int) []change.Value {
	out := make([]change.Value, len(cols))
	for i, c := range cols {
		out[i] = vals[c]
	}
	return out
}

// params renders values as statement parameters: text values in text
// format (the server parses them with the column's type), binary ones in
// binary format, NULL as a nil parameter.
func params(a, b []change.Value) ([][]byte, []int16) {
	ps := make([][]byte, 0, len(a)+len(b))
	var formats []int16
	for _, vals := range [2][]change.Value{a, b} {
		for _, v := range vals {
			if v.Kind == change.Binary && formats == nil {
				formats = make([]int16, len(ps), cap(ps))
			}
			if formats != nil {
				f := int16(0)
				if v.Kind == change.Binary {
					f = 1
				}
				formats = append(formats, f)
			}
			if v.Kind == change.Null {
				ps = append(ps, nil)
			} else {
				ps = append(ps, v.Data)
			}
		}
	}
	return ps, formats
}
