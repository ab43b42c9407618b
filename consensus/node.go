package consensus

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"go.etcd.io/bbolt"

	"github.com/xdcr/xdcr/checkpoints"
)

// Errors returned by [Node] methods.
var (
	// ErrNotLeader: a leader-only call reached a follower or candidate.
	// Forward to [Node.Leader] and retry there.
	ErrNotLeader = errors.New("not the raft leader")

	// ErrNoLeader: [Node.WaitLeader] gave up before any leader was known.
	ErrNoLeader = errors.New("no raft leader")

	// ErrUnknownOutcome: [Node.Apply] cannot tell whether the command will be
	// applied. The leader lost its leadership after appending it, or ctx
	// ended (or the node closed) while it waited for the commit. The command
	// may still commit under the next leader: re-read the state, and retry
	// only commands that are safe to apply twice.
	ErrUnknownOutcome = errors.New("raft apply outcome unknown")
)

// Node is this process's member of the Raft group. Its methods are safe for
// concurrent use.
type Node struct {
	cfg    Config
	logger *slog.Logger

	store  *raftboltdb.BoltStore // log and stable store, Dir/raft.db
	logs   raft.LogStore         // store behind a cache of recent entries
	snaps  raft.SnapshotStore
	stream *streamLayer
	trans  *raft.NetworkTransport
	fsm    *fsm
	raft   *raft.Raft

	hadState     bool // Dir held Raft state at Open
	bootstrapped bool // this Open bootstrapped the group from Peers

	changes  chan struct{}
	obsCh    chan raft.Observation
	observer *raft.Observer

	haltCh  chan struct{} // the FSM halted; watch shuts raft down
	haltMu  sync.Mutex
	haltErr error

	closing   chan struct{}
	wg        sync.WaitGroup
	closeOnce sync.Once
	closeErr  error
}

// Open starts the node: a bolt log and stable store in Dir/raft.db, file
// snapshots (the last 2 kept) in Dir/snapshots, and a TCP (or TLS) transport
// listening on Bind. If Dir holds no Raft state, it first bootstraps the group
// with Peers; every node may do so with the same Peers. A node with existing
// state never bootstraps again, so a restart keeps its log, term and vote.
//
// Open returns once raft runs, not once a leader exists ([Node.WaitLeader]).
// On error everything opened so far is closed again.
func Open(cfg Config) (*Node, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, fmt.Errorf("open raft node: %w", err)
	}
	n := &Node{
		cfg:     cfg,
		logger:  cfg.Logger.With("component", "consensus", "node", cfg.ID),
		changes: make(chan struct{}, 1),
		haltCh:  make(chan struct{}, 1),
		closing: make(chan struct{}),
	}
	if err := n.open(); err != nil {
		return nil, errors.Join(fmt.Errorf("open raft node %s: %w", cfg.ID, err), n.Close())
	}
	return n, nil
}

