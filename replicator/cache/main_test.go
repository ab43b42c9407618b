package cache

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"

	"github.com/xdcr/xdcr/deploy/local"
	"github.com/xdcr/xdcr/replicator/change"
)

// shared holds the servers the integration tests share, started on first
// use: one PostgreSQL cluster (a database per test) and one NATS server.
// Every test starts its own cache servers.
var shared struct {
	once sync.Once
	err  error
	dir  string
	pg   *local.Postgres
	nats *local.NATS
}

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	code := m.Run()
	if shared.pg != nil {
		shared.pg.Close()
	}
	if shared.nats != nil {
		shared.nats.Close()
	}
	if shared.dir != "" {
		os.RemoveAll(shared.dir)
	}
	return code
}

func servers(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("starts PostgreSQL, NATS and cache servers")
	}
	shared.once.Do(func() {
		shared.dir, shared.err = os.MkdirTemp("", "xdcr-cache-test-")
		if shared.err != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		shared.pg, shared.err = local.StartPostgres(ctx, local.PostgresConfig{Dir: filepath.Join(shared.dir, "pg"),
			Settings: map[string]string{"fsync": "off"}})
		if shared.err != nil {
			return
		}
		shared.nats, shared.err = local.StartNATS(ctx, local.NATSConfig{Name: "dc-a", Dir: filepath.Join(shared.dir, "nats")})
	})
	if shared.err != nil {
		t.Fatal(shared.err)
	}
}

var dbSeq atomic.Int32

// testDB creates a database of its own for the test, runs schema in it
// and returns its DSN.
func testDB(t *testing.T, schema string) string {
	t.Helper()
	servers(t)
	name := fmt.Sprintf("cache_%d", dbSeq.Add(1))
	if err := shared.pg.CreateDatabase(t.Context(), name); err != nil {
		t.Fatal(err)
	}
	dsn := shared.pg.DSN(name)
	if schema != "" {
		execSQL(t, dsn, schema)
	}
	return dsn
}

func execSQL(t *testing.T, dsn, sql string, args ...any) {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(t.Context(), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

func queryInt(t *testing.T, dsn, sql string, args ...any) int64 {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var n int64
	if err := conn.QueryRow(t.Context(), sql, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return n
}

func startRedis(t *testing.T, args ...string) *local.Redis {
	t.Helper()
	servers(t)
	r, err := local.StartRedis(t.Context(), local.RedisConfig{Dir: t.TempDir(), Args: args})
	if errors.Is(err, exec.ErrNotFound) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func startMemcached(t *testing.T) *local.Memcached {
	t.Helper()
	servers(t)
	m, err := local.StartMemcached(t.Context(), local.MemcachedConfig{Dir: t.TempDir()})
	if errors.Is(err, exec.ErrNotFound) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func openBackend(t *testing.T, url string) Backend {
	t.Helper()
	b, err := Open(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

func natsConn(t *testing.T) *nats.Conn {
	t.Helper()
	servers(t)
	nc, err := nats.Connect(shared.nats.URL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// events subscribes to subject and returns what arrived so far.
func events(t *testing.T, nc *nats.Conn, subject string) func() []Event {
	t.Helper()
	var (
		mu  sync.Mutex
		got []Event
	)
	sub, err := nc.Subscribe(subject, func(m *nats.Msg) {
		var e Event
		if err := json.Unmarshal(m.Data, &e); err != nil {
			t.Errorf("event %q: %v", m.Data, err)
			return
		}
		mu.Lock()
		got = append(got, e)
		mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sub.Unsubscribe() })
	return func() []Event {
		mu.Lock()
		defer mu.Unlock()
		return append([]Event(nil), got...)
	}
}

// testLogger sends log lines to t.Log and keeps them.
func testLogger(t *testing.T) (*slog.Logger, *syncBuffer) {
	var buf syncBuffer
	l := &tlog{t: t, buf: &buf}
	t.Cleanup(func() { // runs after the cleanups registered later
		l.mu.Lock()
		l.end = true
		l.mu.Unlock()
	})
	h := slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelDebug})
	return slog.New(h), &buf
}

type tlog struct {
	t   *testing.T
	buf *syncBuffer
	mu  sync.Mutex
	end bool
}

func (l *tlog) Write(p []byte) (int, error) {
	l.buf.Write(p)
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.end {
		l.t.Log(strings.TrimSuffix(string(p), "\n"))
	}
	return len(p), nil
}

// queueOutbox writes a row into the outbox, as apply does.
func queueOutbox(t *testing.T, dsn, cluster string, lsn change.LSN, commit time.Time, inv ...change.Invalidation) {
	t.Helper()
	entries, err := json.Marshal(inv)
	if err != nil {
		t.Fatal(err)
	}
	execSQL(t, dsn, `INSERT INTO xdcr.cache_outbox (cluster, lsn, commit_time, entries) VALUES ($1, $2::pg_lsn, $3, $4::jsonb)`,
		cluster, lsn.String(), commit, string(entries))
}

// eventually polls cond until it holds or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// runWorker runs w until the test ends.
func runWorker(t *testing.T, w interface{ Run(context.Context) error }) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Run returned %v, want context.Canceled", err)
		}
	})
}
