package local

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

// processTree returns pid and its descendants: a postmaster and its
// backends and auxiliary processes.
func processTree(pid int) []int { return append([]int{pid}, descendants(pid)...) }

// stillRunning returns the pids of tree that still run.
func stillRunning(tree []int) []int {
	var out []int
	for _, p := range tree {
		if processAlive(p) {
			out = append(out, p)
		}
	}
	return out
}

// testLog sends log lines to t.Log (shown only for failing tests or -v) and
// keeps them so a test can look for messages such as "Loop detected".
type testLog struct {
	t     testing.TB
	mu    sync.Mutex
	done  bool
	lines []string
}

// newTestLogger returns a logger writing to t.Log. Lines that arrive after
// the test ended (a server goroutine finishing late) are kept but not sent
// to t.Log, which would panic.
func newTestLogger(t testing.TB) (*slog.Logger, *testLog) {
	t.Helper()
	tl := &testLog{t: t}
	t.Cleanup(func() { // registered first, so it runs after every other cleanup
		tl.mu.Lock()
		tl.done = true
		tl.mu.Unlock()
	})
	return slog.New(slog.NewTextHandler(tl, &slog.HandlerOptions{Level: slog.LevelInfo})), tl
}

func (tl *testLog) Write(p []byte) (int, error) {
	line := strings.TrimSuffix(string(p), "\n")
	tl.mu.Lock()
	defer tl.mu.Unlock()
	tl.lines = append(tl.lines, line)
	if !tl.done {
		tl.t.Log(line)
	}
	return len(p), nil
}

// matching returns the lines that contain s.
func (tl *testLog) matching(s string) []string {
	tl.mu.Lock()
	defer tl.mu.Unlock()
	var out []string
	for _, l := range tl.lines {
		if strings.Contains(l, s) {
			out = append(out, l)
		}
	}
	return out
}

// eventually polls cond every 20 ms until it returns nil or timeout passes,
// then fails the test with cond's last error.
func eventually(t testing.TB, ctx context.Context, timeout time.Duration, what string, cond func(context.Context) error) time.Duration {
	t.Helper()
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		err := cond(ctx)
		if err == nil {
			return time.Since(start)
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s: not within %s: %v", what, timeout, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
