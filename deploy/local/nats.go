package local

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// NATSConfig describes one site's nats-server.
type NATSConfig struct {
	// Name is the server name and the JetStream domain: the site name,
	// e.g. "dc-a". It must be one subject token (no '.', '*', '>' or space).
	Name string
	// Dir holds nats.conf, the JetStream store (Dir/jetstream) and the log
	// (Dir/nats.log).
	Dir string
	// Port is the client port on 127.0.0.1; 0 picks a free one.
	Port int
	// LeafPort is the leafnode listen port on 127.0.0.1; 0 picks a free one.
	LeafPort int
	// Remotes are the leafnode URLs this server solicits, such as
	// "nats-leaf://127.0.0.1:7422". In a mesh, list each pair once only.
	Remotes []string
	// SyncInterval is JetStream's fsync interval. 0 means "always": fsync
	// before every acknowledgement, the durability we ship.
	SyncInterval time.Duration
	// Security, when set, turns on TLS and authorization on the client and
	// leafnode ports.
	Security *NATSSecurity
	// Logger receives the server's log at matching levels (notice = Info);
	// nil discards it. Debug lines are produced only when Logger has Debug
	// enabled; trace is never enabled.
	Logger *slog.Logger
}

// NATSSecurity is TLS and authorization for a local NATS server, the way a
// real site's server runs.
type NATSSecurity struct {
	// CAFile, CertFile and KeyFile are PEM files: the server's certificate
	// (for 127.0.0.1) and the CA that verifies client certificates and the
	// other sites' servers. The leafnode links between sites use them both
	// ways. CertFile empty: no TLS.
	CAFile, CertFile, KeyFile string
	// VerifyClients requires a client certificate signed by CAFile.
	VerifyClients bool
	// Users are user -> password pairs clients log in with; NKeys are
	// public user nkeys ("U…") that log in with their seed.
	Users map[string]string
	NKeys []string
	// Permissions, when set, is a nats-server permissions map, such as
	// {publish: [...], subscribe: [...]}, given to every user of Users and
	// NKeys (not to deploy/local's own users).
	Permissions string
	// LeafPassword authenticates the leafnode links (user "leaf");
	// AdminPassword is for deploy/local's own connections (user
	// "local-admin", see [NATS.Connect]). StartSites generates both.
	LeafPassword, AdminPassword string
}

// tls reports whether the server speaks TLS.
func (s *NATSSecurity) tls() bool { return s != nil && s.CertFile != "" }

// auth reports whether clients must log in.
func (s *NATSSecurity) auth() bool {
	return s != nil && (len(s.Users) > 0 || len(s.NKeys) > 0 || s.AdminPassword != "")
}

func (s *NATSSecurity) writeTLS(b *strings.Builder, indent string, verify bool) {
	fmt.Fprintf(b, "%stls {\n", indent)
	fmt.Fprintf(b, "%s  cert_file: %s\n", indent, confQuote(s.CertFile))
	fmt.Fprintf(b, "%s  key_file: %s\n", indent, confQuote(s.KeyFile))
	if s.CAFile != "" {
		fmt.Fprintf(b, "%s  ca_file: %s\n", indent, confQuote(s.CAFile))
	}
	if verify {
		fmt.Fprintf(b, "%s  verify: true\n", indent)
	}
	fmt.Fprintf(b, "%s  timeout: 5\n", indent)
	fmt.Fprintf(b, "%s}\n", indent)
}

// natsHost is the address every local server listens on.
const natsHost = "127.0.0.1"

