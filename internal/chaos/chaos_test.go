package chaos

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/xdcr/xdcr/deploy/faults"
	"github.com/xdcr/xdcr/deploy/local"
	"github.com/xdcr/xdcr/deploy/topology"
	"github.com/xdcr/xdcr/replicator"
)

var (
	flagDuration = flag.Duration("chaos.duration", 0, "TestChaos: how long the random schedule runs (0 skips it; make chaos DURATION=10m)")
	flagSeed     = flag.Uint64("chaos.seed", 1, "seed of the schedule, the victims and the transfers (make chaos SEED=N)")
)

// env is shared by the tests: three sites whose leaf links run through
// the WAN's proxies, started once; each test runs a cluster of its own on
// them.
var env struct {
	binary string
	sites  *local.Sites
	wan    *faults.WAN
}

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	flag.Parse()
	if testing.Short() || os.Getenv("XDCR_E2E") == "off" {
		fmt.Println("chaos: skipped (-short)")
		return m.Run()
	}
	start := time.Now()
	env.wan = faults.NewWAN(nil)
	defer env.wan.Close()
	// without the race detector unless XDCR_CHAOS_RACE=on: the schedule
	// is about timing, and the e2e suite runs the agents with it
	bed, err := topology.StartBed(context.Background(), topology.BedOptions{
		Race:     os.Getenv("XDCR_CHAOS_RACE") == "on",
		WAN:      env.wan,
		LogLevel: slog.LevelInfo,
		PostgresSettings: map[string]string{
			// The faults are of processes and links, not of the machine,
			// so the OS keeps what PostgreSQL wrote without an fsync. A
			// commit must still be written before it is acknowledged: with
			// synchronous_commit off a killed server forgets commits its
			// clients (and apply) were told about (docs/faults.md).
			"fsync":              "off",
			"synchronous_commit": "on",
			"max_connections":    "200",
		},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "chaos:", err)
		return 1
	}
	defer bed.Close()
	env.binary, env.sites = bed.Binary, bed.Sites
	fmt.Printf("chaos: binary built and sites up in %s\n", time.Since(start).Round(time.Millisecond))
	return m.Run()
}

var clusterSeq atomic.Int32

