package consensus

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/xdcr/xdcr/checkpoints"
	"github.com/xdcr/xdcr/replicator/change"
)

// Three nodes bootstrapped from the same peers elect a leader, replicate
// commands, reject what the state rejects, and serve reads per the contract.
func TestThreeNodes(t *testing.T) {
	c := newCluster(t, 3, nil)
	l := c.leader()
	f := c.follower(l)
	for i, n := range c.nodes {
		if !n.bootstrapped || n.hadState {
			t.Errorf("%s: bootstrapped=%v hadState=%v, want a first bootstrap", c.cfgs[i].ID, n.bootstrapped, n.hadState)
		}
	}

	t.Run("replicates", func(t *testing.T) {
		c.apply(l, bootstrapCmd(t))
		for lsn := change.LSN(1); lsn <= 5; lsn++ {
			c.apply(l, sourceCmd(t, lsn*0x100))
		}
		want := c.nodes[l].LocalState()
		if !want.Bootstrapped() || want.Primary != "dc-a" || want.Epoch != 1 || want.Source.SentLSN != 0x500 {
			t.Fatalf("leader state: got primary %q epoch %d sent %s, want dc-a, 1, 0/500", want.Primary, want.Epoch, want.Source.SentLSN)
		}
		c.converged(want)
	})

	t.Run("follower refuses leader-only calls", func(t *testing.T) {
		err := c.nodes[f].Apply(t.Context(), sourceCmd(t, 0x600))
		if !errors.Is(err, ErrNotLeader) {
			t.Errorf("Apply on a follower: got %v, want ErrNotLeader", err)
		}
		_, err = c.nodes[f].ConsistentState(t.Context())
		if !errors.Is(err, ErrNotLeader) {
			t.Errorf("ConsistentState on a follower: got %v, want ErrNotLeader", err)
		}
		id, addr := c.nodes[f].Leader()
		if id != c.cfgs[l].ID || addr != c.cfgs[l].Bind {
			t.Errorf("follower's Leader(): got %s %s, want %s %s", id, addr, c.cfgs[l].ID, c.cfgs[l].Bind)
		}
	})

	t.Run("consistent read on the leader", func(t *testing.T) {
		c.apply(l, sourceCmd(t, 0x700))
		got := c.consistent(l)
		if got.Source.SentLSN != 0x700 {
			t.Errorf("ConsistentState: got sent_lsn %s, want 0/700", got.Source.SentLSN)
		}
		// It is a copy: changing it changes nothing in the node.
		got.Primary = "elsewhere"
		if p := c.nodes[l].LocalState().Primary; p != "dc-a" {
			t.Errorf("after editing the copy, the node's primary is %q", p)
		}
	})

	t.Run("rejections reach the caller", func(t *testing.T) {
		before := stateJSON(t, c.consistent(l))
		for _, tc := range []struct {
			name string
			cmd  []byte
			want error
		}{
			{"position backwards", sourceCmd(t, 0x10), checkpoints.ErrRegression},
			{"unknown site", encode(t, checkpoints.SourceReport{Site: "dc-x", Epoch: 1, State: checkpoints.StateStreaming}.Command(time.Now())), checkpoints.ErrUnknownSite},
			{"second bootstrap", bootstrapCmd(t), checkpoints.ErrAlreadyBootstrapped},
			{"not a command", []byte("{}"), checkpoints.ErrInvalidCommand},
		} {
			err := c.nodes[l].Apply(t.Context(), tc.cmd)
			if !errors.Is(err, tc.want) {
				t.Errorf("%s: got %v, want %v", tc.name, err, tc.want)
			}
			if errors.Is(err, ErrUnknownOutcome) || errors.Is(err, ErrNotLeader) {
				t.Errorf("%s: a rejection must not look like %v", tc.name, err)
			}
		}
		after := c.consistent(l)
		if got := stateJSON(t, after); got != before {
			t.Errorf("rejected commands changed the state:\n got %s\nwant %s", got, before)
		}
		c.converged(after)
	})

	t.Run("ctx already done proposes nothing", func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		last := c.nodes[l].Stats().LastLogIndex
		err := c.nodes[l].Apply(ctx, sourceCmd(t, 0x800))
		if !errors.Is(err, context.Canceled) || errors.Is(err, ErrUnknownOutcome) {
			t.Errorf("Apply with a cancelled ctx: got %v, want context.Canceled and not ErrUnknownOutcome", err)
		}
		if now := c.nodes[l].Stats().LastLogIndex; now != last {
			t.Errorf("last log index moved from %d to %d", last, now)
		}
	})

	t.Run("stats", func(t *testing.T) {
		ls, fs := c.nodes[l].Stats(), c.nodes[f].Stats()
		if ls.State != "leader" || fs.State != "follower" {
			t.Errorf("states: got %q and %q, want leader and follower", ls.State, fs.State)
		}
		if ls.Voters != 3 || ls.LeaderID != c.cfgs[l].ID || fs.LeaderID != c.cfgs[l].ID {
			t.Errorf("leader stats %+v / follower stats %+v: want 3 voters and leader %s", ls, fs, c.cfgs[l].ID)
		}
		if ls.LastContact != 0 || fs.LastContact < 0 || fs.LastContact > 5*testHeartbeat {
			t.Errorf("last contact: leader %v, follower %v", ls.LastContact, fs.LastContact)
		}
		if ls.CommitIndex == 0 || ls.AppliedIndex < ls.CommitIndex-1 || ls.Term == 0 {
			t.Errorf("leader stats %+v", ls)
		}
	})
}

