package local

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/xdcr/xdcr/deploy/faults"
)

// SitesConfig describes N local sites.
type SitesConfig struct {
	// Names are the site names, e.g. SiteNames(3). Each becomes a NATS
	// server name, a JetStream domain and a directory name.
	Names []string
	// Dir holds everything: Dir/<site>/pg and Dir/<site>/nats.
	Dir string
	// PostgresSettings are passed to every cluster (see PostgresConfig.Settings).
	PostgresSettings map[string]string
	// NATSSyncInterval is passed to every NATS server; 0 = "always".
	NATSSyncInterval time.Duration
	// NATSSecurity, when set, secures every NATS server the same way; its
	// LeafPassword and AdminPassword are generated when empty.
	NATSSecurity *NATSSecurity
	// WAN, when set, routes every leaf-node link between two sites through
	// a proxy of its own (a link of kind faults.KindLeaf from the soliciting
	// site to the other): the remote URL names the proxy, which forwards to
	// the other server's leaf port, so a test can cut, black-hole, delay or
	// throttle it. The caller closes the WAN after the sites.
	WAN *faults.WAN
	// NoPostgres starts only the NATS servers; Site.Postgres stays nil.
	// Transport tests that need no database start much faster.
	NoPostgres bool
	// Logger receives every server's events, tagged with "site" and
	// "component"; nil discards them.
	Logger *slog.Logger
}

// Site is one local datacenter.
type Site struct {
	Name     string
	Postgres *Postgres // nil with SitesConfig.NoPostgres
	NATS     *NATS
}

// Sites are N local sites, joined as in docs/nats-topology.md.
type Sites struct {
	List []*Site
}

// SiteNames returns n site names: "dc-a", "dc-b", "dc-c", ... ("dc-z", then
// "dc-aa", "dc-ab", ...).
func SiteNames(n int) []string {
	names := make([]string, max(n, 0))
	for i := range n {
		var suffix []byte
		for j := i; ; j = j/26 - 1 {
			suffix = append([]byte{byte('a' + j%26)}, suffix...)
			if j < 26 {
				break
			}
		}
		names[i] = "dc-" + string(suffix)
	}
	return names
}

// meshTimeout bounds the wait for the leaf mesh when ctx has no deadline.
const meshTimeout = 30 * time.Second

