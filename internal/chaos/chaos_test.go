package chaos

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/xdcr/xdcr/deploy/faults"
	"github.com/xdcr/xdcr/deploy/local"
	"github.com/xdcr/xdcr/deploy/topology"
	"github.com/xdcr/xdcr/internal/config"
	"github.com/xdcr/xdcr/internal/wait"
	"github.com/xdcr/xdcr/replicator"
	"github.com/xdcr/xdcr/replicator/change"
)

var (
	flagDuration = flag.Duration("chaos.duration", 0, "TestChaos: how long the random schedule runs (0 skips it; make chaos DURATION=10m)")
	flagSeed     = flag.Uint64("chaos.seed", 1, "seed of the schedule, the victims and the transfers (make chaos SEED=N)")
	flagOnly     = flag.String("chaos.only", "", "TestNemeses and TestChaos: only these nemeses (comma-separated names)")
)

// nemeses returns the nemeses -chaos.only names, or every one.
func nemeses(t *testing.T) []Nemesis {
	t.Helper()
	all := Nemeses()
	if *flagOnly == "" {
		return all
	}
	var out []Nemesis
	for _, name := range strings.Split(*flagOnly, ",") {
		i := slices.IndexFunc(all, func(n Nemesis) bool { return n.Name == strings.TrimSpace(name) })
		if i < 0 {
			t.Fatalf("-chaos.only: no nemesis %q", name)
		}
		out = append(out, all[i])
	}
	return out
}

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
			// partition-primary reads the old primary's WAL after the
			// handoff (pg_walinspect), which its capture slot may no
			// longer hold
			"wal_keep_size": "512MB",
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
	return newEnvOf(t, Tables, Schema)
}

