package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/xdcr/xdcr/deploy/topology"
)

// verifyJSON is the documented shape of `xdcr verify -o json`. Pointers
// tell a missing field from a zero one.
type verifyJSON struct {
	Cluster *string `json:"cluster"`
	Primary *string `json:"primary"`
	Sites   []struct {
		Site   *string           `json:"site"`
		Result *string           `json:"result"`
		Error  string            `json:"error"`
		Tables []verifyTableJSON `json:"tables"`
	} `json:"sites"`
}

type verifyTableJSON struct {
	Table       *string  `json:"table"`
	Key         []string `json:"key"`
	Result      *string  `json:"result"`
	Equal       *bool    `json:"equal"`
	RowsPrimary *int64   `json:"rows_primary"`
	RowsReplica *int64   `json:"rows_replica"`
	Ranges      []struct {
		From *string `json:"from"`
		To   *string `json:"to"`
	} `json:"ranges"`
	Missing   []string `json:"missing"`
	Extra     []string `json:"extra"`
	Different []string `json:"different"`
	Unsettled int      `json:"unsettled"`
	Note      string   `json:"note"`
	Error     string   `json:"error"`
}

// xdcrVerify runs the real `xdcr verify` and returns stdout, stderr and the
// exit code.
func xdcrVerify(t *testing.T, c *topology.Cluster, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, env.binary, append([]string{"verify", "--config", c.ConfigPath, "--log-format", "text"}, args...)...)
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	start := time.Now()
	err := cmd.Run()
	t.Logf("xdcr verify %s: %s", strings.Join(args, " "), time.Since(start).Round(time.Millisecond))
	var ee *exec.ExitError
	switch {
	case err == nil:
		return out.String(), stderr.String(), 0
	case errors.As(err, &ee):
		return out.String(), stderr.String(), ee.ExitCode()
	}
	t.Fatalf("xdcr verify: %v", err)
	return "", "", -1
}

// verifyReport runs `xdcr verify -o json`, checks the exit code and decodes
// the report.
func verifyReport(t *testing.T, c *topology.Cluster, wantCode int, args ...string) verifyJSON {
	t.Helper()
	out, stderr, code := xdcrVerify(t, c, append([]string{"-o", "json"}, args...)...)
	if code != wantCode {
		t.Fatalf("xdcr verify %v exited %d, want %d\nstdout:\n%s\nstderr:\n%s", args, code, wantCode, out, lastLines(stderr, 30))
	}
	var rep verifyJSON
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("xdcr verify -o json printed %q: %v", out, err)
	}
	if rep.Cluster == nil || *rep.Cluster != c.Config.Cluster || rep.Primary == nil || *rep.Primary != c.Config.Primary {
		t.Fatalf("report header: %s", out)
	}
	return rep
}

// tableResult finds a site's table in a report and checks the documented
// fields are there.
func tableResult(t *testing.T, rep verifyJSON, site, table string) verifyTableJSON {
	t.Helper()
	for _, s := range rep.Sites {
		if s.Site == nil || *s.Site != site {
			continue
		}
		for _, tr := range s.Tables {
			if tr.Table == nil || *tr.Table != table {
				continue
			}
			if tr.Result == nil || tr.Equal == nil || tr.Ranges == nil || tr.Missing == nil || tr.Extra == nil || tr.Different == nil {
				t.Fatalf("site %s table %s misses a documented field: %+v", site, table, tr)
			}
			return tr
		}
		t.Fatalf("site %s has no table %s in the report", site, table)
	}
	t.Fatalf("the report has no site %s", site)
	return verifyTableJSON{}
}

