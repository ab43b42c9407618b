package e2e

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"slices"
	"testing"
	"time"

	"github.com/xdcr/xdcr/deploy/topology"
	"github.com/xdcr/xdcr/internal/config"
	"github.com/xdcr/xdcr/replicator/change"
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

// TestMalformedMessagePausesApply publishes poison into the change stream,
// as a foreign publisher or a damaged store would: junk, a truncated
// message, a message of an unknown wire-format version, and a compressed
// message whose body does not decompress. Each pauses
// apply naming the stream sequence and what is wrong, loses nothing, and
// apply continues once the operator removes it.
func TestMalformedMessagePausesApply(t *testing.T) {
	c := newCluster(t, clusterOpts{schema: padSchema, tables: []string{"items"}})
	execOn(t, c, c.Config.Primary, `INSERT INTO items SELECT g, 'before' FROM generate_series(1, 10) g`)
	converge(t, c, time.Minute)

	good, err := transport.Encode(nil, itemsBatch(c.Config.Primary, 1, 0xFFFFFF00, 666))
	if err != nil {
		t.Fatal(err)
	}
	truncated := good[:len(good)/2]
	version := slices.Clone(good)
	version[4] = 2 // the version byte follows the 4-byte magic
	// flagged compressed (flags, byte 5, bit 0), with a sound checksum but
	// a body that is no zstd frame (docs/wire-format.md)
	damaged := slices.Clone(good[:7])
	damaged[5] = 1
	damaged = binary.AppendUvarint(damaged, 100)
	damaged = append(damaged, "not a zstd frame"...)
	damaged = binary.LittleEndian.AppendUint32(damaged, crc32.Checksum(damaged, crc32.MakeTable(crc32.Castagnoli)))
	rows := 10
	for _, tc := range []struct {
		name  string
		data  []byte
		parts []string
	}{
		{"junk", []byte("not an xdcr message"), []string{"malformed", "nats stream rmm"}},
		{"truncated", truncated, []string{"malformed", "nats stream rmm"}},
		{"unknown version", version, []string{"unsupported wire format version", "upgrade this site's agent"}},
		{"damaged compressed body", damaged, []string{"malformed", "compressed body", "nats stream rmm"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			js := jetStream(t, c, c.Config.Primary)
			ack, err := js.Publish(t.Context(), transport.Subject(c.Config.Cluster, c.Config.Primary), tc.data)
			if err != nil {
				t.Fatal(err)
			}
			junk := ack.Sequence
			execOn(t, c, c.Config.Primary, `INSERT INTO items SELECT g, 'after' FROM generate_series($1::int + 1, $1::int + 10) g`, rows)

			stream := transport.StreamName(c.Config.Cluster, c.Config.Primary)
			for _, site := range replicas(c) {
				e := waitLog(t, c, topology.NodeID(site), "apply paused", time.Minute,
					append([]string{fmt.Sprintf("seq %d", junk), stream}, tc.parts...)...)
				t.Logf("%s paused: %v", site, e["err"])
				assertCount(t, c, site, "items", rows)
			}
			// the operator removes the poison from each replica site's stream
			for _, site := range replicas(c) {
				st, err := jetStream(t, c, site).Stream(t.Context(), stream)
				if err != nil {
					t.Fatal(err)
				}
				if err := st.DeleteMsg(t.Context(), junk); err != nil {
					t.Fatalf("delete seq %d from %s's stream: %v", junk, site, err)
				}
			}
			rows += 10
			converge(t, c, 2*time.Minute)
			assertCount(t, c, replicas(c)[0], "items", rows)
		})
	}
}

// itemsBatch is a well-formed batch from origin in epoch inserting id
// into items.
func itemsBatch(origin string, epoch uint64, lsn uint64, id int) *change.Batch {
	rel := &change.Relation{Schema: "public", Name: "items", Identity: change.IdentityDefault,
		Columns: []change.Column{{Name: "id", Type: "integer", TypeOID: 23, Key: true}, {Name: "v", Type: "text", TypeOID: 25}}}
	return &change.Batch{Origin: origin, Epoch: epoch, Txns: []change.Txn{{Xid: 1, LSN: change.LSN(lsn), CommitTime: time.Now().UTC().Truncate(time.Microsecond),
		Changes: []change.Change{{Op: change.Insert, Rel: rel, New: []change.Value{{Kind: change.Text, Data: []byte(fmt.Sprint(id))}, {Kind: change.Text, Data: []byte("poison")}}}}}}}
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
