package chaos

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jedib0t/go-pretty/v6/table"

	"github.com/xdcr/xdcr/internal/wait"
)

// Plan is a schedule of faults.
type Plan struct {
	// Nemeses to draw from.
	Nemeses []Nemesis
	// Duration of a random schedule; zero runs each nemesis once, in
	// order.
	Duration time.Duration
	// Seed makes the random choices (schedule, victims, transfers)
	// repeatable.
	Seed uint64
	// Quiet is the time between one fault's heal and the next fault.
	Quiet time.Duration
	// Clients of each workload.
	Clients int
	// Converge bounds the wait for every site to match the primary after
	// the last fault.
	Converge time.Duration
	// Progress, when set, gets a line per fault.
	Progress func(format string, args ...any)
}

// Report is what a run did and found.
type Report struct {
	Seed     uint64
	Ran      time.Duration
	Faults   map[string]int // by nemesis
	Acked    int            // transfers acknowledged
	InDoubt  int            // transfers whose outcome the client never learned
	Events   int            // log rows acknowledged
	Samples  int            // prefix samples taken on replicas
	Failed   int            // samples that could not be taken (site down)
	Converge time.Duration  // from the last heal until every site matched the primary
	// Windowed are acknowledged transactions (transfers and log rows) that
	// forced failovers lost in their loss windows, as DESIGN.md allows.
	Windowed int
	Windows  []LossWindow
	Findings
}

// Run starts the workloads, runs the plan's faults while they write, heals,
// waits for every site to match the primary row for row, and checks every
// site against what the clients were told. An error means the run itself
// could not go on (a fault could not be injected or healed, or the
// cluster never converged); Findings say whether the guarantees held.
func Run(ctx context.Context, e *Env, p Plan) (*Report, error) {
	if p.Clients == 0 {
		p.Clients = 4
	}
	if p.Quiet == 0 {
		p.Quiet = 3 * time.Second
	}
	if p.Converge == 0 {
		p.Converge = 3 * time.Minute
	}
	progress := p.Progress
	if progress == nil {
		progress = func(string, ...any) {}
	}
	e.logf = progress
	rng := rand.New(rand.NewPCG(p.Seed, 0x5eed))
	rep := &Report{Seed: p.Seed, Faults: map[string]int{}}
	start := time.Now()

	hist := newHistory()
	cl := &clients{primary: e.Primary, hist: hist, op: 5 * time.Second}
	sampler := &Sampler{Replicas: e.Replicas, Interval: 300 * time.Millisecond}
	wctx, stopWrites := context.WithCancel(ctx)
	defer stopWrites()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); cl.run(wctx, p.Clients, p.Seed) }()
	go func() { defer wg.Done(); sampler.Run(wctx) }()

	runErr := schedule(ctx, e, p, rng, rep, progress)
	lastHeal := time.Now()
	// the clients write on a little after the last heal, so that the
	// stream carries new changes over the healed path
	_ = wait.Sleep(ctx, p.Quiet)
	stopWrites()
	wg.Wait()
	rep.Acked, rep.InDoubt, rep.Events = hist.Counts()
	if runErr != nil {
		return rep, runErr
	}

	progress("writes stopped: %d transfers acknowledged, %d in doubt, %d log rows; waiting for every site to match the primary", rep.Acked, rep.InDoubt, rep.Events)
	primary, err := waitConverged(ctx, e, p.Converge, progress)
	rep.Converge = time.Since(lastHeal)
	if err != nil {
		return rep, err
	}
	sf, samples, failed := sampler.Result()
	rep.Samples, rep.Failed = samples, failed
	rep.Merge(sf)
	rep.Windows = e.LossWindows()
	for i, w := range rep.Windows {
		rep.Windows[i].AckedAfterStart = hist.ackedBy(w.Site, w.Start)
	}
	hist.AddWindows(rep.Windows...)
	ff, windowed := CheckFailovers(hist)
	rep.Windowed = windowed
	rep.Merge(ff)
	for _, s := range e.Cluster.Config.SiteNames() {
		f, err := CheckSite(ctx, s, e.Cluster.DSN(s), hist)
		if err != nil {
			return rep, err
		}
		rep.Merge(f)
	}
	rep.Ran = time.Since(start)
	progress("converged on primary %s %s after the last heal; checked every site", primary, rep.Converge.Round(time.Millisecond))
	return rep, nil
}