// The leader dies: the other two elect a new one and go on; the old leader
// restarts from its data dir without bootstrapping again and catches up.
func TestLeaderRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("restarts a raft node")
	}
	c := newCluster(t, 3, nil)
	old := c.leader()
	c.apply(old, bootstrapCmd(t))
	c.apply(old, sourceCmd(t, 0x100))
	c.converged(c.nodes[old].LocalState())

	c.stop(old)
	l := c.leader()
	if l == old {
		t.Fatalf("the stopped node is leader")
	}
	c.apply(l, sourceCmd(t, 0x200))
	c.apply(l, sourceCmd(t, 0x300))

	n := c.start(old)
	if !n.hadState || n.bootstrapped {
		t.Errorf("restart: hadState=%v bootstrapped=%v, want true, false", n.hadState, n.bootstrapped)
	}
	want := c.consistent(l)
	if want.Source.SentLSN != 0x300 {
		t.Fatalf("new leader's sent_lsn: got %s, want 0/300", want.Source.SentLSN)
	}
	c.converged(want)

	// Exactly one configuration entry in the restarted node's log: the first
	// bootstrap, at index 1 of term 1.
	first, err := n.logs.FirstIndex()
	if err != nil {
		t.Fatal(err)
	}
	last, err := n.logs.LastIndex()
	if err != nil {
		t.Fatal(err)
	}
	var configs []raft.Log
	for i := first; i <= last; i++ {
		var e raft.Log
		if err := n.logs.GetLog(i, &e); err != nil {
			t.Fatalf("log entry %d: %v", i, err)
		}
		if e.Type == raft.LogConfiguration {
			configs = append(configs, e)
		}
	}
	if len(configs) != 1 || configs[0].Index != 1 || configs[0].Term != 1 {
		t.Errorf("configuration entries in the restarted node's log %d..%d: got %d (first at index %d), want one at index 1, term 1",
			first, last, len(configs), configs[0].Index)
	}
	if id, _ := n.Leader(); id != c.cfgs[l].ID {
		t.Errorf("restarted node follows %q, want %q", id, c.cfgs[l].ID)
	}
}

