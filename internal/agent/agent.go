// Package agent wires one xdcr node: its Raft member, its HTTP API and,
// on a data site, the data path pipeline of that site — capture while the
// site is the primary of the current epoch, apply otherwise. cmd/xdcr,
// deploy/topology and the tests all run agents through it.
package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"

	"github.com/xdcr/xdcr/checkpoints"
	"github.com/xdcr/xdcr/consensus"
	"github.com/xdcr/xdcr/internal/api"
	"github.com/xdcr/xdcr/internal/certs"
	"github.com/xdcr/xdcr/internal/config"
	"github.com/xdcr/xdcr/internal/natsconn"
	"github.com/xdcr/xdcr/replicator"
	"github.com/xdcr/xdcr/transport"
)

// Options are what an agent needs beyond the config.
type Options struct {
	// DataDir holds the node's Raft log and snapshots.
	DataDir string
	// Version is reported in metrics.
	Version string
	// DialVia maps another node's Raft or HTTP address to the address
	// this node dials instead: a proxy in front of the link, as the
	// fault-injection tests put on every link between sites (deploy/faults).
	// Empty: dial the other nodes directly.
	DialVia map[string]string
}

// Timing of the reports agents make through Raft, and of "down".
const (
	reportInterval = time.Second
	downAfter      = 5 * time.Second
)

// Agent runs one node of the config.
type Agent struct {
	cfg     *config.Config
	id      string
	node    config.Node
	opts    Options
	log     *slog.Logger
	token   string      // the HTTP API's admin token; empty: none
	raftTLS *tls.Config // mutual TLS between the Raft nodes; nil: plain TCP
	httpTLS *tls.Config // the HTTP API's certificate; nil: plain HTTP
	metrics *metrics
	client  *api.Client

	raft  *consensus.Node // set by Run
	lease *sourceLease    // this site's lease as the primary of its epoch

	cache *siteCache // cache invalidation (cache.go); set by runPipeline, nil without cache: templates

	mu       sync.Mutex
	pipeline pipelineState
	capture  *replicator.Capture // the running capture, for a drain
	hold     bool                // a promotion holds the pipeline
	cancel   context.CancelFunc  // ends the running pipeline

	walWarnedAt time.Time // when the retained-WAL warning was last logged; zero: not over (slotwarn.go)
}

// pipelineState is what the site's pipeline last said about itself.
type pipelineState struct {
	running bool
	role    Role
	state   string
	err     error
	source  replicator.SourceProgress
	applied *replicator.ApplyProgress
	catchUp bool
}

// Role says which site is the primary, in which epoch.
type Role struct {
	Primary string
	Epoch   uint64
}

// New returns the agent of node id. Nothing runs until Run.
func New(cfg *config.Config, id string, opts Options, log *slog.Logger) (*Agent, error) {
	node, ok := cfg.Node(id)
	if !ok {
		return nil, fmt.Errorf("node %q is not in the config's nodes (have %v)", id, cfg.NodeNames())
	}
	if opts.DataDir == "" {
		return nil, errors.New("a data directory is required for the node's Raft state")
	}
	token, err := cfg.HTTP.Token()
	if err != nil {
		return nil, err
	}
	client, err := api.ClientFor(cfg, 5*time.Second)
	if err != nil {
		return nil, err
	}
	if len(opts.DialVia) > 0 {
		dialVia(client.HTTP, opts.DialVia)
	}
	var raftTLS, httpTLS *tls.Config
	if cfg.TLS.Enabled() {
		f := cfg.TLS.ForNode(id)
		if raftTLS, err = certs.Load(certs.Files{CA: f.CAFile, Cert: f.CertFile, Key: f.KeyFile}); err != nil {
			return nil, fmt.Errorf("tls of node %s: %w", id, err)
		}
		if cfg.HTTP.TLS {
			// the same certificate; HTTP clients (xdcr lag, Prometheus)
			// authenticate with the token, not a certificate
			httpTLS = &tls.Config{Certificates: raftTLS.Certificates, MinVersion: tls.VersionTLS12}
		}
	}
	return &Agent{
		raftTLS: raftTLS,
		httpTLS: httpTLS,
		cfg:     cfg,
		id:      id,
		node:    node,
		opts:    opts,
		log:     log.With("node", id, "site", node.Site),
		metrics: newMetrics(opts.Version),
		token:   token,
		client:  client,
		lease:   &sourceLease{timeout: leaseTimeout},
	}, nil
}

