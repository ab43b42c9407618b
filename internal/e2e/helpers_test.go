package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/xdcr/xdcr/deploy/topology"
	"github.com/xdcr/xdcr/internal/config"
	"github.com/xdcr/xdcr/replicator"
)

var clusterSeq atomic.Int32

// clusterOpts are what a test varies.
type clusterOpts struct {
	schema      string   // SQL for every site
	primaryOnly string   // SQL for the primary only
	tables      []string // replicated tables
	tune        func(*config.Config)
	noAgents    bool
	// cache gives the config cache: entries, and cacheURLs each site's
	// cache (sites.<site>.redis), applied before tune.
	cache     map[string]config.CacheTable
	cacheURLs map[string]string
}

// newCluster stands up a cluster of its own on the shared sites and starts
// its agents (unless noAgents). On failure it prints the agents' logs.
func newCluster(t *testing.T, o clusterOpts) *topology.Cluster {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end test")
	}
	name := fmt.Sprintf("t%d-%s", clusterSeq.Add(1), slug(t.Name()))
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	c, err := topology.New(ctx, env.sites, topology.Options{
		Cluster: name,
		Tables:  o.tables,
		Schema:  o.schema,
		Binary:  env.binary,
		Dir:     t.TempDir(),
		Tune: func(cfg *config.Config) {
			cfg.Cache = o.cache
			for site, url := range o.cacheURLs {
				s := cfg.Sites[site]
				s.Redis = url
				cfg.Sites[site] = s
			}
			if o.tune != nil {
				o.tune(cfg)
			}
		},
	})
	if err != nil {
		t.Fatalf("new cluster: %v", err)
	}
	t.Cleanup(func() {
		stopCluster(t, c)
		dropSlots(t, c)
	})
	if o.primaryOnly != "" {
		execOn(t, c, c.Config.Primary, o.primaryOnly)
	}
	if !o.noAgents {
		if err := c.StartAgents(ctx); err != nil {
			t.Fatal(err)
		}
		if err := c.WaitReady(ctx); err != nil {
			t.Fatalf("wait ready: %v", err)
		}
	}
	return c
}

// stopCluster stops c's agents and, if the test failed, prints the end of
// their logs.
func stopCluster(t *testing.T, c *topology.Cluster) {
	if err := c.Close(); err != nil {
		t.Errorf("stop agents: %v", err)
	}
	if t.Failed() {
		for _, n := range c.Nodes() {
			if b, err := os.ReadFile(c.LogPath(n)); err == nil {
				t.Logf("---- agent %s log (last 60 lines) ----\n%s", n, lastLines(string(b), 60))
			}
		}
	}
}

func slug(s string) string {
	s = strings.ToLower(regexp.MustCompile(`[^a-zA-Z0-9]+`).ReplaceAllString(s, "-"))
	s = strings.Trim(strings.TrimPrefix(s, "test"), "-")
	if len(s) > 30 {
		s = s[:30]
	}
	return strings.Trim(s, "-")
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func connect(t *testing.T, c *topology.Cluster, site string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), c.DSN(site))
	if err != nil {
		t.Fatalf("connect to %s: %v", site, err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

func execOn(t *testing.T, c *topology.Cluster, site, sql string, args ...any) {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), c.DSN(site))
	if err != nil {
		t.Fatalf("connect to %s: %v", site, err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(t.Context(), sql, args...); err != nil {
		t.Fatalf("on %s: %s: %v", site, firstLine(sql), err)
	}
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i > 0 {
		return s[:i] + " …"
	}
	return s
}

// converge waits until every site equals the primary.
func converge(t *testing.T, c *topology.Cluster, timeout time.Duration, tables ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	if err := c.WaitConverged(ctx, tables...); err != nil {
		t.Fatalf("replicas did not converge: %v", err)
	}
}

func replicas(c *topology.Cluster) []string {
	var out []string
	for _, s := range c.Config.SiteNames() {
		if s != c.Config.Primary {
			out = append(out, s)
		}
	}
	return out
}

// logEntry is one JSON line of an agent's log.
type logEntry map[string]any

// waitLog waits until node's log has a line whose msg is msg and whose err
// contains every one of parts, and returns it.
func waitLog(t *testing.T, c *topology.Cluster, node, msg string, timeout time.Duration, parts ...string) logEntry {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if e, ok := findLog(c.LogPath(node), msg, parts...); ok {
			return e
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent %s never logged %q with %q within %s", node, msg, parts, timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitLogCount waits until node's log has n lines whose msg is msg.
func waitLogCount(t *testing.T, c *topology.Cluster, node, msg string, n int, timeout time.Duration) {
	t.Helper()
	eventually(t, timeout, fmt.Sprintf("agent %s logging %q %d times", node, msg, n), func() error {
		if got := len(findLogs(c.LogPath(node), msg)); got < n {
			return fmt.Errorf("logged %d times", got)
		}
		return nil
	})
}

// findLogs returns the lines of an agent's log whose msg is msg.
func findLogs(path, msg string) []logEntry {
	var out []logEntry
	for _, e := range readLog(path) {
		if e["msg"] == msg {
			out = append(out, e)
		}
	}
	return out
}

// readLog parses an agent's JSON log lines.
func readLog(path string) []logEntry {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []logEntry
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var e logEntry
		if json.Unmarshal(sc.Bytes(), &e) == nil {
			out = append(out, e)
		}
	}
	return out
}

func findLog(path, msg string, parts ...string) (logEntry, bool) {
	for _, e := range findLogs(path, msg) {
		text := fmt.Sprint(e["err"])
		ok := true
		for _, p := range parts {
			if !strings.Contains(text, p) {
				ok = false
				break
			}
		}
		if ok {
			return e, true
		}
	}
	return nil, false
}

// dropSlots drops the cluster's replication slot on every site once its
// agents have stopped: the tests share the sites, and every cluster's slot
// would otherwise count against max_replication_slots until the suite ends.
func dropSlots(t *testing.T, c *topology.Cluster) {
	slot := replicator.SlotName(c.Config.Cluster)
	for _, site := range c.Config.SiteNames() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		conn, err := pgx.Connect(ctx, c.DSN(site))
		if err != nil {
			cancel()
			continue
		}
		for {
			// a walsender lets go of the slot a moment after its agent exits
			var left int
			err := conn.QueryRow(ctx, `SELECT count(*) FROM (SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
				WHERE slot_name = $1 AND NOT active) d`, slot).Scan(&left)
			if err == nil {
				err = conn.QueryRow(ctx, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&left)
			}
			if err != nil || left == 0 {
				if err != nil {
					t.Logf("drop slot %s on %s: %v", slot, site, err)
				}
				break
			}
			if ctx.Err() != nil {
				t.Logf("slot %s on %s is still active", slot, site)
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		conn.Close(context.Background())
		cancel()
	}
}

// queryInt runs a query that returns one integer on a site, on a
// connection of its own (safe to call in a polling loop).
func queryInt(t *testing.T, c *topology.Cluster, site, sql string, args ...any) (int64, error) {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), c.DSN(site))
	if err != nil {
		return 0, err
	}
	defer conn.Close(context.Background())
	var n int64
	err = conn.QueryRow(t.Context(), sql, args...).Scan(&n)
	return n, err
}
