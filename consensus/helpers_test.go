package consensus

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xdcr/xdcr/checkpoints"
	"github.com/xdcr/xdcr/replicator/change"
)

// Timeouts for tests: short enough to elect within a second, long enough not
// to flap on a loaded 2-core machine under -race.
const (
	testHeartbeat = 500 * time.Millisecond
	testLease     = 500 * time.Millisecond
	testCommit    = 10 * time.Millisecond
	waitFor       = 15 * time.Second // upper bound for anything to converge
)

// testLogger sends logs to t.Log, so they show only for failing tests. Lines
// written after the test ended (raft's connection goroutines wind down
// asynchronously) are dropped: t.Log would panic.
func testLogger(t *testing.T) *slog.Logger {
	t.Helper()
	w := &testWriter{t: t}
	t.Cleanup(w.stop)
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type testWriter struct {
	mu   sync.Mutex
	t    *testing.T
	done bool
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimSuffix(string(p), "\n"))
	}
	return len(p), nil
}

func (w *testWriter) stop() {
	w.mu.Lock()
	w.done = true
	w.mu.Unlock()
}

// freeAddrs returns n loopback addresses with ports that were free a moment ago.
func freeAddrs(t *testing.T, n int) []string {
	t.Helper()
	var addrs []string
	var lns []net.Listener
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("reserve a port: %v", err)
		}
		lns = append(lns, ln)
		addrs = append(addrs, ln.Addr().String())
	}
	for _, ln := range lns {
		ln.Close()
	}
	return addrs
}

// cluster is n nodes of one group on loopback, each with its own data dir.
type cluster struct {
	t     *testing.T
	cfgs  []Config
	nodes []*Node // nil while a node is stopped
}

// newCluster opens n nodes; adjust, if given, edits each config first.
func newCluster(t *testing.T, n int, adjust func(i int, c *Config)) *cluster {
	t.Helper()
	addrs := freeAddrs(t, n)
	var peers []Peer
	for i, a := range addrs {
		peers = append(peers, Peer{ID: fmt.Sprintf("n%d", i+1), Address: a})
	}
	logger := testLogger(t)
	c := &cluster{t: t}
	for i, p := range peers {
		cfg := Config{
			ID:                 p.ID,
			Bind:               p.Address,
			Dir:                t.TempDir(),
			Peers:              peers,
			HeartbeatTimeout:   testHeartbeat,
			ElectionTimeout:    testHeartbeat,
			LeaderLeaseTimeout: testLease,
			CommitTimeout:      testCommit,
			Logger:             logger,
		}
		if adjust != nil {
			adjust(i, &cfg)
		}
		c.cfgs = append(c.cfgs, cfg)
	}
	c.nodes = make([]*Node, n)
	t.Cleanup(c.closeAll)
	for i := range c.cfgs {
		c.start(i)
	}
	return c
}

func (c *cluster) start(i int) *Node {
	c.t.Helper()
	n, err := Open(c.cfgs[i])
	if err != nil {
		c.t.Fatalf("open %s: %v", c.cfgs[i].ID, err)
	}
	c.nodes[i] = n
	return n
}

func (c *cluster) stop(i int) {
	c.t.Helper()
	if err := c.nodes[i].Close(); err != nil {
		c.t.Errorf("close %s: %v", c.cfgs[i].ID, err)
	}
	c.nodes[i] = nil
}

func (c *cluster) closeAll() {
	for i, n := range c.nodes {
		if n != nil {
			if err := n.Close(); err != nil {
				c.t.Errorf("close %s: %v", c.cfgs[i].ID, err)
			}
		}
	}
}

// leader waits until one running node is leader and every running node knows
// it, and returns its index.
func (c *cluster) leader() int {
	c.t.Helper()
	found := -1
	eventually(c.t, "a leader known to every running node", func() bool {
		found = -1
		for i, n := range c.nodes {
			if n != nil && n.IsLeader() {
				found = i
			}
		}
		if found < 0 {
			return false
		}
		for _, n := range c.nodes {
			if n != nil {
				if id, _ := n.Leader(); id != c.cfgs[found].ID {
					return false
				}
			}
		}
		return true
	})
	return found
}

// follower returns the index of a running node other than leader.
func (c *cluster) follower(leader int) int {
	for i, n := range c.nodes {
		if n != nil && i != leader {
			return i
		}
	}
	c.t.Fatal("no running follower")
	return -1
}

// converged waits until every running node's state equals want.
func (c *cluster) converged(want *checkpoints.State) {
	c.t.Helper()
	w := stateJSON(c.t, want)
	eventually(c.t, "every node's state equal to "+w, func() bool {
		for _, n := range c.nodes {
			if n != nil && stateJSON(c.t, n.LocalState()) != w {
				return false
			}
		}
		return true
	})
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up after %s waiting for %s", waitFor, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func stateJSON(t *testing.T, s *checkpoints.State) string {
	t.Helper()
	b, err := s.MarshalSnapshot()
	if err != nil {
		t.Fatalf("marshal state: %v", err)
	}
	return string(b)
}

var testSites = []string{"dc-a", "dc-b", "dc-c"}

func encode(t *testing.T, c checkpoints.Command) []byte {
	t.Helper()
	b, err := checkpoints.EncodeCommand(c)
	if err != nil {
		t.Fatalf("encode %s command: %v", c.Op, err)
	}
	return b
}

func bootstrapCmd(t *testing.T) []byte {
	return encode(t, checkpoints.Bootstrap{Cluster: "shop", Primary: "dc-a", Sites: testSites}.Command(time.Now()))
}

// sourceCmd is dc-a's report of having sent WAL up to lsn in epoch 1.
func sourceCmd(t *testing.T, lsn change.LSN) []byte {
	return encode(t, checkpoints.SourceReport{
		Site: "dc-a", Epoch: 1, SentLSN: lsn, WALLSN: lsn, State: checkpoints.StateStreaming,
	}.Command(time.Now()))
}

// apply applies cmd on node i, which must be the leader.
func (c *cluster) apply(i int, cmd []byte) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(c.t.Context(), waitFor)
	defer cancel()
	if err := c.nodes[i].Apply(ctx, cmd); err != nil {
		c.t.Fatalf("apply on %s: %v", c.cfgs[i].ID, err)
	}
}

// consistent returns node i's linearizable state.
func (c *cluster) consistent(i int) *checkpoints.State {
	c.t.Helper()
	s, err := c.nodes[i].ConsistentState(c.t.Context())
	if err != nil {
		c.t.Fatalf("consistent state on %s: %v", c.cfgs[i].ID, err)
	}
	return s
}

// drain empties a Changes channel.
func drain(ch <-chan struct{}) {
	for {
		select {
		case <-ch:
		default:
			return
		}
	}
}

// signalled reports whether ch holds or receives a signal within the given
// time (0: only one already there).
func signalled(ch <-chan struct{}, within time.Duration) bool {
	select {
	case <-ch:
		return true
	default:
	}
	select {
	case <-ch:
		return true
	case <-time.After(within):
		return false
	}
}