// wantOnly checks that a table differs by exactly one key of one kind
// (missing, extra or different), named in the sample list and held by one
// of the reported ranges.
func wantOnly(t *testing.T, tr verifyTableJSON, kind string, key int) {
	t.Helper()
	lists := map[string][]string{"missing": tr.Missing, "extra": tr.Extra, "different": tr.Different}
	if *tr.Result != "differs" || *tr.Equal {
		t.Fatalf("%s: result %s, want differs", *tr.Table, *tr.Result)
	}
	for k, l := range lists {
		want := []string(nil)
		if k == kind {
			want = []string{strconv.Itoa(key)}
		}
		if len(l) > 0 || want != nil {
			if !slices.Equal(l, want) {
				t.Errorf("%s: %s keys %v, want %v", *tr.Table, k, l, want)
			}
		}
	}
	held := false
	for _, r := range tr.Ranges {
		from, to := int64(-1<<62), int64(1<<62)
		var err error
		if r.From != nil {
			if from, err = strconv.ParseInt(*r.From, 10, 64); err != nil {
				t.Fatalf("range from %q: %v", *r.From, err)
			}
		}
		if r.To != nil {
			if to, err = strconv.ParseInt(*r.To, 10, 64); err != nil {
				t.Fatalf("range to %q: %v", *r.To, err)
			}
		}
		if from <= int64(key) && int64(key) < to {
			held = true
		}
	}
	if !held {
		t.Errorf("%s: no reported range holds key %d: %+v", *tr.Table, key, tr.Ranges)
	}
}

