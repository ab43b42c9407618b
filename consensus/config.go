package consensus

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"
)

// Defaults for a [Config] field left at zero. The timeouts suit a WAN-ish
// link or a loaded 2-core machine: raft's own defaults (1 s / 1 s / 500 ms)
// are tuned for a LAN and flap under load. For a real WAN between distant
// sites raise them further (docs/consensus.md).
const (
	DefaultHeartbeatTimeout = 2 * time.Second
	DefaultCommitTimeout    = 50 * time.Millisecond
	// ElectionTimeout defaults to HeartbeatTimeout, LeaderLeaseTimeout to
	// half of it.

	// The state is a few hundred bytes per site, so snapshots are cheap:
	// take them often and keep a short log.
	DefaultSnapshotInterval  = 60 * time.Second
	DefaultSnapshotThreshold = 2048
	DefaultTrailingLogs      = 2048

	// DefaultApplyTimeout bounds Apply and ConsistentState when ctx has no
	// deadline.
	DefaultApplyTimeout = 10 * time.Second
)

// Internal knobs that nobody has needed to tune.
const (
	transportTimeout = 10 * time.Second // I/O deadline of one RPC, and dial timeout
	transportMaxPool = 3                // pooled connections per peer
	retainSnapshots  = 2
	logCacheSize     = 256             // recent log entries kept in memory for replication
	boltOpenTimeout  = 5 * time.Second // raft.db is locked by another process
)

// Peer is one voting member of the group.
type Peer struct {
	ID      string // node id: a key of the config's nodes:
	Address string // host:port the other nodes dial (its Advertise)
}

// Config is what one node needs. Zero durations and counts take the defaults
// above; Logger nil discards raft's logs.
type Config struct {
	ID        string // this node's id (a key of the config's nodes:)
	Bind      string // host:port to listen on for Raft
	Advertise string // host:port the other nodes dial; default Bind
	Dir       string // data directory: raft.db (bolt log + stable store), snapshots/

	// DialVia maps a peer's address to the address this node dials instead
	// (a proxy in front of the link, as fault-injection tests put on every
	// link between sites); raft still knows the peer by its own address.
	// Empty: dial peers directly.
	DialVia map[string]string

	// Peers lists every voter, this node included. It is the configuration
	// of the very first bootstrap only: once Dir holds Raft state the group's
	// membership comes from the log, and Peers is not consulted again (a
	// difference is logged as a warning).
	Peers []Peer

	// TLS nil: plain TCP. Otherwise it is used to listen (server side) and
	// to dial (client side), so it must carry this node's certificate and the
	// RootCAs that verify the others. See streamlayer.go for where mutual TLS
	// and the node identity check plug in.
	TLS *tls.Config

	// HeartbeatTimeout: a follower that hears nothing from the leader for
	// this long starts an election. ElectionTimeout: how long a candidate
	// waits before trying again. LeaderLeaseTimeout: a leader that cannot
	// reach a majority for this long steps down (must be ≤ HeartbeatTimeout).
	// CommitTimeout: how long the leader waits for more commands before it
	// sends what it has.
	HeartbeatTimeout, ElectionTimeout, LeaderLeaseTimeout, CommitTimeout time.Duration

	// SnapshotInterval: how often raft checks whether to snapshot (staggered
	// up to 2x); SnapshotThreshold: log entries since the last snapshot that
	// make it take one; TrailingLogs: entries kept after a snapshot so a
	// follower that is slightly behind catches up from the log instead of a
	// whole snapshot.
	SnapshotInterval  time.Duration
	SnapshotThreshold uint64
	TrailingLogs      uint64

	// Logger receives this package's lines and raft's own (through an hclog
	// adapter), at the handler's level.
	Logger *slog.Logger
}

// withDefaults fills in defaults and checks c, reporting every problem.
func (c Config) withDefaults() (Config, error) {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{field}, args...)...))
	}
	if c.ID == "" {
		bad("id", "empty")
	}
	if c.Dir == "" {
		bad("dir", "empty")
	}
	if c.Bind == "" {
		bad("bind", "empty")
	} else if _, _, err := net.SplitHostPort(c.Bind); err != nil {
		bad("bind", "%w", err)
	}
	if c.Advertise == "" {
		c.Advertise = c.Bind
	}
	if c.Advertise != "" {
		if host, _, err := net.SplitHostPort(c.Advertise); err != nil {
			bad("advertise", "%w", err)
		} else if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
			bad("advertise", "%q is not an address other nodes can dial; set Advertise", c.Advertise)
		}
	}

	if len(c.Peers) == 0 {
		bad("peers", "empty")
	}
	ids, addrs := map[string]bool{}, map[string]bool{}
	self := false
	for i, p := range c.Peers {
		field := fmt.Sprintf("peers[%d]", i)
		switch {
		case p.ID == "" || p.Address == "":
			bad(field, "id and address are both required")
		case ids[p.ID]:
			bad(field, "duplicate id %q", p.ID)
		case addrs[p.Address]:
			bad(field, "duplicate address %q", p.Address)
		}
		ids[p.ID], addrs[p.Address] = true, true
		if p.ID == c.ID && c.ID != "" {
			self = true
			if p.Address != c.Advertise {
				bad(field, "address %q of this node differs from advertise %q", p.Address, c.Advertise)
			}
		}
	}
	if c.ID != "" && len(c.Peers) > 0 && !self {
		bad("peers", "this node %q is not listed", c.ID)
	}

	if c.HeartbeatTimeout == 0 {
		c.HeartbeatTimeout = DefaultHeartbeatTimeout
	}
	if c.ElectionTimeout == 0 {
		c.ElectionTimeout = c.HeartbeatTimeout
	}
	if c.LeaderLeaseTimeout == 0 {
		c.LeaderLeaseTimeout = c.HeartbeatTimeout / 2
	}
	if c.CommitTimeout == 0 {
		c.CommitTimeout = DefaultCommitTimeout
	}
	if c.SnapshotInterval == 0 {
		c.SnapshotInterval = DefaultSnapshotInterval
	}
	if c.SnapshotThreshold == 0 {
		c.SnapshotThreshold = DefaultSnapshotThreshold
	}
	if c.TrailingLogs == 0 {
		c.TrailingLogs = DefaultTrailingLogs
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c, errors.Join(errs...)
}
