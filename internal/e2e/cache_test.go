package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bradfitz/gomemcache/memcache"
	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/redis/go-redis/v9"

	"github.com/xdcr/xdcr/deploy/local"
	"github.com/xdcr/xdcr/deploy/topology"
	"github.com/xdcr/xdcr/internal/config"
	"github.com/xdcr/xdcr/replicator/cache"
)

// cacheSchema: accounts has REPLICA IDENTITY FULL, so a changed email
// invalidates the old email's key too; orders keys only by its primary key.
const cacheSchema = `
CREATE TABLE public.accounts (id bigint PRIMARY KEY, email text NOT NULL, balance numeric NOT NULL DEFAULT 0);
ALTER TABLE public.accounts REPLICA IDENTITY FULL;
CREATE TABLE public.orders (id bigint PRIMARY KEY, account_id bigint NOT NULL);`

var cacheTables = map[string]config.CacheTable{
	"public.accounts": {Keys: []string{"account:{id}", "account-email:{email}"},
		Warm: "SELECT id, email, balance FROM public.accounts WHERE id <= 10"},
	"public.orders": {Keys: []string{"order:{id}"}},
}

// siteCache is one site's cache server, seen as an application sees it.
type siteCache interface {
	url() string
	set(t *testing.T, key, value string)
	get(t *testing.T, key string) (string, bool)
}

type redisCache struct {
	srv *local.Redis
	c   *redis.Client
}

func (r *redisCache) url() string { return r.srv.URL() }

func (r *redisCache) set(t *testing.T, key, value string) {
	t.Helper()
	if err := r.c.Set(context.Background(), key, value, 0).Err(); err != nil {
		t.Fatalf("redis set %s: %v", key, err)
	}
}

func (r *redisCache) get(t *testing.T, key string) (string, bool) {
	t.Helper()
	v, err := r.c.Get(context.Background(), key).Result()
	if errors.Is(err, redis.Nil) {
		return "", false
	}
	if err != nil {
		t.Fatalf("redis get %s: %v", key, err)
	}
	return v, true
}

type memcachedCache struct {
	srv *local.Memcached
	mc  *memcache.Client
}

func (m *memcachedCache) url() string { return m.srv.URL() }

func (m *memcachedCache) set(t *testing.T, key, value string) {
	t.Helper()
	if err := m.mc.Set(&memcache.Item{Key: key, Value: []byte(value)}); err != nil {
		t.Fatalf("memcached set %s: %v", key, err)
	}
}

func (m *memcachedCache) get(t *testing.T, key string) (string, bool) {
	t.Helper()
	it, err := m.mc.Get(key)
	if errors.Is(err, memcache.ErrCacheMiss) {
		return "", false
	}
	if err != nil {
		t.Fatalf("memcached get %s: %v", key, err)
	}
	return string(it.Value), true
}

// startCaches starts one cache server per shared site, or skips the test
// when the server is not installed.
func startCaches(t *testing.T, backend string) map[string]siteCache {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end test")
	}
	out := map[string]siteCache{}
	for _, site := range env.sites.Names() {
		switch backend {
		case "redis":
			srv, err := local.StartRedis(t.Context(), local.RedisConfig{Dir: t.TempDir()})
			if errors.Is(err, exec.ErrNotFound) {
				t.Skip(err)
			}
			if err != nil {
				t.Fatal(err)
			}
			c := redis.NewClient(&redis.Options{Addr: srv.Addr(), MaxRetries: -1})
			t.Cleanup(func() { c.Close(); srv.Close() })
			out[site] = &redisCache{srv: srv, c: c}
		case "memcached":
			srv, err := local.StartMemcached(t.Context(), local.MemcachedConfig{Dir: t.TempDir()})
			if errors.Is(err, exec.ErrNotFound) {
				t.Skip(err)
			}
			if err != nil {
				t.Fatal(err)
			}
			mc := memcache.New(srv.Addr())
			t.Cleanup(func() { mc.Close(); srv.Close() })
			out[site] = &memcachedCache{srv: srv, mc: mc}
		}
	}
	return out
}

