package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/xdcr/xdcr/deploy/topology"
	"github.com/xdcr/xdcr/internal/config"
)

// eventsSchema has no primary key on purpose: its rows carry client-unique
// ids, and a transaction applied twice shows up as duplicate rows instead of
// being hidden by a key conflict.
const eventsSchema = `
CREATE TABLE public.events (client int NOT NULL, seq int NOT NULL, payload text);
ALTER TABLE public.events REPLICA IDENTITY FULL;
CREATE TABLE public.counters (client int PRIMARY KEY, n int NOT NULL);`

// workload runs writers that each commit numbered transactions until they
// have done n, and returns the transactions acknowledged per client.
func workload(ctx context.Context, t *testing.T, c *topology.Cluster, clients, n int) <-chan map[int]int {
	t.Helper()
	done := make(chan map[int]int, 1)
	var wg sync.WaitGroup
	var mu sync.Mutex
	acked := make(map[int]int)
	for cl := 1; cl <= clients; cl++ {
		conn := connect(t, c, c.Config.Primary)
		if _, err := conn.Exec(ctx, `INSERT INTO counters VALUES ($1, 0)`, cl); err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for seq := 1; seq <= n; seq++ {
				err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
					if _, err := tx.Exec(ctx, `INSERT INTO events VALUES ($1, $2, repeat('x', 50 + $2 % 200))`, cl, seq); err != nil {
						return err
					}
					_, err := tx.Exec(ctx, `UPDATE counters SET n = n + 1 WHERE client = $1`, cl)
					return err
				})
				if err != nil {
					t.Errorf("client %d txn %d: %v", cl, seq, err)
					return
				}
				mu.Lock()
				acked[cl] = seq
				mu.Unlock()
				if seq%20 == 0 {
					time.Sleep(time.Duration(rand.IntN(5)) * time.Millisecond)
				}
			}
		}()
	}
	go func() {
		wg.Wait()
		done <- acked
	}()
	return done
}

// checkExactlyOnce checks that every site holds each acknowledged
// transaction exactly once.
func checkExactlyOnce(t *testing.T, c *topology.Cluster, acked map[int]int) {
	t.Helper()
	want := 0
	for _, n := range acked {
		want += n
	}
	for _, site := range c.Config.SiteNames() {
		conn := connect(t, c, site)
		var rows, distinct, sum int
		err := conn.QueryRow(t.Context(), `SELECT count(*), count(DISTINCT (client, seq)),
			(SELECT coalesce(sum(n), 0) FROM counters) FROM events`).Scan(&rows, &distinct, &sum)
		if err != nil {
			t.Fatal(err)
		}
		if rows != want || distinct != want || sum != want {
			t.Errorf("site %s: %d event rows (%d distinct), counters sum to %d; want %d of each (lost or doubled transactions)",
				site, rows, distinct, sum, want)
		}
	}
}

// TestApplyAgentKilled kills a replica's agent with SIGKILL at random
// moments of a write workload and restarts it: nothing is lost or doubled.
func TestApplyAgentKilled(t *testing.T) {
	c := newCluster(t, clusterOpts{schema: eventsSchema, tables: []string{"events", "counters"}})
	victim := topology.NodeID(replicas(c)[0])
	killRepeatedly(t, c, victim, 5)
}

// TestCaptureAgentKilled does the same to the primary's agent.
func TestCaptureAgentKilled(t *testing.T) {
	c := newCluster(t, clusterOpts{schema: eventsSchema, tables: []string{"events", "counters"}})
	victim := topology.NodeID(c.Config.Primary)
	killRepeatedly(t, c, victim, 4)
}

func killRepeatedly(t *testing.T, c *topology.Cluster, victim string, kills int) {
	ctx := t.Context()
	done := workload(ctx, t, c, 3, 700)
	var acked map[int]int
	for i := 0; i < kills && acked == nil; i++ {
		select {
		case acked = <-done:
			continue
		case <-time.After(time.Duration(300+rand.IntN(900)) * time.Millisecond):
		}
		if err := c.KillAgent(victim); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(100+rand.IntN(500)) * time.Millisecond)
		if err := c.StartAgent(ctx, victim); err != nil {
			t.Fatal(err)
		}
		t.Logf("killed and restarted %s (%d)", victim, i+1)
	}
	if acked == nil {
		acked = <-done
	}
	if t.Failed() {
		return
	}
	converge(t, c, 3*time.Minute)
	checkExactlyOnce(t, c, acked)
}

// TestGracefulStop stops every agent with SIGTERM in the middle of a
// workload and starts them again.
func TestGracefulStop(t *testing.T) {
	c := newCluster(t, clusterOpts{schema: eventsSchema, tables: []string{"events", "counters"}})
	ctx := t.Context()
	done := workload(ctx, t, c, 2, 400)
	time.Sleep(700 * time.Millisecond)
	for _, n := range c.Nodes() {
		if err := c.StopAgent(n, 30*time.Second); err != nil {
			t.Fatalf("stop %s: %v", n, err)
		}
	}
	if err := c.StartAgents(ctx); err != nil {
		t.Fatal(err)
	}
	acked := <-done
	converge(t, c, 3*time.Minute)
	checkExactlyOnce(t, c, acked)
	for _, n := range c.Nodes() {
		if _, ok := findLog(c.LogPath(n), "agent stopped"); !ok {
			t.Errorf("agent %s did not log a clean stop", n)
		}
	}
}

