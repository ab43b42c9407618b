package cache

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bradfitz/gomemcache/memcache"
	"github.com/redis/go-redis/v9"

	"github.com/xdcr/xdcr/replicator/change"
)

const accountsSchema = `
CREATE TABLE public.accounts (id bigint PRIMARY KEY, email text);
INSERT INTO public.accounts SELECT g, 'user' || g || '@example.com' FROM generate_series(1, 50) g;
ANALYZE public.accounts;`

// recorder is an Observer that keeps what it is told.
type recorder struct {
	mu      sync.Mutex
	results map[string]int // "backend/ok" → calls
	outbox  int64
}

func (r *recorder) Invalidated(backend string, n int, _ time.Duration, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.results == nil {
		r.results = map[string]int{}
	}
	res := "ok"
	if err != nil {
		res = "error"
	}
	r.results[backend+"/"+res]++
}

func (r *recorder) OutboxRows(n int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.outbox = n
}

func (r *recorder) count(key string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.results[key]
}

// cacheClient reads and writes a cache server directly, as an application
// would.
type cacheClient interface {
	set(key, value string)
	exists(key string) bool
	get(key string) (string, bool)
}

type redisClient struct {
	t *testing.T
	c *redis.Client
}

func newRedisClient(t *testing.T, url string) redisClient {
	opt, err := redis.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	c := redis.NewClient(opt)
	t.Cleanup(func() { c.Close() })
	return redisClient{t, c}
}

func (r redisClient) set(key, value string) {
	if err := r.c.Set(context.Background(), key, value, 0).Err(); err != nil {
		r.t.Fatal(err)
	}
}

func (r redisClient) exists(key string) bool {
	_, ok := r.get(key)
	return ok
}

func (r redisClient) get(key string) (string, bool) {
	v, err := r.c.Get(context.Background(), key).Result()
	if errors.Is(err, redis.Nil) {
		return "", false
	}
	if err != nil {
		r.t.Fatal(err)
	}
	return v, true
}

type memcachedClient struct {
	t  *testing.T
	mc *memcache.Client
}

func newMemcachedClient(t *testing.T, addr string) memcachedClient {
	mc := memcache.New(addr)
	t.Cleanup(func() { mc.Close() })
	return memcachedClient{t, mc}
}

func (m memcachedClient) set(key, value string) {
	if err := m.mc.Set(&memcache.Item{Key: key, Value: []byte(value)}); err != nil {
		m.t.Fatal(err)
	}
}

func (m memcachedClient) exists(key string) bool {
	_, ok := m.get(key)
	return ok
}

func (m memcachedClient) get(key string) (string, bool) {
	it, err := m.mc.Get(key)
	if errors.Is(err, memcache.ErrCacheMiss) {
		return "", false
	}
	if err != nil {
		m.t.Fatal(err)
	}
	return string(it.Value), true
}

// fixture is one site: a database with public.accounts and an outbox, a
// cache server, NATS, and the keys of public.accounts.
type fixture struct {
	cluster string
	dsn     string
	keys    *Keys
	backend Backend
	client  cacheClient
	events  func() []Event
	obs     *recorder
	logs    *syncBuffer // the worker's log
}

var clusterSeq atomic.Int32

func newFixture(t *testing.T, backend string, redisArgs ...string) *fixture {
	t.Helper()
	log, logs := testLogger(t)
	f := &fixture{cluster: fmt.Sprintf("c%d", clusterSeq.Add(1)), obs: &recorder{}, logs: logs}
	f.dsn = testDB(t, accountsSchema)
	var err error
	f.keys, err = NewKeys([]Table{{Name: "public.accounts", Schema: "public", Rel: "accounts",
		Keys: []string{"account:{id}", "account-email:{email}"}}}, log)
	if err != nil {
		t.Fatal(err)
	}
	switch backend {
	case "redis":
		r := startRedis(t, redisArgs...)
		f.backend = openBackend(t, r.URL())
		f.client = newRedisClient(t, r.URL())
	case "memcached":
		m := startMemcached(t)
		f.backend = openBackend(t, m.URL())
		f.client = newMemcachedClient(t, m.Addr())
	}
	conn, err := connect(t.Context(), f.dsn, "test")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if err := ensureSchema(t.Context(), conn); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fixture) worker(t *testing.T, cfg WorkerConfig) *Worker {
	t.Helper()
	nc := natsConn(t)
	cfg.Cluster, cfg.Site, cfg.DSN = f.cluster, "dc-a", f.dsn
	if cfg.Interval == 0 {
		cfg.Interval = 50 * time.Millisecond
	}
	f.events = events(t, nc, Subject(f.cluster, "dc-a"))
	wlog, logs := testLogger(t)
	f.logs = logs
	return NewWorker(cfg, f.keys, f.backend, nc, f.obs, wlog)
}