func (n *Node) open() error {
	cfg := n.cfg
	hl := newHCLogAdapter(cfg.Logger, "raft", "node", cfg.ID)

	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.ID)
	rc.HeartbeatTimeout = cfg.HeartbeatTimeout
	rc.ElectionTimeout = cfg.ElectionTimeout
	rc.LeaderLeaseTimeout = cfg.LeaderLeaseTimeout
	rc.CommitTimeout = cfg.CommitTimeout
	rc.SnapshotInterval = cfg.SnapshotInterval
	rc.SnapshotThreshold = cfg.SnapshotThreshold
	rc.TrailingLogs = cfg.TrailingLogs
	rc.Logger = hl
	if err := raft.ValidateConfig(rc); err != nil {
		return fmt.Errorf("raft config: %w", err)
	}

	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	bolt := *bbolt.DefaultOptions
	bolt.Timeout = boltOpenTimeout
	store, err := raftboltdb.New(raftboltdb.Options{Path: filepath.Join(cfg.Dir, "raft.db"), BoltOptions: &bolt})
	if err != nil {
		return fmt.Errorf("open %s: %w", filepath.Join(cfg.Dir, "raft.db"), err)
	}
	n.store = store
	if n.logs, err = raft.NewLogCache(logCacheSize, store); err != nil {
		return fmt.Errorf("log cache: %w", err)
	}
	if n.snaps, err = raft.NewFileSnapshotStoreWithLogger(cfg.Dir, retainSnapshots, hl.Named("snapshot")); err != nil {
		return fmt.Errorf("snapshot store: %w", err)
	}
	if n.stream, err = newStreamLayer(cfg.Bind, cfg.Advertise, cfg.TLS, cfg.Peers, cfg.DialVia); err != nil {
		return err
	}
	n.trans = raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream:  n.stream,
		MaxPool: transportMaxPool,
		Timeout: transportTimeout,
		Logger:  hl.Named("net"),
	})

	if n.hadState, err = raft.HasExistingState(n.logs, store, n.snaps); err != nil {
		return fmt.Errorf("check for raft state: %w", err)
	}
	if !n.hadState {
		if err := raft.BootstrapCluster(rc, n.logs, store, n.snaps, n.trans, peersConfiguration(cfg.Peers)); err != nil {
			return fmt.Errorf("bootstrap: %w", err)
		}
		n.bootstrapped = true
	}

	n.fsm = newFSM(n.signal, n.halt)
	// Buffered, and raft drops observations when it is full: one pending
	// observation is enough for a hint.
	n.obsCh = make(chan raft.Observation, 8)
	n.observer = raft.NewObserver(n.obsCh, false, func(o *raft.Observation) bool {
		switch o.Data.(type) {
		case raft.RaftState, raft.LeaderObservation:
			return true
		}
		return false
	})
	if n.raft, err = raft.NewRaft(rc, n.fsm, n.logs, store, n.snaps, n.trans); err != nil {
		return fmt.Errorf("start raft: %w", err)
	}
	n.raft.RegisterObserver(n.observer)
	n.wg.Add(1)
	go n.watch()

	n.logger.Info("raft node started", "bind", cfg.Bind, "advertise", cfg.Advertise,
		"tls", cfg.TLS != nil, "bootstrapped", n.bootstrapped, "last_index", n.raft.LastIndex())
	if n.hadState {
		n.checkMembership()
	}
	return nil
}

// peersConfiguration is the bootstrap configuration: every peer a voter.
func peersConfiguration(peers []Peer) raft.Configuration {
	var c raft.Configuration
	for _, p := range peers {
		c.Servers = append(c.Servers, raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(p.ID), Address: raft.ServerAddress(p.Address)})
	}
	return c
}

// checkMembership warns when the membership stored in the log is not what the
// config says: Peers only seeds the first bootstrap, so an edited nodes: list
// changes nothing by itself.
func (n *Node) checkMembership() {
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		n.logger.Warn("read raft configuration", "error", err)
		return
	}
	servers := slices.Clone(f.Configuration().Servers)
	want := peersConfiguration(n.cfg.Peers).Servers
	byID := func(a, b raft.Server) int { return strings.Compare(string(a.ID), string(b.ID)) }
	slices.SortFunc(servers, byID)
	slices.SortFunc(want, byID)
	if !slices.Equal(servers, want) {
		n.logger.Warn("stored raft membership differs from the configured peers; peers only seed the first bootstrap",
			"stored", fmt.Sprint(servers), "configured", fmt.Sprint(want))
	}
	if !slices.ContainsFunc(servers, func(s raft.Server) bool { return s.ID == raft.ServerID(n.cfg.ID) }) {
		n.logger.Warn("this node is not a member of its stored raft configuration; it will not vote or be elected")
	}
}

