package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/xdcr/xdcr/internal/config"
	"github.com/xdcr/xdcr/replicator/cache"
	"github.com/xdcr/xdcr/replicator/change"
	"github.com/xdcr/xdcr/transport"
)

// siteCache is the cache invalidation of this node's site (docs/cache.md):
// the keys apply writes into the outbox, the worker that drains it, and
// the tail that fills it from the site's own stream while the site is the
// primary. It runs for as long as the pipeline, whatever the site's role.
type siteCache struct {
	keys    *cache.Keys
	worker  *cache.Worker
	backend cache.Backend
	cancel  context.CancelFunc
	wg      sync.WaitGroup
}

// invalidator is what apply takes as its cacheKeys.
type invalidator interface {
	Invalidations(changes []change.Change) []change.Invalidation
}

// cacheKeys returns what apply writes into the outbox; an untyped nil
// without cache templates.
func (a *Agent) cacheKeys() invalidator {
	if a.cache == nil {
		return nil
	}
	return a.cache.keys
}

// wake tells the worker that a commit queued invalidations. Safe on nil.
func (s *siteCache) wake() {
	if s != nil {
		s.worker.Wake()
	}
}

// close stops the worker and the tail and waits for them.
func (s *siteCache) close() {
	s.cancel()
	s.wg.Wait()
	if s.backend != nil {
		s.backend.Close()
	}
}

// openCache starts the site's cache invalidation, when the config has
// cache templates; it sets a.cache. First it checks the templates against
// the site's database and records where the tail starts, retrying while
// the database or NATS are away: both must happen before capture may
// start. A template that names a missing column stops the agent (the
// error says which); one that would need REPLICA IDENTITY FULL is logged.
// The returned func stops everything openCache started.
func (a *Agent) openCache(ctx context.Context, nc *nats.Conn, js jetstream.JetStream) (func(), error) {
	if len(a.cfg.Cache) == 0 {
		return func() {}, nil
	}
	site := a.cfg.Sites[a.node.Site]
	log := a.log.With("component", "cache")
	tables, err := CacheTables(a.cfg)
	if err != nil {
		return nil, err
	}
	keys, err := cache.NewKeys(tables, log)
	if err != nil {
		return nil, err
	}
	backend, err := cache.Open(site.Redis)
	if err != nil {
		return nil, fmt.Errorf("sites.%s.redis: %w", a.node.Site, err)
	}
	backendName := "none"
	if backend != nil {
		backendName = backend.Name()
	}
	a.metrics.cache.init(backendName)
	worker := cache.NewWorker(cache.WorkerConfig{
		Cluster:       a.cfg.Cluster,
		Site:          a.node.Site,
		DSN:           site.Postgres,
		MaxOutboxRows: a.cfg.Invalidation.MaxOutboxRows,
	}, keys, backend, nc, a.metrics.cache, a.log) // it names its own component
	tail := cache.NewTail(cache.TailConfig{
		Cluster: a.cfg.Cluster,
		Site:    a.node.Site,
		DSN:     site.Postgres,
		Stream:  transport.StreamName(a.cfg.Cluster, a.node.Site),
	}, jsStream{transport.NewSubscriber(js), js}, keys, worker.Wake, a.log)
	err = retry(ctx, log, "check the cache templates against the database", func(ctx context.Context) error {
		if err := checkTemplates(ctx, keys, site.Postgres, a.node.Site, log); err != nil {
			return err
		}
		return tail.Init(ctx)
	})
	if err != nil {
		if backend != nil {
			backend.Close()
		}
		return nil, err
	}

	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	s := &siteCache{keys: keys, worker: worker, backend: backend, cancel: cancel}
	s.wg.Go(func() { _ = worker.Run(runCtx) })
	s.wg.Go(func() { _ = tail.Run(runCtx) })
	a.cache = s
	log.Info("cache invalidation running", "backend", backendName, "subject", cache.Subject(a.cfg.Cluster, a.node.Site),
		"tables", len(tables))
	return s.close, nil
}

// CacheTables turns the config's cache entries into the cache package's,
// sorted by name.
func CacheTables(cfg *config.Config) ([]cache.Table, error) {
	names := make([]string, 0, len(cfg.Cache))
	for name := range cfg.Cache {
		names = append(names, name)
	}
	slices.Sort(names)
	out := make([]cache.Table, 0, len(names))
	for _, name := range names {
		schema, rel, err := config.SplitTable(name)
		if err != nil {
			return nil, fmt.Errorf("cache.%s: %w", name, err)
		}
		ct := cfg.Cache[name]
		out = append(out, cache.Table{Name: name, Schema: schema, Rel: rel, Keys: ct.Keys, Warm: ct.Warm})
	}
	return out, nil
}