func (f *fixture) outboxRows(t *testing.T) int64 {
	return queryInt(t, f.dsn, "SELECT count(*) FROM xdcr.cache_outbox WHERE cluster = $1", f.cluster)
}

func TestWorkerDeletesKeysAndPublishes(t *testing.T) {
	for _, backend := range []string{"redis", "memcached"} {
		t.Run(backend, func(t *testing.T) {
			f := newFixture(t, backend)
			for _, k := range []string{"account:1", "account-email:old@x", "account-email:new@x", "account:2", "account:3", "session:1"} {
				f.client.set(k, "cached")
			}
			commit := time.Date(2026, 11, 27, 10, 0, 0, 123456000, time.UTC)
			queueOutbox(t, f.dsn, f.cluster, 0x3000060, commit,
				change.Invalidation{Table: "public.accounts", Op: "update", Keys: []string{"account:1", "account-email:old@x", "account-email:new@x"}})
			queueOutbox(t, f.dsn, f.cluster, 0x3000100, commit.Add(time.Second),
				change.Invalidation{Table: "public.accounts", Op: "delete", Keys: []string{"account:2"}})
			// another cluster's rows in the same database are not ours
			queueOutbox(t, f.dsn, "other", 0x3000200, commit, change.Invalidation{Table: "public.accounts", Op: "delete", Keys: []string{"account:3"}})

			w := f.worker(t, WorkerConfig{})
			runWorker(t, w)
			eventually(t, 10*time.Second, "the outbox to drain", func() bool { return f.outboxRows(t) == 0 })
			for _, k := range []string{"account:1", "account-email:old@x", "account-email:new@x", "account:2"} {
				if f.client.exists(k) {
					t.Errorf("key %s is still cached", k)
				}
			}
			for _, k := range []string{"account:3", "session:1"} {
				if !f.client.exists(k) {
					t.Errorf("unrelated key %s was deleted", k)
				}
			}
			if n := queryInt(t, f.dsn, "SELECT count(*) FROM xdcr.cache_outbox WHERE cluster = 'other'"); n != 1 {
				t.Errorf("the other cluster's outbox has %d rows, want 1", n)
			}
			eventually(t, 5*time.Second, "two events", func() bool { return len(f.events()) == 2 })
			ev := f.events()
			ct := commit
			want := []Event{
				{Table: "public.accounts", Op: "update", Keys: []string{"account:1", "account-email:old@x", "account-email:new@x"}, LSN: "0/3000060", CommitTime: &ct},
			}
			if got := ev[0]; got.Table != want[0].Table || got.Op != want[0].Op || !slices.Equal(got.Keys, want[0].Keys) ||
				got.LSN != want[0].LSN || got.CommitTime == nil || !got.CommitTime.Equal(ct) {
				t.Errorf("event: got %+v, want %+v", got, want[0])
			}
			if ev[1].Op != "delete" || ev[1].LSN != "0/3000100" {
				t.Errorf("second event: got %+v", ev[1])
			}
			if f.obs.count(backend+"/ok") == 0 || f.obs.count("nats/ok") == 0 {
				t.Errorf("observer: got %v", f.obs.results)
			}
		})
	}
}

// TestWorkerUnlinkFallback: a Redis without UNLINK gets DEL.
func TestWorkerUnlinkFallback(t *testing.T) {
	f := newFixture(t, "redis", "--rename-command", "UNLINK", "")
	f.client.set("account:1", "x")
	queueOutbox(t, f.dsn, f.cluster, 1, time.Now(), change.Invalidation{Table: "public.accounts", Op: "delete", Keys: []string{"account:1"}})
	runWorker(t, f.worker(t, WorkerConfig{}))
	eventually(t, 10*time.Second, "the outbox to drain", func() bool { return f.outboxRows(t) == 0 })
	if f.client.exists("account:1") {
		t.Error("key still cached")
	}
}