// watch turns raft's state and leader observations into Changes signals,
// logs this node's leadership transitions, and shuts raft down when the FSM
// halts (it cannot do so itself: Shutdown waits for the FSM goroutine).
func (n *Node) watch() {
	defer n.wg.Done()
	leader := false
	for {
		select {
		case <-n.closing:
			return
		case <-n.haltCh:
			n.logger.Error("raft node stopped: the log holds an entry this build cannot apply; upgrade this node",
				"error", n.Err())
			_ = n.raft.Shutdown().Error() // always nil
			n.signal()
		case o := <-n.obsCh:
			if s, ok := o.Data.(raft.RaftState); ok {
				switch {
				case s == raft.Shutdown:
					// Close deregisters the observer first, so this is
					// raft stopping on its own (or the halt above).
					n.setErr(errors.New("raft shut down by itself: was this node removed from the group?"))
				case s == raft.Leader && !leader:
					n.logger.Info("raft leadership gained", "term", n.raft.CurrentTerm())
				case s != raft.Leader && leader:
					n.logger.Info("raft leadership lost", "state", strings.ToLower(s.String()))
				}
				leader = s == raft.Leader
			}
			n.signal()
		}
	}
}

// halt is the FSM's: it records err and wakes watch.
func (n *Node) halt(err error) {
	n.setErr(err)
	select {
	case n.haltCh <- struct{}{}:
	default:
	}
}

// setErr records why the node stopped by itself; the first reason wins.
func (n *Node) setErr(err error) {
	n.haltMu.Lock()
	defer n.haltMu.Unlock()
	if n.haltErr == nil {
		n.haltErr = err
	}
}

// Err returns nil while the node runs as opened, and why it stopped when it
// stopped by itself: a Raft log entry this build cannot apply (wrapping
// checkpoints.ErrUnsupportedVersion: upgrade the node), or raft shutting
// down on its own (this node was removed from the group). The node then
// answers like a closed one; its owner should Close it and exit non-zero.
func (n *Node) Err() error {
	n.haltMu.Lock()
	defer n.haltMu.Unlock()
	return n.haltErr
}

func (n *Node) closed() bool {
	select {
	case <-n.closing:
		return true
	default:
		return false
	}
}

func (n *Node) signal() {
	select {
	case n.changes <- struct{}{}:
	default:
	}
}

// Close shuts raft down, then the transport, then the stores. It is
// idempotent, and safe on a nil *Node (which a failed [Open] returns).
// Pending Apply and ConsistentState calls return.
func (n *Node) Close() error {
	if n == nil {
		return nil
	}
	n.closeOnce.Do(func() {
		close(n.closing)
		var errs []error
		// raft first: its goroutines (FSM, snapshots, replication) use the
		// transport and the stores until Shutdown returns. Shutdown also
		// closes the transport, which closes the listener.
		if n.raft != nil {
			n.raft.DeregisterObserver(n.observer)
			if err := n.raft.Shutdown().Error(); err != nil {
				errs = append(errs, fmt.Errorf("shutdown raft: %w", err))
			}
		}
		n.wg.Wait()
		if n.trans != nil {
			if err := n.trans.Close(); err != nil {
				errs = append(errs, fmt.Errorf("close transport: %w", err))
			}
			n.trans.CloseStreams() // pooled outgoing connections
		} else if n.stream != nil {
			if err := n.stream.Close(); err != nil {
				errs = append(errs, fmt.Errorf("close listener: %w", err))
			}
		}
		if n.store != nil {
			if err := n.store.Close(); err != nil {
				errs = append(errs, fmt.Errorf("close raft.db: %w", err))
			}
		}
		n.closeErr = errors.Join(errs...)
		if n.raft != nil {
			n.logger.Info("raft node stopped")
		}
	})
	return n.closeErr
}

