package bench

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/jackc/pgx/v5"
)

// steady is workload 3 at one rate: pgbench at a fixed offered rate (open
// loop, synchronous commits) while one system replicates, and the lag of
// every transaction from its commit on the source
// (pg_xact_commit_timestamp) to its apply on the target (an ENABLE ALWAYS
// trigger stamps clock_timestamp(); xdcr applies with
// session_replication_role = replica, where only such triggers fire). The
// other system is stopped meanwhile.
func (e *env) steady(ctx context.Context, r, rate int, nativeFirst bool) error {
	e.progress("steady state %d/%d at %d txn/s for %s, %s first", r+1, e.o.Reps, rate, e.sc.Duration, first(nativeFirst))
	for _, native := range order(nativeFirst) {
		var (
			l   lagStats
			err error
		)
		if native {
			l, err = e.steadyNative(ctx, rate)
		} else {
			l, err = e.steadyXDCR(ctx, rate)
		}
		if err != nil {
			return err
		}
		name := "xdcr"
		if native {
			name = "native"
		}
		e.progress("  %s: achieved %.0f txn/s, %d samples, lag p50 %.2f ms, p99 %.2f ms, p99.9 %.2f ms, max %.1f ms",
			name, l.tps, l.n, l.p50, l.p99, l.p999, l.max)
		for _, m := range []struct {
			stat string
			v    float64
		}{{"p50", l.p50}, {"p99", l.p99}, {"max", l.max}} {
			row := e.rep.row(fmt.Sprintf("lag_%d_%s", rate, m.stat),
				fmt.Sprintf("steady %s txn/s, commit→applied lag %s", humanize.Comma(int64(rate)), m.stat), "ms", false)
			if native {
				row.Native = append(row.Native, m.v)
			} else {
				row.XDCR = append(row.XDCR, m.v)
			}
		}
	}
	for _, stat := range []string{"p50", "p99", "max"} {
		row := e.rep.row(fmt.Sprintf("lag_%d_%s", rate, stat), "", "", false)
		if n := len(row.Native); n > 0 && len(row.XDCR) == n && row.Native[n-1] > 0 {
			row.Ratios = append(row.Ratios, row.XDCR[n-1]/row.Native[n-1])
		}
	}
	// the system measured first is behind by the second one's load
	if err := e.waitXDCR(ctx); err != nil {
		return err
	}
	if err := e.waitNative(ctx); err != nil {
		return err
	}
	if err := e.verify(ctx, fmt.Sprintf("steady state at %d txn/s", rate), e.xdst, e.ndst); err != nil {
		return err
	}
	return e.vacuum(ctx)
}

func (e *env) steadyNative(ctx context.Context, rate int) (lagStats, error) {
	if err := e.stopAgent(ctx, e.primary); err != nil {
		return lagStats{}, err
	}
	if err := e.nativeEnable(ctx, true); err != nil {
		return lagStats{}, err
	}
	// catch up with what xdcr-only phases wrote, then measure
	if err := e.catchUp(ctx, e.ndst); err != nil {
		return lagStats{}, err
	}
	l, err := e.measureLag(ctx, e.ndst, rate, nil)
	if err != nil {
		return l, err
	}
	return l, e.nativeEnable(ctx, false)
}

func (e *env) steadyXDCR(ctx context.Context, rate int) (lagStats, error) {
	for _, n := range []string{e.primary, e.replica} {
		if err := e.startAgent(ctx, n); err != nil {
			return lagStats{}, err
		}
	}
	if err := e.catchUp(ctx, e.xdst); err != nil {
		return lagStats{}, err
	}
	var prof *profiler
	if e.o.ProfileDir != "" {
		prof = e.startProfiles(ctx, fmt.Sprintf("steady%d", rate), e.primary, e.replica)
	}
	var trace *stageTrace
	if e.o.Stages {
		var err error
		if trace, err = e.traceStages(ctx); err != nil {
			return lagStats{}, err
		}
		defer trace.close()
	}
	l, err := e.measureLag(ctx, e.xdst, rate, trace)
	if prof != nil {
		if perr := prof.wait(); perr != nil {
			e.progress("  profiles: %v", perr)
		}
	}
	return l, err
}

// catchUp writes a marker and waits until target has it.
func (e *env) catchUp(ctx context.Context, target string) error {
	m, err := e.writeMarker(ctx)
	if err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, e.sc.Timeout)
	defer cancel()
	_, err = waitMarker(wctx, target, m.id)
	return err
}