// RenderNATSConfig returns the nats-server configuration file for cfg: a
// standalone JetStream server with its own domain, a leafnode listener with
// isolate_leafnode_interest, and cfg.Remotes as solicited leaf connections;
// no cluster and no gateway block. A zero Port or LeafPort is written as -1,
// which nats-server reads as "any free port" ([StartNATS] picks real ports
// before it renders).
func RenderNATSConfig(cfg NATSConfig) string {
	port := func(p int) string {
		if p == 0 {
			return "-1"
		}
		return strconv.Itoa(p)
	}
	sync := "always"
	if cfg.SyncInterval > 0 {
		sync = confQuote(cfg.SyncInterval.String())
	}
	var b strings.Builder
	fmt.Fprintf(&b, "# nats-server configuration for site %s, written by xdcr deploy/local.\n", cfg.Name)
	b.WriteString("# Topology: docs/nats-topology.md. One JetStream domain per site; sites are\n")
	b.WriteString("# joined by leaf nodes, one connection per pair, with interest isolation.\n\n")
	fmt.Fprintf(&b, "server_name: %s\n", confQuote(cfg.Name))
	fmt.Fprintf(&b, "listen: %s\n", confQuote(natsHost+":"+port(cfg.Port)))
	fmt.Fprintf(&b, "log_file: %s\n\n", confQuote(filepath.Join(cfg.Dir, "nats.log")))
	sec := cfg.Security
	if sec.tls() {
		sec.writeTLS(&b, "", sec.VerifyClients)
		b.WriteString("\n")
	}
	if sec.auth() {
		b.WriteString("authorization {\n  users: [\n")
		if sec.AdminPassword != "" {
			fmt.Fprintf(&b, "    { user: %s, password: %s }\n", confQuote(natsAdminUser), confQuote(sec.AdminPassword))
		}
		perms := ""
		if sec.Permissions != "" {
			perms = ", permissions: " + sec.Permissions
		}
		for _, u := range slices.Sorted(maps.Keys(sec.Users)) {
			fmt.Fprintf(&b, "    { user: %s, password: %s%s }\n", confQuote(u), confQuote(sec.Users[u]), perms)
		}
		for _, k := range sec.NKeys {
			fmt.Fprintf(&b, "    { nkey: %s%s }\n", confQuote(k), perms)
		}
		b.WriteString("  ]\n}\n\n")
	}
	b.WriteString("jetstream {\n")
	fmt.Fprintf(&b, "  store_dir: %s\n", confQuote(filepath.Join(cfg.Dir, "jetstream")))
	fmt.Fprintf(&b, "  domain: %s\n", confQuote(cfg.Name))
	b.WriteString("  # fsync before every ack; see docs/nats-topology.md for the cost.\n")
	fmt.Fprintf(&b, "  sync_interval: %s\n", sync)
	b.WriteString("}\n\n")
	b.WriteString("leafnodes {\n")
	fmt.Fprintf(&b, "  listen: %s\n", confQuote(natsHost+":"+port(cfg.LeafPort)))
	b.WriteString("  # Do not pass interest learned from one leaf connection on to another:\n")
	b.WriteString("  # without it the mesh's cycles trip leafnode loop detection.\n")
	b.WriteString("  isolate_leafnode_interest: true\n")
	b.WriteString("  # Do not advertise this listen address to soliciting servers: they would\n")
	b.WriteString("  # add it to their reconnect pool and could bypass the URL configured in\n")
	b.WriteString("  # their remote (a WAN proxy in the fault tests).\n")
	b.WriteString("  no_advertise: true\n")
	b.WriteString("  # The links are loopback: nothing to save by compressing, and the default\n")
	b.WriteString("  # (s2_auto) still frames every byte in S2 below 10 ms of RTT.\n")
	b.WriteString("  compression: off\n")
	if sec.tls() {
		sec.writeTLS(&b, "  ", true)
	}
	if sec != nil && sec.LeafPassword != "" {
		fmt.Fprintf(&b, "  authorization { user: %s, password: %s }\n", confQuote(natsLeafUser), confQuote(sec.LeafPassword))
	}
	if len(cfg.Remotes) == 0 {
		b.WriteString("  remotes: []\n")
	} else {
		b.WriteString("  remotes: [\n")
		for _, r := range cfg.Remotes {
			if sec != nil && sec.LeafPassword != "" {
				r = strings.Replace(r, "://", "://"+natsLeafUser+":"+url.QueryEscape(sec.LeafPassword)+"@", 1)
			}
			if !sec.tls() {
				fmt.Fprintf(&b, "    { url: %s, compression: off }\n", confQuote(r))
				continue
			}
			fmt.Fprintf(&b, "    {\n      url: %s\n      compression: off\n", confQuote(r))
			sec.writeTLS(&b, "      ", false)
			b.WriteString("    }\n")
		}
		b.WriteString("  ]\n")
	}
	b.WriteString("}\n")
	return b.String()
}