// checkTemplates runs keys.Check on the site's database and logs the
// templates that need REPLICA IDENTITY FULL.
func checkTemplates(ctx context.Context, keys *cache.Keys, dsn, site string, log *slog.Logger) error {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return permanentError(fmt.Errorf("parse postgres connection string: %w", err))
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("connect to postgres %s:%d: %w", cfg.Host, cfg.Port, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	warnings, err := keys.Check(ctx, conn, site)
	for _, w := range warnings {
		log.Warn("cache template uses a column outside the table's replica identity: without REPLICA IDENTITY FULL on the primary, "+
			"an update invalidates only the key of the new value and a delete cannot invalidate this key",
			"table", w.Table, "template", w.Template, "column", w.Column, "replica_identity", w.Identity,
			"fix", "ALTER TABLE "+w.Table+" REPLICA IDENTITY FULL on this site (it matters while the site is the primary)")
	}
	var te *cache.TemplateError
	if errors.As(err, &te) {
		return permanentError(err)
	}
	return err
}

// permanent marks an error that retrying cannot fix.
type permanent struct{ err error }

func (p permanent) Error() string { return p.err.Error() }
func (p permanent) Unwrap() error { return p.err }

func permanentError(err error) error { return permanent{err} }

// retry runs f until it succeeds, fails permanently, or ctx ends, with a
// growing pause and a warning per failure.
func retry(ctx context.Context, log *slog.Logger, what string, f func(context.Context) error) error {
	wait := 250 * time.Millisecond
	for {
		fctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err := f(fctx)
		cancel()
		if err == nil {
			return nil
		}
		var p permanent
		if errors.As(err, &p) {
			return p.err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		log.Warn(what, "err", err, "retry_in", wait)
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return ctx.Err()
		}
		wait = min(2*wait, 10*time.Second)
	}
}

// jsStream is the tail's view of the site's own stream.
type jsStream struct {
	*transport.Subscriber
	js jetstream.JetStream
}

func (s jsStream) LastSeq(ctx context.Context, name string) (uint64, error) {
	st, err := s.js.Stream(ctx, name)
	if err != nil {
		return 0, err
	}
	info, err := st.Info(ctx)
	if err != nil {
		return 0, err
	}
	return info.State.LastSeq, nil
}

// cacheMetrics are the cache invalidation's series; they implement the
// worker's Observer.
type cacheMetrics struct {
	invalidations *prometheus.CounterVec
	duration      *prometheus.HistogramVec
	outbox        prometheus.Gauge
}

var _ cache.Observer = (*cacheMetrics)(nil)

func newCacheMetrics(r prometheus.Registerer) *cacheMetrics {
	m := &cacheMetrics{
		invalidations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "xdcr_cache_invalidations_total",
			Help: "Cache keys deleted from the site's cache (a table flush counts as one; backend redis or memcached) and invalidation events published (backend nats), by result.",
		}, []string{"backend", "result"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "xdcr_cache_invalidation_duration_seconds",
			Help:    "Time one round of invalidations took on a backend.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}, []string{"backend"}),
		outbox: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "xdcr_cache_outbox_rows",
			Help: "Invalidations (one row per source transaction) waiting in the site's xdcr.cache_outbox for the cache.",
		}),
	}
	r.MustRegister(m.invalidations, m.duration, m.outbox)
	return m
}

// init makes the series of a backend ("none" for no cache store) exist
// before the first round.
func (m *cacheMetrics) init(backend string) {
	for _, b := range []string{backend, "nats"} {
		if b == "none" {
			continue
		}
		m.invalidations.WithLabelValues(b, "ok")
		m.invalidations.WithLabelValues(b, "error")
	}
}

func (m *cacheMetrics) Invalidated(backend string, n int, took time.Duration, err error) {
	result := "ok"
	if err != nil {
		result = "error"
	}
	m.invalidations.WithLabelValues(backend, result).Add(float64(n))
	m.duration.WithLabelValues(backend).Observe(took.Seconds())
}

func (m *cacheMetrics) OutboxRows(n int64) { m.outbox.Set(float64(n)) }
