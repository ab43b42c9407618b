package local

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// RedisConfig describes one local redis-server.
type RedisConfig struct {
	// Dir holds the server's log (Dir/redis.log) and the snapshot Stop
	// writes (Dir/dump.rdb). It is created if missing.
	Dir string
	// Port is the TCP port on 127.0.0.1; 0 picks a free one.
	Port int
	// Args are extra redis-server arguments, such as
	// {"--rename-command", "UNLINK", ""} to play an old server.
	Args []string
	// Logger receives lifecycle events; nil discards them.
	Logger *slog.Logger
}

// Redis is one redis-server run from the binary on PATH (Debian:
// apt-get install redis-server), listening on 127.0.0.1 only, without
// background persistence. [Redis.Stop] writes a snapshot that the next
// [Redis.Start] loads, so a stopped and restarted server keeps its keys the
// way a production Redis with persistence does; [Redis.Kill] loses them.
type Redis struct {
	d *daemon
}

// StartRedis starts a redis-server and returns once it answers PING. The
// error wraps exec.ErrNotFound when redis-server is not installed. Without
// a ctx deadline the wait is bounded by 60 s.
func StartRedis(ctx context.Context, cfg RedisConfig) (*Redis, error) {
	bin, err := lookBinary("redis-server", "Debian: apt-get install redis-server")
	if err != nil {
		return nil, fmt.Errorf("start redis: %w", err)
	}
	r := &Redis{d: &daemon{
		name:    "redis",
		bin:     bin,
		dir:     cfg.Dir,
		port:    cfg.Port,
		logger:  cfg.Logger,
		ready:   redisReady,
		logPath: "", // set below, once dir is absolute
	}}
	r.d.args = func(port int) []string {
		args := []string{
			"--bind", natsHost,
			"--port", strconv.Itoa(port),
			"--dir", r.d.dir,
			"--dbfilename", "dump.rdb",
			"--save", "",
			"--appendonly", "no",
			"--daemonize", "no",
			"--logfile", "",
		}
		return append(args, cfg.Args...)
	}
	if cfg.Dir != "" {
		abs, err := filepath.Abs(cfg.Dir)
		if err != nil {
			return nil, fmt.Errorf("start redis: %w", err)
		}
		r.d.dir = abs
		r.d.logPath = filepath.Join(abs, "redis.log")
	}
	if err := startDaemon(ctx, r.d); err != nil {
		return nil, err
	}
	return r, nil
}

// URL returns "redis://127.0.0.1:PORT/0", the form of a site's redis
// setting.
func (r *Redis) URL() string { return "redis://" + r.d.addr() + "/0" }

// Addr returns "127.0.0.1:PORT".
func (r *Redis) Addr() string { return r.d.addr() }

// Port returns the TCP port on 127.0.0.1.
func (r *Redis) Port() int { return r.d.Port() }

// LogPath returns the server's log file.
func (r *Redis) LogPath() string { return r.d.LogPath() }

// Running reports whether the server runs.
func (r *Redis) Running() bool { return r.d.Running() }

// Start starts a stopped server again on the same port and directory; it
// loads the snapshot the last Stop wrote.
func (r *Redis) Start(ctx context.Context) error { return r.d.Start(ctx) }

// Stop shuts the server down with SHUTDOWN SAVE, so its keys are written to
// Dir/dump.rdb for the next Start, and waits until it has exited. Stopping
// a stopped server is a no-op.
func (r *Redis) Stop(ctx context.Context) error {
	return r.d.signal(ctx, syscall.SIGTERM, func() bool {
		// true when the server took the command; SIGTERM otherwise
		return redisCommand(ctx, r.d.addr(), "SHUTDOWN", "SAVE") == nil
	})
}

// Kill ends the server with SIGKILL: its keys are lost.
func (r *Redis) Kill() error { return r.d.Kill() }

// Close stops the server (Stop, then Kill if that fails). It keeps the
// directory and is idempotent.
func (r *Redis) Close() error { return r.d.closeWith(r.Stop) }

// redisReady returns nil once the server at addr is process pid and
// accepts commands.
func redisReady(ctx context.Context, addr string, pid int) error {
	reply, err := redisReply(ctx, addr, "INFO", "server")
	if err != nil {
		return err
	}
	if !strings.Contains(reply, "\nprocess_id:"+strconv.Itoa(pid)+"\r") {
		return fmt.Errorf("another process answers on %s", addr)
	}
	return nil
}

// redisCommand sends one command and checks that the reply is no error.
// SHUTDOWN closes the connection instead of replying; that counts as
// success.
func redisCommand(ctx context.Context, addr string, args ...string) error {
	_, err := redisReply(ctx, addr, args...)
	return err
}

// redisReply sends one command in RESP and returns a simple or bulk string
// reply.
func redisReply(ctx context.Context, addr string, args ...string) (string, error) {
	var dialer net.Dialer
	conn, err := dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	deadline := time.Now().Add(2 * time.Second)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = conn.SetDeadline(deadline)
	var b strings.Builder
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := conn.Write([]byte(b.String())); err != nil {
		return "", err
	}
	rd := bufio.NewReader(conn)
	line, err := rd.ReadString('\n')
	if args[0] == "SHUTDOWN" && err != nil && line == "" {
		return "", nil // the server closed the connection: it is shutting down
	}
	if err != nil {
		return "", err
	}
	switch {
	case strings.HasPrefix(line, "-"):
		return "", fmt.Errorf("redis %s: %s", args[0], strings.TrimSpace(line[1:]))
	case strings.HasPrefix(line, "$"):
		n, err := strconv.Atoi(strings.TrimSpace(line[1:]))
		if err != nil || n < 0 {
			return "", fmt.Errorf("redis %s: unexpected reply %q", args[0], line)
		}
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(rd, buf); err != nil {
			return "", err
		}
		return string(buf[:n]), nil
	}
	return strings.TrimSpace(line[1:]), nil
}
