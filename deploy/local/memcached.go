package local

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// MemcachedConfig describes one local memcached.
type MemcachedConfig struct {
	// Dir holds the server's log (Dir/memcached.log). It is created if
	// missing.
	Dir string
	// Port is the TCP port on 127.0.0.1; 0 picks a free one.
	Port int
	// MemoryMB is the item memory; 0 means 64.
	MemoryMB int
	// Args are extra memcached arguments.
	Args []string
	// Logger receives lifecycle events; nil discards them.
	Logger *slog.Logger
}

// Memcached is one memcached run from the binary on PATH (Debian:
// apt-get install memcached), listening on TCP 127.0.0.1 only (no UDP). A
// stopped memcached forgets everything, as a real one does.
type Memcached struct {
	d *daemon
}

// StartMemcached starts a memcached and returns once it answers.
// The error wraps exec.ErrNotFound when memcached is not installed. When
// the caller is root, memcached runs as "nobody" (it refuses to run as
// root). Without a ctx deadline the wait is bounded by 60 s.
func StartMemcached(ctx context.Context, cfg MemcachedConfig) (*Memcached, error) {
	bin, err := lookBinary("memcached", "Debian: apt-get install memcached")
	if err != nil {
		return nil, fmt.Errorf("start memcached: %w", err)
	}
	mem := cfg.MemoryMB
	if mem <= 0 {
		mem = 64
	}
	m := &Memcached{d: &daemon{
		name:   "memcached",
		bin:    bin,
		dir:    cfg.Dir,
		port:   cfg.Port,
		logger: cfg.Logger,
		ready:  memcachedReady,
	}}
	m.d.args = func(port int) []string {
		args := []string{"-l", natsHost, "-p", strconv.Itoa(port), "-U", "0", "-m", strconv.Itoa(mem)}
		if os.Geteuid() == 0 {
			args = append(args, "-u", "nobody")
		}
		return append(args, cfg.Args...)
	}
	if cfg.Dir != "" {
		abs, err := filepath.Abs(cfg.Dir)
		if err != nil {
			return nil, fmt.Errorf("start memcached: %w", err)
		}
		m.d.dir = abs
		m.d.logPath = filepath.Join(abs, "memcached.log")
	}
	if err := startDaemon(ctx, m.d); err != nil {
		return nil, err
	}
	return m, nil
}

// URL returns "memcache://127.0.0.1:PORT", the form of a site's redis
// setting for a memcached.
func (m *Memcached) URL() string { return "memcache://" + m.d.addr() }

// Addr returns "127.0.0.1:PORT".
func (m *Memcached) Addr() string { return m.d.addr() }

// Port returns the TCP port on 127.0.0.1.
func (m *Memcached) Port() int { return m.d.Port() }

// Running reports whether the server runs.
func (m *Memcached) Running() bool { return m.d.Running() }

// Start starts a stopped server again on the same port, empty.
func (m *Memcached) Start(ctx context.Context) error { return m.d.Start(ctx) }

// Stop ends the server with SIGTERM and waits until it has exited. Its
// items are gone. Stopping a stopped server is a no-op.
func (m *Memcached) Stop(ctx context.Context) error { return m.d.signal(ctx, syscall.SIGTERM, nil) }

// Kill ends the server with SIGKILL.
func (m *Memcached) Kill() error { return m.d.Kill() }

// Close stops the server (Stop, then Kill if that fails). It is
// idempotent.
func (m *Memcached) Close() error { return m.d.closeWith(m.Stop) }

// memcachedReady returns nil once the server at addr answers "stats" as
// process pid.
func memcachedReady(ctx context.Context, addr string, pid int) error {
	var dialer net.Dialer
	conn, err := dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := conn.Write([]byte("stats\r\n")); err != nil {
		return err
	}
	rd := bufio.NewReader(conn)
	for {
		line, err := rd.ReadString('\n')
		if err != nil {
			return err
		}
		line = strings.TrimSpace(line)
		switch {
		case line == "STAT pid "+strconv.Itoa(pid):
			return nil
		case line == "END":
			return fmt.Errorf("another process answers on %s", addr)
		case !strings.HasPrefix(line, "STAT "):
			return fmt.Errorf("memcached answered %q to stats", line)
		}
	}
}