func newCacheCluster(t *testing.T, caches map[string]siteCache) *topology.Cluster {
	t.Helper()
	urls := map[string]string{}
	for site, c := range caches {
		urls[site] = c.url()
	}
	return newCluster(t, clusterOpts{schema: cacheSchema, tables: []string{"public.accounts", "public.orders"},
		cache: cacheTables, cacheURLs: urls})
}

// checker is RELIABILITY.md §3.5's cache-invalidation checker: it records
// the invalidation events every site publishes and the commit time of
// every write, so it can tell whether each key a write touched was
// invalidated on each site by an event of that write or a later one.
type checker struct {
	t       *testing.T
	c       *topology.Cluster
	mu      sync.Mutex
	events  map[string][]cache.Event // by site
	touched map[string]time.Time     // key → commit time of the last write touching it
}

func newChecker(t *testing.T, c *topology.Cluster) *checker {
	ch := &checker{t: t, c: c, events: map[string][]cache.Event{}, touched: map[string]time.Time{}}
	for _, site := range c.Config.SiteNames() {
		nc, err := nats.Connect(env.sites.Site(site).NATS.URL())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		_, err = nc.Subscribe(cache.Subject(c.Config.Cluster, site), func(m *nats.Msg) {
			var e cache.Event
			if err := json.Unmarshal(m.Data, &e); err != nil {
				t.Errorf("site %s: event %q: %v", site, m.Data, err)
				return
			}
			ch.mu.Lock()
			ch.events[site] = append(ch.events[site], e)
			ch.mu.Unlock()
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := nc.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	return ch
}

// write runs sql in one transaction on the primary and records that it
// touched keys.
func (ch *checker) write(keys []string, sql string, args ...any) {
	ch.t.Helper()
	ctx := ch.t.Context()
	conn, err := pgx.Connect(ctx, ch.c.DSN(ch.c.Config.Primary))
	if err != nil {
		ch.t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var xid string
	err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if err := tx.QueryRow(ctx, "SELECT txid_current()::text").Scan(&xid); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, sql, args...)
		return err
	})
	if err != nil {
		ch.t.Fatalf("%s: %v", sql, err)
	}
	var at time.Time
	if err := conn.QueryRow(ctx, "SELECT pg_xact_commit_timestamp(($1::bigint % 4294967296)::text::xid)", xid).Scan(&at); err != nil {
		ch.t.Fatalf("commit time of %s: %v", xid, err)
	}
	ch.mu.Lock()
	defer ch.mu.Unlock()
	for _, k := range keys {
		ch.touched[k] = at
	}
}

// missing returns, per site, the touched keys that no event of their last
// write (or a later one) invalidated.
func (ch *checker) missing() []string {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	var out []string
	for _, site := range ch.c.Config.SiteNames() {
		last := map[string]time.Time{} // key → newest event naming it
		for _, e := range ch.events[site] {
			if e.CommitTime == nil {
				continue
			}
			for _, k := range e.Keys {
				if e.CommitTime.After(last[k]) {
					last[k] = *e.CommitTime
				}
			}
		}
		for k, at := range ch.touched {
			if last[k].Before(at) {
				out = append(out, fmt.Sprintf("%s: %s (written %s, newest event %s)", site, k, at.Format(time.RFC3339Nano), last[k].Format(time.RFC3339Nano)))
			}
		}
	}
	slices.Sort(out)
	return out
}

// waitInvalidated waits until every site has published the invalidation
// of every touched key.
func (ch *checker) waitInvalidated(timeout time.Duration) {
	ch.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		m := ch.missing()
		if len(m) == 0 {
			return
		}
		if time.Now().After(deadline) {
			ch.t.Fatalf("invalidations missing after %s:\n%s", timeout, strings.Join(m, "\n"))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// fill sets every key on every site's cache.
func fill(t *testing.T, caches map[string]siteCache, keys ...string) {
	t.Helper()
	for _, c := range caches {
		for _, k := range keys {
			c.set(t, k, "cached")
		}
	}
}

// expectKeys checks that gone keys are absent and kept keys present on
// every site's cache.
func expectKeys(t *testing.T, caches map[string]siteCache, gone, kept []string) {
	t.Helper()
	for site, c := range caches {
		for _, k := range gone {
			if _, ok := c.get(t, k); ok {
				t.Errorf("site %s: key %s of a changed row is still cached", site, k)
			}
		}
		for _, k := range kept {
			if _, ok := c.get(t, k); !ok {
				t.Errorf("site %s: key %s was deleted although its row did not change", site, k)
			}
		}
	}
}

func accountKeys(ids ...int) []string {
	var out []string
	for _, id := range ids {
		out = append(out, fmt.Sprintf("account:%d", id), fmt.Sprintf("account-email:user%d@example.com", id))
	}
	return out
}

// seedAccounts inserts accounts 1..20 and orders 1..5 and waits until every
// site invalidated them, so that keys set afterwards stay until a write.
func seedAccounts(t *testing.T, c *topology.Cluster, ch *checker) {
	t.Helper()
	var keys []string
	for i := 1; i <= 20; i++ {
		keys = append(keys, accountKeys(i)...)
	}
	for i := 1; i <= 5; i++ {
		keys = append(keys, fmt.Sprintf("order:%d", i))
	}
	ch.write(keys, `INSERT INTO accounts SELECT g, 'user' || g || '@example.com', 100 FROM generate_series(1, 20) g;
		INSERT INTO orders SELECT g, g FROM generate_series(1, 5) g`)
	converge(t, c, time.Minute)
	ch.waitInvalidated(time.Minute)
}

// TestCacheInvalidation: after writes on the primary, exactly the keys of
// the changed rows disappear from every site's cache — the replicas' and
// the primary's own — old and new keys of a key-changing update included,
// and every site published an event for each of them.
func TestCacheInvalidation(t *testing.T) {
	for _, backend := range []string{"redis", "memcached"} {
		t.Run(backend, func(t *testing.T) {
			caches := startCaches(t, backend)
			c := newCacheCluster(t, caches)
			ch := newChecker(t, c)
			seedAccounts(t, c, ch)

			unrelated := []string{"session:1", "account:999", "account:1:profile", "order:6", "account-email:nobody@example.com"}
			fill(t, caches, unrelated...)
			fill(t, caches, "account-email:new4@example.com", "account:40", "account:21", "account-email:user21@example.com")
			for i := 1; i <= 20; i++ {
				fill(t, caches, accountKeys(i)...)
			}
			fill(t, caches, "order:1", "order:2", "order:3", "order:4", "order:5")

			ch.write(accountKeys(3), `UPDATE accounts SET balance = balance + 1 WHERE id = 3`)
			ch.write(append(accountKeys(4), "account-email:new4@example.com"), `UPDATE accounts SET email = 'new4@example.com' WHERE id = 4`)
			ch.write(append(accountKeys(5), "account:40"), `UPDATE accounts SET id = 40 WHERE id = 5`)
			ch.write(accountKeys(6), `DELETE FROM accounts WHERE id = 6`)
			ch.write(accountKeys(21), `INSERT INTO accounts VALUES (21, 'user21@example.com', 0)`)
			ch.write([]string{"order:1"}, `UPDATE orders SET account_id = 2 WHERE id = 1`)
			ch.write(append(accountKeys(7), accountKeys(8)...), `UPDATE accounts SET balance = 0 WHERE id IN (7, 8)`)
			converge(t, c, time.Minute)
			ch.waitInvalidated(time.Minute)

			gone := []string{"account-email:new4@example.com", "account:40", "order:1"}
			for _, id := range []int{3, 4, 5, 6, 7, 8, 21} {
				gone = append(gone, accountKeys(id)...)
			}
			kept := append([]string{"order:2", "order:5"}, unrelated...)
			for _, id := range []int{1, 2, 9, 10, 20} {
				kept = append(kept, accountKeys(id)...)
			}
			expectKeys(t, caches, gone, kept)
		})
	}
}

// metric returns the value of an unlabelled series of a node's /metrics.
func metric(t *testing.T, c *topology.Cluster, node, name string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + c.HTTPAddr(node) + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	t.Fatalf("node %s has no series %s", node, name)
	return 0
}

func outboxRows(t *testing.T, c *topology.Cluster, site string) int {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), c.DSN(site))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var n int
	if err := conn.QueryRow(t.Context(), `SELECT count(*) FROM xdcr.cache_outbox WHERE cluster = $1`, c.Config.Cluster).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestCacheOutage: a site's cache that is down for a while loses no
// invalidation: replication goes on, the invalidations wait in the
// outbox (and the metric says so), and once the cache is back on the same
// port the keys are gone. Down here are a replica's and the primary's.
func TestCacheOutage(t *testing.T) {
	caches := startCaches(t, "redis")
	c := newCacheCluster(t, caches)
	ch := newChecker(t, c)
	seedAccounts(t, c, ch)
	down := []string{c.Config.Primary, replicas(c)[0]}
	fill(t, caches, accountKeys(1, 2, 3)...)
	fill(t, caches, "session:1")
	for _, site := range down {
		if err := caches[site].(*redisCache).srv.Stop(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	ch.write(accountKeys(1), `UPDATE accounts SET balance = 1 WHERE id = 1`)
	ch.write(accountKeys(2), `DELETE FROM accounts WHERE id = 2`)
	converge(t, c, time.Minute) // replication does not wait for the cache
	for _, site := range down {
		deadline := time.Now().Add(30 * time.Second)
		for outboxRows(t, c, site) == 0 || metric(t, c, topology.NodeID(site), "xdcr_cache_outbox_rows") == 0 {
			if time.Now().After(deadline) {
				t.Fatalf("site %s: no invalidations wait in the outbox while its cache is down", site)
			}
			time.Sleep(100 * time.Millisecond)
		}
		waitLog(t, c, topology.NodeID(site), "cache invalidation failing; invalidations wait in the outbox and are retried", 30*time.Second)
	}
	time.Sleep(2 * time.Second) // down for a while: several failed rounds
	for _, site := range down {
		rc := caches[site].(*redisCache)
		if err := rc.srv.Start(t.Context()); err != nil {
			t.Fatal(err)
		}
		// session:1 is never invalidated; account:1 may already be, by
		// the outbox retrying the moment redis is back
		if _, ok := rc.get(t, "session:1"); !ok {
			t.Fatalf("site %s: the restarted redis lost its keys, so the test would prove nothing", site)
		}
	}
	ch.waitInvalidated(time.Minute)
	expectKeys(t, caches, accountKeys(1, 2), append(accountKeys(3), "session:1"))
	for _, site := range down {
		node := topology.NodeID(site)
		waitLog(t, c, node, "cache invalidation recovered", 30*time.Second)
		if n := countLog(c.LogPath(node), "cache invalidation failing; invalidations wait in the outbox and are retried"); n != 1 {
			t.Errorf("site %s logged the outage %d times, want once", site, n)
		}
		if outboxRows(t, c, site) != 0 {
			t.Errorf("site %s: the outbox did not drain", site)
		}
	}
}

func countLog(path, msg string) int {
	n := 0
	for _, e := range readLog(path) {
		if e["msg"] == msg {
			n++
		}
	}
	return n
}

// TestCacheKillApplyAgent: the apply agent killed with SIGKILL after the
// commit and before the invalidation: the key is still gone in the end.
// The cache is stopped first so the outbox cannot drain; the agent dies
// with the rows in it; the cache comes back with the stale key; the
// restarted agent invalidates it.
func TestCacheKillApplyAgent(t *testing.T) {
	caches := startCaches(t, "redis")
	c := newCacheCluster(t, caches)
	ch := newChecker(t, c)
	seedAccounts(t, c, ch)
	site := replicas(c)[0]
	node := topology.NodeID(site)
	rc := caches[site].(*redisCache)
	rc.set(t, "account:9", "stale")
	rc.set(t, "account:10", "cached")
	if err := rc.srv.Stop(t.Context()); err != nil {
		t.Fatal(err)
	}
	ch.write(accountKeys(9), `UPDATE accounts SET balance = 9 WHERE id = 9`)
	converge(t, c, time.Minute)
	if n := outboxRows(t, c, site); n == 0 {
		t.Fatal("the replica committed the change without its invalidation in the outbox")
	}
	if err := c.KillAgent(node); err != nil {
		t.Fatal(err)
	}
	if err := rc.srv.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	if v, _ := rc.get(t, "account:9"); v != "stale" {
		t.Fatalf("the stale key is not in the restarted redis (%q): the test would prove nothing", v)
	}
	if err := c.StartAgent(t.Context(), node); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Minute)
	for {
		if _, ok := rc.get(t, "account:9"); !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the key made stale before the kill is still cached")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, ok := rc.get(t, "account:10"); !ok {
		t.Error("an unrelated key was deleted")
	}
	ch.waitInvalidated(time.Minute)
}

// TestCacheRebuild: `xdcr cache rebuild SITE --table T` drops the keys of
// that table's rows from the site's cache and warms the warm query's rows
// back as JSON; other tables' keys and other sites' caches are untouched.
func TestCacheRebuild(t *testing.T) {
	caches := startCaches(t, "redis")
	c := newCacheCluster(t, caches)
	ch := newChecker(t, c)
	seedAccounts(t, c, ch)
	site := replicas(c)[1]
	for _, cc := range caches {
		for i := 1; i <= 20; i++ {
			for _, k := range accountKeys(i) {
				cc.set(t, k, "stale")
			}
		}
		cc.set(t, "order:1", "stale")
		cc.set(t, "session:1", "stale")
	}
	out, err := exec.Command(env.binary, "cache", "rebuild", site, "--config", c.ConfigPath,
		"--table", "public.accounts", "--log-format", "json").CombinedOutput()
	if err != nil {
		t.Fatalf("cache rebuild: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "public.accounts") || !strings.Contains(string(out), "ok") {
		t.Errorf("output lacks the table's result:\n%s", out)
	}
	rc := caches[site]
	conn := connect(t, c, site)
	for i := 1; i <= 20; i++ {
		for _, k := range accountKeys(i) {
			v, ok := rc.get(t, k)
			if i > 10 {
				if ok {
					t.Errorf("%s = %q: not dropped", k, v)
				}
				continue
			}
			var want string
			if err := conn.QueryRow(t.Context(), `SELECT row_to_json(w)::text FROM (SELECT id, email, balance FROM accounts WHERE id = $1) w`, i).Scan(&want); err != nil {
				t.Fatal(err)
			}
			if v != want {
				t.Errorf("%s = %q, want the row as JSON %s", k, v, want)
			}
		}
	}
	for _, k := range []string{"order:1", "session:1"} {
		if v, _ := rc.get(t, k); v != "stale" {
			t.Errorf("%s = %q: rebuilding accounts touched it", k, v)
		}
	}
	for other, cc := range caches {
		if other == site {
			continue
		}
		if v, _ := cc.get(t, "account:1"); v != "stale" {
			t.Errorf("site %s: account:1 = %q: a rebuild of %s touched another site", other, v, site)
		}
	}
	// in-process caches were told to drop the table
	deadline := time.Now().Add(10 * time.Second)
	for !ch.sawFlush(site, "public.accounts", "rebuild") {
		if time.Now().After(deadline) {
			t.Fatal("no rebuild event on the site's subject")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (ch *checker) sawFlush(site, table, op string) bool {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	for _, e := range ch.events[site] {
		if e.Table == table && e.Op == op && e.Flush {
			return true
		}
	}
	return false
}

// TestCacheTemplateUnknownColumn: a template naming a column the table
// lacks stops the agent at start with a message that names the template.
func TestCacheTemplateUnknownColumn(t *testing.T) {
	tables := map[string]config.CacheTable{"public.accounts": {Keys: []string{"account:{id}", "account-email:{emial}"}}}
	c := newCluster(t, clusterOpts{schema: cacheSchema, tables: []string{"public.accounts", "public.orders"}, cache: tables, noAgents: true})
	node := topology.NodeID(replicas(c)[0])
	if err := c.StartAgent(t.Context(), node); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Minute)
	for {
		exited, err := c.AgentExited(node)
		if exited {
			if err == nil {
				t.Fatal("the agent exited cleanly")
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the agent runs with a template over a missing column")
		}
		time.Sleep(100 * time.Millisecond)
	}
	b, err := os.ReadFile(c.LogPath(node))
	if err != nil {
		t.Fatal(err)
	}
	want := `cache.public.accounts[1]: template "account-email:{emial}" names column "emial", which table public.accounts does not have`
	if !strings.Contains(string(b), want) {
		t.Errorf("the agent's log lacks %q:\n%s", want, lastLines(string(b), 10))
	}
}