// TestWorkerCacheOutage: while Redis is down the rows wait and replication
// is not involved; once it is back they are applied; the outage is logged
// once and its end once.
func TestWorkerCacheOutage(t *testing.T) {
	servers(t)
	r := startRedis(t)
	f := newFixture(t, "")
	f.backend = openBackend(t, r.URL())
	client := newRedisClient(t, r.URL())
	client.set("account:7", "stale")
	if err := r.Stop(t.Context()); err != nil {
		t.Fatal(err)
	}
	w := f.worker(t, WorkerConfig{})
	runWorker(t, w)
	for i := range 5 {
		queueOutbox(t, f.dsn, f.cluster, change.LSN(i+1), time.Now(), change.Invalidation{Table: "public.accounts", Op: "update", Keys: []string{"account:7"}})
		w.Wake()
	}
	eventually(t, 10*time.Second, "failed rounds", func() bool { return f.obs.count("redis/error") >= 3 })
	if n := f.outboxRows(t); n != 5 {
		t.Fatalf("outbox has %d rows while redis is down, want 5", n)
	}
	if err := r.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	if v, ok := client.get("account:7"); !ok || v != "stale" {
		t.Fatalf("the restarted redis lost the stale key (%q, %v): the test proves nothing", v, ok)
	}
	// the worker deletes the rows, then counts the outbox for its gauge and
	// logs the recovery: wait for the log line, the last of the three
	eventually(t, 30*time.Second, "the outbox to drain and the recovery to be logged", func() bool {
		return f.outboxRows(t) == 0 && strings.Contains(f.logs.String(), "cache invalidation recovered")
	})
	if client.exists("account:7") {
		t.Error("the key invalidated during the outage is still cached")
	}
	logs := f.logs.String()
	if n := strings.Count(logs, "cache invalidation failing"); n != 1 {
		t.Errorf("outage logged %d times, want once:\n%s", n, logs)
	}
	if n := strings.Count(logs, "cache invalidation recovered"); n != 1 {
		t.Errorf("recovery logged %d times, want once:\n%s", n, logs)
	}
	f.obs.mu.Lock()
	defer f.obs.mu.Unlock()
	if f.obs.outbox != 0 {
		t.Errorf("outbox gauge: got %d, want 0", f.obs.outbox)
	}
}

// TestWorkerOverflow: a backlog over the bound becomes a flush of the
// tables it touched: on Redis every key of their templates' patterns goes,
// also keys of rows no invalidation named, and nothing else.
func TestWorkerOverflow(t *testing.T) {
	servers(t)
	r := startRedis(t)
	f := newFixture(t, "")
	f.backend = openBackend(t, r.URL())
	client := newRedisClient(t, r.URL())
	for _, k := range []string{"account:1", "account:999", "account-email:a@x", "session:1", "accounts"} {
		client.set(k, "cached")
	}
	if err := r.Stop(t.Context()); err != nil {
		t.Fatal(err)
	}
	for i := range 120 {
		queueOutbox(t, f.dsn, f.cluster, change.LSN(i+1), time.Now(),
			change.Invalidation{Table: "public.accounts", Op: "update", Keys: []string{fmt.Sprintf("account:%d", i)}})
	}
	runWorker(t, f.worker(t, WorkerConfig{MaxOutboxRows: 100}))
	eventually(t, 10*time.Second, "the backlog to collapse", func() bool { return f.outboxRows(t) == 1 })
	var entries string
	conn, err := connect(t.Context(), f.dsn, "test")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if err := conn.QueryRow(t.Context(), "SELECT entries::text FROM xdcr.cache_outbox WHERE cluster = $1", f.cluster).Scan(&entries); err != nil {
		t.Fatal(err)
	}
	if want := `[{"op": "overflow", "flush": true, "table": "public.accounts"}]`; entries != want {
		t.Errorf("collapsed row: got %s, want %s", entries, want)
	}
	if !strings.Contains(f.logs.String(), "collapsed the backlog") {
		t.Errorf("no log line about the collapse:\n%s", f.logs)
	}
	if err := r.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "the outbox to drain", func() bool { return f.outboxRows(t) == 0 })
	for _, k := range []string{"account:1", "account:999", "account-email:a@x"} {
		if client.exists(k) {
			t.Errorf("key %s survived the flush", k)
		}
	}
	for _, k := range []string{"session:1", "accounts"} {
		if !client.exists(k) {
			t.Errorf("key %s of no template was flushed", k)
		}
	}
	ev := f.events()
	if len(ev) != 1 || ev[0].Op != OpOverflow || !ev[0].Flush || ev[0].Table != "public.accounts" {
		t.Errorf("events: got %+v, want one overflow flush", ev)
	}
}