// Snapshots: a follower that was down while the leader snapshotted and
// truncated its log catches up through InstallSnapshot; a node restarted
// after a snapshot restores it and replays the rest.
func TestSnapshots(t *testing.T) {
	if testing.Short() {
		t.Skip("restarts raft nodes")
	}
	c := newCluster(t, 3, func(_ int, cfg *Config) {
		cfg.TrailingLogs = 2
		cfg.SnapshotInterval = time.Hour // only forced snapshots
		cfg.SnapshotThreshold = 1 << 40
	})
	l := c.leader()
	f := c.follower(l)
	c.apply(l, bootstrapCmd(t))
	c.apply(l, sourceCmd(t, 0x100))
	c.converged(c.nodes[l].LocalState())
	behind := c.nodes[f].Stats().LastLogIndex
	c.stop(f)

	for lsn := change.LSN(0x200); lsn <= 0xa00; lsn += 0x100 {
		c.apply(l, sourceCmd(t, lsn))
	}
	if err := c.nodes[l].raft.Snapshot().Error(); err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	first, err := c.nodes[l].logs.FirstIndex()
	if err != nil {
		t.Fatal(err)
	}
	if first <= behind+1 {
		t.Fatalf("leader's log starts at %d; the stopped follower needs %d: not truncated", first, behind+1)
	}
	c.apply(l, sourceCmd(t, 0xb00))
	c.apply(l, sourceCmd(t, 0xc00))

	if snaps, _ := os.ReadDir(filepath.Join(c.cfgs[f].Dir, "snapshots")); len(snaps) != 0 {
		t.Fatalf("the follower had snapshots before it went down: %v", snaps)
	}
	n := c.start(f)
	want := c.consistent(l)
	c.converged(want)
	list, err := n.snaps.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(list) == 0 || list[0].Index < first-1 {
		t.Errorf("follower's snapshots after catching up: %+v, want one from the leader (index ≥ %d)", list, first-1)
	}

	// Restart the node that took the snapshot: the snapshot is restored
	// before raft starts, the log after it replayed once a leader is known.
	c.stop(l)
	n = c.start(l)
	if got := n.LocalState(); !got.Bootstrapped() || got.Source.SentLSN < 0xa00 {
		t.Errorf("right after restart: bootstrapped=%v sent_lsn=%s, want the snapshot's state (≥ 0/A00)", got.Bootstrapped(), got.Source.SentLSN)
	}
	l = c.leader()
	c.apply(l, sourceCmd(t, 0xd00))
	c.converged(c.consistent(l))
}

// Changes fires on every node when the primary or the epoch changes, not for
// a mere position report, and when leadership moves.
func TestChanges(t *testing.T) {
	c := newCluster(t, 3, nil)
	l := c.leader()
	for _, n := range c.nodes {
		drain(n.Changes())
	}

	c.apply(l, bootstrapCmd(t))
	// The leader's FSM signals before Apply returns.
	if !signalled(c.nodes[l].Changes(), 0) {
		t.Error("leader: no signal after the bootstrap set primary and epoch")
	}
	for i, n := range c.nodes {
		if i != l && !signalled(n.Changes(), waitFor) {
			t.Errorf("%s: no signal after the bootstrap", c.cfgs[i].ID)
		}
	}

	drain(c.nodes[l].Changes())
	c.apply(l, sourceCmd(t, 0x100))
	if signalled(c.nodes[l].Changes(), 0) {
		t.Error("leader: signal after a source report that changed neither primary nor epoch")
	}

	c.converged(c.nodes[l].LocalState())
	for _, n := range c.nodes {
		drain(n.Changes())
	}
	c.stop(l)
	for i, n := range c.nodes {
		if n != nil && !signalled(n.Changes(), waitFor) {
			t.Errorf("%s: no signal after the leader stopped", c.cfgs[i].ID)
		}
	}
	c.leader() // and the survivors elect one of them
}

// An entry of a format this build does not know stops a node rather than
// being skipped (which would let states diverge). Every node that learns the
// entry is committed halts: the proposer at once, then the next leader, which
// commits it again with its first entry. That is a majority, so the group
// stops; the last node may never learn of the commit.
func TestUnsupportedVersionHalts(t *testing.T) {
	c := newCluster(t, 3, nil)
	l := c.leader()
	c.apply(l, bootstrapCmd(t))
	err := c.nodes[l].Apply(t.Context(), []byte(`{"v":99,"op":"teleport"}`))
	if !errors.Is(err, checkpoints.ErrUnsupportedVersion) {
		t.Fatalf("Apply of a version-99 entry: got %v, want ErrUnsupportedVersion", err)
	}
	halted := func(n *Node) bool {
		return errors.Is(n.Err(), checkpoints.ErrUnsupportedVersion) && n.Stats().State == "shutdown"
	}
	eventually(t, "the leader halted", func() bool { return halted(c.nodes[l]) })
	if err := c.nodes[l].Apply(t.Context(), sourceCmd(t, 0x100)); !errors.Is(err, raft.ErrRaftShutdown) {
		t.Errorf("Apply after the halt: got %v, want raft.ErrRaftShutdown", err)
	}
	eventually(t, "a majority halted", func() bool {
		count := 0
		for _, n := range c.nodes {
			if halted(n) {
				count++
			}
		}
		return count >= 2
	})
}

