// Package topology runs an xdcr cluster on local sites (deploy/local): it
// creates the database on every site, writes the shared config file, and
// runs one agent per site as a separate OS process of the xdcr binary, so
// that kill -9 of an agent is real. `xdcr dev`, `xdcr demo`, the end-to-end
// tests and the benchmarks all stand their clusters up through it.
package topology

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/xdcr/xdcr/deploy/faults"
	"github.com/xdcr/xdcr/deploy/local"
	"github.com/xdcr/xdcr/internal/config"
	"github.com/xdcr/xdcr/replicator"
	"github.com/xdcr/xdcr/transport"
)

// Options describe one cluster.
type Options struct {
	Cluster  string   // default "shop"
	Database string   // default: the cluster name, with '-' as '_'
	Primary  string   // default: the first site
	Tables   []string // the replicated tables
	// Schema is SQL run in the database on every site before any agent
	// starts (the tables, identical everywhere).
	Schema string
	// Binary is the xdcr executable the agents run as.
	Binary string
	// Dir holds the config file, and each node's data directory and log.
	Dir string
	// Tune adjusts the generated config before it is written.
	Tune func(*config.Config)
	// AgentArgs, when set, returns extra command-line arguments for a
	// node's agent (such as --pprof for the benchmarks).
	AgentArgs func(node string) []string
	// WAN, when set, routes the traffic between the agents of different
	// sites through proxies of WAN, one per ordered pair of nodes and kind
	// (faults.KindRaft to the other's Raft address, faults.KindHTTP to its
	// HTTP API): each agent is started with --dial-via so that it reaches
	// the others through them. The config keeps the nodes' own addresses,
	// which the CLI and tests still reach directly. With the sites' leaf
	// links in the same WAN (local.SitesConfig.WAN), WAN.Isolate(site) cuts
	// a site off from all others. The caller closes the WAN.
	WAN    *faults.WAN
	Logger *slog.Logger
}

// Cluster is an xdcr cluster on local sites.
type Cluster struct {
	Sites      *local.Sites
	Config     *config.Config
	ConfigPath string

	dir       string
	binary    string
	agentArgs func(node string) []string
	dialVia   map[string]map[string]string // node -> address -> proxy (Options.WAN)
	log       *slog.Logger

	mu     sync.Mutex
	agents map[string]*process
}

// HTTPAddr is the address of a node's HTTP API.
func (c *Cluster) HTTPAddr(node string) string {
	n, _ := c.Config.Node(node)
	return n.HTTP
}

// NodeID is the node the cluster runs in a site: "a1" for "dc-a".
func NodeID(site string) string {
	return strings.TrimPrefix(site, "dc-") + "1"
}

