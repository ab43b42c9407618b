package local

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// daemon is a server run from a binary on PATH, listening on one TCP port
// of 127.0.0.1: what [Redis] and [Memcached] share. Its lifecycle calls are
// meant to be made one at a time; the accessors are safe for concurrent use.
type daemon struct {
	name    string // for messages: "redis", "memcached"
	bin     string // absolute path of the binary
	dir     string
	port    int
	logPath string
	args    func(port int) []string
	// ready returns nil once the server on addr answers its protocol and
	// says it is process pid (not another server that has the port).
	ready  func(ctx context.Context, addr string, pid int) error
	logger *slog.Logger

	mu   sync.Mutex
	proc *daemonProc // nil while stopped
}

type daemonProc struct {
	cmd  *exec.Cmd
	pid  int
	done chan struct{} // closed once the process has exited and been reaped
	err  error         // cmd.Wait's result, set before done is closed
}

// startDaemon prepares d (a free port unless d.port is set, retried when
// the picked port is taken meanwhile) and starts it.
func startDaemon(ctx context.Context, d *daemon) error {
	if d.dir == "" {
		return fmt.Errorf("start %s: no directory", d.name)
	}
	dir, err := filepath.Abs(d.dir)
	if err != nil {
		return fmt.Errorf("start %s: %w", d.name, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("start %s: %w", d.name, err)
	}
	d.dir = dir
	if d.logger == nil {
		d.logger = slog.New(slog.DiscardHandler)
	}
	fixed := d.port != 0
	for i := 0; ; i++ {
		if !fixed {
			if d.port, err = freePort(); err != nil {
				return fmt.Errorf("start %s: %w", d.name, err)
			}
		}
		err = d.Start(ctx)
		if err == nil || fixed || i >= 2 || !errors.Is(err, errPortInUse) {
			return err
		}
		d.logger.Warn(d.name+" port taken, trying another", "port", d.port)
	}
}

func (d *daemon) addr() string { return net.JoinHostPort(natsHost, strconv.Itoa(d.port)) }

// Start starts the server on the same directory and port and waits until
// it answers (bounded by ctx, or 60 s without a deadline). It is a no-op if
// the server runs.
func (d *daemon) Start(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.proc != nil {
		select {
		case <-d.proc.done:
		default:
			return nil
		}
	}
	d.proc = nil
	logf, err := os.OpenFile(d.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("start %s: open log: %w", d.name, err)
	}
	defer logf.Close() // the child has its own descriptor
	fmt.Fprintf(logf, "%s%s at %s ----\n", startMarker, d.name, time.Now().Format(time.RFC3339))
	cmd := exec.Command(d.bin, d.args(d.port)...)
	cmd.Dir = d.dir
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = serverProcAttr(runAs{})
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s %s: %w", d.name, d.bin, err)
	}
	proc := &daemonProc{cmd: cmd, pid: cmd.Process.Pid, done: make(chan struct{})}
	go func() {
		proc.err = cmd.Wait()
		close(proc.done)
	}()
	if err := d.waitReady(ctx, proc); err != nil {
		return err
	}
	d.proc = proc
	d.logger.Info(d.name+" started", "pid", proc.pid, "port", d.port)
	return nil
}

func (d *daemon) waitReady(ctx context.Context, proc *daemonProc) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, defaultReadyTimeout)
		defer cancel()
	}
	var lastErr error
	for {
		select {
		case <-proc.done:
			err := fmt.Errorf("%s exited during startup (%v); %s ends with:\n%s", d.name, proc.err, filepath.Base(d.logPath), d.logTail())
			if portTaken(d.logTail()) {
				err = fmt.Errorf("%w: %w", errPortInUse, err)
			}
			return fmt.Errorf("start %s on port %d: %w", d.name, d.port, err)
		default:
		}
		rctx, cancel := context.WithTimeout(ctx, time.Second)
		lastErr = d.ready(rctx, d.addr(), proc.pid)
		cancel()
		if lastErr == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			_ = syscall.Kill(proc.pid, syscall.SIGKILL)
			<-proc.done
			return fmt.Errorf("start %s on port %d: not ready: %w (last error: %v); %s ends with:\n%s",
				d.name, d.port, ctx.Err(), lastErr, filepath.Base(d.logPath), d.logTail())
		case <-proc.done:
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func portTaken(log string) bool {
	return strings.Contains(strings.ToLower(log), "address already in use")
}

// startMarker begins the log of every start, so the tail shown for a
// failed start is that start's own.
const startMarker = "---- xdcr deploy/local: starting "

func (d *daemon) logTail() string {
	f, err := os.Open(d.logPath)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	defer f.Close()
	const n = 4096
	if fi, err := f.Stat(); err == nil && fi.Size() > n {
		_, _ = f.Seek(fi.Size()-n, io.SeekStart)
	}
	b, _ := io.ReadAll(f)
	if i := bytes.LastIndex(b, []byte(startMarker)); i >= 0 {
		b = b[i:]
	}
	return tail(b, n)
}

// Port returns the TCP port on 127.0.0.1.
func (d *daemon) Port() int { return d.port }

// Dir returns the server's directory.
func (d *daemon) Dir() string { return d.dir }

// LogPath returns the file the server's output goes to.
func (d *daemon) LogPath() string { return d.logPath }

// PID returns the server's pid, or 0 while it is stopped.
func (d *daemon) PID() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.proc == nil {
		return 0
	}
	select {
	case <-d.proc.done:
		return 0
	default:
		return d.proc.pid
	}
}

// Running reports whether the server runs.
func (d *daemon) Running() bool { return d.PID() != 0 }

// signal sends sig and waits until the process has exited, or ctx ends.
func (d *daemon) signal(ctx context.Context, sig syscall.Signal, before func() bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.proc == nil {
		return nil
	}
	if before == nil || !before() {
		if err := syscall.Kill(d.proc.pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("stop %s: send %v: %w", d.name, sig, err)
		}
	}
	select {
	case <-d.proc.done:
	case <-ctx.Done():
		return fmt.Errorf("stop %s pid %d: wait for exit: %w", d.name, d.proc.pid, ctx.Err())
	}
	d.logger.Info(d.name+" stopped", "pid", d.proc.pid, "signal", sig.String())
	d.proc = nil
	return nil
}

// Kill ends the server with SIGKILL, as a crash would, and waits until it
// is gone.
func (d *daemon) Kill() error {
	ctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
	defer cancel()
	return d.signal(ctx, syscall.SIGKILL, nil)
}

// closeWith stops the server with stop, then kills it if that fails. It is
// idempotent.
func (d *daemon) closeWith(stop func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
	defer cancel()
	err := stop(ctx)
	if err == nil {
		return nil
	}
	if kerr := d.Kill(); kerr != nil {
		return fmt.Errorf("close %s: %w", d.name, errors.Join(err, kerr))
	}
	return nil
}

// lookBinary finds name on PATH; the error wraps exec.ErrNotFound when it
// is not installed.
func lookBinary(name, hint string) (string, error) {
	p, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("%s is not installed (%s): %w", name, hint, err)
	}
	return p, nil
}
