package e2e

import (
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/xdcr/xdcr/deploy/topology"
	"github.com/xdcr/xdcr/internal/config"
	"github.com/xdcr/xdcr/transport"
)

// TestTableWithoutPrimaryKeyRefused: capture refuses to start on a table
// whose updates and deletes could not be replicated, naming it and the fix.
func TestTableWithoutPrimaryKeyRefused(t *testing.T) {
	c := newCluster(t, clusterOpts{
		schema:   `CREATE TABLE public.keyed (id int PRIMARY KEY); CREATE TABLE public.nopk (a int, b text);`,
		tables:   []string{"public.keyed", "public.nopk"},
		noAgents: true,
	})
	node := topology.NodeID(c.Config.Primary)
	if err := c.StartAgents(t.Context()); err != nil { // the role comes from a Raft majority
		t.Fatal(err)
	}
	e := waitLog(t, c, node, "capture stopped", time.Minute, "public.nopk", "no primary key", "ADD PRIMARY KEY", "REPLICA IDENTITY FULL")
	t.Logf("refused: %v", e["err"])
	deadline := time.Now().Add(30 * time.Second)
	for {
		exited, err := c.AgentExited(node)
		if exited {
			if err == nil {
				t.Error("the agent exited with status 0 after refusing to start")
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the agent did not exit after refusing to start")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

const padSchema = `CREATE TABLE public.items (id int PRIMARY KEY, v text);`

// TestMalformedMessagePausesApply publishes junk into the change stream:
// apply pauses naming the stream sequence, loses nothing, and continues once
// the junk is removed.
func TestMalformedMessagePausesApply(t *testing.T) {
	c := newCluster(t, clusterOpts{schema: padSchema, tables: []string{"items"}})
	execOn(t, c, c.Config.Primary, `INSERT INTO items SELECT g, 'before' FROM generate_series(1, 10) g`)
	converge(t, c, time.Minute)

	// junk on the primary's subject, as a foreign publisher would send it
	nc, err := nats.Connect(c.Config.Sites[c.Config.Primary].NATS)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js := jetStream(t, c, c.Config.Primary)
	ack, err := js.Publish(t.Context(), transport.Subject(c.Config.Cluster, c.Config.Primary), []byte("not an xdcr message"))
	if err != nil {
		t.Fatal(err)
	}
	junk := ack.Sequence
	execOn(t, c, c.Config.Primary, `INSERT INTO items SELECT g, 'after' FROM generate_series(11, 20) g`)

	stream := transport.StreamName(c.Config.Cluster, c.Config.Primary)
	for _, site := range replicas(c) {
		e := waitLog(t, c, topology.NodeID(site), "apply paused", time.Minute,
			fmt.Sprintf("seq %d", junk), stream, "malformed", "nats stream rmm")
		t.Logf("%s paused: %v", site, e["err"])
		assertCount(t, c, site, "items", 10)
	}
	// the operator removes the junk from each replica site's stream
	for _, site := range replicas(c) {
		st, err := jetStream(t, c, site).Stream(t.Context(), stream)
		if err != nil {
			t.Fatal(err)
		}
		if err := st.DeleteMsg(t.Context(), junk); err != nil {
			t.Fatalf("delete seq %d from %s's stream: %v", junk, site, err)
		}
	}
	converge(t, c, 2*time.Minute)
	assertCount(t, c, replicas(c)[0], "items", 20)
}

// TestMissingTableAndColumnPauseApply: a table the replica lacks, then a
// column it lacks, pause apply with the table, column and fix named;
// nothing is lost once the replica is fixed.
func TestMissingTableAndColumnPauseApply(t *testing.T) {
	c := newCluster(t, clusterOpts{
		schema:      padSchema,
		primaryOnly: `CREATE TABLE public.late (id int PRIMARY KEY, v text)`,
		tables:      []string{"items", "late"},
	})
	execOn(t, c, c.Config.Primary, `INSERT INTO items VALUES (1, 'a')`)
	execOn(t, c, c.Config.Primary, `INSERT INTO late VALUES (1, 'x')`)
	execOn(t, c, c.Config.Primary, `INSERT INTO items VALUES (2, 'b')`)
	for _, site := range replicas(c) {
		e := waitLog(t, c, topology.NodeID(site), "apply paused", time.Minute,
			"public.late", "does not exist on replica site "+site)
		t.Logf("%s paused: %v", site, e["err"])
		assertCount(t, c, site, "items", 1) // nothing after the missing table is applied
	}
	for _, site := range replicas(c) {
		execOn(t, c, site, `CREATE TABLE public.late (id int PRIMARY KEY, v text)`)
	}
	converge(t, c, 2*time.Minute)

	// a column added on the primary only
	execOn(t, c, c.Config.Primary, `ALTER TABLE items ADD COLUMN note varchar(40)`)
	execOn(t, c, c.Config.Primary, `INSERT INTO items VALUES (3, 'c', 'with a note')`)
	execOn(t, c, c.Config.Primary, `UPDATE late SET v = 'y' WHERE id = 1`)
	for _, site := range replicas(c) {
		e := waitLog(t, c, topology.NodeID(site), "apply paused", time.Minute,
			"public.items", "column note", `ADD COLUMN "note" character varying(40)`)
		t.Logf("%s paused: %v", site, e["err"])
		assertCount(t, c, site, "items", 2)
	}
	for _, site := range replicas(c) {
		execOn(t, c, site, `ALTER TABLE items ADD COLUMN note varchar(40)`)
	}
	converge(t, c, 2*time.Minute)
	for _, site := range replicas(c) {
		var v string
		if err := connect(t, c, site).QueryRow(t.Context(), `SELECT v FROM late WHERE id = 1`).Scan(&v); err != nil || v != "y" {
			t.Errorf("site %s: late.v = %q (%v), want y", site, v, err)
		}
	}
}

func assertCount(t *testing.T, c *topology.Cluster, site, table string, want int) {
	t.Helper()
	var n int
	if err := connect(t, c, site).QueryRow(t.Context(), "SELECT count(*) FROM "+table).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != want {
		t.Errorf("site %s: %s has %d rows, want %d", site, table, n, want)
	}
}

// TestAutoAddColumns: with schema.auto_add_columns a column added on the
// primary is added on every replica, with the primary's type, and no row
// before or after it is lost or doubled.
func TestAutoAddColumns(t *testing.T) {
	c := newCluster(t, clusterOpts{
		schema: padSchema,
		tables: []string{"items"},
		tune:   func(cfg *config.Config) { cfg.Schema.AutoAddColumns = true },
	})
	execOn(t, c, c.Config.Primary, `INSERT INTO items SELECT g, 'r' || g FROM generate_series(1, 100) g`)
	converge(t, c, time.Minute)

	execOn(t, c, c.Config.Primary, `ALTER TABLE items ADD COLUMN note varchar(40), ADD COLUMN price numeric(10,2)`)
	execOn(t, c, c.Config.Primary, `INSERT INTO items VALUES (101, 'r101', 'with a note', 9.99)`)
	execOn(t, c, c.Config.Primary, `UPDATE items SET note = 'updated' WHERE id <= 10`)
	converge(t, c, 2*time.Minute)
	for _, site := range replicas(c) {
		waitLog(t, c, topology.NodeID(site), "added a column the primary has to the replica (schema.auto_add_columns)", time.Minute)
		assertCount(t, c, site, "items", 101)
		var typ string
		if err := connect(t, c, site).QueryRow(t.Context(),
			`SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'items'::regclass AND attname = 'price'`).Scan(&typ); err != nil || typ != "numeric(10,2)" {
			t.Errorf("site %s: price is %q (%v), want numeric(10,2)", site, typ, err)
		}
		var notes int
		if err := connect(t, c, site).QueryRow(t.Context(), `SELECT count(*) FROM items WHERE note IS NOT NULL`).Scan(&notes); err != nil || notes != 11 {
			t.Errorf("site %s: %d rows with a note (%v), want 11", site, notes, err)
		}
	}
}