// newEnvOf stands up a cluster of tables, created on every site with
// schema, its agents' traffic between sites routed through the WAN.
func newEnvOf(t *testing.T, tables []string, schema string) *Env {
	t.Helper()
	if testing.Short() {
		t.Skip("starts a cluster")
	}
	name := fmt.Sprintf("x%d-%s", clusterSeq.Add(1), strings.Trim(regexp.MustCompile(`[^a-z0-9]+`).ReplaceAllString(strings.ToLower(t.Name()), "-"), "-"))
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	c, err := topology.New(ctx, env.sites, topology.Options{
		Cluster: name,
		Tables:  tables,
		Schema:  schema,
		Binary:  env.binary,
		Dir:     t.TempDir(),
		WAN:     env.wan,
		// apply commits with the sites' synchronous_commit (on, above):
		// with it off, a replica whose PostgreSQL restart-replica-pg
		// kills forgets commits that readers saw, and the prefix checker
		// sees its log go back (docs/faults.md)
		Tune: func(cfg *config.Config) { cfg.Apply.SynchronousCommit = true },
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
	return NewEnv(env.sites, c, env.wan, env.binary)
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
	rep, err := Run(t.Context(), e, Plan{Nemeses: nemeses(t), Seed: *flagSeed, Quiet: 2 * time.Second, Progress: logf(t)})
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
	rep, err := Run(t.Context(), e, Plan{Nemeses: nemeses(t), Duration: *flagDuration, Seed: *flagSeed, Quiet: 5 * time.Second, Progress: logf(t)})
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
	// halfway, the primary's WAL position: a stand-in for a handoff
	var (
		midAt  time.Time
		mid    change.LSN
		midErr error
	)
	read := make(chan struct{})
	go func() {
		defer close(read)
		midErr = wait.Sleep(wctx, 2*time.Second)
		midAt = time.Now()
		if midErr == nil {
			mid, midErr = walPosition(ctx, e.Cluster.DSN(e.Cluster.Config.Primary))
		}
	}()
	cl.run(wctx, 2, *flagSeed)
	cancel()
	<-read
	if midErr != nil {
		t.Fatal(midErr)
	}
	primary, err := waitConverged(ctx, e, 2*time.Minute, logf(t))
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
	checkWindowRules(t, ctx, e, hist, primary, dupSite, midAt, mid)
}

// The loss window of a forced failover excuses exactly the acknowledged
// transactions it should: those the old primary acknowledged after the
// window began and committed after the handoff (per its WAL), and nothing
// else; and the divergence report check fails on a report that leaves
// one out or lists one too many.
func checkWindowRules(t *testing.T, ctx context.Context, e *Env, hist *History, primary, site string, midAt time.Time, mid change.LSN) {
	t.Helper()
	w := LossWindow{Site: primary, Epoch: 1, NewPrimary: site, Start: midAt, Barrier: mid, Handoff: mid}
	all, err := e.readWindow(ctx, &w)
	if err != nil {
		t.Fatal(err)
	}
	if len(w.transfers) == 0 || len(w.events) == 0 {
		t.Fatalf("nothing committed after %s: %s", mid, w)
	}
	t.Logf("a window from halfway: %s", w)
	sent, _, _ := hist.snapshot()
	var inside, before string
	for _, id := range slices.Sorted(maps.Keys(sent)) {
		tr := sent[id]
		switch {
		case tr.Outcome != Acked:
		case inside == "" && w.holdsTransfer(id) && !tr.At.Before(midAt):
			inside = id
		case before == "" && tr.At.Before(midAt) && !w.holdsTransfer(id):
			before = id
		}
	}
	if inside == "" || before == "" {
		t.Fatalf("no acknowledged transfer inside (%q) or before (%q) the window %s", inside, before, w)
	}
	withWindow := func(ws ...LossWindow) *History {
		h := newHistory()
		_, h.events, h.pending = hist.snapshot()
		h.transfers = maps.Clone(sent)
		h.AddWindows(ws...)
		return h
	}
	lost := func(h *History) int {
		t.Helper()
		f, err := CheckSite(ctx, site, e.Cluster.DSN(site), h)
		if err != nil {
			t.Fatal(err)
		}
		return f.Lost
	}
	base := lost(withWindow(w))
	for _, id := range []string{inside, before} {
		tr := sent[id]
		conn, err := pgx.Connect(ctx, e.Cluster.DSN(site))
		if err != nil {
			t.Fatal(err)
		}
		_, err = conn.Exec(ctx, `SET session_replication_role = replica`)
		if err == nil {
			_, err = conn.Exec(ctx, `WITH d AS (DELETE FROM public.transfers WHERE id = $1)
				UPDATE public.accounts SET balance = balance + CASE id WHEN $2 THEN $4::bigint ELSE -$4::bigint END WHERE id IN ($2, $3)`,
				id, tr.Src, tr.Dst, tr.Amount)
		}
		conn.Close(context.Background())
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := lost(withWindow(w)) - base; n != 1 {
		t.Errorf("with %s (in the window) and %s (acknowledged before it) missing, %d more lost; want 1", inside, before, n)
	}
	if n := lost(withWindow()) - base; n != 2 {
		t.Errorf("without a window, %d more lost; want 2", n)
	}
	late := w
	late.Start = sent[inside].At.Add(time.Millisecond)
	if n := lost(withWindow(late)) - base; n != 2 {
		t.Errorf("with %s acknowledged before the window began, %d more lost; want 2", inside, n)
	}
	other := w
	other.Site = site
	if n := lost(withWindow(other)) - base; n != 2 {
		t.Errorf("with a window of another site, %d more lost; want 2", n)
	}

	// log rows a failover dropped
	var in, out [2]int64
	for k := range w.events {
		in = k
		break
	}
	out = [2]int64{in[0], 1}
	if w.holdsEvent(int(out[0]), out[1]) {
		t.Fatalf("the window holds client %d's first row", out[0])
	}
	h := withWindow(w)
	h.dropped = []Dropped{
		{Client: int(in[0]), Seq: in[1], Site: primary, At: midAt.Add(time.Second)},
		{Client: int(out[0]), Seq: out[1], Site: primary, At: midAt.Add(time.Second)},
	}
	f, excused := CheckFailovers(h)
	if f.Lost != 1 {
		t.Errorf("of two dropped log rows, one outside the window: %d lost, want 1 (%v)", f.Lost, f.Problems)
	}
	if want := 1 + countIn(sent, w, midAt); excused != want {
		t.Errorf("%d acknowledged transactions excused, want %d", excused, want)
	}

	// the divergence report
	exact := maps.Clone(w.Commits)
	if p := w.checkReport(exact, all, "report"); len(p) != 0 {
		t.Errorf("an exact report has problems: %v", p)
	}
	if p := w.checkReport(nil, all, "report"); len(p) != len(w.Commits) {
		t.Errorf("a missing report: %d problems, want %d", len(p), len(w.Commits))
	}
	extra := maps.Clone(exact)
	extra[1] = mid // xid 1 never commits
	short := maps.Clone(exact)
	for x := range short {
		delete(short, x)
		break
	}
	if p := w.checkReport(extra, all, "report"); len(p) != 1 {
		t.Errorf("a report with a transaction too many: %v", p)
	}
	if p := w.checkReport(short, all, "report"); len(p) != 1 {
		t.Errorf("a report with a transaction left out: %v", p)
	}
}

// countIn counts the acknowledged transfers w holds.
func countIn(sent map[string]Transfer, w LossWindow, start time.Time) int {
	n := 0
	for id, tr := range sent {
		if tr.Outcome == Acked && tr.Site == w.Site && !tr.At.Before(start) && w.holdsTransfer(id) {
			n++
		}
	}
	return n
}