// Apply proposes cmd (encoded with checkpoints.EncodeCommand) and waits until
// this leader has applied it to its state. ctx bounds the whole call; without
// a deadline, [DefaultApplyTimeout] does.
//
// It returns nil once applied; the FSM's error, as is, when the state rejected
// the command (unchanged state); [ErrNotLeader] on a follower (nothing
// proposed); and [ErrUnknownOutcome] when the command was proposed but the
// outcome could not be learnt (wrapping raft.ErrLeadershipLost, ctx's error,
// or raft.ErrRaftShutdown). Other errors mean it was not applied.
func (n *Node) Apply(ctx context.Context, cmd []byte) error {
	if n.closed() {
		return fmt.Errorf("apply: %w", raft.ErrRaftShutdown)
	}
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	timeout, err := enqueueTimeout(ctx)
	if err != nil {
		return fmt.Errorf("apply: %w", err)
	}
	f := n.raft.Apply(cmd, timeout)
	if err := n.wait(ctx, f); err != nil {
		var abandoned *abandonedError
		switch {
		case errors.As(err, &abandoned):
			return fmt.Errorf("apply: %w: %w", ErrUnknownOutcome, abandoned.cause)
		case errors.Is(err, raft.ErrLeadershipLost):
			return fmt.Errorf("apply: %w: %w", ErrUnknownOutcome, err)
		case errors.Is(err, raft.ErrNotLeader):
			return fmt.Errorf("apply: %w", ErrNotLeader)
		case errors.Is(err, raft.ErrLeadershipTransferInProgress):
			return fmt.Errorf("apply: %w: %w", ErrNotLeader, err)
		case errors.Is(err, raft.ErrEnqueueTimeout):
			// The timer is ctx's deadline: nothing was proposed.
			return fmt.Errorf("apply: %w: %w", err, context.DeadlineExceeded)
		default:
			return fmt.Errorf("apply: %w", err)
		}
	}
	if err, ok := f.Response().(error); ok && err != nil {
		return err
	}
	return nil
}

// ConsistentState returns a copy of the state as of a linearizable read:
// VerifyLeader (a majority still follows this leader), then Barrier (the
// state has applied everything committed before the read), then a copy. It
// returns [ErrNotLeader] on a follower or when leadership is lost meanwhile.
// ctx bounds the call; without a deadline, [DefaultApplyTimeout] does.
func (n *Node) ConsistentState(ctx context.Context) (*checkpoints.State, error) {
	if n.closed() {
		return nil, fmt.Errorf("consistent read: %w", raft.ErrRaftShutdown)
	}
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	if err := n.wait(ctx, n.raft.VerifyLeader()); err != nil {
		return nil, fmt.Errorf("consistent read: verify leader: %w", readError(err))
	}
	timeout, err := enqueueTimeout(ctx)
	if err != nil {
		return nil, fmt.Errorf("consistent read: %w", err)
	}
	if err := n.wait(ctx, n.raft.Barrier(timeout)); err != nil {
		return nil, fmt.Errorf("consistent read: barrier: %w", readError(err))
	}
	return n.fsm.clone(), nil
}

func readError(err error) error {
	var abandoned *abandonedError
	switch {
	case errors.As(err, &abandoned):
		return abandoned.cause
	case errors.Is(err, raft.ErrNotLeader):
		return ErrNotLeader
	case errors.Is(err, raft.ErrLeadershipLost), errors.Is(err, raft.ErrLeadershipTransferInProgress):
		return fmt.Errorf("%w: %w", ErrNotLeader, err)
	case errors.Is(err, raft.ErrEnqueueTimeout):
		return fmt.Errorf("%w: %w", err, context.DeadlineExceeded)
	}
	return err
}

// LocalState returns a copy of this node's state. On a follower it may lag
// the leader's (by the replication delay, or without bound while cut off).
func (n *Node) LocalState() *checkpoints.State { return n.fsm.clone() }

// IsLeader reports whether this node believes it is the leader right now. A
// decision that must not act on a stale belief uses [Node.ConsistentState].
func (n *Node) IsLeader() bool { return n.raft.State() == raft.Leader }

// Leader returns the leader's id and address as this node knows them, or
// empty strings when it knows none.
func (n *Node) Leader() (id, address string) {
	a, i := n.raft.LeaderWithID()
	return string(i), string(a)
}