// newEnv stands up a cluster of the workloads' tables, its agents'
// traffic between sites routed through the WAN.
func newEnv(t *testing.T) *Env {
	t.Helper()
	if testing.Short() {
		t.Skip("starts a cluster")
	}
	name := fmt.Sprintf("x%d-%s", clusterSeq.Add(1), strings.Trim(regexp.MustCompile(`[^a-z0-9]+`).ReplaceAllString(strings.ToLower(t.Name()), "-"), "-"))
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	c, err := topology.New(ctx, env.sites, topology.Options{
		Cluster: name,
		Tables:  Tables,
		Schema:  Schema,
		Binary:  env.binary,
		Dir:     t.TempDir(),
		WAN:     env.wan,
	})
	if err != nil {
		t.Fatalf("new cluster: %v", err)
	}
	t.Cleanup(func() {
		env.wan.Heal()
		if err := c.Close(); err != nil {
			t.Errorf("stop agents: %v", err)
		}
		if t.Failed() {
			for _, n := range c.Nodes() {
				if b, err := os.ReadFile(c.LogPath(n)); err == nil {
					t.Logf("---- agent %s log (last 40 lines) ----\n%s", n, lastLines(string(b), 40))
				}
			}
		}
		for _, s := range c.Config.SiteNames() {
			if conn, err := pgx.Connect(context.Background(), c.DSN(s)); err == nil {
				_, _ = conn.Exec(context.Background(), `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active`, replicator.SlotName(name))
				_ = conn.Close(context.Background())
			}
		}
	})
	if err := c.StartAgents(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitReady(ctx); err != nil {
		t.Fatalf("wait ready: %v", err)
	}
	return NewEnv(env.sites, c, env.wan)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func logf(t *testing.T) func(string, ...any) {
	return func(format string, args ...any) {
		t.Logf("%s "+format, append([]any{time.Now().Format("15:04:05.0")}, args...)...)
	}
}

// TestNemeses runs every nemesis once, in order, while the workloads
// write: nothing acknowledged may be lost or doubled, and every replica
// shows each client's log as a prefix at every sample.
func TestNemeses(t *testing.T) {
	e := newEnv(t)
	SetHolds(3*time.Second, 10*time.Second)
	rep, err := Run(t.Context(), e, Plan{Nemeses: Nemeses(), Seed: *flagSeed, Quiet: 2 * time.Second, Progress: logf(t)})
	if rep != nil {
		t.Logf("\n%s", rep.Table())
	}
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK() {
		t.Errorf("the guarantees did not hold: %d lost, %d duplicated, %d prefix violations", rep.Lost, rep.Duplicated, rep.PrefixViolations)
	}
	if rep.Acked == 0 || rep.Events == 0 || rep.Samples == 0 {
		t.Errorf("the run proves nothing: %d transfers and %d log rows acknowledged, %d samples", rep.Acked, rep.Events, rep.Samples)
	}
}

// TestChaos is the long random schedule of `make chaos DURATION=10m
// SEED=N`; it prints the summary table to stdout.
func TestChaos(t *testing.T) {
	if *flagDuration == 0 {
		t.Skip("set -chaos.duration (make chaos DURATION=10m SEED=N)")
	}
	e := newEnv(t)
	SetHolds(5*time.Second, 30*time.Second)
	rep, err := Run(t.Context(), e, Plan{Nemeses: Nemeses(), Duration: *flagDuration, Seed: *flagSeed, Quiet: 5 * time.Second, Progress: logf(t)})
	if rep != nil {
		fmt.Print(rep.Table())
	}
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK() {
		t.Errorf("the guarantees did not hold: %d lost, %d duplicated, %d prefix violations", rep.Lost, rep.Duplicated, rep.PrefixViolations)
	}
}

// The checkers catch what they are there for: a replica that lost an
// acknowledged transfer, one that applied a transfer twice or holds one
// nobody sent, and one whose log has a gap or went back.
func TestCheckersCatchPlantedFaults(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	hist := newHistory()
	cl := &clients{primary: e.Primary, hist: hist, op: 5 * time.Second}
	wctx, cancel := context.WithTimeout(ctx, 4*time.Second)
	cl.run(wctx, 2, *flagSeed)
	cancel()
	primary, err := waitConverged(ctx, e, 2*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range e.Cluster.Config.SiteNames() {
		f, err := CheckSite(ctx, s, e.Cluster.DSN(s), hist)
		if err != nil {
			t.Fatal(err)
		}
		if !f.OK() {
			t.Fatalf("%s fails the checks before anything was planted: %+v", s, f)
		}
	}
	// the agents stop, so that nothing repairs what the test breaks
	if err := e.Cluster.Close(); err != nil {
		t.Fatal(err)
	}
	var replicas []string
	for _, s := range e.Cluster.Config.SiteNames() {
		if s != primary {
			replicas = append(replicas, s)
		}
	}
	lossSite, dupSite := replicas[0], replicas[1]
	sent, _, _ := hist.snapshot()
	var victim string
	var vt Transfer
	for id, tr := range sent {
		if tr.Outcome == Acked {
			victim, vt = id, tr
			break
		}
	}
	if victim == "" {
		t.Fatal("no transfer was acknowledged")
	}
	plant := func(site, sql string, args ...any) {
		t.Helper()
		conn, err := pgx.Connect(ctx, e.Cluster.DSN(site))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(context.Background())
		if _, err := conn.Exec(ctx, `SET session_replication_role = replica`); err != nil { // as apply does: the fence trigger does not fire
			t.Fatal(err)
		}
		if _, err := conn.Exec(ctx, sql, args...); err != nil {
			t.Fatalf("plant on %s: %s: %v", site, sql, err)
		}
	}
	check := func(site string) Findings {
		t.Helper()
		f, err := CheckSite(ctx, site, e.Cluster.DSN(site), hist)
		if err != nil {
			t.Fatal(err)
		}
		return f
	}

	// a loss: an acknowledged transfer and its effect on the balances gone
	plant(lossSite, `WITH d AS (DELETE FROM public.transfers WHERE id = $1)
		UPDATE public.accounts SET balance = balance + CASE id WHEN $2 THEN $4::bigint ELSE -$4::bigint END WHERE id IN ($2, $3)`,
		victim, vt.Src, vt.Dst, vt.Amount)
	if f := check(lossSite); f.Lost == 0 {
		t.Errorf("a lost transfer went unnoticed: %+v", f)
	}
	// a duplicate: the same transfer's balance updates applied again
	plant(dupSite, `UPDATE public.accounts SET balance = balance + CASE id WHEN $1 THEN -$3::bigint ELSE $3::bigint END WHERE id IN ($1, $2)`,
		vt.Src, vt.Dst, vt.Amount)
	if f := check(dupSite); f.Duplicated == 0 {
		t.Errorf("a transfer applied twice went unnoticed: %+v", f)
	}
	// a phantom: a transfer nobody sent
	plant(dupSite, `INSERT INTO public.transfers VALUES ('c99-1', 99, 1, 2, 0)`)
	if f := check(dupSite); f.Duplicated < 2 {
		t.Errorf("a transfer nobody sent went unnoticed: %+v", f)
	}

	// out of order: a later row of client 1's log visible without an
	// earlier one, both in a sample and in the final check
	sample := func(s *Sampler, site string) {
		t.Helper()
		conn, err := pgx.Connect(ctx, e.Cluster.DSN(site))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(context.Background())
		logs, err := readLogs(ctx, conn)
		if err != nil {
			t.Fatal(err)
		}
		s.Observe(site, logs)
	}
	s := &Sampler{}
	sample(s, lossSite)
	if f, _, _ := s.Result(); f.PrefixViolations != 0 {
		t.Fatalf("a clean log sampled as a violation: %+v", f)
	}
	lostBefore := check(lossSite).Lost
	plant(lossSite, `DELETE FROM public.events WHERE client = 1 AND seq = 2`)
	sample(s, lossSite)
	if f, _, _ := s.Result(); f.PrefixViolations == 0 {
		t.Errorf("a gap in a replica's log went unnoticed by the sampler")
	}
	if f := check(lossSite); f.PrefixViolations == 0 || f.Lost <= lostBefore {
		t.Errorf("a gap in a replica's log (an acknowledged row lost) went unnoticed by the final check: %+v", f)
	}
	// a log that goes back between two samples
	s2 := &Sampler{}
	sample(s2, dupSite)
	plant(dupSite, `DELETE FROM public.events WHERE client = 2 AND seq = (SELECT max(seq) FROM public.events WHERE client = 2)`)
	sample(s2, dupSite)
	if f, _, _ := s2.Result(); f.PrefixViolations == 0 {
		t.Errorf("a replica's log that went back went unnoticed")
	}
}