// confQuote writes s as a double-quoted nats-server config string.
func confQuote(s string) string {
	r := strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`, "\r", `\r`, "\t", `\t`)
	return `"` + r.Replace(s) + `"`
}

// validSiteName checks that name can be a server name, a JetStream domain
// (one subject token) and a directory name.
func validSiteName(name string) error {
	if name == "" {
		return errors.New("empty name")
	}
	for _, r := range name {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_'
		if !ok {
			return fmt.Errorf("name %q: only letters, digits, '-' and '_' are allowed", name)
		}
	}
	return nil
}

// NATS is one nats-server with JetStream running inside this process. Its
// methods are safe for concurrent use.
type NATS struct {
	cfg      NATSConfig // Dir absolute, ports resolved
	confPath string
	logger   *slog.Logger

	mu  sync.Mutex
	srv *server.Server // nil while stopped
	log *natsLogger
}

// StartNATS writes Dir/nats.conf = [RenderNATSConfig](cfg) (after picking
// free ports for zero ones), loads it with server.ProcessConfigFile, so the
// file on disk is what runs, starts the server in this process and waits
// until it accepts client and leafnode connections with JetStream enabled.
// It does not wait for the remotes to connect. Without a ctx deadline the
// wait is bounded by 60 s.
func StartNATS(ctx context.Context, cfg NATSConfig) (*NATS, error) {
	if err := validSiteName(cfg.Name); err != nil {
		return nil, fmt.Errorf("start nats: %w", err)
	}
	if cfg.Dir == "" {
		return nil, fmt.Errorf("start nats %s: no directory", cfg.Name)
	}
	dir, err := filepath.Abs(cfg.Dir)
	if err != nil {
		return nil, fmt.Errorf("start nats %s: %w", cfg.Name, err)
	}
	cfg.Dir = dir
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("start nats %s: %w", cfg.Name, err)
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	// A picked port can be taken before the server binds it; pick again.
	attempts := 1
	if cfg.Port == 0 || cfg.LeafPort == 0 {
		attempts = 3
	}
	for i := 0; ; i++ {
		c := cfg
		if c.Port == 0 || c.LeafPort == 0 {
			ports, err := FreePorts(2)
			if err != nil {
				return nil, fmt.Errorf("start nats %s: %w", cfg.Name, err)
			}
			if c.Port == 0 {
				c.Port = ports[0]
			}
			if c.LeafPort == 0 {
				c.LeafPort = ports[1]
			}
		}
		n := &NATS{cfg: c, confPath: filepath.Join(dir, "nats.conf"), logger: logger}
		if err := os.WriteFile(n.confPath, []byte(RenderNATSConfig(c)), 0o644); err != nil {
			return nil, fmt.Errorf("start nats %s: write config: %w", cfg.Name, err)
		}
		err := n.Start(ctx)
		if err == nil {
			return n, nil
		}
		if i+1 >= attempts || !errors.Is(err, errListen) {
			return nil, err
		}
		logger.Warn("nats port taken, trying others", "port", c.Port, "leaf_port", c.LeafPort)
	}
}

// errListen marks a start that failed because a listener could not bind.
var errListen = errors.New("listen failed")

// Users of a secured server that deploy/local itself adds.
const (
	natsAdminUser = "local-admin"
	natsLeafUser  = "leaf"
)

// URL returns the client URL, "nats://127.0.0.1:PORT", or tls:// when the
// server speaks TLS. It carries no credentials.
func (n *NATS) URL() string {
	scheme := "nats://"
	if n.cfg.Security.tls() {
		scheme = "tls://"
	}
	return scheme + natsHost + ":" + strconv.Itoa(n.cfg.Port)
}

// Connect connects to the server with the rights of deploy/local's own
// admin user and its TLS files, if it is secured, then opts.
func (n *NATS) Connect(opts ...nats.Option) (*nats.Conn, error) {
	var own []nats.Option
	if sec := n.cfg.Security; sec != nil {
		if sec.tls() && sec.CAFile != "" {
			own = append(own, nats.RootCAs(sec.CAFile))
		}
		if sec.tls() && sec.VerifyClients {
			own = append(own, nats.ClientCert(sec.CertFile, sec.KeyFile))
		}
		if sec.AdminPassword != "" {
			own = append(own, nats.UserInfo(natsAdminUser, sec.AdminPassword))
		}
	}
	return nats.Connect(n.URL(), append(own, opts...)...)
}

// LeafURL returns the URL other sites solicit, "nats-leaf://127.0.0.1:LEAFPORT".
func (n *NATS) LeafURL() string {
	return "nats-leaf://" + natsHost + ":" + strconv.Itoa(n.cfg.LeafPort)
}

// Name returns the server name, which is also its JetStream domain.
func (n *NATS) Name() string { return n.cfg.Name }

// Dir returns the directory holding nats.conf, the store and the log.
func (n *NATS) Dir() string { return n.cfg.Dir }

// ConfigPath returns the path of the config file the server runs with.
func (n *NATS) ConfigPath() string { return n.confPath }

// Running reports whether the server is running.
func (n *NATS) Running() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.srv != nil && n.srv.Running()
}

// LeafConnections returns the number of leafnode connections (solicited and
// accepted) the server has; 0 while stopped.
func (n *NATS) LeafConnections() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.srv == nil {
		return 0
	}
	return n.srv.NumLeafNodes()
}

// Start starts the server again from the same config file: same ports, same
// store. It is a no-op if the server is running.
func (n *NATS) Start(ctx context.Context) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.srv != nil {
		return nil
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, defaultReadyTimeout)
		defer cancel()
	}
	opts, err := server.ProcessConfigFile(n.confPath)
	if err != nil {
		return fmt.Errorf("start nats %s: load %s: %w", n.cfg.Name, n.confPath, err)
	}
	opts.NoSigs = true // signals belong to the embedding program
	srv, err := server.NewServer(opts)
	if err != nil {
		return fmt.Errorf("start nats %s: %w", n.cfg.Name, err)
	}
	lg, err := newNATSLogger(n.logger, opts.LogFile)
	if err != nil {
		return fmt.Errorf("start nats %s: %w", n.cfg.Name, err)
	}
	srv.SetLogger(lg, n.logger.Enabled(ctx, slog.LevelDebug), false)
	go srv.Start()

	fail := func(err error) error {
		srv.Shutdown()
		srv.WaitForShutdown()
		lg.close()
		return fmt.Errorf("start nats %s: %w", n.cfg.Name, err)
	}
	for !srv.ReadyForConnections(50 * time.Millisecond) {
		if ferr := lg.fatal(); ferr != nil {
			if strings.Contains(ferr.Error(), "listening") {
				return fail(fmt.Errorf("%w: %w", errListen, ferr))
			}
			return fail(ferr)
		}
		if ctx.Err() != nil {
			return fail(fmt.Errorf("not ready: %w", ctx.Err()))
		}
	}
	if !srv.JetStreamEnabled() {
		return fail(fmt.Errorf("jetstream did not start (see %s): %w", opts.LogFile, errors.Join(lg.fatal(), lg.lastError())))
	}
	n.srv, n.log = srv, lg
	n.logger.Info("nats started", "url", n.URL(), "leaf_url", n.LeafURL(), "domain", n.cfg.Name)
	return nil
}

// Stop shuts the server down and waits for it. The store stays on disk and
// Start brings the server back. Stopping a stopped server is a no-op.
func (n *NATS) Stop() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.srv == nil {
		return
	}
	n.srv.Shutdown()
	n.srv.WaitForShutdown()
	n.log.close()
	n.srv, n.log = nil, nil
	n.logger.Info("nats stopped")
}

// Close stops the server if it runs. It is idempotent.
func (n *NATS) Close() error {
	n.Stop()
	return nil
}

// natsLogger is nats-server's Logger: each line goes to the slog Logger at
// the matching level and to the log file the config names. Fatal errors do
// not exit; they are kept so Start can report them.
type natsLogger struct {
	logger *slog.Logger

	mu      sync.Mutex
	file    *os.File
	fatalE  error
	lastErr error
}

func newNATSLogger(logger *slog.Logger, path string) (*natsLogger, error) {
	l := &natsLogger{logger: logger}
	if path != "" {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			return nil, fmt.Errorf("open log file: %w", err)
		}
		l.file = f
	}
	return l, nil
}

func (l *natsLogger) write(level slog.Level, tag, format string, v []any) string {
	msg := fmt.Sprintf(format, v...)
	l.logger.Log(context.Background(), level, msg)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.file != nil {
		fmt.Fprintf(l.file, "%s %s %s\n", time.Now().Format("2006/01/02 15:04:05.000000"), tag, msg)
	}
	return msg
}

func (l *natsLogger) Noticef(format string, v ...any) { l.write(slog.LevelInfo, "[INF]", format, v) }
func (l *natsLogger) Warnf(format string, v ...any)   { l.write(slog.LevelWarn, "[WRN]", format, v) }
func (l *natsLogger) Debugf(format string, v ...any)  { l.write(slog.LevelDebug, "[DBG]", format, v) }
func (l *natsLogger) Tracef(format string, v ...any)  { l.write(slog.LevelDebug-4, "[TRC]", format, v) }

func (l *natsLogger) Errorf(format string, v ...any) {
	msg := l.write(slog.LevelError, "[ERR]", format, v)
	l.mu.Lock()
	l.lastErr = errors.New(msg)
	l.mu.Unlock()
}

func (l *natsLogger) Fatalf(format string, v ...any) {
	msg := l.write(slog.LevelError, "[FTL]", format, v)
	l.mu.Lock()
	if l.fatalE == nil {
		l.fatalE = errors.New(msg)
	}
	l.mu.Unlock()
}

func (l *natsLogger) fatal() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.fatalE
}

func (l *natsLogger) lastError() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lastErr
}

// close closes the log file; later lines go to the slog Logger only.
func (l *natsLogger) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.file != nil {
		_ = l.file.Close()
		l.file = nil
	}
}
