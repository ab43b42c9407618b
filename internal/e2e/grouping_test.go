package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/xdcr/xdcr/deploy/topology"
	"github.com/xdcr/xdcr/internal/config"
)

const groupingSchema = `
CREATE TABLE public.counters_hot (id int PRIMARY KEY, n bigint NOT NULL, note text);
INSERT INTO counters_hot SELECT g, 0, '' FROM generate_series(1, 3) g;
CREATE TABLE public.emails (id int PRIMARY KEY, email text NOT NULL UNIQUE);
INSERT INTO emails SELECT 2 * g, 'a' || g FROM generate_series(1, 40) g;`

// TestGroupedApplyOfHotRows builds a backlog while the replicas' agents
// are down, so apply takes many source transactions into one target
// transaction: updates of the same few rows over and over, which apply
// folds into the last one (on a table whose only unique index is the
// primary key), and on a table with a second unique index a sequence that
// only works in the source's order — an update frees a value that the
// next transaction inserts in another row before a third moves the first
// row on. Every site must end equal to the primary, every counter must
// hold the number of its increments, and the replica must have written
// fewer row versions than the source for the hot rows (the folding
// happened) but every one of them for the table with the unique index.
func TestGroupedApplyOfHotRows(t *testing.T) {
	c := newCluster(t, clusterOpts{schema: groupingSchema, tables: []string{"counters_hot", "emails"}})
	ctx := t.Context()
	for _, site := range replicas(c) {
		if err := c.StopAgent(topology.NodeID(site), 30*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	p := connect(t, c, c.Config.Primary)
	const increments = 600
	for i := range increments {
		id := 1 + i%3
		if _, err := p.Exec(ctx, `UPDATE counters_hot SET n = n + 1, note = $2 WHERE id = $1`, id, fmt.Sprintf("txn %d", i)); err != nil {
			t.Fatal(err)
		}
	}
	for g := 1; g <= 40; g++ {
		for _, q := range []string{
			fmt.Sprintf(`UPDATE emails SET email = 'b%d' WHERE id = %d`, g, 2*g),
			fmt.Sprintf(`INSERT INTO emails VALUES (%d, 'a%d')`, 2*g+1, g),
			fmt.Sprintf(`UPDATE emails SET email = 'c%d' WHERE id = %d`, g, 2*g),
		} {
			if _, err := p.Exec(ctx, q); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, site := range replicas(c) {
		if err := c.StartAgent(ctx, topology.NodeID(site)); err != nil {
			t.Fatal(err)
		}
	}
	converge(t, c, 2*time.Minute)

	for _, site := range append(replicas(c), c.Config.Primary) {
		conn := connect(t, c, site)
		var total int64
		if err := conn.QueryRow(ctx, `SELECT sum(n) FROM counters_hot`).Scan(&total); err != nil {
			t.Fatal(err)
		}
		if total != increments {
			t.Errorf("site %s: the counters add up to %d, want %d", site, total, increments)
		}
		if site == c.Config.Primary {
			continue
		}
		hot, emails := updatesWritten(ctx, t, conn, 80)
		t.Logf("site %s: %d row versions written for %d updates of the hot rows, %d for the table with a unique index",
			site, hot, increments, emails)
		if hot >= increments {
			t.Errorf("site %s: apply wrote %d updates of the hot rows, want fewer than the source's %d (whole-row updates of a row in one group are folded)",
				site, hot, increments)
		}
		if emails != 80 {
			t.Errorf("site %s: apply wrote %d updates of the table with a second unique index, want all 80", site, emails)
		}
	}
}

// updatesWritten reads the replica's statistics of updated rows of both
// tables once they show the emails table's want updates (statistics reach
// the view up to a second late).
func updatesWritten(ctx context.Context, t *testing.T, conn *pgx.Conn, want int64) (hot, emails int64) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		_, err := conn.Exec(ctx, `SELECT pg_stat_clear_snapshot()`)
		if err == nil {
			err = conn.QueryRow(ctx, `SELECT
				(SELECT n_tup_upd FROM pg_stat_user_tables WHERE relid = 'counters_hot'::regclass),
				(SELECT n_tup_upd FROM pg_stat_user_tables WHERE relid = 'emails'::regclass)`).Scan(&hot, &emails)
		}
		if err != nil {
			t.Fatal(err)
		}
		if emails >= want && hot > 0 || time.Now().After(deadline) {
			return hot, emails
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestReplicaRefusesRowMidBacklog: the replicas refuse one row in the
// middle of a backlog that apply takes in several groups (a CHECK
// constraint only they have). Apply sends a group while it arranges the
// next, so this is where a next group could go out after one that failed,
// moving the position past the failed group's transactions. Apply must
// pause with exactly a prefix of the transactions applied (ids 1..k with
// no gap, k below the refused id), and once the constraint is dropped,
// apply every row once.
func TestReplicaRefusesRowMidBacklog(t *testing.T) {
	c := newCluster(t, clusterOpts{
		schema: `CREATE TABLE public.ledger (id int PRIMARY KEY, pad text NOT NULL)`,
		tables: []string{"ledger"},
		// a group per message
		tune: func(cfg *config.Config) { cfg.Apply.MaxBatchBytes = 256 << 10 },
	})
	ctx := t.Context()
	for _, site := range replicas(c) {
		if err := c.StopAgent(topology.NodeID(site), 30*time.Second); err != nil {
			t.Fatal(err)
		}
		execOn(t, c, site, `ALTER TABLE ledger ADD CONSTRAINT refused CHECK (id <> 250)`)
	}
	// 400 transactions of ~20 KB: a message holds ~50 of them, and
	// apply takes the backlog in a group per message
	p := connect(t, c, c.Config.Primary)
	const rows, refused = 400, 250
	for id := 1; id <= rows; id++ {
		if _, err := p.Exec(ctx, `INSERT INTO ledger VALUES ($1::int, repeat(md5($1::int::text), 625))`, id); err != nil {
			t.Fatal(err)
		}
	}
	for _, site := range replicas(c) {
		if err := c.StartAgent(ctx, topology.NodeID(site)); err != nil {
			t.Fatal(err)
		}
	}
	for _, site := range replicas(c) {
		e := waitLog(t, c, topology.NodeID(site), "apply paused", time.Minute, "refused")
		t.Logf("%s paused: %v", site, e["err"])
		var n, maxID int
		if err := connect(t, c, site).QueryRow(ctx, `SELECT count(*), coalesce(max(id), 0) FROM ledger`).Scan(&n, &maxID); err != nil {
			t.Fatal(err)
		}
		t.Logf("%s applied ids 1..%d before the refused row", site, maxID)
		if n != maxID || maxID >= refused {
			t.Errorf("site %s paused with %d rows up to id %d, want ids 1..k with no gap and k < %d", site, n, maxID, refused)
		}
	}
	for _, site := range replicas(c) {
		execOn(t, c, site, `ALTER TABLE ledger DROP CONSTRAINT refused`)
	}
	converge(t, c, 2*time.Minute)
	for _, site := range replicas(c) {
		assertCount(t, c, site, "ledger", rows)
	}
}
