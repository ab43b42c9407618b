// Package bench measures xdcr against PostgreSQL's own logical replication
// on the same machine, in the same run (`xdcr bench`, `make bench`).
//
// It stands up two local sites (deploy/local: a PostgreSQL cluster and a
// NATS server with JetStream fsyncing before every acknowledgement, each)
// and an xdcr cluster on them (deploy/topology: the agents run as separate
// processes of the xdcr binary). The source database is dc-a's; xdcr
// applies it to dc-b's database of the same name, and a native
// subscription in another database of dc-b (`native`) applies the same
// publication. Both read the same WAL through their own slots, so every
// backlog is built once and drained by each in turn, in alternating order.
//
// Workloads (sizes per [Scale]):
//
//   - pgbench: a TPC-B backlog built while replication is stopped, then
//     timed until a marker row written after it is visible on the target;
//   - bulk: rows inserted in a few large transactions, timed the same way;
//   - steady: pgbench at fixed rates, lag of every transaction from its
//     source commit to its apply on the target;
//   - memory: peak RSS of each agent while it drains a large backlog;
//   - capture: capture and publish alone (no apply agent) draining the
//     pgbench backlog;
//   - sync: `xdcr sync` of two tables against `pg_dump | psql`.
//
// After every repetition the source and both targets are compared (row
// counts, key sums and a hash of every row); a difference fails the run.
// Timings are reported, never asserted.
package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"slices"
	"strings"
	"time"
)

// Workload names, in the order they run.
const (
	WPgbench = "pgbench"
	WBulk    = "bulk"
	WSteady  = "steady"
	WMemory  = "memory"
	WCapture = "capture"
	WSync    = "sync"
)

// Workloads lists every workload in run order.
var workloads = []string{WPgbench, WBulk, WSteady, WCapture, WMemory, WSync}

// Workloads returns every workload name in run order.
func Workloads() []string { return slices.Clone(workloads) }

// Options configure one benchmark run.
type Options struct {
	// Scale is tiny, small or full (see [Scale]).
	Scale string
	// Reps is the number of repetitions of each workload (at least 1).
	Reps int
	// Binary is the xdcr executable the agents run as.
	Binary string
	// Dir holds the sites, the cluster and the logs; it must exist.
	Dir string
	// Only restricts the run to these workloads; empty runs all.
	Only []string
	// ProfileDir, when set, makes the run also take CPU and allocation
	// profiles of the agents (and of this process, which hosts the NATS
	// servers) while they drain the pgbench and bulk backlogs, and write
	// them there.
	ProfileDir string
	// Rates, when set, replaces the scale's offered rates of the steady
	// workload (transactions per second).
	Rates []int
	// Stages makes each steady run of xdcr also follow the primary's
	// stream on both sites and split every transaction's lag at the
	// stream and the mirror. It costs the NATS servers CPU (two more
	// consumers of every message) and so adds a little to what it
	// measures.
	Stages bool
	// Progress receives one line per step (stderr).
	Progress io.Writer
	// Logger receives the servers' and agents' lifecycle events.
	Logger *slog.Logger
}

// Scale sizes every workload.
type Scale struct {
	Name string
	// pgbench
	PgbenchScale  int // pgbench -i -s
	Clients       int
	TxnsPerClient int
	// bulk
	BulkRows int
	BulkTxns int
	// steady state
	Rates    []int
	Duration time.Duration
	Warmup   time.Duration
	// memory: the WAL the backlog should reach
	MemoryWAL int64
	// sync: bytes over both tables
	SyncBytes int64
	// SharedBuffers for both clusters
	SharedBuffers string
	// Timeout bounds every wait for replication.
	Timeout time.Duration
	// ProfileSeconds is how long profiles are taken (with ProfileDir).
	ProfileSeconds int
}

// Scales returns the known scales.
func Scales() map[string]Scale {
	return map[string]Scale{
		"tiny": {
			Name: "tiny", PgbenchScale: 1, Clients: 2, TxnsPerClient: 1000,
			BulkRows: 20_000, BulkTxns: 10,
			Rates: []int{500, 1500}, Duration: 4 * time.Second, Warmup: time.Second,
			MemoryWAL: 8 << 20, SyncBytes: 8 << 20, SharedBuffers: "128MB", Timeout: 2 * time.Minute, ProfileSeconds: 3,
		},
		"small": {
			Name: "small", PgbenchScale: 10, Clients: 4, TxnsPerClient: 10_000,
			BulkRows: 200_000, BulkTxns: 10,
			Rates: []int{500, 1500}, Duration: 20 * time.Second, Warmup: 3 * time.Second,
			MemoryWAL: 128 << 20, SyncBytes: 200 << 20, SharedBuffers: "1GB", Timeout: 5 * time.Minute, ProfileSeconds: 8,
		},
		"full": {
			Name: "full", PgbenchScale: 10, Clients: 4, TxnsPerClient: 50_000,
			BulkRows: 1_000_000, BulkTxns: 10,
			Rates: []int{500, 1500}, Duration: 60 * time.Second, Warmup: 5 * time.Second,
			MemoryWAL: 1 << 30, SyncBytes: 2 << 30, SharedBuffers: "1GB", Timeout: 45 * time.Minute, ProfileSeconds: 20,
		},
	}
}