// schedule injects and heals the faults of p.
func schedule(ctx context.Context, e *Env, p Plan, rng *rand.Rand, rep *Report, progress func(string, ...any)) error {
	if err := wait.Sleep(ctx, p.Quiet); err != nil {
		return err
	}
	deadline := time.Now().Add(p.Duration)
	for i := 0; ; i++ {
		var n Nemesis
		if p.Duration == 0 {
			if i == len(p.Nemeses) {
				return nil
			}
			n = p.Nemeses[i]
		} else {
			if time.Now().After(deadline) {
				return nil
			}
			n = p.Nemeses[rng.IntN(len(p.Nemeses))]
		}
		if err := waitPrimary(ctx, e); err != nil {
			return fmt.Errorf("before %s: %w", n.Name, err)
		}
		what, heal, err := n.Inject(ctx, e, rng)
		if err != nil {
			return fmt.Errorf("inject %s: %w", n.Name, err)
		}
		rep.Faults[n.Name]++
		progress("fault %d: %s: %s", i+1, n.Name, what)
		if err := heal(context.WithoutCancel(ctx)); err != nil {
			return fmt.Errorf("heal %s (%s): %w", n.Name, what, err)
		}
		progress("healed: %s", n.Name)
		if err := wait.Sleep(ctx, p.Quiet); err != nil {
			return err
		}
	}
}

// waitPrimary waits until the cluster names a primary again (after a
// Raft leader's death, say), so that the next nemesis can pick its victim.
func waitPrimary(ctx context.Context, e *Env) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		if _, _, err := e.Primary(ctx); err == nil {
			return nil
		}
		if err := wait.Sleep(ctx, 200*time.Millisecond); err != nil {
			return errors.New("no node named a primary for a minute")
		}
	}
}

// waitConverged waits until every site holds what the primary holds, row
// for row, in every table, and returns the primary. Every 10 s it tells
// progress what still differs.
func waitConverged(ctx context.Context, e *Env, timeout time.Duration, progress func(string, ...any)) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for said := time.Now(); ; {
		if last != nil && time.Since(said) >= 10*time.Second {
			progress("not converged yet: %v", last)
			said = time.Now()
		}
		primary, _, err := e.Primary(ctx)
		if err == nil {
			if last = differs(ctx, e, primary); last == nil {
				return primary, nil
			}
		} else {
			last = err
		}
		if wait.Sleep(ctx, time.Second) != nil {
			return "", fmt.Errorf("the sites did not match the primary within %s: %w", timeout, last)
		}
	}
}

// differs returns the first difference between a site and the primary.
func differs(ctx context.Context, e *Env, primary string) error {
	for _, t := range Tables {
		want, err := e.Cluster.TableChecksum(ctx, primary, t)
		if err != nil {
			return err
		}
		for _, s := range e.Cluster.Config.SiteNames() {
			got, err := e.Cluster.TableChecksum(ctx, s, t)
			if err != nil {
				return err
			}
			if got != want {
				return fmt.Errorf("%s on %s: %d rows (md5 %s), primary %s has %d (md5 %s)", t, s, got.Rows, got.MD5, primary, want.Rows, want.MD5)
			}
		}
	}
	return nil
}

// Table renders the report as the summary `make chaos` prints.
func (r *Report) Table() string {
	tw := table.NewWriter()
	tw.SetTitle(fmt.Sprintf("chaos run, seed %d, %s", r.Seed, r.Ran.Round(time.Second)))
	tw.AppendHeader(table.Row{"WHAT", "COUNT", "MUST BE"})
	for _, k := range slices.Sorted(maps.Keys(r.Faults)) {
		tw.AppendRow(table.Row{"fault: " + k, r.Faults[k], ""})
	}
	tw.AppendSeparator()
	tw.AppendRow(table.Row{"transfers acknowledged", r.Acked, ""})
	tw.AppendRow(table.Row{"transfers in doubt (connection lost at commit)", r.InDoubt, ""})
	tw.AppendRow(table.Row{"log rows acknowledged", r.Events, ""})
	tw.AppendRow(table.Row{"prefix samples on replicas (failed: site down)", fmt.Sprintf("%d (%d)", r.Samples, r.Failed), ""})
	if len(r.Windows) > 0 {
		tw.AppendRow(table.Row{"acknowledged, lost in a forced failover's loss window", r.Windowed, ""})
	}
	tw.AppendSeparator()
	tw.AppendRow(table.Row{"lost", r.Lost, 0})
	tw.AppendRow(table.Row{"duplicated", r.Duplicated, 0})
	tw.AppendRow(table.Row{"prefix violations", r.PrefixViolations, 0})
	if len(r.Windows) > 0 {
		tw.AppendRow(table.Row{"divergence report errors", r.ReportErrors, 0})
	}
	tw.AppendRow(table.Row{"time to converge after the last fault", r.Converge.Round(100 * time.Millisecond).String(), ""})
	var b strings.Builder
	b.WriteString(tw.Render())
	b.WriteString("\n")
	for _, w := range r.Windows {
		b.WriteString("  loss window: " + w.String() + "\n")
	}
	for _, p := range r.Problems {
		b.WriteString("  " + p + "\n")
	}
	return b.String()
}