// TestCaptureCatchUpThroughSQL stops the primary's agent, lets more than
// 16 MiB of changes pile up in its slot, and starts it again while writers
// keep going: the backlog is read through pg_logical_slot_peek_binary_changes
// in ranges of WAL (small ones here, so that there are many, and their
// ends cut through transactions), two at a time, and the agent is
// killed in the middle of them and started again. Every row arrives once.
func TestCaptureCatchUpThroughSQL(t *testing.T) {
	c := newCluster(t, clusterOpts{
		schema: eventsSchema + `
CREATE TABLE public.bulk (id int PRIMARY KEY, payload text NOT NULL);`,
		tables: []string{"events", "counters", "bulk"},
		tune:   func(cfg *config.Config) { cfg.Capture.CatchUpRange = 1 << 20 },
	})
	ctx := t.Context()
	victim := stopCapture(t, c)
	writeBulkBacklog(t, c)
	done := workload(ctx, t, c, 3, 300)
	if err := c.StartAgent(ctx, victim); err != nil {
		t.Fatal(err)
	}
	waitLog(t, c, victim, "capture catching up through SQL", time.Minute)
	time.Sleep(time.Duration(200+rand.IntN(400)) * time.Millisecond)
	if err := c.KillAgent(victim); err != nil {
		t.Fatal(err)
	}
	if err := c.StartAgent(ctx, victim); err != nil {
		t.Fatal(err)
	}
	acked := <-done
	if t.Failed() {
		return
	}
	converge(t, c, 3*time.Minute)
	checkExactlyOnce(t, c, acked)
	for _, site := range c.Config.SiteNames() {
		n, err := queryInt(t, c, site, `SELECT count(DISTINCT id) + count(*) FROM bulk`)
		if err != nil {
			t.Fatal(err)
		}
		if n != 120_000 {
			t.Errorf("site %s: bulk holds %d distinct ids + rows, want 60,000 + 60,000", site, n)
		}
	}
	finished := 0
	for _, e := range readLog(c.LogPath(victim)) {
		switch e["msg"] {
		case "capture catching up through SQL":
			t.Logf("catch-up began %v bytes behind", e["behind_bytes"])
		case "capture caught up through SQL":
			finished++
			t.Logf("catch-up ended after %v ranges, %v messages, %v", e["ranges"], e["messages"], e["duration"])
			if n, _ := e["ranges"].(float64); n < 3 {
				t.Errorf("catch-up took %v ranges of WAL, want several (1MiB, 2MiB, 4MiB, …)", e["ranges"])
			}
		}
	}
	if finished == 0 {
		t.Errorf("the capture never finished a catch-up through SQL (see its log)")
	}
	// the temporary copies of the slot go with the peek connections, the
	// killed agent's too
	eventually(t, time.Minute, "temporary replication slots gone from the primary after catch-up", func() error {
		n, err := queryInt(t, c, c.Config.Primary, `SELECT count(*) FROM pg_replication_slots WHERE temporary`)
		if err == nil && n != 0 {
			err = fmt.Errorf("%d are left", n)
		}
		return err
	})
}

// TestCatchUpPassesOpenTransaction: a transaction that began before a
// backlog and is still open when the capture catches up through SQL. The
// ranges end at the WAL flush position and the slot advances there, past
// the transaction's first changes; it commits afterwards and must still
// arrive whole, once.
func TestCatchUpPassesOpenTransaction(t *testing.T) {
	c := newCluster(t, clusterOpts{
		schema: `CREATE TABLE public.bulk (id int PRIMARY KEY, payload text NOT NULL);
CREATE TABLE public.straddle (id int PRIMARY KEY, v text NOT NULL);`,
		tables: []string{"bulk", "straddle"},
		tune:   func(cfg *config.Config) { cfg.Capture.CatchUpRange = 1 << 20 },
	})
	ctx := t.Context()
	capture := stopCapture(t, c)
	open := connect(t, c, c.Config.Primary)
	tx, err := open.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `INSERT INTO straddle SELECT g, 'before' FROM generate_series(1, 100) g`); err != nil {
		t.Fatal(err)
	}
	writeBulkBacklog(t, c)
	if err := c.StartAgent(ctx, capture); err != nil {
		t.Fatal(err)
	}
	waitLog(t, c, capture, "capture caught up through SQL", 2*time.Minute)
	if _, err := tx.Exec(ctx, `INSERT INTO straddle SELECT g, 'after' FROM generate_series(101, 200) g`); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	converge(t, c, 3*time.Minute)
	for _, site := range replicas(c) {
		assertCount(t, c, site, "bulk", 60_000)
		assertCount(t, c, site, "straddle", 200)
	}
	complete := false
	for _, e := range readLog(c.LogPath(capture)) {
		if e["msg"] == "catch-up range" && e["last"] == true {
			complete = true
		}
	}
	if !complete {
		t.Error("no catch-up range ended at the flush position: the slot never advanced to one (see the capture's log)")
	}
}