// newVerifyCluster is newCluster whose replication slot is dropped at the
// end: the shared sites hold 20 slots (deploy/local), and every cluster of
// the suite otherwise keeps its own until the sites stop.
func newVerifyCluster(t *testing.T, o clusterOpts) *topology.Cluster {
	t.Helper()
	c := newCluster(t, o)
	// runs before newCluster's cleanup, which then finds the agents stopped
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("stop agents: %v", err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, c.DSN(c.Config.Primary))
		if err != nil {
			t.Errorf("drop the slot: %v", err)
			return
		}
		defer conn.Close(ctx)
		for {
			var left int
			err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1`, c.Config.SlotName()).Scan(&left)
			if err == nil && left == 0 {
				return
			}
			if err == nil {
				// the walsender may still be going away
				_, err = conn.Exec(ctx, `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
					WHERE slot_name = $1 AND NOT active`, c.Config.SlotName())
			}
			if ctx.Err() != nil {
				t.Errorf("drop the slot %s: %v", c.Config.SlotName(), err)
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
	return c
}

// writeReplica changes a replica's rows behind replication's back, as an
// operator's mistake or a bug would: past the fence that makes a replica's
// replicated tables read-only, which, like the replica's other ordinary
// triggers, does not fire with session_replication_role = replica.
func writeReplica(t *testing.T, c *topology.Cluster, site, sql string) {
	t.Helper()
	execOn(t, c, site, "SET session_replication_role = replica; "+sql)
}

const verifySchema = `
CREATE TABLE public.items (id bigint PRIMARY KEY, v text, n numeric, at timestamptz, f float8, b bytea);
CREATE TABLE public.pairs (a int, b text, v text, PRIMARY KEY (a, b));
CREATE TABLE public.bag (v text);
ALTER TABLE public.bag REPLICA IDENTITY FULL;`

// TestVerifyFindsDifferences: verify is quiet (exit 0) on equal copies;
// a row changed, deleted or added directly on a replica makes it exit 4,
// naming the table, the key and a key range that holds it, while the other
// replica stays equal; a composite key and a table without a key too.
func TestVerifyFindsDifferences(t *testing.T) {
	c := newVerifyCluster(t, clusterOpts{schema: verifySchema, tables: []string{"items", "pairs", "bag"}})
	execOn(t, c, c.Config.Primary, `
		INSERT INTO items SELECT g, 'v' || g, g / 7.0, '2026-01-01'::timestamptz + g * interval '1 minute', g / 3.0, decode(md5(g::text), 'hex')
			FROM generate_series(1, 30000) g;
		INSERT INTO pairs SELECT g / 10, 'k' || g, 'p' || g FROM generate_series(1, 3000) g;
		INSERT INTO bag SELECT 'b' || (g % 50) FROM generate_series(1, 200) g;`)
	converge(t, c, 2*time.Minute)
	b, other := replicas(c)[0], replicas(c)[1]

	rep := verifyReport(t, c, 0)
	if len(rep.Sites) != 2 {
		t.Fatalf("%d sites in the report, want both replicas", len(rep.Sites))
	}
	for _, site := range replicas(c) {
		for table, rows := range map[string]int64{"public.items": 30000, "public.pairs": 3000, "public.bag": 200} {
			tr := tableResult(t, rep, site, table)
			if *tr.Result != "equal" || !*tr.Equal || tr.RowsPrimary == nil || *tr.RowsPrimary != rows || *tr.RowsReplica != rows {
				t.Errorf("%s %s: %+v, want equal with %d rows", site, table, tr, rows)
			}
		}
	}

	check := func(name, tamper, undo, kind string, key int) {
		t.Run(name, func(t *testing.T) {
			writeReplica(t, c, b, tamper)
			defer writeReplica(t, c, b, undo)
			rep := verifyReport(t, c, 4, "--table", "items", "--chunk-rows", "2000")
			wantOnly(t, tableResult(t, rep, b, "public.items"), kind, key)
			if tr := tableResult(t, rep, other, "public.items"); *tr.Result != "equal" {
				t.Errorf("untouched replica %s: %+v, want equal", other, tr)
			}
			if len(rep.Sites[0].Tables) != 1 {
				t.Errorf("--table items reported %d tables", len(rep.Sites[0].Tables))
			}
		})
	}
	check("changed", `UPDATE items SET n = n + 1 WHERE id = 12345`, `UPDATE items SET n = n - 1 WHERE id = 12345`, "different", 12345)
	check("missing", `DELETE FROM items WHERE id = 777`,
		`INSERT INTO items SELECT 777, 'v777', 777 / 7.0, '2026-01-01'::timestamptz + 777 * interval '1 minute', 777 / 3.0, decode(md5('777'), 'hex')`,
		"missing", 777)
	check("extra", `INSERT INTO items (id, v) VALUES (1000001, 'only here')`, `DELETE FROM items WHERE id = 1000001`, "extra", 1000001)

	t.Run("composite-and-keyless", func(t *testing.T) {
		writeReplica(t, c, other, `UPDATE pairs SET v = 'tampered' WHERE a = 42 AND b = 'k425'; INSERT INTO bag VALUES ('b7')`)
		out, stderr, code := xdcrVerify(t, c, "--site", other, "--table", "pairs", "--table", "bag")
		if code != 4 {
			t.Fatalf("exit %d, want 4\n%s\n%s", code, out, stderr)
		}
		t.Logf("output:\n%s", out)
		for _, want := range []string{"public.pairs", "differs", "different (a,b) (42,k425)", "public.bag", "200", "201", "counts only"} {
			if !strings.Contains(out, want) {
				t.Errorf("table output lacks %q:\n%s", want, out)
			}
		}
		if strings.Contains(out, b) {
			t.Errorf("--site %s reported other sites:\n%s", other, out)
		}
		if !strings.Contains(stderr, "differences found: "+other+" public.pairs, "+other+" public.bag") {
			t.Errorf("stderr does not sum up the differences:\n%s", stderr)
		}
	})
	// everything undone on b: equal again
	rep = verifyReport(t, c, 0, "--site", b)
	if tr := tableResult(t, rep, b, "public.items"); *tr.Result != "equal" {
		t.Errorf("after undoing: %+v", tr)
	}
}

// verifyWorkload writes to items(id 1..hot) on the primary from several
// connections until ctx ends: updates, deletes, re-inserts, and new rows
// above 1e6. It returns how many transactions committed.
func verifyWorkload(ctx context.Context, t *testing.T, c *topology.Cluster, writers int, hot int) func() int64 {
	t.Helper()
	var (
		n  atomic.Int64
		wg sync.WaitGroup
	)
	for w := range writers {
		conn := connect(t, c, c.Config.Primary)
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 42))
			next := 1_000_000 * (w + 1)
			for ctx.Err() == nil {
				id := 1 + rng.IntN(hot)
				var err error
				switch rng.IntN(4) {
				case 0, 1:
					_, err = conn.Exec(ctx, `UPDATE items SET v = md5(random()::text), n = n + 1 WHERE id = $1`, id)
				case 2:
					_, err = conn.Exec(ctx, `DELETE FROM items WHERE id = $1`, id)
					if err == nil {
						_, err = conn.Exec(ctx, `INSERT INTO items (id, v, n) VALUES ($1, 'back', 0) ON CONFLICT DO NOTHING`, id)
					}
				default:
					next++
					_, err = conn.Exec(ctx, `INSERT INTO items (id, v, n) VALUES ($1, 'new', 1)`, next)
				}
				if err != nil {
					if ctx.Err() == nil {
						t.Errorf("workload: %v", err)
					}
					return
				}
				n.Add(1)
				// a few hundred transactions a second in all: enough to
				// move every pass, little enough for apply to keep up on
				// a loaded machine
				time.Sleep(5 * time.Millisecond)
			}
		}()
	}
	return func() int64 { wg.Wait(); return n.Load() }
}

// TestVerifyUnderWrites: while a workload writes to the primary, verify of
// healthy replicas finds no difference (exit 0), although its whole-table
// hashes do see the replicas at other points than the primary; a row
// changed on one replica is still found, alone.
func TestVerifyUnderWrites(t *testing.T) {
	c := newVerifyCluster(t, clusterOpts{schema: verifySchema, tables: []string{"items"}})
	execOn(t, c, c.Config.Primary, `INSERT INTO items (id, v, n) SELECT g, 'v' || g, g FROM generate_series(1, 20000) g`)
	converge(t, c, 2*time.Minute)
	b := replicas(c)[0]

	ctx, cancel := context.WithCancel(t.Context())
	wait := verifyWorkload(ctx, t, c, 3, 10000)
	time.Sleep(time.Second) // let the workload get going

	out, stderr, code := xdcrVerify(t, c, "-o", "json", "--chunk-rows", "1000", "--log-level", "debug")
	if code != 0 {
		cancel()
		wait()
		t.Fatalf("healthy replicas under writes: exit %d, want 0\n%s\n%s", code, out, lastLines(stderr, 40))
	}
	// The run must have met the writes: some whole-table hash differed, so
	// the chunk comparison and drill-down ran and found only lag.
	if !strings.Contains(stderr, "chunks compared") {
		t.Errorf("no whole-table hash differed while the primary took writes; the test did not exercise the drill-down:\n%s", lastLines(stderr, 20))
	}

	writeReplica(t, c, b, `UPDATE items SET v = 'tampered' WHERE id = 15000`) // the workload does not touch 15000
	rep := verifyReport(t, c, 4, "--chunk-rows", "1000")
	wantOnly(t, tableResult(t, rep, b, "public.items"), "different", 15000)
	if tr := tableResult(t, rep, replicas(c)[1], "public.items"); *tr.Result != "equal" {
		t.Errorf("healthy replica under writes: %+v, want equal", tr)
	}
	cancel()
	t.Logf("workload committed %d transactions", wait())
	writeReplica(t, c, b, `UPDATE items SET v = 'v15000' WHERE id = 15000`)
	converge(t, c, 2*time.Minute)
}

// TestVerifyLaggingSite: a replica whose agent is stopped cannot reach the
// primary's position: it is reported lagging, not different, and verify
// exits 3; the running replica is still compared.
func TestVerifyLaggingSite(t *testing.T) {
	c := newVerifyCluster(t, clusterOpts{schema: verifySchema, tables: []string{"items"}})
	execOn(t, c, c.Config.Primary, `INSERT INTO items (id, v) SELECT g, 'v' || g FROM generate_series(1, 1000) g`)
	converge(t, c, time.Minute)
	stopped := replicas(c)[1]
	if err := c.StopAgent(topology.NodeID(stopped), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	execOn(t, c, c.Config.Primary, `UPDATE items SET v = 'after' WHERE id <= 10`)

	rep := verifyReport(t, c, 3, "--wait", "10s")
	tr := tableResult(t, rep, stopped, "public.items")
	if *tr.Result != "lagging" || *tr.Equal || len(tr.Different)+len(tr.Missing)+len(tr.Extra)+len(tr.Ranges) != 0 ||
		!strings.Contains(tr.Note, "did not apply the primary's position") {
		t.Errorf("stopped replica: %+v, want lagging without differences", tr)
	}
	if tr := tableResult(t, rep, replicas(c)[0], "public.items"); *tr.Result != "equal" {
		t.Errorf("running replica: %+v, want equal", tr)
	}
	if err := c.StartAgent(t.Context(), topology.NodeID(stopped)); err != nil {
		t.Fatal(err)
	}
	converge(t, c, time.Minute)
	verifyReport(t, c, 0, "--site", stopped)
}