// New creates the cluster's database and schema on every site and writes
// its config to Dir/xdcr.yaml. No agent runs until StartAgents.
func New(ctx context.Context, sites *local.Sites, o Options) (*Cluster, error) {
	if o.Cluster == "" {
		o.Cluster = "shop"
	}
	if o.Database == "" {
		o.Database = strings.ReplaceAll(o.Cluster, "-", "_")
	}
	names := sites.Names()
	if o.Primary == "" {
		o.Primary = names[0]
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(filepath.Join(o.Dir, "logs"), 0o755); err != nil {
		return nil, err
	}
	cfg := &config.Config{
		Cluster: o.Cluster,
		Primary: o.Primary,
		Tables:  o.Tables,
		Sites:   make(map[string]config.Site),
		Nodes:   make(map[string]config.Node),
	}
	ports, err := local.FreePorts(2*len(names) + 2)
	if err != nil {
		return nil, err
	}
	for i, s := range sites.List {
		if err := s.Postgres.CreateDatabase(ctx, o.Database); err != nil {
			return nil, fmt.Errorf("site %s: %w", s.Name, err)
		}
		dsn := s.Postgres.DSN(o.Database)
		if o.Schema != "" {
			if err := execSQL(ctx, dsn, o.Schema); err != nil {
				return nil, fmt.Errorf("create the schema on site %s: %w", s.Name, err)
			}
		}
		cfg.Sites[s.Name] = config.Site{Postgres: dsn, NATS: s.NATS.URL()}
		cfg.Nodes[NodeID(s.Name)] = config.Node{
			Site: s.Name,
			Raft: "127.0.0.1:" + strconv.Itoa(ports[2*i]),
			HTTP: "127.0.0.1:" + strconv.Itoa(ports[2*i+1]),
		}
	}
	if len(names) == 2 {
		// two voters cannot survive the loss of either: add a witness
		cfg.Nodes["w1"] = config.Node{
			Site: config.WitnessSite,
			Raft: "127.0.0.1:" + strconv.Itoa(ports[2*len(names)]),
			HTTP: "127.0.0.1:" + strconv.Itoa(ports[2*len(names)+1]),
		}
	}
	if o.Tune != nil {
		o.Tune(cfg)
	}
	cfg.ApplyDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("generated config: %w", err)
	}
	c := &Cluster{
		Sites:      sites,
		Config:     cfg,
		ConfigPath: filepath.Join(o.Dir, "xdcr.yaml"),
		dir:        o.Dir,
		binary:     o.Binary,
		agentArgs:  o.AgentArgs,
		log:        o.Logger,
		agents:     make(map[string]*process),
	}
	if o.WAN != nil {
		if err := c.routeThrough(o.WAN); err != nil {
			return nil, err
		}
	}
	return c, c.WriteConfig()
}

// routeThrough puts a proxy of wan on the Raft and HTTP traffic of every
// ordered pair of nodes in different sites.
func (c *Cluster) routeThrough(wan *faults.WAN) error {
	c.dialVia = map[string]map[string]string{}
	for _, from := range c.Nodes() {
		src, _ := c.Config.Node(from)
		for _, to := range c.Nodes() {
			dst, _ := c.Config.Node(to)
			if src.Site == dst.Site {
				continue
			}
			for _, l := range []struct{ kind, addr string }{{faults.KindRaft, dst.Raft}, {faults.KindHTTP, dst.HTTP}} {
				link, err := wan.Add(l.kind, src.Site, dst.Site, l.addr)
				if err != nil {
					return fmt.Errorf("route %s from %s to %s: %w", l.kind, from, to, err)
				}
				if c.dialVia[from] == nil {
					c.dialVia[from] = map[string]string{}
				}
				c.dialVia[from][l.addr] = link.Addr()
			}
		}
	}
	return nil
}

// WriteConfig writes the cluster's config to ConfigPath; agents read it
// when they start.
func (c *Cluster) WriteConfig() error {
	data, err := c.Config.Marshal()
	if err != nil {
		return fmt.Errorf("render config: %w", err)
	}
	return os.WriteFile(c.ConfigPath, data, 0o644)
}

func execSQL(ctx context.Context, dsn, sql string) error {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	_, err = conn.Exec(ctx, sql)
	return err
}

// DSN is the connection string of a site's database.
func (c *Cluster) DSN(site string) string { return c.Config.Sites[site].Postgres }

// Nodes returns the node ids, sorted.
func (c *Cluster) Nodes() []string { return c.Config.NodeNames() }

// LogPath is the file an agent's stderr goes to.
func (c *Cluster) LogPath(node string) string { return filepath.Join(c.dir, "logs", node+".log") }

// process is one running agent.
type process struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// StartAgents starts every node's agent, witnesses included.
func (c *Cluster) StartAgents(ctx context.Context) error {
	for _, n := range c.Nodes() {
		if err := c.StartAgent(ctx, n); err != nil {
			return err
		}
	}
	return nil
}

