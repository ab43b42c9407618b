package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/xdcr/xdcr/deploy/topology"
	"github.com/xdcr/xdcr/transport"
)

const typesSchema = `
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE public.types (
	id       bigint PRIMARY KEY,
	i2       smallint,
	i4       integer,
	i8       bigint,
	num      numeric(20,6),
	num_free numeric,
	r4       real,
	r8       double precision,
	t        text,
	vc       varchar(20),
	ch       char(5),
	b        boolean,
	d        date,
	tm       time,
	tmtz     timetz,
	ts       timestamp,
	tstz     timestamptz,
	iv       interval,
	u        uuid,
	j        json,
	jb       jsonb,
	by       bytea,
	arr_i    integer[],
	arr_t    text[],
	arr_2d   integer[][],
	m        mood,
	arr_m    mood[],
	big      text
);`

// TestTypesRoundTrip writes every supported type, NULLs and edge values on
// the primary and compares the replicas row by row, one row per statement
// and many rows in one (applied as a COPY), including a TOASTed value left
// alone by an update of another column.
func TestTypesRoundTrip(t *testing.T) {
	c := newCluster(t, clusterOpts{schema: typesSchema, tables: []string{"public.types"}})
	p := connect(t, c, c.Config.Primary)
	ctx := t.Context()
	stmts := []string{
		`INSERT INTO types VALUES (1, 32767, 2147483647, 9223372036854775807, 12345678901234.123456, 1e-40,
			3.4028235e38, 1.7976931348623157e308, 'plain text', 'varchar', 'abc', true, '2024-02-29', '23:59:59.999999',
			'12:00:00+05:30', '1999-12-31 23:59:59.123456', '2026-11-27 10:00:00.5+01', '1 year 2 mons 3 days 04:05:06.7',
			'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"b": 1,  "a": [1, 2]}', '{"b": 1, "a": [1, 2, {"c": null}]}',
			'\x00ff10', '{1,2,3}', '{"a","b c","d\"e",NULL}', '{{1,2},{3,4}}', 'happy', '{sad,ok}', 'short')`,
		`INSERT INTO types VALUES (2, -32768, -2147483648, -9223372036854775808, -0.000001, 'NaN',
			'-Infinity', 'Infinity', E'quote '' backslash \\ tab \t newline \n unicode ☃ 日本語', '', '', false,
			'infinity', '00:00:00', '00:00:00-12', '-infinity', 'infinity', '-1 days -00:00:01', '00000000-0000-0000-0000-000000000000',
			'[]', '{}', '', '{}', '{}', '{}', 'sad', '{}', '')`,
		`INSERT INTO types (id) VALUES (3)`,
		`INSERT INTO types (id, r4, r8, num_free, t, d, ts) VALUES (4, 'NaN', -0.0, 123456789012345678901234567890.0123456789, 'x',
			'0001-01-01 BC', '4713-01-01 00:00:00 BC')`,
		// a TOASTed value (incompressible, stored out of line)
		`INSERT INTO types (id, big) SELECT 5, string_agg(md5(random()::text), '') FROM generate_series(1, 1000)`,
	}
	for _, s := range stmts {
		if _, err := p.Exec(ctx, s); err != nil {
			t.Fatalf("%s: %v", firstLine(s), err)
		}
	}
	converge(t, c, time.Minute)

	// Ten copies of every row in one transaction: a run of inserts into one
	// table that apply sends as a COPY, with every type and every
	// character COPY's text format escapes.
	if _, err := p.Exec(ctx, `INSERT INTO types SELECT id + 100 * k, i2, i4, i8, num, num_free, r4, r8, t, vc, ch, b, d, tm, tmtz,
		ts, tstz, iv, u, j, jb, by, arr_i, arr_t, arr_2d, m, arr_m, big FROM types, generate_series(1, 10) k`); err != nil {
		t.Fatal(err)
	}
	converge(t, c, time.Minute)

	// An update of another column sends the TOASTed value as "unchanged":
	// the replica must keep it, not overwrite it with NULL.
	for _, s := range []string{
		`UPDATE types SET i4 = 42 WHERE id = 5`,
		`UPDATE types SET id = 1000, t = 'moved' WHERE id = 3`, // primary key update
		`UPDATE types SET jb = jb || '{"x": 1}', arr_i = arr_i || 4 WHERE id = 1`,
		`DELETE FROM types WHERE id = 4`,
	} {
		if _, err := p.Exec(ctx, s); err != nil {
			t.Fatalf("%s: %v", s, err)
		}
	}
	converge(t, c, time.Minute)
	for _, site := range replicas(c) {
		var n int
		if err := connect(t, c, site).QueryRow(ctx, `SELECT length(big) FROM types WHERE id = 5`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n != 32000 {
			t.Errorf("site %s: TOASTed value has length %d after an update of another column, want 32000", site, n)
		}
	}
}

const ledgerSchema = `
CREATE TABLE public.acct_a (id int PRIMARY KEY, v bigint NOT NULL);
CREATE TABLE public.acct_b (id int PRIMARY KEY, v bigint NOT NULL);
CREATE TABLE public.notes (id int PRIMARY KEY, txn int NOT NULL, note text);
CREATE TABLE public.gen (id int PRIMARY KEY, g int NOT NULL);
INSERT INTO acct_a SELECT g, 100 FROM generate_series(1, 50) g;
INSERT INTO acct_b SELECT g, 0 FROM generate_series(1, 50) g;
INSERT INTO gen SELECT g, 0 FROM generate_series(1, 100) g;`

// TestTransactionsAtomic runs transactions that insert, update (keys too),
// delete and truncate across several tables, and samples the replicas all
// along: every sample must be a state the primary went through.
func TestTransactionsAtomic(t *testing.T) {
	c := newCluster(t, clusterOpts{schema: ledgerSchema,
		tables: []string{"acct_a", "acct_b", "notes", "gen"}})
	ctx := t.Context()
	p := connect(t, c, c.Config.Primary)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var samples atomic.Int64
	errs := make(chan error, 16)
	for _, site := range replicas(c) {
		conn := connect(t, c, site)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if err := checkLedger(ctx, conn); err != nil {
					errs <- fmt.Errorf("site %s: %w", site, err)
					return
				}
				samples.Add(1)
			}
		}()
	}
	for i := 1; i <= 300; i++ {
		from, to := 1+rand.IntN(50), 1+rand.IntN(50)
		err := pgx.BeginFunc(ctx, p, func(tx pgx.Tx) error {
			q := []string{
				fmt.Sprintf(`UPDATE acct_a SET v = v - 7 WHERE id = %d`, from),
				fmt.Sprintf(`UPDATE acct_b SET v = v + 7 WHERE id = %d`, to),
				fmt.Sprintf(`INSERT INTO notes VALUES (%d, %d, 'transfer')`, i, i),
				fmt.Sprintf(`UPDATE notes SET id = id + 100000 WHERE id = %d`, i-1), // key change
				fmt.Sprintf(`DELETE FROM notes WHERE id = %d`, 100000+i-5),
			}
			if i%50 == 0 {
				q = append(q, `TRUNCATE gen`, fmt.Sprintf(`INSERT INTO gen SELECT g, %d FROM generate_series(1, 100) g`, i))
			}
			for _, s := range q {
				if _, err := tx.Exec(ctx, s); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	converge(t, c, 2*time.Minute)
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if samples.Load() < 10 {
		t.Errorf("only %d samples of the replicas were taken", samples.Load())
	}
	t.Logf("%d consistent samples", samples.Load())
}

// checkLedger reads one snapshot of a replica and checks the invariants of
// TestTransactionsAtomic's workload. It is one statement at READ COMMITTED:
// TRUNCATE is not MVCC-safe, so a snapshot taken before a truncate commits
// (as REPEATABLE READ would keep) sees the table empty, on any PostgreSQL;
// a single statement locks every table before it takes its snapshot.
func checkLedger(ctx context.Context, conn *pgx.Conn) error {
	var total, moved, genRows, gens, maxTxn int64
	err := conn.QueryRow(ctx, `SELECT (SELECT sum(v) FROM acct_a) + (SELECT sum(v) FROM acct_b),
		(SELECT sum(v) FROM acct_b),
		(SELECT count(*) FROM gen), (SELECT count(DISTINCT g) FROM gen),
		(SELECT coalesce(max(txn), 0) FROM notes)`).Scan(&total, &moved, &genRows, &gens, &maxTxn)
	if err != nil {
		return err
	}
	if total != 5000 {
		return fmt.Errorf("balances sum to %d, want 5000 (a transfer was applied partially)", total)
	}
	if genRows != 100 || gens != 1 {
		return fmt.Errorf("gen has %d rows of %d generations, want 100 of 1 (truncate and refill applied partially)", genRows, gens)
	}
	// transaction i inserted note i and moved 7 into acct_b
	if moved != 7*maxTxn {
		return fmt.Errorf("%d transfers applied but the newest note is from transaction %d", moved/7, maxTxn)
	}
	return nil
}

// TestLargeTransaction writes 200,000 rows in one transaction: it travels
// as several chunks, and no replica ever shows part of it.
func TestLargeTransaction(t *testing.T) {
	const rows = 200000
	c := newCluster(t, clusterOpts{
		schema: `CREATE TABLE public.bulk (id bigint PRIMARY KEY, payload text NOT NULL)`,
		tables: []string{"public.bulk"},
	})
	ctx := t.Context()
	before := streamMessages(t, c)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for _, site := range replicas(c) {
		conn := connect(t, c, site)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				var n int64
				if err := conn.QueryRow(ctx, `SELECT count(*) FROM bulk`).Scan(&n); err != nil {
					errs <- err
					return
				}
				if n != 0 && n != rows {
					errs <- fmt.Errorf("site %s shows %d of the transaction's %d rows", site, n, rows)
					return
				}
				select {
				case <-stop:
					return
				case <-time.After(20 * time.Millisecond):
				}
			}
		}()
	}
	execOn(t, c, c.Config.Primary, fmt.Sprintf(
		`INSERT INTO bulk SELECT g, md5(g::text) || md5((g+1)::text) FROM generate_series(1, %d) g`, rows))
	converge(t, c, 3*time.Minute)
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := streamMessages(t, c) - before; n < 2 {
		t.Errorf("the transaction was published as %d message(s); want several chunks", n)
	} else {
		t.Logf("published as %d chunks", n)
	}
}

// streamMessages counts the messages in the primary's change stream.
func streamMessages(t *testing.T, c *topology.Cluster) uint64 {
	t.Helper()
	js := jetStream(t, c, c.Config.Primary)
	st, err := js.Stream(t.Context(), transport.StreamName(c.Config.Cluster, c.Config.Primary))
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Msgs
}

func jetStream(t *testing.T, c *topology.Cluster, site string) jetstream.JetStream {
	t.Helper()
	nc, err := nats.Connect(c.Config.Sites[site].NATS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js
}