// Row is one line of the report: a measurement of both systems, one value
// per repetition.
type Row struct {
	Name  string // machine name, e.g. pgbench_catchup
	Title string // what was measured
	Unit  string
	// Higher says whether a higher value is better (throughput) or a
	// lower one (lag, memory).
	Higher bool
	Native []float64 // empty when native has no counterpart
	XDCR   []float64
	// Ratios are xdcr/native per repetition, when both ran in it.
	Ratios []float64
}

// Report is the result of a run.
type Report struct {
	Scale    Scale
	Reps     int
	Started  time.Time
	Duration time.Duration
	CPUs     int
	Versions string
	// LoadStart and LoadEnd are /proc/loadavg at the start and the end;
	// RepLoads the 1-minute load average at the start of each repetition.
	LoadStart, LoadEnd string
	RepLoads           []string
	Rows               []*Row
	Notes              []string
}

func (r *Report) row(name, title, unit string, higher bool) *Row {
	for _, x := range r.Rows {
		if x.Name == name {
			return x
		}
	}
	x := &Row{Name: name, Title: title, Unit: unit, Higher: higher}
	r.Rows = append(r.Rows, x)
	return x
}

// add records one repetition's pair of values; native < 0 means none.
func (x *Row) add(native, xdcr float64) {
	x.XDCR = append(x.XDCR, xdcr)
	if native >= 0 {
		x.Native = append(x.Native, native)
		if native > 0 {
			x.Ratios = append(x.Ratios, xdcr/native)
		}
	}
}

// Run runs the benchmark. It fails when anything does not work, including
// a target that differs from the source after a repetition.
func Run(ctx context.Context, o Options) (*Report, error) {
	sc, ok := Scales()[o.Scale]
	if !ok {
		return nil, fmt.Errorf("unknown scale %q: want tiny, small or full", o.Scale)
	}
	if o.Reps < 1 {
		return nil, fmt.Errorf("reps %d: want at least 1", o.Reps)
	}
	for _, w := range o.Only {
		if !slices.Contains(workloads, w) {
			return nil, fmt.Errorf("unknown workload %q (have %s)", w, strings.Join(workloads, ", "))
		}
	}
	for _, r := range o.Rates {
		if r < 1 {
			return nil, fmt.Errorf("steady rate %d: want at least 1 transaction per second", r)
		}
	}
	if len(o.Rates) > 0 {
		sc.Rates = o.Rates
	}
	if o.Binary == "" {
		return nil, errors.New("no xdcr binary for the agents")
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.ProfileDir != "" {
		if err := os.MkdirAll(o.ProfileDir, 0o755); err != nil {
			return nil, fmt.Errorf("profile dir: %w", err)
		}
	}
	rep := &Report{Scale: sc, Reps: o.Reps, Started: time.Now(), CPUs: runtime.NumCPU(), LoadStart: loadavg()}
	e, err := setup(ctx, o, sc, rep)
	if err != nil {
		return nil, err
	}
	defer e.close()
	run := func(w string) bool { return len(o.Only) == 0 || slices.Contains(o.Only, w) }
	var pg []pgbenchRep // workload 1 results, for workloads 4 and 5
	for r := range o.Reps {
		rep.RepLoads = append(rep.RepLoads, load1())
		nativeFirst := r%2 == 0
		if run(WPgbench) || run(WCapture) {
			res, err := e.pgbenchCatchup(ctx, r, nativeFirst)
			if err != nil {
				return nil, fmt.Errorf("pgbench catch-up, repetition %d: %w", r+1, err)
			}
			pg = append(pg, res)
		}
		if run(WBulk) {
			if err := e.bulkCatchup(ctx, r, nativeFirst); err != nil {
				return nil, fmt.Errorf("bulk catch-up, repetition %d: %w", r+1, err)
			}
		}
		if run(WSteady) {
			for _, rate := range sc.Rates {
				if err := e.steady(ctx, r, rate, nativeFirst); err != nil {
					return nil, fmt.Errorf("steady state at %d txn/s, repetition %d: %w", rate, r+1, err)
				}
			}
		}
		if run(WCapture) {
			var native float64 = -1
			if r < len(pg) {
				native = pg[r].nativeRate
			}
			if err := e.captureOnly(ctx, r, native); err != nil {
				return nil, fmt.Errorf("capture alone, repetition %d: %w", r+1, err)
			}
		}
	}
	if run(WMemory) {
		var walPerTxn float64
		for _, p := range pg {
			walPerTxn = max(walPerTxn, p.walPerTxn)
		}
		if err := e.memory(ctx, walPerTxn); err != nil {
			return nil, fmt.Errorf("memory: %w", err)
		}
	}
	if run(WSync) {
		for r := range o.Reps {
			if err := e.syncBench(ctx, r, r%2 == 0); err != nil {
				return nil, fmt.Errorf("sync, repetition %d: %w", r+1, err)
			}
		}
	}
	rep.LoadEnd = loadavg()
	rep.Duration = time.Since(rep.Started)
	return rep, nil
}

// loadavg returns the first three fields of /proc/loadavg.
func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return strings.TrimSpace(string(b))
	}
	return strings.Join(f[:3], " ")
}

func load1() string {
	f := strings.Fields(loadavg())
	if len(f) == 0 {
		return "unknown"
	}
	return f[0]
}
