// Package agent wires one xdcr node: config → NATS, streams and the data
// path pipeline of its site. cmd/xdcr, deploy/topology and the tests all run
// agents through it, so every path runs the same code.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/xdcr/xdcr/internal/config"
	"github.com/xdcr/xdcr/replicator"
	"github.com/xdcr/xdcr/transport"
)

// Role says which site is the primary, in which epoch.
type Role struct {
	Primary string
	Epoch   uint64
}

// roleSource tells the agent the current role. Today it is the config's
// bootstrap primary in epoch 1; the Raft group will feed it.
type roleSource interface {
	// Role returns the current role.
	Role(ctx context.Context) (Role, error)
	// Changed is signalled (never closed) when the role may have changed;
	// a hint: the agent re-reads Role.
	Changed() <-chan struct{}
}

// staticRole is the role fixed by the config.
type staticRole struct{ role Role }

func (s staticRole) Role(context.Context) (Role, error) { return s.role, nil }
func (s staticRole) Changed() <-chan struct{}           { return nil }

// Agent runs one node of the config.
type Agent struct {
	cfg   *config.Config
	node  string
	site  string
	log   *slog.Logger
	roles roleSource

	mu    sync.Mutex
	state string
	err   error
}

// New returns the agent of node id. Nothing runs until Run.
func New(cfg *config.Config, id string, log *slog.Logger) (*Agent, error) {
	node, ok := cfg.Node(id)
	if !ok {
		return nil, fmt.Errorf("node %q is not in the config's nodes (have %v)", id, cfg.NodeNames())
	}
	if node.Site == config.WitnessSite {
		return nil, fmt.Errorf("node %q is a witness: witnesses only vote in the Raft group, which this build does not run yet", id)
	}
	return &Agent{
		cfg:   cfg,
		node:  id,
		site:  node.Site,
		log:   log.With("node", id, "site", node.Site),
		roles: staticRole{Role{Primary: cfg.Primary, Epoch: 1}},
		state: replicator.StateStarting,
	}, nil
}

// Run runs the node until ctx ends; it returns nil then. It returns an
// error only for a problem that needs an operator (e.g. a lost slot).
func (a *Agent) Run(ctx context.Context) error {
	nc, err := a.connectNATS(ctx)
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
		return ignoreCanceled(err)
	}
	for {
		role, err := a.roles.Role(ctx)
		if err != nil {
			return ignoreCanceled(err)
		}
		runCtx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- a.pipeline(runCtx, js, role) }()
		select {
		case err := <-done:
			cancel()
			return ignoreCanceled(err)
		case <-a.roles.Changed():
			cancel()
			<-done
			a.log.Info("role may have changed; restarting the pipeline")
		}
	}
}

// pipeline runs capture when this site is the primary, apply otherwise.
func (a *Agent) pipeline(ctx context.Context, js jetstream.JetStream, role Role) error {
	site := a.cfg.Sites[a.site]
	if role.Primary == a.site {
		tables, err := a.tables()
		if err != nil {
			return err
		}
		c := replicator.NewCapture(replicator.CaptureConfig{
			Cluster:        a.cfg.Cluster,
			Site:           a.site,
			Epoch:          role.Epoch,
			DSN:            site.Postgres,
			Tables:         tables,
			MaxBatchBytes:  a.cfg.Capture.MaxBatchBytes,
			FlushInterval:  a.cfg.Capture.FlushInterval,
			StatusInterval: a.cfg.Capture.StatusInterval,
			MaxInFlight:    a.cfg.Capture.MaxInFlight,
		}, transport.NewPublisher(js, a.cfg.Cluster, a.site), a.log, a.setState)
		return c.Run(ctx)
	}
	ap := replicator.NewApply(replicator.ApplyConfig{
		Cluster:       a.cfg.Cluster,
		Site:          a.site,
		DSN:           site.Postgres,
		Stream:        transport.StreamName(a.cfg.Cluster, role.Primary),
		MaxBatchTxns:  a.cfg.Apply.MaxBatchTxns,
		MaxBatchBytes: a.cfg.Apply.MaxBatchBytes,
	}, transport.NewSubscriber(js), a.log, a.setState, nil)
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

// State returns the pipeline's state and the error behind it, if any.
func (a *Agent) State() (string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.state, a.err
}

func (a *Agent) setState(state string, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.state, a.err = state, err
}

func (a *Agent) connectNATS(ctx context.Context) (*nats.Conn, error) {
	url := a.cfg.Sites[a.site].NATS
	opts := []nats.Option{
		nats.Name("xdcr-" + a.node),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(500 * time.Millisecond),
		nats.RetryOnFailedConnect(true),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				a.log.Warn("nats disconnected", "err", err)
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) { a.log.Info("nats reconnected", "url", nc.ConnectedUrlRedacted()) }),
	}
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		return nil, fmt.Errorf("connect to nats of site %s: %w", a.site, err)
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
		err := transport.EnsureStreams(sctx, js, a.cfg.Cluster, a.site, a.cfg.SiteNames(), settings)
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

func ignoreCanceled(err error) error {
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}