// Run runs the node until ctx ends; it returns nil then. It returns an
// error when the node cannot run (its Raft state cannot be opened, its
// address is taken) or its pipeline stopped on a problem that needs an
// operator (a lost slot, a table without a key).
//
// Shutdown order: the pipeline stops first (capture confirms nothing more,
// apply commits nothing half-done), then the reporter, then the HTTP API,
// and the Raft member last, so the node keeps voting until the end.
func (a *Agent) Run(ctx context.Context) error {
	node, err := consensus.Open(consensus.Config{
		ID:      a.id,
		Bind:    a.node.Raft,
		Dir:     filepath.Join(a.opts.DataDir, "raft"),
		Peers:   a.peers(),
		DialVia: a.opts.DialVia,
		TLS:     a.raftTLS,
		Logger:  a.log.With("component", "raft"),
	})
	if err != nil {
		return fmt.Errorf("open raft: %w", err)
	}
	a.raft = node
	defer func() {
		if err := node.Close(); err != nil {
			a.log.Warn("close raft", "err", err)
		}
	}()
	a.metrics.registry.MustRegister(&stateCollector{a: a})

	httpCtx, stopHTTP := context.WithCancel(context.WithoutCancel(ctx))
	defer stopHTTP()
	httpDone := make(chan error, 1)
	srv := api.NewServer(a.node.HTTP, a, a.metrics.registry, api.Auth{Token: a.token, ProtectReads: a.cfg.HTTP.ProtectReads, TLS: a.httpTLS}, a.log)
	go func() { httpDone <- srv.Run(httpCtx) }()

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return a.bootstrap(gctx) })
	g.Go(func() error { return a.report(gctx) })
	g.Go(func() error { return a.promotions(gctx) })
	if !a.node.IsWitness() {
		g.Go(func() error { return a.runPipeline(gctx) })
	}
	err = g.Wait()
	stopHTTP()
	if herr := <-httpDone; herr != nil && err == nil {
		err = herr
	}
	if errors.Is(err, context.Canceled) {
		err = nil
	}
	return err
}

func (a *Agent) peers() []consensus.Peer {
	var peers []consensus.Peer
	for _, id := range a.cfg.NodeNames() {
		n, _ := a.cfg.Node(id)
		peers = append(peers, consensus.Peer{ID: id, Address: n.Raft})
	}
	return peers
}