// WaitLeader blocks until this node knows a leader (itself or another). When
// ctx ends first it returns [ErrNoLeader] wrapping ctx's error.
func (n *Node) WaitLeader(ctx context.Context) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		if id, _ := n.Leader(); id != "" {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for leader: %w: %w", ErrNoLeader, ctx.Err())
		case <-n.closing:
			return fmt.Errorf("wait for leader: %w: %w", ErrNoLeader, raft.ErrRaftShutdown)
		case <-t.C:
		}
	}
}

// Changes is signalled after an applied command or a snapshot restore that
// changed the state's Primary or Epoch, and whenever this node's raft state
// or known leader changes. It is a hint, coalesced (buffered 1, never
// blocks raft, never closed): on a signal, re-read the state and leadership.
func (n *Node) Changes() <-chan struct{} { return n.changes }

// Stats is a snapshot of this node's raft counters, for metrics and status.
type Stats struct {
	State        string // leader, follower, candidate or shutdown
	Term         uint64
	CommitIndex  uint64
	AppliedIndex uint64 // handed to the FSM
	LastLogIndex uint64 // last index in the log or the last snapshot
	// LastContact is the time since the leader was last heard from: 0 on the
	// leader, -1 when this node never heard from one.
	LastContact time.Duration
	LeaderID    string
	Voters      int // voters in the latest (maybe uncommitted) configuration
}

// Stats returns the node's current counters. It does not block on raft.
func (n *Node) Stats() Stats {
	state := n.raft.State()
	_, leader := n.raft.LeaderWithID()
	s := Stats{
		State:        strings.ToLower(state.String()),
		Term:         n.raft.CurrentTerm(),
		CommitIndex:  n.raft.CommitIndex(),
		AppliedIndex: n.raft.AppliedIndex(),
		LastLogIndex: n.raft.LastIndex(),
		LeaderID:     string(leader),
	}
	switch last := n.raft.LastContact(); {
	case state == raft.Leader:
	case last.IsZero():
		s.LastContact = -1
	default:
		s.LastContact = time.Since(last)
	}
	if f := n.raft.GetConfiguration(); f.Error() == nil {
		for _, srv := range f.Configuration().Servers {
			if srv.Suffrage == raft.Voter {
				s.Voters++
			}
		}
	}
	return s
}

// abandonedError says a raft future was left unresolved because ctx ended or
// the node closed.
type abandonedError struct{ cause error }

func (e *abandonedError) Error() string { return "stopped waiting: " + e.cause.Error() }
func (e *abandonedError) Unwrap() error { return e.cause }

// wait returns f's error, or an *abandonedError when ctx ends or the node
// closes first. raft futures take no context, so f is waited for in a
// goroutine. It ends when raft resolves f: on commit, loss of leadership or
// shutdown. The one exception is raft's: a command committed but not yet
// handed to the FSM when raft shuts down is never resolved, and its goroutine
// stays until the process exits.
func (n *Node) wait(ctx context.Context, f raft.Future) error {
	done := make(chan error, 1)
	go func() { done <- f.Error() }()
	var cause error
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		cause = ctx.Err()
	case <-n.closing:
		cause = raft.ErrRaftShutdown
	}
	select {
	case err := <-done: // resolved meanwhile: the real outcome beats a guess
		return err
	default:
		return &abandonedError{cause: cause}
	}
}

func withDefaultTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, DefaultApplyTimeout)
}

// enqueueTimeout is the time left before ctx's deadline, for raft calls that
// take a timeout (it bounds only the hand-off to raft's main loop).
func enqueueTimeout(ctx context.Context) (time.Duration, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	d, ok := ctx.Deadline()
	if !ok {
		return 0, nil
	}
	left := time.Until(d)
	if left <= 0 {
		return 0, context.DeadlineExceeded
	}
	return left, nil
}