type lagStats struct {
	n                   int
	tps                 float64
	p50, p99, p999, max float64 // ms
}

// measureLag runs pgbench at rate against the source while target
// replicates, and computes the lag of every transaction committed after
// the warm-up; with a trace, it also says how that lag splits between the
// stages.
func (e *env) measureLag(ctx context.Context, target string, rate int, trace *stageTrace) (lagStats, error) {
	if err := execSQL(ctx, target, "ALTER TABLE pgbench_history ENABLE ALWAYS TRIGGER stamp_applied"); err != nil {
		return lagStats{}, err
	}
	defer func() {
		if err := execSQL(context.WithoutCancel(ctx), target, "ALTER TABLE pgbench_history DISABLE TRIGGER stamp_applied"); err != nil {
			e.log.Warn("disable the apply stamp", "err", err)
		}
	}()
	h0, err := queryInt(ctx, e.src, "SELECT coalesce(max(hid), 0) FROM pgbench_history")
	if err != nil {
		return lagStats{}, err
	}
	start := time.Now()
	cpu := e.watchCPU(false)
	out, err := e.pgbenchCmd(ctx, e.src, "", "-n", "-M", "prepared", "-c", strconv.Itoa(e.sc.Clients), "-j", "2",
		"-R", strconv.Itoa(rate), "-T", strconv.Itoa(int(e.sc.Duration.Seconds())))
	if err != nil {
		return lagStats{}, fmt.Errorf("pgbench: %w\n%s", err, out)
	}
	e.progress("  %s", cpu.report(ctx))
	l := lagStats{}
	if m := tpsRE.FindStringSubmatch(out); m != nil {
		l.tps, _ = strconv.ParseFloat(m[1], 64)
	}
	if err := e.catchUp(ctx, target); err != nil {
		return l, err
	}
	commits, err := hidTimes(ctx, e.src, "pg_xact_commit_timestamp(xmin)", h0)
	if err != nil {
		return l, err
	}
	applied, err := hidTimes(ctx, target, "applied_at", h0)
	if err != nil {
		return l, err
	}
	if len(applied) != len(commits) {
		return l, fmt.Errorf("the target has %d of the %d history rows the source committed", len(applied), len(commits))
	}
	from := start.Add(e.sc.Warmup)
	lags := make([]float64, 0, len(commits))
	var traced [2][]time.Time // commit and apply times after the warm-up
	for hid, c := range commits {
		a, ok := applied[hid]
		if !ok {
			return l, fmt.Errorf("history row %d is missing on the target", hid)
		}
		if a.IsZero() {
			return l, fmt.Errorf("history row %d on the target has no applied_at: the trigger did not fire", hid)
		}
		if c.Before(from) {
			continue
		}
		lags = append(lags, float64(a.Sub(c).Microseconds())/1000)
		traced[0], traced[1] = append(traced[0], c), append(traced[1], a)
	}
	if trace != nil {
		e.progress("  %s", trace.stages(traced[0], traced[1], e.srcSite, e.sites.List[1].Name))
	}
	if len(lags) == 0 {
		return l, fmt.Errorf("no transaction committed after the %s warm-up", e.sc.Warmup)
	}
	slices.Sort(lags)
	l.n = len(lags)
	l.p50, l.p99, l.p999, l.max = percentile(lags, 0.5), percentile(lags, 0.99), percentile(lags, 0.999), lags[len(lags)-1]
	return l, nil
}

// hidTimes reads a timestamp per pgbench_history row after hid h0.
func hidTimes(ctx context.Context, dsn, expr string, h0 int64) (map[int64]time.Time, error) {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return nil, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	rows, err := conn.Query(ctx, "SELECT hid, "+expr+" FROM pgbench_history WHERE hid > $1", h0)
	if err != nil {
		return nil, err
	}
	out := make(map[int64]time.Time)
	for rows.Next() {
		var (
			hid int64
			t   *time.Time
		)
		if err := rows.Scan(&hid, &t); err != nil {
			return nil, err
		}
		if t != nil {
			out[hid] = *t
		} else {
			out[hid] = time.Time{}
		}
	}
	return out, rows.Err()
}

// percentile of sorted values, interpolated linearly between the closest
// ranks (as percentile_cont).
func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	pos := p * float64(len(sorted)-1)
	i := int(pos)
	if i+1 >= len(sorted) {
		return sorted[len(sorted)-1]
	}
	return sorted[i] + (pos-float64(i))*(sorted[i+1]-sorted[i])
}