// bootstrap records the config's cluster, primary and sites in the Raft
// state once, when the state is empty. Only the leader proposes; a
// second proposal is refused by the state machine and is harmless.
func (a *Agent) bootstrap(ctx context.Context) error {
	for {
		st := a.raft.LocalState()
		if st.Bootstrapped() {
			if st.Cluster != a.cfg.Cluster {
				return fmt.Errorf("the Raft state in %s belongs to cluster %q, the config names %q: point --data-dir at this cluster's state",
					a.opts.DataDir, st.Cluster, a.cfg.Cluster)
			}
			return nil
		}
		if a.raft.IsLeader() {
			cmd := checkpoints.Command{
				Version: checkpoints.Version, Op: checkpoints.OpBootstrap, At: time.Now().UTC(),
				Bootstrap: &checkpoints.Bootstrap{Cluster: a.cfg.Cluster, Primary: a.cfg.Primary, Sites: a.cfg.SiteNames()},
			}
			err := a.propose(ctx, cmd)
			switch {
			case err == nil:
				a.log.Info("bootstrapped the cluster state", "cluster", a.cfg.Cluster, "primary", a.cfg.Primary)
			case errors.Is(err, checkpoints.ErrAlreadyBootstrapped):
			default:
				a.log.Warn("bootstrap the cluster state", "err", err)
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-a.raft.Changes():
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// role waits until the Raft state names a primary.
func (a *Agent) role(ctx context.Context) (Role, error) {
	for {
		st := a.raft.LocalState()
		if st.Bootstrapped() && st.Cluster == a.cfg.Cluster {
			return Role{Primary: st.Primary, Epoch: st.Epoch}, nil
		}
		select {
		case <-ctx.Done():
			return Role{}, ctx.Err()
		case <-a.raft.Changes():
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// runPipeline runs capture or apply for the role the Raft state gives this
// site, and restarts it when the role changes.
func (a *Agent) runPipeline(ctx context.Context) error {
	nc, err := a.connectNATS()
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc,
		jetstream.WithPublishAsyncMaxPending(a.cfg.Capture.MaxInFlight+16),
		jetstream.WithPublishAsyncTimeout(30*time.Second))
	if err != nil {
		return fmt.Errorf("jetstream: %w", err)
	}
	if err := a.ensureStreams(ctx, js); err != nil {
		return err
	}
	closeCache, err := a.openCache(ctx, nc, js) // cache.go: before capture may start
	if err != nil {
		return err
	}
	defer closeCache()
	for {
		role, err := a.role(ctx)
		if err != nil {
			return err
		}
		if a.held() {
			// a promotion holds this site's pipeline while it reads the
			// position it hands over; wait for the role to change
			if err := a.waitRoleChange(ctx, role); err != nil {
				return err
			}
			continue
		}
		a.setPipeline(func(p *pipelineState) { *p = pipelineState{running: true, role: role, state: replicator.StateStarting} })
		runCtx, cancel := context.WithCancel(ctx)
		a.setPipelineCancel(cancel)
		done := make(chan error, 1)
		go func() { done <- a.pipelineFor(runCtx, js, role) }()
		for changed := false; !changed; {
			select {
			case err := <-done:
				cancel()
				a.setPipeline(func(p *pipelineState) { p.running = false })
				switch {
				case ctx.Err() != nil:
					return ctx.Err()
				case errors.Is(err, context.Canceled), errors.Is(err, replicator.ErrDrained):
					// held by a promotion, or handed over: wait for the new role
					if err := a.waitRoleChange(ctx, role); err != nil {
						return err
					}
				case errors.Is(err, replicator.ErrLeaseLost):
					if err := a.leaseLost(ctx, role); err != nil {
						return err
					}
				default:
					return err
				}
				changed = true
			case <-a.raft.Changes():
				st := a.raft.LocalState()
				changed = st.Primary != role.Primary || st.Epoch != role.Epoch
				if changed {
					cancel()
					<-done
					a.setPipeline(func(p *pipelineState) { p.running = false })
				}
			}
		}
		a.log.Info("restarting the pipeline", "primary", role.Primary, "epoch", role.Epoch)
	}
}

// pipelineFor runs capture when this site is the primary, apply otherwise.
func (a *Agent) pipelineFor(ctx context.Context, js jetstream.JetStream, role Role) error {
	site := a.cfg.Sites[a.node.Site]
	obs := &observer{a: a}
	tables, err := a.tables()
	if err != nil {
		return err
	}
	if role.Primary == a.node.Site {
		// publish only as the confirmed primary of the epoch
		if err := a.confirmPrimary(ctx, role); err != nil {
			return err
		}
		var seqs map[string]int64
		if end, ok := a.raft.LocalState().EpochEnded(role.Epoch - 1); ok && end.Successor == a.node.Site {
			seqs = end.Sequences
		}
		pub := transport.NewPublisher(js, a.cfg.Cluster, a.node.Site)
		if err := pub.Compress(transport.Compression(a.cfg.Capture.Compression)); err != nil {
			return fmt.Errorf("capture.compression: %w", err)
		}
		pub.Sent = a.metrics.observeSent
		c := replicator.NewCapture(replicator.CaptureConfig{
			Cluster:        a.cfg.Cluster,
			Site:           a.node.Site,
			Epoch:          role.Epoch,
			DSN:            site.Postgres,
			Tables:         tables,
			MaxBatchBytes:  a.cfg.Capture.MaxBatchBytes,
			FlushInterval:  a.cfg.Capture.FlushInterval,
			StatusInterval: a.cfg.Capture.StatusInterval,
			MaxInFlight:    a.cfg.Capture.MaxInFlight,
			CatchUpRange:   a.cfg.Capture.CatchUpRange,
			Sequences:      seqs,
		}, pub, a.lease, a.log, obs)
		a.setCapture(c)
		defer a.setCapture(nil)
		return c.Run(ctx)
	}
	// a replica: applications must not write here
	if err := a.fenceOwn(ctx, tables); err != nil {
		return err
	}
	if err := a.reconcileOldPrimary(ctx, js, tables); err != nil {
		return err
	}
	st := a.raft.LocalState()
	var history []replicator.EpochEnd
	for _, e := range st.History {
		history = append(history, replicator.EpochEnd{Epoch: e.Epoch, Primary: e.Primary, Successor: e.Successor, EndLSN: e.EndLSN})
	}
	cluster := a.cfg.Cluster
	ap := replicator.NewApply(replicator.ApplyConfig{
		Cluster:           a.cfg.Cluster,
		Site:              a.node.Site,
		DSN:               site.Postgres,
		Primary:           role.Primary,
		Epoch:             role.Epoch,
		History:           history,
		StreamOf:          func(site string) string { return transport.StreamName(cluster, site) },
		MaxBatchTxns:      a.cfg.Apply.MaxBatchTxns,
		AutoAddColumns:    a.cfg.Schema.AutoAddColumns,
		SynchronousCommit: a.cfg.Apply.SynchronousCommit,
		MaxBatchBytes:     a.cfg.Apply.MaxBatchBytes,
	}, transport.NewSubscriber(js), a.log, obs, a.cacheKeys())
	return ap.Run(ctx)
}

func (a *Agent) tables() ([]replicator.Table, error) {
	out := make([]replicator.Table, 0, len(a.cfg.Tables))
	for _, s := range a.cfg.Tables {
		schema, name, err := config.SplitTable(s)
		if err != nil {
			return nil, err
		}
		out = append(out, replicator.Table{Schema: schema, Name: name})
	}
	return out, nil
}

func (a *Agent) setPipeline(f func(*pipelineState)) {
	a.mu.Lock()
	defer a.mu.Unlock()
	f(&a.pipeline)
}

func (a *Agent) pipelineSnapshot() pipelineState {
	a.mu.Lock()
	defer a.mu.Unlock()
	p := a.pipeline
	if p.applied != nil {
		cp := *p.applied
		p.applied = &cp
	}
	return p
}

// connectNATS connects to the site's NATS, retrying in the background
// while it is away; bad credentials or a failed TLS verification end the
// agent with what to fix instead.
func (a *Agent) connectNATS() (*nats.Conn, error) {
	opts := []nats.Option{
		nats.Name("xdcr-" + a.id),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(500 * time.Millisecond),
		nats.RetryOnFailedConnect(true),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				a.log.Warn("nats disconnected", "err", err)
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) { a.log.Info("nats reconnected", "url", nc.ConnectedUrlRedacted()) }),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			a.log.Warn("nats error", "err", natsconn.Explain(a.node.Site, err))
		}),
	}
	// one plain attempt first: it tells a refusal from an absence
	nc, err := natsconn.Connect(a.cfg, a.node.Site, append(opts[:1:1], nats.Timeout(5*time.Second))...)
	switch {
	case err == nil:
		nc.Close()
	case natsconn.Permanent(err):
		return nil, err
	}
	nc, err = natsconn.Connect(a.cfg, a.node.Site, opts...)
	if err != nil {
		return nil, err
	}
	return nc, nil
}

// ensureStreams sets up the site's streams, retrying while NATS is away.
func (a *Agent) ensureStreams(ctx context.Context, js jetstream.JetStream) error {
	maxAge := a.cfg.Stream.MaxAge
	if maxAge == config.Unlimited {
		maxAge = 0 // JetStream: keep for ever
	}
	settings := transport.StreamSettings{
		MaxAge:          maxAge,
		MaxBytes:        a.cfg.Stream.MaxBytes,
		DuplicateWindow: a.cfg.Stream.DuplicateWindow,
	}
	wait := 250 * time.Millisecond
	for {
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := transport.EnsureStreams(sctx, js, a.cfg.Cluster, a.node.Site, a.cfg.SiteNames(), settings)
		cancel()
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		a.log.Warn("set up change streams", "err", err, "retry_in", wait)
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return ctx.Err()
		}
		wait = min(2*wait, 10*time.Second)
	}
}

// dialVia makes hc dial via[addr] whenever it would dial addr.
func dialVia(hc *http.Client, via map[string]string) {
	t, ok := hc.Transport.(*http.Transport)
	if !ok || t == nil {
		t = http.DefaultTransport.(*http.Transport).Clone()
	} else {
		t = t.Clone()
	}
	d := &net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}
	t.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		if v, ok := via[addr]; ok {
			addr = v
		}
		return d.DialContext(ctx, network, addr)
	}
	hc.Transport = t
}

// httpAddr is the HTTP address of a node id.
func (a *Agent) httpAddr(id string) (string, bool) {
	n, ok := a.cfg.Node(id)
	return n.HTTP, ok
}
