package e2e

import (
	"bytes"
	"context"
	"errors"
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/xdcr/xdcr/deploy/topology"
)

// xdcrSync runs `xdcr sync SITE` and returns its output and exit code.
func xdcrSync(t *testing.T, c *topology.Cluster, site string, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, env.binary, append([]string{"sync", site, "--config", c.ConfigPath, "--log-format", "text"}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return out.String(), 0
	case errors.As(err, &ee):
		return out.String(), ee.ExitCode()
	}
	t.Fatalf("xdcr sync: %v", err)
	return "", -1
}

// TestSyncWhileWriting: tables that exist only on the primary, with rows
// written before any agent ran, are created and copied into both replicas
// while a workload keeps writing; afterwards every site holds every
// acknowledged transaction exactly once.
func TestSyncWhileWriting(t *testing.T) {
	c := newCluster(t, clusterOpts{
		primaryOnly: eventsSchema + `
			CREATE TYPE kind AS ENUM ('small', 'big');
			CREATE TABLE public.bulk (id bigserial PRIMARY KEY, k kind NOT NULL, tags kind[], payload text, UNIQUE (payload));
			CREATE INDEX bulk_k ON public.bulk (k);
			INSERT INTO bulk (k, tags, payload) SELECT 'small', '{small,big}', md5(g::text) FROM generate_series(1, 60000) g;`,
		tables: []string{"events", "counters", "bulk"},
	})
	done := workload(t.Context(), t, c, 2, 400)
	for _, site := range replicas(c) {
		out, code := xdcrSync(t, c, site, "--chunk-rows", "20000")
		if code != 0 {
			t.Fatalf("xdcr sync %s exited %d:\n%s", site, code, out)
		}
		t.Logf("sync %s:\n%s", site, out)
	}
	execOn(t, c, c.Config.Primary, `UPDATE bulk SET k = 'big' WHERE id % 100 = 0`)
	acked := <-done
	converge(t, c, 3*time.Minute)
	checkExactlyOnce(t, c, acked)
	// the copy created the key, the unique constraint and the index
	var n int
	if err := connect(t, c, replicas(c)[0]).QueryRow(t.Context(),
		`SELECT count(*) FROM pg_indexes WHERE tablename = 'bulk'`).Scan(&n); err != nil || n != 3 {
		t.Errorf("bulk has %d indexes on the replica (%v), want 3", n, err)
	}
}

// TestSyncKilledAndRerun: a sync killed halfway leaves the site waiting;
// running it again gives the same result as an uninterrupted one.
func TestSyncKilledAndRerun(t *testing.T) {
	c := newCluster(t, clusterOpts{
		primaryOnly: `CREATE TABLE public.big (id bigint PRIMARY KEY, payload text);
			INSERT INTO big SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 400000) g;`,
		tables: []string{"big"},
	})
	site := replicas(c)[0]
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, env.binary, "sync", site, "--config", c.ConfigPath, "--chunk-rows", "50000", "--parallel", "2")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// kill it once some rows are in
	eventually(t, 30*time.Second, "the copy to start", func() error {
		n, err := queryInt(t, c, site, `SELECT coalesce(sum(rows_done), 0) FROM xdcr.table_sync`)
		if err != nil || n == 0 {
			return errors.New("no rows copied yet")
		}
		return nil
	})
	_ = cmd.Process.Signal(syscall.SIGKILL)
	_ = cmd.Wait()
	if _, ok := findLog(c.LogPath(topology.NodeID(site)), "apply paused"); ok {
		t.Error("apply paused while a sync ran: waiting for a copy is not a failure")
	}
	execOn(t, c, c.Config.Primary, `UPDATE big SET payload = 'changed' WHERE id % 1000 = 0`)
	if out, code := xdcrSync(t, c, site); code != 0 {
		t.Fatalf("re-run exited %d:\n%s", code, out)
	}
	other := replicas(c)[1]
	if out, code := xdcrSync(t, c, other); code != 0 {
		t.Fatalf("sync %s exited %d:\n%s", other, code, out)
	}
	execOn(t, c, c.Config.Primary, `DELETE FROM big WHERE id % 777 = 0`)
	converge(t, c, 3*time.Minute, "public.big")
}

