package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/xdcr/xdcr/deploy/topology"
	"github.com/xdcr/xdcr/internal/config"
	"github.com/xdcr/xdcr/replicator"
)

// TestRetainedWALWarning: a slot that retains more WAL than
// capture.max_retained_wal (here because a transaction stays open on the
// primary) is reported by a log line, xdcr_slot_retained_wal_exceeded and
// the primary's error in /v1/status; the warning clears once the WAL is
// released, and the slot is never dropped.
func TestRetainedWALWarning(t *testing.T) {
	c := newCluster(t, clusterOpts{
		schema: padSchema + `CREATE TABLE public.scratch (id int, v text);`,
		tables: []string{"items"},
		tune:   func(cfg *config.Config) { cfg.Capture.MaxRetainedWAL = 4 << 20 },
	})
	ctx := t.Context()
	primary := c.Config.Primary
	node := topology.NodeID(primary)
	// an open transaction that has written holds the slot's restart_lsn
	open := connect(t, c, primary)
	tx, err := open.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `INSERT INTO items VALUES (1, 'held open')`); err != nil {
		t.Fatal(err)
	}
	// 8 MB of WAL behind it (a table outside the publication)
	execOn(t, c, primary, `INSERT INTO scratch SELECT g, repeat('w', 1000) FROM generate_series(1, 8000) g`)
	eventually(t, time.Minute, "the retained-WAL warning", func() error {
		if v := metricValue(t, c.HTTPAddr(node), "xdcr_slot_retained_wal_exceeded"); v != 1 {
			return fmt.Errorf("xdcr_slot_retained_wal_exceeded = %v (retained %v bytes)", v,
				metricValue(t, c.HTTPAddr(node), "xdcr_slot_retained_wal_bytes"))
		}
		st, err := tryLagStatus(t, c)
		if err != nil {
			return err
		}
		raw, _ := xdcrLag(t, c, "-o", "json")
		if !strings.Contains(raw, "capture.max_retained_wal") {
			return fmt.Errorf("the status does not show the warning: %s", raw)
		}
		if _, _, state := siteRow(t, st, primary); state != "streaming" {
			return fmt.Errorf("primary state %q while warning, want streaming", state)
		}
		return nil
	})
	if _, ok := findLog(c.LogPath(node), "the replication slot retains too much WAL"); !ok {
		t.Error("no warning in the agent's log")
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	execOn(t, c, primary, `CHECKPOINT`)
	eventually(t, time.Minute, "the warning to clear", func() error {
		execOn(t, c, primary, `INSERT INTO items VALUES ((SELECT coalesce(max(id), 0) + 1 FROM items), 'nudge')`)
		if v := metricValue(t, c.HTTPAddr(node), "xdcr_slot_retained_wal_exceeded"); v != 0 {
			return fmt.Errorf("xdcr_slot_retained_wal_exceeded = %v (retained %v bytes)", v,
				metricValue(t, c.HTTPAddr(node), "xdcr_slot_retained_wal_bytes"))
		}
		return nil
	})
	n, err := queryInt(t, c, primary, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1`, replicator.SlotName(c.Config.Cluster))
	if err != nil || n != 1 {
		t.Errorf("the slot is gone (%d, %v): the agent must never drop it", n, err)
	}
	converge(t, c, time.Minute)
}

// TestInvalidatedSlot: a slot that PostgreSQL invalidates because it held
// more WAL than max_slot_wal_keep_size stops capture with an error that
// says the replicas must be re-synced and how; doing what it says (xdcr
// sync for each replica, then restarting the agent) brings every site
// back to equal, with the rows written while the slot was lost.
func TestInvalidatedSlot(t *testing.T) {
	c := newCluster(t, clusterOpts{
		schema: padSchema + `CREATE TABLE public.scratch (id int, v text);`,
		tables: []string{"items"},
	})
	ctx := t.Context()
	primary := c.Config.Primary
	node := topology.NodeID(primary)
	slot := replicator.SlotName(c.Config.Cluster)
	execOn(t, c, primary, `INSERT INTO items VALUES (1, 'before')`)
	converge(t, c, time.Minute)
	if err := c.StopAgent(node, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	// the sites are shared: the setting is put back for the tests after
	execOn(t, c, primary, `ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'`)
	execOn(t, c, primary, `SELECT pg_reload_conf()`)
	t.Cleanup(func() {
		conn, err := pgx.Connect(context.Background(), c.DSN(primary))
		if err != nil {
			return
		}
		defer conn.Close(context.Background())
		_, _ = conn.Exec(context.Background(), `ALTER SYSTEM RESET max_slot_wal_keep_size`)
		_, _ = conn.Exec(context.Background(), `SELECT pg_reload_conf()`)
	})
	execOn(t, c, primary, `INSERT INTO items VALUES (2, 'while the slot is lost')`)
	eventually(t, 2*time.Minute, "the slot to be invalidated", func() error {
		execOn(t, c, primary, `INSERT INTO scratch SELECT g, repeat('w', 1000) FROM generate_series(1, 20000) g`)
		execOn(t, c, primary, `SELECT pg_switch_wal()`)
		execOn(t, c, primary, `CHECKPOINT`)
		var status string
		err := connect(t, c, primary).QueryRow(ctx, `SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&status)
		if err != nil {
			return err
		}
		if status != "lost" {
			return fmt.Errorf("wal_status %q", status)
		}
		return nil
	})
	execOn(t, c, primary, `TRUNCATE scratch`)
	if err := c.StartAgent(ctx, node); err != nil {
		t.Fatal(err)
	}
	e := waitLog(t, c, node, "capture stopped", time.Minute, "invalidated", "must be re-synced", "xdcr sync SITE", "for each")
	t.Logf("stopped: %v", e["err"])
	eventually(t, 30*time.Second, "the agent to exit", func() error {
		if exited, _ := c.AgentExited(node); !exited {
			return fmt.Errorf("agent %s still runs", node)
		}
		return nil
	})
	// what the error says: re-sync every replica, restart the agent
	for _, site := range replicas(c) {
		if out, code := xdcrSync(t, c, site); code != 0 {
			t.Fatalf("xdcr sync %s exited %d:\n%s", site, code, out)
		}
	}
	if err := c.StartAgent(ctx, node); err != nil {
		t.Fatal(err)
	}
	execOn(t, c, primary, `INSERT INTO items VALUES (3, 'after the re-sync')`)
	converge(t, c, 2*time.Minute)
	for _, site := range replicas(c) {
		assertCount(t, c, site, "items", 3)
	}
}