// TestCatchUpWithoutFreeSlots: catch-up through SQL decodes the next
// range on a second connection, each with a temporary copy of the slot.
// With one replication slot free on the primary it decodes on one
// connection, and with none it streams the backlog; it says so, and every
// row arrives once either way.
func TestCatchUpWithoutFreeSlots(t *testing.T) {
	c := newCluster(t, clusterOpts{
		schema: `CREATE TABLE public.bulk (id int PRIMARY KEY, payload text NOT NULL);`,
		tables: []string{"bulk"},
		tune:   func(cfg *config.Config) { cfg.Capture.CatchUpRange = 4 << 20 },
	})
	ctx := t.Context()
	primary := c.Config.Primary
	// fill the primary's slots but free of them: physical slots that hold no WAL
	fill := func(free int64, name string) {
		t.Helper()
		used, err := queryInt(t, c, primary, `SELECT current_setting('max_replication_slots')::int - count(*) - $1 FROM pg_replication_slots`, free)
		if err != nil {
			t.Fatal(err)
		}
		execOn(t, c, primary, `SELECT pg_create_physical_replication_slot(format('xdcr_test_fill_%s_%s', $2::text, g)) FROM generate_series(1, $1::int) g`, used, name)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, c.DSN(primary))
		if err == nil {
			defer conn.Close(ctx)
			_, err = conn.Exec(ctx, `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'xdcr\_test\_fill\_%'`)
		}
		if err != nil {
			t.Errorf("drop the slots that filled %s: %v", primary, err)
		}
	})
	capture := stopCapture(t, c)
	fill(1, "one")
	// the checklist warns of it
	out, _ := xdcrCmd(t, time.Minute, "config", "check", "--config", c.ConfigPath, "--connect")
	if !strings.Contains(out, "with fewer slots free on one or none") {
		t.Errorf("config check does not warn that catch-up lacks replication slots:\n%s", out)
	}
	writeBulkBacklog(t, c)
	if err := c.StartAgent(ctx, capture); err != nil {
		t.Fatal(err)
	}
	e := waitLog(t, c, capture, "catch-up through SQL has fewer connections than it could use", time.Minute, "no free replication slot", "max_replication_slots")
	if e["peekers"] != 1.0 {
		t.Errorf("catch-up with one free slot used %v connections, want 1", e["peekers"])
	}
	done := waitLog(t, c, capture, "capture caught up through SQL", time.Minute)
	t.Logf("one connection: %v ranges, %v messages, %v", done["ranges"], done["messages"], done["duration"])
	converge(t, c, 3*time.Minute)
	for _, site := range replicas(c) {
		assertCount(t, c, site, "bulk", 60_000)
	}

	// no slot free: the backlog streams
	if err := c.StopAgent(capture, time.Minute); err != nil {
		t.Fatal(err)
	}
	fill(0, "none")
	execOn(t, c, primary, `UPDATE bulk SET payload = payload || 'x'`)
	if err := c.StartAgent(ctx, capture); err != nil {
		t.Fatal(err)
	}
	waitLogCount(t, c, capture, "catch-up through SQL has fewer connections than it could use", 2, time.Minute)
	converge(t, c, 3*time.Minute)
	for _, site := range c.Config.SiteNames() {
		n, err := queryInt(t, c, site, `SELECT count(*) FROM bulk WHERE payload LIKE '%x'`)
		if err != nil {
			t.Fatal(err)
		}
		if n != 60_000 {
			t.Errorf("site %s: %d of 60,000 rows updated", site, n)
		}
	}
	if n := len(findLogs(c.LogPath(capture), "capture caught up through SQL")); n != 1 {
		t.Errorf("%d catch-ups through SQL finished, want only the first (the second had no slot to copy)", n)
	}
}

// stopCapture stops the primary's agent once its capture has streamed, so
// that the slot exists before a backlog is written (a capture's first
// start creates it where the WAL is then), and returns the agent's node.
func stopCapture(t *testing.T, c *topology.Cluster) string {
	t.Helper()
	node := topology.NodeID(c.Config.Primary)
	waitLog(t, c, node, "capture streaming", time.Minute)
	if err := c.StopAgent(node, time.Minute); err != nil {
		t.Fatal(err)
	}
	return node
}

// writeBulkBacklog writes ~24 MiB of WAL into public.bulk on the primary:
// 60 transactions of 1,000 rows, ids 1 to 60,000.
func writeBulkBacklog(t *testing.T, c *topology.Cluster) {
	t.Helper()
	for i := range 60 {
		execOn(t, c, c.Config.Primary, `INSERT INTO bulk SELECT g, repeat(md5(g::text), 12) FROM generate_series($1::int, $1::int + 999) g`, i*1000+1)
	}
}