func TestWaitLeaderTimesOut(t *testing.T) {
	addrs := freeAddrs(t, 3)
	n, err := Open(Config{
		ID: "n1", Bind: addrs[0], Dir: t.TempDir(), Logger: testLogger(t),
		Peers:            []Peer{{"n1", addrs[0]}, {"n2", addrs[1]}, {"n3", addrs[2]}},
		HeartbeatTimeout: testHeartbeat, LeaderLeaseTimeout: testLease,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 3*testHeartbeat)
	defer cancel()
	err = n.WaitLeader(ctx)
	if !errors.Is(err, ErrNoLeader) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("WaitLeader alone among 3 voters: got %v, want ErrNoLeader and DeadlineExceeded", err)
	}
	if s := n.Stats(); s.LastContact != -1 || s.LeaderID != "" || s.Voters != 3 {
		t.Errorf("stats of a node that never heard a leader: %+v", s)
	}
	if err := n.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
	if err := n.Close(); err != nil {
		t.Errorf("second close: %v", err)
	}
}

func TestOpenRefusesBadConfig(t *testing.T) {
	peers := []Peer{{"a", "127.0.0.1:7001"}, {"b", "127.0.0.1:7002"}}
	good := Config{ID: "a", Bind: "127.0.0.1:7001", Dir: "/nonexistent", Peers: peers}
	for _, tc := range []struct {
		name string
		edit func(*Config)
		want string
	}{
		{"no id", func(c *Config) { c.ID = "" }, "id: empty"},
		{"no dir", func(c *Config) { c.Dir = "" }, "dir: empty"},
		{"bind without port", func(c *Config) { c.Bind = "127.0.0.1" }, "bind:"},
		{"wildcard advertise", func(c *Config) { c.Bind = "0.0.0.0:7001" }, "not an address other nodes can dial"},
		{"not among peers", func(c *Config) { c.ID = "z" }, `this node "z" is not listed`},
		{"duplicate id", func(c *Config) { c.Peers = []Peer{peers[0], {"a", "127.0.0.1:7003"}} }, "duplicate id"},
		{"duplicate address", func(c *Config) { c.Peers = []Peer{peers[0], {"b", peers[0].Address}} }, "duplicate address"},
		{"own address differs", func(c *Config) { c.Advertise = "127.0.0.2:7001" }, "differs from advertise"},
		{"lease above heartbeat", func(c *Config) { c.HeartbeatTimeout, c.LeaderLeaseTimeout = time.Second, 2*time.Second }, "LeaderLeaseTimeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := good
			tc.edit(&cfg)
			n, err := Open(cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want an error containing %q", err, tc.want)
			}
			if n != nil {
				t.Errorf("got a node with the error")
			}
			if err := n.Close(); err != nil {
				t.Errorf("Close after a failed Open: %v", err)
			}
		})
	}
}

// A port in use fails Open after the stores were opened: they are closed
// again, so the same Dir opens fine afterwards.
func TestOpenCleansUpOnError(t *testing.T) {
	addrs := freeAddrs(t, 1)
	dir := t.TempDir()
	cfg := Config{ID: "a", Bind: addrs[0], Dir: dir, Peers: []Peer{{"a", addrs[0]}}, Logger: testLogger(t),
		HeartbeatTimeout: testHeartbeat, LeaderLeaseTimeout: testLease}
	blocker, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	other := cfg
	other.Dir = t.TempDir()
	if n, err := Open(other); err == nil {
		n.Close()
		t.Fatal("second node on the same port: no error")
	}
	if err := blocker.Close(); err != nil {
		t.Fatal(err)
	}
	// A single voter elects itself: the dir and the port are usable again.
	n, err := Open(other)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer n.Close()
	if err := n.WaitLeader(t.Context()); err != nil {
		t.Fatal(err)
	}
}