// StartAgent starts the agent of node as a child process; its log is
// appended to LogPath(node).
func (c *Cluster) StartAgent(ctx context.Context, node string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if p, ok := c.agents[node]; ok && !p.exited() {
		return fmt.Errorf("agent %s is already running", node)
	}
	logf, err := os.OpenFile(c.LogPath(node), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	args := []string{"agent", "--config", c.ConfigPath, "--node", node,
		"--data-dir", filepath.Join(c.dir, node), "--log-format", "json", "--log-level", "info"}
	if via := c.dialVia[node]; len(via) > 0 {
		pairs := make([]string, 0, len(via))
		for _, addr := range slices.Sorted(maps.Keys(via)) {
			pairs = append(pairs, addr+"="+via[addr])
		}
		args = append(args, "--dial-via", strings.Join(pairs, ","))
	}
	if c.agentArgs != nil {
		args = append(args, c.agentArgs(node)...)
	}
	cmd := exec.Command(c.binary, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start agent %s: %w", node, err)
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	c.agents[node] = p
	c.log.Info("agent started", "node", node, "pid", cmd.Process.Pid)
	return nil
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// AgentPID returns the pid of node's agent, 0 when it is not running.
func (c *Cluster) AgentPID(node string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if p, ok := c.agents[node]; ok && !p.exited() {
		return p.cmd.Process.Pid
	}
	return 0
}

// AgentExited reports whether node's agent ran and has exited, and how.
func (c *Cluster) AgentExited(node string) (bool, error) {
	c.mu.Lock()
	p, ok := c.agents[node]
	c.mu.Unlock()
	if !ok || !p.exited() {
		return false, nil
	}
	return true, p.err
}

// StopAgent sends SIGTERM to node's agent and waits for it to exit; after
// timeout it kills it.
func (c *Cluster) StopAgent(node string, timeout time.Duration) error {
	return c.signal(node, syscall.SIGTERM, timeout)
}

// KillAgent kills node's agent with SIGKILL and waits for it to be gone.
func (c *Cluster) KillAgent(node string) error {
	return c.signal(node, syscall.SIGKILL, 10*time.Second)
}

func (c *Cluster) signal(node string, sig syscall.Signal, timeout time.Duration) error {
	c.mu.Lock()
	p, ok := c.agents[node]
	c.mu.Unlock()
	if !ok || p.exited() {
		return nil
	}
	if err := p.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("signal agent %s: %w", node, err)
	}
	select {
	case <-p.done:
	case <-time.After(timeout):
		_ = p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("agent %s did not stop within %s after %s; killed it", node, timeout, sig)
	}
	if sig == syscall.SIGTERM && p.err != nil {
		return fmt.Errorf("agent %s exited after %s: %w", node, sig, p.err)
	}
	return nil
}

// WaitReady waits until the cluster takes writes that will be replicated:
// every site's agent has set up its streams, and the primary's replication
// slot exists.
func (c *Cluster) WaitReady(ctx context.Context) error {
	for _, s := range c.Sites.List {
		if err := c.waitStreams(ctx, s); err != nil {
			return err
		}
	}
	conn, err := pgx.Connect(ctx, c.DSN(c.Config.Primary))
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	slot := replicator.SlotName(c.Config.Cluster)
	return poll(ctx, func() (bool, error) {
		var n int
		err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND active", slot).Scan(&n)
		return n == 1, err
	}, c.exitedAgent)
}

func (c *Cluster) waitStreams(ctx context.Context, s *local.Site) error {
	nc, err := s.NATS.Connect()
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	var want []string
	for _, site := range c.Config.SiteNames() {
		want = append(want, transport.StreamName(c.Config.Cluster, site))
	}
	return poll(ctx, func() (bool, error) {
		for _, name := range want {
			if _, err := js.Stream(ctx, name); err != nil {
				return false, nil
			}
		}
		return true, nil
	}, c.exitedAgent)
}

// exitedAgent returns an error naming an agent that has exited.
func (c *Cluster) exitedAgent() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	nodes := make([]string, 0, len(c.agents))
	for n := range c.agents {
		nodes = append(nodes, n)
	}
	slices.Sort(nodes)
	for _, n := range nodes {
		if p := c.agents[n]; p.exited() {
			return fmt.Errorf("agent %s exited (%v); see %s", n, p.err, c.LogPath(n))
		}
	}
	return nil
}

func poll(ctx context.Context, done func() (bool, error), abort func() error) error {
	for {
		ok, err := done()
		if err != nil && ctx.Err() == nil {
			return err
		}
		if ok {
			return nil
		}
		if err := abort(); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Close stops every agent (SIGTERM, then SIGKILL after 30 s). The sites are
// the caller's.
func (c *Cluster) Close() error {
	var errs []error
	for _, n := range c.Nodes() {
		errs = append(errs, c.StopAgent(n, 30*time.Second))
	}
	return errors.Join(errs...)
}

// Checksum is a table's row count and a hash of all its rows, comparable
// between sites: md5 over the rows' text forms in a fixed order, read in
// one snapshot with the same session settings everywhere.
type Checksum struct {
	Rows int64
	MD5  string
}

// TableChecksum computes the checksum of table (schema.table) in site.
func (c *Cluster) TableChecksum(ctx context.Context, site, table string) (Checksum, error) {
	schema, name, err := config.SplitTable(table)
	if err != nil {
		return Checksum{}, err
	}
	t := replicator.Table{Schema: schema, Name: name}
	cfg, err := pgx.ParseConfig(c.DSN(site))
	if err != nil {
		return Checksum{}, err
	}
	for k, v := range map[string]string{"TimeZone": "UTC", "DateStyle": "ISO", "IntervalStyle": "postgres", "extra_float_digits": "3", "bytea_output": "hex"} {
		cfg.RuntimeParams[k] = v
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return Checksum{}, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var sum Checksum
	err = conn.QueryRow(ctx, fmt.Sprintf(
		`SELECT count(*), coalesce(md5(string_agg(r, '|' ORDER BY r)), '') FROM (SELECT t::text AS r FROM %s t) s`,
		t.Quoted())).Scan(&sum.Rows, &sum.MD5)
	if err != nil {
		return Checksum{}, fmt.Errorf("checksum %s on %s: %w", table, site, err)
	}
	return sum, nil
}

// WaitConverged waits until every site's copy of every table has the
// primary's checksum. Call it once writes have stopped.
func (c *Cluster) WaitConverged(ctx context.Context, tables ...string) error {
	if len(tables) == 0 {
		tables = c.Config.Tables
	}
	var last error
	err := poll(ctx, func() (bool, error) {
		for _, t := range tables {
			want, err := c.TableChecksum(ctx, c.Config.Primary, t)
			if err != nil {
				return false, err
			}
			for _, s := range c.Config.SiteNames() {
				got, err := c.TableChecksum(ctx, s, t)
				if err != nil {
					return false, err
				}
				if got != want {
					last = fmt.Errorf("site %s table %s: %d rows (md5 %s), primary has %d rows (md5 %s)",
						s, t, got.Rows, got.MD5, want.Rows, want.MD5)
					return false, nil
				}
			}
		}
		return true, nil
	}, c.exitedAgent)
	if err != nil && last != nil {
		return fmt.Errorf("%w; last difference: %w", err, last)
	}
	return err
}

// Build compiles the xdcr binary into dir for the agents a Cluster runs
// (with the race detector when race is set) and returns its path. Run it
// from inside the module.
func Build(ctx context.Context, dir string, race bool, out io.Writer) (string, error) {
	bin := filepath.Join(dir, "xdcr")
	args := []string{"build", "-o", bin}
	if race {
		args = append(args, "-race")
	}
	cmd := exec.CommandContext(ctx, "go", append(args, "github.com/xdcr/xdcr/cmd/xdcr")...)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("build xdcr: %w", err)
	}
	return bin, nil
}
