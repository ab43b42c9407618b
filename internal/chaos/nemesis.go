package chaos

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/xdcr/xdcr/deploy/faults"
	"github.com/xdcr/xdcr/deploy/local"
	"github.com/xdcr/xdcr/deploy/topology"
	"github.com/xdcr/xdcr/internal/api"
	"github.com/xdcr/xdcr/internal/wait"
)

// Env is the cluster the nemeses act on: sites whose leaf links run
// through WAN, and a cluster of agents whose Raft and HTTP traffic between
// sites does too.
type Env struct {
	Sites   *local.Sites
	Cluster *topology.Cluster
	WAN     *faults.WAN
	// Binary is the xdcr executable, for the commands an operator runs
	// (xdcr promote --force, xdcr sync).
	Binary string
	api    *api.Client
	logf   func(format string, args ...any) // Run's progress

	mu      sync.Mutex
	aside   map[string]bool // sites the sampler leaves alone: diverged, until re-seeded
	gen     map[string]int  // site -> times it was re-seeded
	windows []LossWindow
}

// NewEnv returns the Env of a cluster running on sites joined by wan,
// whose agents run binary.
func NewEnv(sites *local.Sites, c *topology.Cluster, wan *faults.WAN, binary string) *Env {
	return &Env{Sites: sites, Cluster: c, WAN: wan, Binary: binary, api: api.NewClient(2*time.Second, ""),
		logf: func(string, ...any) {}, aside: map[string]bool{}, gen: map[string]int{}}
}

// setAside keeps the sampler off site (a diverged old primary), or lets it
// back on a re-seeded site with a new history.
func (e *Env) setAside(site string, aside bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if !aside && e.aside[site] {
		e.gen[site]++
	}
	e.aside[site] = aside
}

// LossWindows returns the loss windows of the forced failovers so far.
func (e *Env) LossWindows() []LossWindow {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.windows)
}

func (e *Env) addWindow(w LossWindow) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.windows = append(e.windows, w)
}

// Status returns the cluster's checkpoints as the first node that answers
// sees them.
func (e *Env) Status(ctx context.Context) (string, uint64, string, error) {
	var errs []error
	for _, n := range e.Cluster.Nodes() {
		st, err := e.api.Status(ctx, e.Cluster.HTTPAddr(n), false)
		if err == nil && st.Primary != "" {
			return st.Primary, st.Epoch, st.Leader, nil
		}
		errs = append(errs, err)
	}
	return "", 0, "", fmt.Errorf("no node answered with the cluster's state: %w", errors.Join(errs...))
}

// Primary returns the primary site and its database.
func (e *Env) Primary(ctx context.Context) (string, string, error) {
	p, _, _, err := e.Status(ctx)
	if err != nil {
		return "", "", err
	}
	return p, e.Cluster.DSN(p), nil
}

