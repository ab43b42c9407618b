package local

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// StopMode is how [Postgres.Stop] asks the postmaster to shut down.
type StopMode int

const (
	// StopSmart (SIGTERM) waits for every client to disconnect.
	StopSmart StopMode = iota
	// StopFast (SIGINT) disconnects clients and writes a shutdown checkpoint.
	StopFast
	// StopImmediate (SIGQUIT) exits at once; the next start runs crash recovery.
	StopImmediate
)

// String returns "smart", "fast" or "immediate".
func (m StopMode) String() string {
	switch m {
	case StopSmart:
		return "smart"
	case StopFast:
		return "fast"
	case StopImmediate:
		return "immediate"
	}
	return "StopMode(" + strconv.Itoa(int(m)) + ")"
}

func (m StopMode) signal() (syscall.Signal, error) {
	switch m {
	case StopSmart:
		return syscall.SIGTERM, nil
	case StopFast:
		return syscall.SIGINT, nil
	case StopImmediate:
		return syscall.SIGQUIT, nil
	}
	return 0, fmt.Errorf("unknown stop mode %d", int(m))
}

// PostgresConfig describes one local PostgreSQL cluster.
type PostgresConfig struct {
	// Dir is the cluster's data directory. It is created if missing; a
	// directory that already holds a cluster (PG_VERSION) is reused as is.
	// An existing directory must otherwise be empty.
	Dir string
	// Port is the TCP port on 127.0.0.1; 0 picks a free one.
	Port int
	// Settings are extra postgresql.conf settings. They override the
	// defaults (see [DefaultPostgresSettings]).
	Settings map[string]string
	// Logger receives lifecycle events; nil discards them. The server's own
	// log goes to Dir/postgres.log.
	Logger *slog.Logger
}

// DefaultPostgresSettings returns the postgresql.conf settings every local
// cluster gets unless [PostgresConfig.Settings] overrides them
// (listen_addresses, port and unix_socket_directories are added per cluster).
func DefaultPostgresSettings() map[string]string {
	return map[string]string{
		"wal_level":              "logical",
		"max_wal_senders":        "20",
		"max_replication_slots":  "20",
		"max_connections":        "100",
		"shared_buffers":         "128MB",
		"track_commit_timestamp": "on",
		"fsync":                  "on",
		// Crash recovery first syncs the whole data directory. One syncfs
		// instead of an fsync per file keeps a restart after Kill or an
		// immediate stop fast on a busy machine (the WAL is fsynced as usual).
		"recovery_init_sync_method": "syncfs",
		"logging_collector":         "off",
		"log_destination":           "stderr",
	}
}

// defaultReadyTimeout bounds a start when the ctx carries no deadline.
const defaultReadyTimeout = 60 * time.Second

// stopTimeout bounds the fast stop in Close before it falls back to Kill.
const stopTimeout = 30 * time.Second

// Postgres is one PostgreSQL cluster run from the server binaries. Its
// methods are safe for concurrent use, but lifecycle calls (Start, Stop,
// Kill, Restart, Close) are meant to be made one at a time.
type Postgres struct {
	dir    string
	port   int
	bins   pgBinaries
	ra     runAs
	logger *slog.Logger

	mu   sync.Mutex
	proc *pgProcess // nil while stopped
}

// pgProcess is one run of the postmaster.
type pgProcess struct {
	cmd  *exec.Cmd
	pid  int
	done chan struct{} // closed once the postmaster has exited and been reaped
	err  error         // cmd.Wait's result, set before done is closed
}