// TestWorkerFlushMemcached: memcached cannot list keys, so a flush deletes
// the keys of the rows the database holds now; a key of a row that is gone
// cannot be found (the documented limit).
func TestWorkerFlushMemcached(t *testing.T) {
	f := newFixture(t, "memcached")
	for _, k := range []string{"account:1", "account:50", "account-email:user7@example.com", "account:51", "session:1"} {
		f.client.set(k, "cached")
	}
	queueOutbox(t, f.dsn, f.cluster, 1, time.Now(), change.Invalidation{Table: "public.accounts", Op: "truncate", Flush: true})
	runWorker(t, f.worker(t, WorkerConfig{}))
	eventually(t, 10*time.Second, "the outbox to drain", func() bool { return f.outboxRows(t) == 0 })
	for _, k := range []string{"account:1", "account:50", "account-email:user7@example.com"} {
		if f.client.exists(k) {
			t.Errorf("key %s of a row in the table survived the flush", k)
		}
	}
	for _, k := range []string{"account:51", "session:1"} {
		if !f.client.exists(k) {
			t.Errorf("key %s (no such row) was deleted", k)
		}
	}
}

// TestWorkerOnePerSite: a second worker of the same site stands by.
func TestWorkerOnePerSite(t *testing.T) {
	f := newFixture(t, "redis")
	first := f.worker(t, WorkerConfig{})
	runWorker(t, first)
	eventually(t, 10*time.Second, "the first worker to take the outbox", func() bool {
		return queryInt(t, f.dsn, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
			AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`) == 1
	})
	second := f.worker(t, WorkerConfig{})
	runWorker(t, second)
	eventually(t, 10*time.Second, "the second worker to stand by", func() bool {
		return strings.Contains(f.logs.String(), "standing by")
	})
	f.client.set("account:1", "x")
	queueOutbox(t, f.dsn, f.cluster, 1, time.Now(), change.Invalidation{Table: "public.accounts", Op: "delete", Keys: []string{"account:1"}})
	eventually(t, 10*time.Second, "the outbox to drain", func() bool { return f.outboxRows(t) == 0 })
	if f.client.exists("account:1") {
		t.Error("key still cached")
	}
}

// TestWorkerWithoutCacheStore: a site without a cache URL still publishes
// its invalidations for in-process caches, and drains its outbox.
func TestWorkerWithoutCacheStore(t *testing.T) {
	f := newFixture(t, "")
	queueOutbox(t, f.dsn, f.cluster, 0x10, time.Now(),
		change.Invalidation{Table: "public.accounts", Op: "truncate", Flush: true},
		change.Invalidation{Table: "public.accounts", Op: "update", Keys: []string{"account:1"}})
	runWorker(t, f.worker(t, WorkerConfig{}))
	eventually(t, 10*time.Second, "the outbox to drain", func() bool { return f.outboxRows(t) == 0 })
	eventually(t, 5*time.Second, "two events", func() bool { return len(f.events()) == 2 })
	ev := f.events()
	if ev[0].Op != "truncate" || !ev[0].Flush || ev[1].Op != "update" || !slices.Equal(ev[1].Keys, []string{"account:1"}) {
		t.Errorf("events: %+v", ev)
	}
}

// TestEventsSplit: an entry with more keys than fit one event is sent as
// several.
func TestEventsSplit(t *testing.T) {
	nc := natsConn(t)
	got := events(t, nc, "test.split")
	keys := make([]string, 2*EventKeys+1)
	for i := range keys {
		keys[i] = fmt.Sprintf("k:%d", i)
	}
	n, err := publishEvents(t.Context(), nc, "test.split", []Event{{Table: "t", Op: "update", Keys: keys}, {Table: "t", Op: "truncate", Flush: true}})
	if err != nil || n != 4 {
		t.Fatalf("published %d, %v; want 4", n, err)
	}
	eventually(t, 5*time.Second, "four events", func() bool { return len(got()) == 4 })
	var all []string
	for _, e := range got()[:3] {
		if len(e.Keys) > EventKeys {
			t.Errorf("an event has %d keys", len(e.Keys))
		}
		all = append(all, e.Keys...)
	}
	if !slices.Equal(all, keys) {
		t.Errorf("the events carry %d keys, want %d in order", len(all), len(keys))
	}
	if e := got()[3]; !e.Flush || len(e.Keys) != 0 {
		t.Errorf("flush event: %+v", e)
	}
}