// Replicas returns every data site but the primary, and but a diverged
// old primary until it is re-seeded.
func (e *Env) Replicas(ctx context.Context) []Target {
	p, _, _, err := e.Status(ctx)
	if err != nil {
		return nil
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []Target
	for _, s := range e.Cluster.Config.SiteNames() {
		if s != p && !e.aside[s] {
			out = append(out, Target{Site: s, DSN: e.Cluster.DSN(s), Gen: e.gen[s]})
		}
	}
	return out
}

func (e *Env) site(name string) *local.Site { return e.Sites.Site(name) }

// A Nemesis injects one kind of fault. Inject starts it and returns what
// it did and the function that heals it.
type Nemesis struct {
	Name   string
	Inject func(ctx context.Context, e *Env, rng *rand.Rand) (what string, heal func(context.Context) error, err error)
}

// Nemeses returns every nemesis, in the order of the short schedule
// (TestNemeses). A replica whose stream mirror was cut, throttled or
// restarted can take tens of seconds to resume (JetStream retries a
// failed mirror with a growing backoff), so those faults come early,
// while the process faults run; partition-primary, which waits for every
// replica to catch up before its cut and moves the primary, comes last.
func Nemeses() []Nemesis {
	return []Nemesis{
		{"kill-capture", killAgent(primarySite)},
		{"kill-apply", killAgent(randomReplica)},
		{"restart-nats", restartNATS},
		{"throttle-wan", throttleWAN},
		{"partition-replica", partitionReplica},
		{"pause-capture", pauseCapture},
		{"restart-primary-pg-fast", restartPostgres(primarySite, local.StopFast)},
		{"restart-primary-pg-immediate", restartPostgres(primarySite, local.StopImmediate)},
		{"restart-replica-pg", restartPostgres(randomReplica, local.StopImmediate)},
		{"delay-wan", delayWAN},
		{"kill-raft-leader", killLeader},
		{"partition-primary", partitionPrimary},
	}
}

// hold is how long a fault lasts before it is healed; partition how long
// a replica site stays cut off, and links stay slow; leaseHold how long
// the capture agent stays stopped (longer than the source lease and
// Raft's failure detection).
var (
	hold      = 3 * time.Second
	partition = 10 * time.Second
	leaseHold = 10 * time.Second
)

// SetHolds sets how long faults last: most of them hold, a partition and
// slow links partitionFor.
func SetHolds(holdFor, partitionFor time.Duration) { hold, partition = holdFor, partitionFor }

// The slow links of delay-wan and throttle-wan.
const (
	wanDelay  = 200 * time.Millisecond // each way, ± wanJitter drawn per link
	wanJitter = 50 * time.Millisecond
	wanRate   = 16 << 10 // bytes per second, per connection and direction
)

func primarySite(ctx context.Context, e *Env, _ *rand.Rand) (string, error) {
	p, _, err := e.Primary(ctx)
	return p, err
}

func randomReplica(ctx context.Context, e *Env, rng *rand.Rand) (string, error) {
	rs := e.Replicas(ctx)
	if len(rs) == 0 {
		return "", errors.New("no replica site known")
	}
	return rs[rng.IntN(len(rs))].Site, nil
}

// killAgent kill -9s the agent of the site pick chooses and starts it
// again after hold.
func killAgent(pick func(context.Context, *Env, *rand.Rand) (string, error)) func(context.Context, *Env, *rand.Rand) (string, func(context.Context) error, error) {
	return func(ctx context.Context, e *Env, rng *rand.Rand) (string, func(context.Context) error, error) {
		site, err := pick(ctx, e, rng)
		if err != nil {
			return "", nil, err
		}
		node := topology.NodeID(site)
		if err := e.Cluster.KillAgent(node); err != nil {
			return "", nil, err
		}
		return "kill -9 agent " + node, restartAfterHold(e, node), nil
	}
}

// restartAfterHold starts node's agent again after hold.
func restartAfterHold(e *Env, node string) func(context.Context) error {
	return func(ctx context.Context) error {
		if err := wait.Sleep(ctx, hold); err != nil {
			return err
		}
		return e.Cluster.StartAgent(ctx, node)
	}
}

// killLeader kill -9s the Raft leader's agent.
func killLeader(ctx context.Context, e *Env, _ *rand.Rand) (string, func(context.Context) error, error) {
	_, _, leader, err := e.Status(ctx)
	if err != nil {
		return "", nil, err
	}
	if leader == "" {
		return "", nil, errors.New("no Raft leader known")
	}
	if err := e.Cluster.KillAgent(leader); err != nil {
		return "", nil, err
	}
	return "kill -9 Raft leader " + leader, restartAfterHold(e, leader), nil
}

// pauseCapture stops the primary's agent with SIGSTOP for longer than its
// lease, then lets it go on.
func pauseCapture(ctx context.Context, e *Env, _ *rand.Rand) (string, func(context.Context) error, error) {
	p, _, err := e.Primary(ctx)
	if err != nil {
		return "", nil, err
	}
	node := topology.NodeID(p)
	pid := e.Cluster.AgentPID(node)
	if pid == 0 {
		return "", nil, fmt.Errorf("agent %s is not running", node)
	}
	if err := faults.Pause(pid); err != nil {
		return "", nil, err
	}
	return fmt.Sprintf("SIGSTOP agent %s for %s", node, leaseHold), func(ctx context.Context) error {
		serr := wait.Sleep(ctx, leaseHold)
		if err := faults.Resume(pid); err != nil {
			return err
		}
		return serr
	}, nil
}

// restartPostgres stops the database of the site pick chooses in mode and
// starts it again after hold.
func restartPostgres(pick func(context.Context, *Env, *rand.Rand) (string, error), mode local.StopMode) func(context.Context, *Env, *rand.Rand) (string, func(context.Context) error, error) {
	return func(ctx context.Context, e *Env, rng *rand.Rand) (string, func(context.Context) error, error) {
		site, err := pick(ctx, e, rng)
		if err != nil {
			return "", nil, err
		}
		pg := e.site(site).Postgres
		if err := pg.Stop(ctx, mode); err != nil {
			return "", nil, fmt.Errorf("stop %s's PostgreSQL (%s): %w", site, mode, err)
		}
		return fmt.Sprintf("stop %s's PostgreSQL (%s)", site, mode), func(ctx context.Context) error {
			if err := wait.Sleep(ctx, hold); err != nil {
				return err
			}
			return pg.Start(ctx)
		}, nil
	}
}

// restartNATS stops a random site's NATS server, store kept, and starts it
// again after hold.
func restartNATS(ctx context.Context, e *Env, rng *rand.Rand) (string, func(context.Context) error, error) {
	sites := e.Cluster.Config.SiteNames()
	site := sites[rng.IntN(len(sites))]
	n := e.site(site).NATS
	n.Stop()
	return "stop " + site + "'s NATS server", func(ctx context.Context) error {
		if err := wait.Sleep(ctx, hold); err != nil {
			return err
		}
		return n.Start(ctx)
	}, nil
}

// partitionReplica cuts a replica site off from every other site (leaf,
// Raft and HTTP links) for the partition time.
func partitionReplica(ctx context.Context, e *Env, rng *rand.Rand) (string, func(context.Context) error, error) {
	site, err := randomReplica(ctx, e, rng)
	if err != nil {
		return "", nil, err
	}
	e.WAN.Isolate(site)
	return fmt.Sprintf("cut %s off for %s", site, partition), func(ctx context.Context) error {
		serr := wait.Sleep(ctx, partition)
		cerr := e.checkCut(site)
		e.WAN.Heal()
		return errors.Join(serr, cerr)
	}, nil
}

// checkCut fails when site, cut off by WAN.Isolate, still has a leaf
// connection to another site's NATS server: a partition that leaks.
func (e *Env) checkCut(site string) error {
	if n := e.site(site).NATS.LeafConnections(); n != 0 {
		return fmt.Errorf("the partition leaks: %s's NATS server still has %d leaf connections", site, n)
	}
	return nil
}

// delayWAN delays every link of the primary's site (its leaf links, the
// Raft and HTTP traffic of its agent, both ways) by wanDelay ± wanJitter,
// drawn per link, for the partition time: the stream reaches every
// replica late and Raft round trips to the primary take 300-500 ms.
func delayWAN(ctx context.Context, e *Env, rng *rand.Rand) (string, func(context.Context) error, error) {
	p, _, err := e.Primary(ctx)
	if err != nil {
		return "", nil, err
	}
	links := e.WAN.Of(p)
	for _, l := range links {
		l.SetDelay(wanDelay - wanJitter + time.Duration(rng.Int64N(int64(2*wanJitter))))
	}
	return fmt.Sprintf("delay %d links of %s by %s ± %s for %s", len(links), p, wanDelay, wanJitter, partition), healWANAfter(e, partition), nil
}

// throttleWAN limits every link of a random replica site to wanRate bytes
// a second per connection and direction, well below the rate at which the
// workloads' changes stream, for the partition time: the replica falls
// behind and catches up after.
func throttleWAN(ctx context.Context, e *Env, rng *rand.Rand) (string, func(context.Context) error, error) {
	site, err := randomReplica(ctx, e, rng)
	if err != nil {
		return "", nil, err
	}
	links := e.WAN.Of(site)
	for _, l := range links {
		l.SetRate(wanRate)
	}
	return fmt.Sprintf("throttle %d links of %s to %d KiB/s for %s", len(links), site, wanRate>>10, partition), healWANAfter(e, partition), nil
}

// healWANAfter restores every link, and clears delays and rate limits,
// after d.
func healWANAfter(e *Env, d time.Duration) func(context.Context) error {
	return func(ctx context.Context) error {
		serr := wait.Sleep(ctx, d)
		e.WAN.Heal()
		return serr
	}
}