// StartSites starts one PostgreSQL cluster and one NATS server per site and
// joins the NATS servers in a leafnode full mesh with exactly one connection
// per pair: site i solicits site j for every j > i. It returns once every
// cluster accepts connections and every server has its N-1 leaf connections.
// On failure it stops whatever it started.
func StartSites(ctx context.Context, cfg SitesConfig) (_ *Sites, err error) {
	if len(cfg.Names) == 0 {
		return nil, errors.New("start sites: no site names")
	}
	if cfg.Dir == "" {
		return nil, errors.New("start sites: no directory")
	}
	seen := make(map[string]bool, len(cfg.Names))
	for _, name := range cfg.Names {
		if err := validSiteName(name); err != nil {
			return nil, fmt.Errorf("start sites: %w", err)
		}
		if seen[strings.ToLower(name)] {
			return nil, fmt.Errorf("start sites: site %q listed twice", name)
		}
		seen[strings.ToLower(name)] = true
	}
	dir, err := filepath.Abs(cfg.Dir)
	if err != nil {
		return nil, fmt.Errorf("start sites: %w", err)
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}

	// Every leaf port must be known before any config is written.
	n := len(cfg.Names)
	ports, err := FreePorts(2 * n)
	if err != nil {
		return nil, fmt.Errorf("start sites: %w", err)
	}
	s := &Sites{List: make([]*Site, n)}
	natsCfgs := make([]NATSConfig, n)
	var sec *NATSSecurity
	if cfg.NATSSecurity != nil {
		c := *cfg.NATSSecurity
		if c.LeafPassword == "" {
			c.LeafPassword = rand.Text()
		}
		if c.AdminPassword == "" {
			c.AdminPassword = rand.Text()
		}
		sec = &c
	}
	for i, name := range cfg.Names {
		s.List[i] = &Site{Name: name}
		natsCfgs[i] = NATSConfig{
			Name:         name,
			Dir:          filepath.Join(dir, name, "nats"),
			Port:         ports[2*i],
			LeafPort:     ports[2*i+1],
			SyncInterval: cfg.NATSSyncInterval,
			Security:     sec,
			Logger:       logger.With("site", name, "component", "nats"),
		}
	}
	for i := range natsCfgs {
		for j := i + 1; j < n; j++ {
			addr := fmt.Sprintf("%s:%d", natsHost, natsCfgs[j].LeafPort)
			if cfg.WAN != nil {
				l, err := cfg.WAN.Add(faults.KindLeaf, cfg.Names[i], cfg.Names[j], addr)
				if err != nil {
					return nil, fmt.Errorf("start sites: %w", err)
				}
				addr = l.Addr()
			}
			natsCfgs[i].Remotes = append(natsCfgs[i].Remotes, "nats-leaf://"+addr)
		}
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, s.Close())
		}
	}()

	// PostgreSQL startup is mostly waiting on the disk and the postmaster,
	// so the clusters start concurrently (the first one may build the
	// initdb template while the others wait on its lock).
	var wg sync.WaitGroup
	pgErrs := make([]error, n)
	if !cfg.NoPostgres {
		for i, site := range s.List {
			wg.Go(func() {
				site.Postgres, pgErrs[i] = StartPostgres(ctx, PostgresConfig{
					Dir:      filepath.Join(dir, site.Name, "pg"),
					Settings: cfg.PostgresSettings,
					Logger:   logger.With("site", site.Name, "component", "postgres"),
				})
			})
		}
	}
	// NATS servers start in a few milliseconds each. Start them last site
	// first: a server's remotes then already listen when it dials them,
	// instead of waiting out the 1 s reconnect interval.
	var natsErr error
	for i := n - 1; i >= 0; i-- {
		if s.List[i].NATS, natsErr = StartNATS(ctx, natsCfgs[i]); natsErr != nil {
			break
		}
	}
	wg.Wait()
	if err := errors.Join(append(pgErrs, natsErr)...); err != nil {
		return nil, fmt.Errorf("start sites: %w", err)
	}
	if err := s.WaitMesh(ctx); err != nil {
		return nil, fmt.Errorf("start sites: %w", err)
	}
	logger.Info("sites ready", "sites", strings.Join(cfg.Names, ","), "dir", dir)
	return s, nil
}

// WaitMesh waits until every running NATS server has a leaf connection to
// every other running one (bounded by ctx, or 30 s without a deadline). Use
// it after restarting a server.
func (s *Sites) WaitMesh(ctx context.Context) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, meshTimeout)
		defer cancel()
	}
	for {
		var running []*NATS
		for _, site := range s.List {
			if site.NATS != nil && site.NATS.Running() {
				running = append(running, site.NATS)
			}
		}
		var missing []string
		for _, n := range running {
			if got := n.LeafConnections(); got != len(running)-1 {
				missing = append(missing, fmt.Sprintf("%s has %d of %d", n.Name(), got, len(running)-1))
			}
		}
		if len(missing) == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for leaf mesh (%s): %w", strings.Join(missing, ", "), ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Site returns the site called name, or nil.
func (s *Sites) Site(name string) *Site {
	for _, site := range s.List {
		if site.Name == name {
			return site
		}
	}
	return nil
}

// Names returns the site names in order.
func (s *Sites) Names() []string {
	names := make([]string, len(s.List))
	for i, site := range s.List {
		names[i] = site.Name
	}
	return names
}

// Close stops every server, in the reverse order of the list and NATS
// before PostgreSQL within a site, and returns every error it met. It keeps
// the files and is idempotent.
func (s *Sites) Close() error {
	var errs []error
	for i := len(s.List) - 1; i >= 0; i-- {
		site := s.List[i]
		if site.NATS != nil {
			if err := site.NATS.Close(); err != nil {
				errs = append(errs, fmt.Errorf("site %s: %w", site.Name, err))
			}
		}
		if site.Postgres != nil {
			if err := site.Postgres.Close(); err != nil {
				errs = append(errs, fmt.Errorf("site %s: %w", site.Name, err))
			}
		}
	}
	return errors.Join(errs...)
}