// TestSyncRefusesDifferingTable: a table that exists on the site with
// another definition is refused with the difference and the fix, and
// nothing is copied.
func TestSyncRefusesDifferingTable(t *testing.T) {
	c := newCluster(t, clusterOpts{
		primaryOnly: `CREATE TABLE public.acct (id bigint PRIMARY KEY, owner text NOT NULL, balance numeric(12,2));
			INSERT INTO acct VALUES (1, 'a', 10);`,
		tables:   []string{"acct"},
		noAgents: true,
	})
	site := replicas(c)[0]
	execOn(t, c, site, `CREATE TABLE public.acct (id integer PRIMARY KEY, balance numeric(12,2))`)
	out, code := xdcrSync(t, c, site)
	if code == 0 {
		t.Fatalf("sync into a differing table succeeded:\n%s", out)
	}
	for _, want := range []string{"public.acct column id", "is bigint on the primary but integer on " + site,
		"ALTER TABLE \"public\".\"acct\" ALTER COLUMN \"id\" TYPE bigint",
		"public.acct column owner", "missing on " + site, "ADD COLUMN \"owner\" text"} {
		if !bytes.Contains([]byte(out), []byte(want)) {
			t.Errorf("the refusal does not say %q:\n%s", want, out)
		}
	}
	assertCount(t, c, site, "acct", 0)
}

// TestAddTableToRunningCluster: a table added to tables: is published once
// the agents restart with the new config, copied into every replica with
// `xdcr sync SITE --table T` while writes go on, and streamed from there.
func TestAddTableToRunningCluster(t *testing.T) {
	c := newCluster(t, clusterOpts{schema: padSchema, tables: []string{"items"}})
	ctx := t.Context()
	execOn(t, c, c.Config.Primary, `CREATE TABLE public.late (id int PRIMARY KEY, v text);
		INSERT INTO late SELECT g, 'old' FROM generate_series(1, 5000) g;`)
	c.Config.Tables = append(c.Config.Tables, "public.late")
	if err := c.WriteConfig(); err != nil {
		t.Fatal(err)
	}
	for _, n := range c.Nodes() {
		if err := c.StopAgent(n, 30*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.StartAgents(ctx); err != nil {
		t.Fatal(err)
	}
	// writes to both tables before, during and after the copies
	conn := connect(t, c, c.Config.Primary)
	stop := make(chan struct{})
	writer := make(chan error, 1)
	var (
		stopOnce sync.Once
		werr     error
	)
	halt := func() error {
		stopOnce.Do(func() {
			close(stop)
			werr = <-writer
		})
		return werr
	}
	// a failing test stops the writer before conn's cleanup closes it
	t.Cleanup(func() { _ = halt() })
	go func() {
		for i := 1; ; i++ {
			select {
			case <-stop:
				writer <- nil
				return
			default:
			}
			if _, err := conn.Exec(ctx, `INSERT INTO items VALUES ($1, 'x')`, i); err != nil {
				writer <- err
				return
			}
			if _, err := conn.Exec(ctx, `UPDATE late SET v = v || '+' WHERE id = $1`, 1+i%5000); err != nil {
				writer <- err
				return
			}
			if _, err := conn.Exec(ctx, `INSERT INTO late VALUES ($1, 'new')`, 10000+i); err != nil {
				writer <- err
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	time.Sleep(time.Second)
	for _, site := range replicas(c) {
		if out, code := xdcrSync(t, c, site, "--table", "public.late"); code != 0 {
			t.Fatalf("sync %s --table public.late exited %d:\n%s", site, code, out)
		}
	}
	time.Sleep(time.Second)
	if err := halt(); err != nil {
		t.Fatal(err)
	}
	converge(t, c, 2*time.Minute)
}