// StartPostgres prepares cfg.Dir (a copy of the cached initdb template for a
// new cluster), writes the configuration and starts the postmaster. It
// returns once the server accepts connections, or an error that includes the
// tail of Dir/postgres.log if the server exits during startup. Without a ctx
// deadline, the wait is bounded by 60 s.
func StartPostgres(ctx context.Context, cfg PostgresConfig) (*Postgres, error) {
	if cfg.Dir == "" {
		return nil, errors.New("start postgres: no data directory")
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	dir, err := filepath.Abs(cfg.Dir)
	if err != nil {
		return nil, fmt.Errorf("start postgres: %w", err)
	}
	bins, err := findPGBinaries(ctx)
	if err != nil {
		return nil, fmt.Errorf("start postgres: %w", err)
	}
	ra, err := currentRunAs()
	if err != nil {
		return nil, fmt.Errorf("start postgres: %w", err)
	}
	if err := prepareDataDir(ctx, dir, bins, ra, logger); err != nil {
		return nil, fmt.Errorf("start postgres in %s: %w", dir, err)
	}

	// A port picked here may be taken by someone else before the postmaster
	// binds it (go test runs packages in parallel); then pick another.
	attempts := 1
	if cfg.Port == 0 {
		attempts = 3
	}
	for i := 0; ; i++ {
		port := cfg.Port
		if port == 0 {
			if port, err = freePort(); err != nil {
				return nil, fmt.Errorf("start postgres: %w", err)
			}
		}
		p := &Postgres{dir: dir, port: port, bins: bins, ra: ra, logger: logger.With("port", port)}
		if err := p.writeConfig(cfg.Settings); err != nil {
			return nil, fmt.Errorf("start postgres in %s: %w", dir, err)
		}
		err = p.Start(ctx)
		if err == nil {
			return p, nil
		}
		if i+1 >= attempts || !errors.Is(err, errPortInUse) {
			return nil, err
		}
		logger.Warn("postgres port taken, trying another", "port", port)
	}
}

// prepareDataDir makes dir a data directory that ra can use.
func prepareDataDir(ctx context.Context, dir string, bins pgBinaries, ra runAs, logger *slog.Logger) error {
	if err := openAncestors(dir, os.TempDir(), ra); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return fmt.Errorf("create parent of data dir: %w", err)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "PG_VERSION")); err == nil {
		if v := strings.TrimSpace(string(b)); v != bins.major {
			return fmt.Errorf("data directory is from PostgreSQL %s but the server binaries (%s) are version %s", v, bins.postgres, bins.major)
		}
		if fi, err := os.Stat(dir); err == nil && ra.switched {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Uid != ra.uid {
				if err := chownTree(dir, ra); err != nil {
					return err
				}
			}
		}
		logger.Info("reusing postgresql data directory", "dir", dir)
		return nil
	}
	if entries, err := os.ReadDir(dir); err == nil && len(entries) > 0 {
		return fmt.Errorf("%s is not empty and holds no cluster (no PG_VERSION); use an empty or new directory", dir)
	}
	tmpl, err := ensureTemplate(ctx, bins, ra, logger)
	if err != nil {
		return err
	}
	if err := copyCluster(tmpl, dir, ra); err != nil {
		return err
	}
	logger.Info("created postgresql cluster", "dir", dir, "template", tmpl)
	return nil
}

// confFile is the file our settings go to; postgresql.conf includes it last,
// so it overrides initdb's defaults while ALTER SYSTEM still overrides it.
const confFile = "xdcr.conf"

var settingNameRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_.]*$`)

// renderPostgresConf returns the text of xdcr.conf.
func renderPostgresConf(dir string, port int, settings map[string]string) (string, error) {
	all := DefaultPostgresSettings()
	all["listen_addresses"] = "127.0.0.1"
	all["port"] = strconv.Itoa(port)
	// The socket path (dir/.s.PGSQL.PORT) must fit in sun_path; PostgreSQL
	// allows 107 bytes. Without a socket, clients use TCP only.
	all["unix_socket_directories"] = ""
	if len(dir)+len("/.s.PGSQL.")+5 < 100 {
		all["unix_socket_directories"] = dir
	}
	maps.Copy(all, settings)
	var b strings.Builder
	b.WriteString("# Written by xdcr deploy/local at every start; edits are lost.\n")
	for _, k := range slices.Sorted(maps.Keys(all)) {
		if !settingNameRE.MatchString(k) {
			return "", fmt.Errorf("invalid setting name %q", k)
		}
		fmt.Fprintf(&b, "%s = '%s'\n", k, strings.ReplaceAll(all[k], "'", "''"))
	}
	return b.String(), nil
}

// writeConfig writes xdcr.conf and makes postgresql.conf include it.
func (p *Postgres) writeConfig(settings map[string]string) error {
	text, err := renderPostgresConf(p.dir, p.port, settings)
	if err != nil {
		return err
	}
	path := filepath.Join(p.dir, confFile)
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		return fmt.Errorf("write %s: %w", confFile, err)
	}
	if err := p.ra.chown(path); err != nil {
		return err
	}
	main := filepath.Join(p.dir, "postgresql.conf")
	b, err := os.ReadFile(main)
	if err != nil {
		return fmt.Errorf("read postgresql.conf: %w", err)
	}
	include := "include '" + confFile + "'"
	if slices.Contains(strings.Split(string(b), "\n"), include) {
		return nil
	}
	f, err := os.OpenFile(main, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return fmt.Errorf("open postgresql.conf: %w", err)
	}
	_, err = fmt.Fprintf(f, "\n# Added by xdcr deploy/local: its settings override the ones above.\n%s\n", include)
	return errors.Join(err, f.Close())
}

// Port returns the TCP port the cluster listens on (127.0.0.1).
func (p *Postgres) Port() int { return p.port }

// Dir returns the data directory.
func (p *Postgres) Dir() string { return p.dir }

// LogPath returns the file the server's output goes to (Dir/postgres.log).
func (p *Postgres) LogPath() string { return filepath.Join(p.dir, "postgres.log") }

// PID returns the postmaster's pid, or 0 while the server is stopped.
func (p *Postgres) PID() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.proc == nil {
		return 0
	}
	select {
	case <-p.proc.done:
		return 0
	default:
		return p.proc.pid
	}
}

// Running reports whether the postmaster is running.
func (p *Postgres) Running() bool { return p.PID() != 0 }

// DSN returns a URL connecting to database as the superuser "postgres"
// over TCP (trust authentication, no TLS).
func (p *Postgres) DSN(database string) string {
	u := url.URL{
		Scheme:   "postgres",
		User:     url.User("postgres"),
		Host:     "127.0.0.1:" + strconv.Itoa(p.port),
		Path:     "/" + database,
		RawQuery: "sslmode=disable",
	}
	return u.String()
}

// CreateDatabase creates database name unless it exists.
func (p *Postgres) CreateDatabase(ctx context.Context, name string) error {
	conn, err := pgx.Connect(ctx, p.DSN("postgres"))
	if err != nil {
		return fmt.Errorf("create database %s: %w", name, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var exists bool
	if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", name).Scan(&exists); err != nil {
		return fmt.Errorf("create database %s: %w", name, err)
	}
	if exists {
		return nil
	}
	_, err = conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize())
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42P04" { // duplicate_database: a concurrent create won
		return nil
	}
	if err != nil {
		return fmt.Errorf("create database %s: %w", name, err)
	}
	return nil
}

// errPortInUse marks a start that failed because the port was taken.
var errPortInUse = errors.New("port in use")

// Start starts the postmaster on the same data directory and port and waits
// until it accepts connections (bounded by ctx, or 60 s without a
// deadline). It is a no-op if the server is running.
func (p *Postgres) Start(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.proc != nil {
		select {
		case <-p.proc.done:
		default:
			return nil
		}
	}
	p.proc = nil
	proc, err := p.spawn()
	if err != nil {
		return err
	}
	if err := p.waitReady(ctx, proc); err != nil {
		return err
	}
	p.proc = proc
	p.logger.Info("postgres started", "pid", proc.pid, "dir", p.dir)
	return nil
}

// spawn starts the postmaster with its output appended to postgres.log.
func (p *Postgres) spawn() (*pgProcess, error) {
	logf, err := os.OpenFile(p.LogPath(), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("start postgres: open log: %w", err)
	}
	defer logf.Close() // the child has its own descriptor
	if err := p.ra.chown(p.LogPath()); err != nil {
		return nil, fmt.Errorf("start postgres: %w", err)
	}
	fmt.Fprintf(logf, "---- xdcr deploy/local: starting postgres at %s ----\n", time.Now().Format(time.RFC3339))
	cmd := exec.Command(p.bins.postgres, "-D", p.dir)
	cmd.Dir = p.dir
	cmd.Env = pgEnv()
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = serverProcAttr(p.ra)
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start postgres %s: %w", p.bins.postgres, err)
	}
	proc := &pgProcess{cmd: cmd, pid: cmd.Process.Pid, done: make(chan struct{})}
	go func() {
		proc.err = cmd.Wait()
		close(proc.done)
	}()
	return proc, nil
}

// waitReady waits until the postmaster reports "ready" in postmaster.pid
// (as pg_ctl does, so the log is not filled with "the database system is
// starting up") and a connection succeeds, the postmaster exits, or ctx
// ends. On failure it kills what it started.
func (p *Postgres) waitReady(ctx context.Context, proc *pgProcess) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, defaultReadyTimeout)
		defer cancel()
	}
	cc, err := pgconn.ParseConfig(p.DSN("postgres"))
	if err != nil {
		return fmt.Errorf("start postgres: %w", err)
	}
	cc.ConnectTimeout = 2 * time.Second
	var lastErr error
	lastTry := time.Now()
	for {
		select {
		case <-proc.done:
			err := fmt.Errorf("postgres exited during startup (%v); postgres.log ends with:\n%s", proc.err, p.logTail())
			if strings.Contains(err.Error(), "Address already in use") {
				err = fmt.Errorf("%w: %w", errPortInUse, err)
			}
			return fmt.Errorf("start postgres in %s on port %d: %w", p.dir, p.port, err)
		default:
		}
		// Connect once the pid file says ready; also now and then without,
		// in case the file cannot be read.
		if p.pidFileReady(proc.pid) || time.Since(lastTry) > 5*time.Second {
			lastTry = time.Now()
			conn, err := pgconn.ConnectConfig(ctx, cc)
			if err == nil {
				return conn.Close(ctx)
			}
			lastErr = err
		}
		select {
		case <-ctx.Done():
			kctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), stopTimeout)
			_ = p.signalAndWait(kctx, proc, syscall.SIGKILL, true)
			cancel()
			return fmt.Errorf("start postgres in %s on port %d: not ready: %w (last error: %v); postgres.log ends with:\n%s",
				p.dir, p.port, ctx.Err(), lastErr, p.logTail())
		case <-proc.done:
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// pidFileReady reports whether postmaster.pid belongs to pid and its status
// line (the 8th) says "ready".
func (p *Postgres) pidFileReady(pid int) bool {
	b, err := os.ReadFile(filepath.Join(p.dir, "postmaster.pid"))
	if err != nil {
		return false
	}
	lines := strings.Split(string(b), "\n")
	return len(lines) >= 8 && strings.TrimSpace(lines[0]) == strconv.Itoa(pid) && strings.TrimSpace(lines[7]) == "ready"
}

// logTail returns the end of postgres.log.
func (p *Postgres) logTail() string {
	f, err := os.Open(p.LogPath())
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	defer f.Close()
	const n = 4096
	if fi, err := f.Stat(); err == nil && fi.Size() > n {
		_, _ = f.Seek(fi.Size()-n, io.SeekStart)
	}
	b, _ := io.ReadAll(f)
	return tail(b, n)
}

// Stop asks the postmaster to shut down in mode (SIGTERM smart, SIGINT
// fast, SIGQUIT immediate) and waits until it and every process of its
// group have exited, or ctx ends. Stopping a stopped server is a no-op.
func (p *Postgres) Stop(ctx context.Context, mode StopMode) error {
	sig, err := mode.signal()
	if err != nil {
		return fmt.Errorf("stop postgres: %w", err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.proc == nil {
		return nil
	}
	if err := p.signalAndWait(ctx, p.proc, sig, false); err != nil {
		return fmt.Errorf("stop postgres (%s) pid %d: %w", mode, p.proc.pid, err)
	}
	p.logger.Info("postgres stopped", "mode", mode.String(), "pid", p.proc.pid)
	p.proc = nil
	return nil
}

// Kill sends SIGKILL to the postmaster and all its backends and auxiliary
// processes, as a machine crash would end them, and waits until they are
// gone. The next Start runs crash recovery. (PostgreSQL puts each child of
// the postmaster in its own session, so Kill signals them one by one rather
// than as a process group.)
func (p *Postgres) Kill() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.proc == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
	defer cancel()
	if err := p.signalAndWait(ctx, p.proc, syscall.SIGKILL, true); err != nil {
		return fmt.Errorf("kill postgres pid %d: %w", p.proc.pid, err)
	}
	p.logger.Info("postgres killed", "pid", p.proc.pid)
	p.proc = nil
	return nil
}

// signalAndWait sends sig to the postmaster, or with all also to every
// descendant (the postmaster first frozen with SIGSTOP so it starts no new
// ones), and waits until the postmaster has been reaped and every
// descendant seen before the signal has exited.
func (p *Postgres) signalAndWait(ctx context.Context, proc *pgProcess, sig syscall.Signal, all bool) error {
	if all {
		_ = syscall.Kill(proc.pid, syscall.SIGSTOP)
	}
	kids := descendants(proc.pid)
	if err := syscall.Kill(proc.pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("send %v: %w", sig, err)
	}
	if all {
		for _, k := range kids {
			_ = syscall.Kill(k, sig)
		}
	}
	select {
	case <-proc.done:
	case <-ctx.Done():
		return fmt.Errorf("wait for exit: %w", ctx.Err())
	}
	// The postmaster waits for its children on every shutdown but a kill.
	for _, k := range kids {
		for processAlive(k) {
			select {
			case <-ctx.Done():
				return fmt.Errorf("wait for backend %d: %w", k, ctx.Err())
			case <-time.After(10 * time.Millisecond):
			}
		}
	}
	return nil
}

// Restart stops the server in mode and starts it again on the same port.
func (p *Postgres) Restart(ctx context.Context, mode StopMode) error {
	if err := p.Stop(ctx, mode); err != nil {
		return fmt.Errorf("restart postgres: %w", err)
	}
	if err := p.Start(ctx); err != nil {
		return fmt.Errorf("restart postgres: %w", err)
	}
	return nil
}

// Close stops the server (fast, then Kill if that takes over 30 s) if it is
// running. It keeps the data directory and is idempotent.
func (p *Postgres) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
	defer cancel()
	err := p.Stop(ctx, StopFast)
	if err == nil {
		return nil
	}
	if kerr := p.Kill(); kerr != nil {
		return fmt.Errorf("close postgres: %w", errors.Join(err, kerr))
	}
	return nil
}
