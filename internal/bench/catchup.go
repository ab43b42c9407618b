package bench

import (
	"context"
	"fmt"
	"math"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/dustin/go-humanize"
)

// pgbenchRep is what one repetition of workload 1 measured.
type pgbenchRep struct {
	nativeRate float64 // txn/s
	walPerTxn  float64 // WAL bytes per pgbench transaction
}

var tpsRE = regexp.MustCompile(`(?m)^tps = ([0-9.]+)`)

// pgbenchBacklog runs the pgbench TPC-B workload on the source with
// synchronous_commit off (it only speeds up building the backlog; the
// decoded changes are the same) and returns the WAL it wrote.
func (e *env) pgbenchBacklog(ctx context.Context, txnsPerClient int) (wal uint64, err error) {
	start, err := e.currentLSN(ctx)
	if err != nil {
		return 0, err
	}
	t0 := time.Now()
	out, err := e.pgbenchCmd(ctx, e.src, "-c synchronous_commit=off", "-n", "-M", "prepared",
		"-c", strconv.Itoa(e.sc.Clients), "-j", "2", "-t", strconv.Itoa(txnsPerClient))
	if err != nil {
		return 0, fmt.Errorf("pgbench: %w\n%s", err, out)
	}
	end, err := e.currentLSN(ctx)
	if err != nil {
		return 0, err
	}
	tps := ""
	if m := tpsRE.FindStringSubmatch(out); m != nil {
		tps = m[1]
	}
	e.progress("  backlog: %s transactions in %.1fs (pgbench tps %s), %s of WAL",
		humanize.Comma(int64(e.sc.Clients*txnsPerClient)), time.Since(t0).Seconds(), tps, humanize.IBytes(end-start))
	return end - start, nil
}

// catchupNative enables the native subscription and returns how long it
// took until marker id was visible on the native target; it disables the
// subscription again.
func (e *env) catchupNative(ctx context.Context, id int) (time.Duration, error) {
	wctx, cancel := context.WithTimeout(ctx, e.sc.Timeout)
	defer cancel()
	cpu := e.watchCPU(true)
	t0 := time.Now()
	if err := e.nativeEnable(ctx, true); err != nil {
		return 0, err
	}
	seen, err := waitMarker(wctx, e.ndst, id)
	if err != nil {
		return 0, fmt.Errorf("native: %w", err)
	}
	e.progress("  native: %s", cpu.report(ctx))
	if err := e.nativeEnable(ctx, false); err != nil {
		return 0, err
	}
	return seen.Sub(t0), nil
}

// xdcrRun is what one timed xdcr catch-up measured.
type xdcrRun struct {
	d   time.Duration // release of the held capture until the marker is visible
	rss map[string]int64
}

// catchupXDCR lets the held capture go and returns how long it took until
// marker m was visible on xdcr's replica, and the agents' peak RSS
// meanwhile. profile names the profiles to take, "" for none.
func (e *env) catchupXDCR(ctx context.Context, m marker, h *hold, profile string) (xdcrRun, error) {
	wctx, cancel := context.WithTimeout(ctx, e.sc.Timeout)
	defer cancel()
	if err := e.startAgent(ctx, e.replica); err != nil {
		return xdcrRun{}, err
	}
	if err := resetPeakRSS(e.c.AgentPID(e.replica)); err != nil {
		e.log.Warn("reset peak RSS", "err", err)
	}
	var prof *profiler
	if profile != "" {
		prof = e.startProfiles(ctx, profile, e.primary, e.replica)
	}
	// when the marker's transaction reached the primary's stream and the
	// replica's mirror of it: where a drain spends its time
	var stages [2]*streamWatch
	for i := range stages {
		w, err := e.watchStream(wctx, i, m.lsn)
		if err != nil {
			return xdcrRun{}, err
		}
		defer w.stop()
		stages[i] = w
	}
	cpu := e.watchCPU(true)
	t0 := time.Now()
	if err := h.release(ctx); err != nil {
		return xdcrRun{}, fmt.Errorf("release the capture: %w", err)
	}
	seen, err := waitMarker(wctx, e.xdst, m.id)
	if err != nil {
		return xdcrRun{}, fmt.Errorf("xdcr: %w; agent logs: %s, %s", err, e.c.LogPath(e.primary), e.c.LogPath(e.replica))
	}
	e.progress("  xdcr: %s", cpu.report(ctx))
	var at [2]string
	for i, w := range stages {
		at[i] = "?"
		if t, ok := w.seen(); ok {
			at[i] = fmt.Sprintf("%.2fs", t.Sub(t0).Seconds())
		}
	}
	e.progress("  xdcr: the last transaction was in %s's stream after %s, in %s's mirror after %s, applied after %.2fs",
		e.srcSite, at[0], e.sites.List[1].Name, at[1], seen.Sub(t0).Seconds())
	// the capture agent was restarted for this drain (armCapture): its counters are the drain's
	if enc, sent, err := e.publishedBytes(ctx); err != nil {
		e.log.Warn("read the capture agent's published bytes", "err", err)
	} else if enc > 0 {
		e.progress("  xdcr: published %s encoded, %s sent (%.0f%%)",
			humanize.IBytes(uint64(enc)), humanize.IBytes(uint64(sent)), 100*sent/enc)
	}
	run := xdcrRun{d: seen.Sub(t0), rss: map[string]int64{}}
	for _, n := range []string{e.primary, e.replica} {
		if v, err := peakRSS(e.c.AgentPID(n)); err == nil {
			run.rss[n] = v
		} else {
			e.log.Warn("read peak RSS", "node", n, "err", err)
		}
	}
	if prof != nil {
		if err := prof.wait(); err != nil {
			e.progress("  profiles: %v", err)
		}
	}
	return run, nil
}

// pgbenchCatchup is workload 1 (and the RSS of workload 4's first half):
// a pgbench backlog built while both systems are stopped, then drained by
// each in turn.
func (e *env) pgbenchCatchup(ctx context.Context, r int, nativeFirst bool) (pgbenchRep, error) {
	ntx := e.sc.Clients * e.sc.TxnsPerClient
	e.progress("pgbench catch-up %d/%d: %s transactions, %s first", r+1, e.o.Reps, humanize.Comma(int64(ntx)), first(nativeFirst))
	h, err := e.holdCapture(ctx)
	if err != nil {
		return pgbenchRep{}, err
	}
	defer h.release(context.WithoutCancel(ctx))
	wal, err := e.pgbenchBacklog(ctx, e.sc.TxnsPerClient)
	if err != nil {
		return pgbenchRep{}, err
	}
	m, err := e.writeMarker(ctx)
	if err != nil {
		return pgbenchRep{}, err
	}
	if err := e.checkpoint(ctx); err != nil {
		return pgbenchRep{}, err
	}
	if err := e.armCapture(ctx, h); err != nil {
		return pgbenchRep{}, err
	}
	profile := ""
	if e.o.ProfileDir != "" && r == 0 {
		profile = "pgbench"
	}
	native, x, err := e.both(ctx, m, nativeFirst, h, profile)
	if err != nil {
		return pgbenchRep{}, err
	}
	nr, xr := float64(ntx)/native.Seconds(), float64(ntx)/x.d.Seconds()
	e.progress("  native %.2fs (%s txn/s), xdcr %.2fs (%s txn/s), xdcr/native %.2f",
		native.Seconds(), humanize.Comma(int64(nr)), x.d.Seconds(), humanize.Comma(int64(xr)), xr/nr)
	e.rep.row("pgbench_catchup", fmt.Sprintf("pgbench catch-up, %s txns (%s WAL)", humanize.Comma(int64(ntx)), humanize.IBytes(wal)),
		"txn/s", true).add(nr, xr)
	e.rep.row("rss_capture_pgbench", "peak RSS, capture agent, pgbench catch-up", "MiB", false).add(-1, mib(x.rss[e.primary]))
	e.rep.row("rss_apply_pgbench", "peak RSS, apply agent, pgbench catch-up", "MiB", false).add(-1, mib(x.rss[e.replica]))
	if err := e.verify(ctx, "pgbench catch-up", e.xdst, e.ndst); err != nil {
		return pgbenchRep{}, err
	}
	if err := e.vacuum(ctx); err != nil {
		return pgbenchRep{}, err
	}
	return pgbenchRep{nativeRate: nr, walPerTxn: float64(wal) / float64(ntx)}, nil
}

// both drains the backlog up to marker m with native replication and with
// xdcr, in the order asked.
func (e *env) both(ctx context.Context, m marker, nativeFirst bool, h *hold, profile string) (native time.Duration, x xdcrRun, err error) {
	for _, n := range order(nativeFirst) {
		if n {
			if native, err = e.catchupNative(ctx, m.id); err != nil {
				return 0, x, err
			}
		} else if x, err = e.catchupXDCR(ctx, m, h, profile); err != nil {
			return 0, x, err
		}
	}
	return native, x, nil
}

func order(nativeFirst bool) []bool {
	if nativeFirst {
		return []bool{true, false}
	}
	return []bool{false, true}
}

func first(nativeFirst bool) string {
	if nativeFirst {
		return "native"
	}
	return "xdcr"
}

// bulkCatchup is workload 2: rows inserted in a few large transactions.
func (e *env) bulkCatchup(ctx context.Context, r int, nativeFirst bool) error {
	rows, txns := e.sc.BulkRows, e.sc.BulkTxns
	e.progress("bulk catch-up %d/%d: %s rows in %d transactions, %s first", r+1, e.o.Reps, humanize.Comma(int64(rows)), txns, first(nativeFirst))
	h, err := e.holdCapture(ctx)
	if err != nil {
		return err
	}
	defer h.release(context.WithoutCancel(ctx))
	start, err := e.currentLSN(ctx)
	if err != nil {
		return err
	}
	per := (rows + txns - 1) / txns
	t0 := time.Now()
	for a := 1; a <= rows; a += per {
		b := min(a+per-1, rows)
		if err := execSQL(ctx, e.src, `INSERT INTO bench_bulk SELECT g, rpad(md5(g::text), 100, md5((g * 7)::text))
			FROM generate_series($1::bigint, $2::bigint) g`, a, b); err != nil {
			return err
		}
	}
	m, err := e.writeMarker(ctx)
	if err != nil {
		return err
	}
	end, err := e.currentLSN(ctx)
	if err != nil {
		return err
	}
	e.progress("  backlog: %s rows in %.1fs, %s of WAL", humanize.Comma(int64(rows)), time.Since(t0).Seconds(), humanize.IBytes(end-start))
	if err := e.checkpoint(ctx); err != nil {
		return err
	}
	if err := e.armCapture(ctx, h); err != nil {
		return err
	}
	profile := ""
	if e.o.ProfileDir != "" && r == 0 {
		profile = "bulk"
	}
	native, x, err := e.both(ctx, m, nativeFirst, h, profile)
	if err != nil {
		return err
	}
	nr, xr := float64(rows)/native.Seconds(), float64(rows)/x.d.Seconds()
	e.progress("  native %.2fs (%s rows/s), xdcr %.2fs (%s rows/s), xdcr/native %.2f",
		native.Seconds(), humanize.Comma(int64(nr)), x.d.Seconds(), humanize.Comma(int64(xr)), xr/nr)
	e.rep.row("bulk_catchup", fmt.Sprintf("bulk catch-up, %s rows in %d txns (%s WAL)", humanize.Comma(int64(rows)), txns, humanize.IBytes(end-start)),
		"rows/s", true).add(nr, xr)
	e.rep.row("rss_capture_bulk", "peak RSS, capture agent, bulk catch-up", "MiB", false).add(-1, mib(x.rss[e.primary]))
	e.rep.row("rss_apply_bulk", "peak RSS, apply agent, bulk catch-up", "MiB", false).add(-1, mib(x.rss[e.replica]))
	if err := e.verify(ctx, "bulk catch-up", e.xdst, e.ndst); err != nil {
		return err
	}
	// empty the table everywhere: xdcr replicates the TRUNCATE, the native
	// publication leaves it out
	if err := execSQL(ctx, e.src, "TRUNCATE bench_bulk"); err != nil {
		return err
	}
	if err := execSQL(ctx, e.ndst, "TRUNCATE bench_bulk"); err != nil {
		return err
	}
	if err := e.waitXDCR(ctx); err != nil {
		return err
	}
	if err := e.waitNative(ctx); err != nil {
		return err
	}
	if err := e.verify(ctx, "bulk reset", e.xdst, e.ndst); err != nil {
		return err
	}
	return e.vacuum(ctx)
}

// waitXDCR writes a marker and waits until xdcr's replica has it, with
// both agents running.
func (e *env) waitXDCR(ctx context.Context) error {
	for _, n := range []string{e.primary, e.replica} {
		if err := e.startAgent(ctx, n); err != nil {
			return err
		}
	}
	m, err := e.writeMarker(ctx)
	if err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, e.sc.Timeout)
	defer cancel()
	if _, err := waitMarker(wctx, e.xdst, m.id); err != nil {
		return fmt.Errorf("xdcr: %w", err)
	}
	return nil
}

// waitNative catches the native target up (untimed) and disables it again.
func (e *env) waitNative(ctx context.Context) error {
	m, err := e.writeMarker(ctx)
	if err != nil {
		return err
	}
	_, err = e.catchupNative(ctx, m.id)
	return err
}

// captureOnly is workload 5: capture and publish alone drain a pgbench
// backlog while the apply agent is held; then apply alone drains the
// replica site's stream.
func (e *env) captureOnly(ctx context.Context, r int, nativeRate float64) error {
	ntx := e.sc.Clients * e.sc.TxnsPerClient
	e.progress("capture alone %d/%d: %s transactions, apply held", r+1, e.o.Reps, humanize.Comma(int64(ntx)))
	ha, err := e.holdApply(ctx)
	if err != nil {
		return err
	}
	defer ha.release(context.WithoutCancel(ctx))
	hc, err := e.holdCapture(ctx)
	if err != nil {
		return err
	}
	defer hc.release(context.WithoutCancel(ctx))
	if _, err := e.pgbenchBacklog(ctx, e.sc.TxnsPerClient); err != nil {
		return err
	}
	m, err := e.writeMarker(ctx)
	if err != nil {
		return err
	}
	if err := e.checkpoint(ctx); err != nil {
		return err
	}
	if err := e.armCapture(ctx, hc); err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, e.sc.Timeout)
	defer cancel()
	w, err := e.watchStream(wctx, 0, m.lsn)
	if err != nil {
		return err
	}
	t0 := time.Now()
	if err := hc.release(ctx); err != nil {
		w.stop()
		return err
	}
	published, err := w.wait(wctx)
	if err != nil {
		return fmt.Errorf("capture: %w; agent log %s", err, e.c.LogPath(e.primary))
	}
	dc := published.Sub(t0)
	rss, _ := peakRSS(e.c.AgentPID(e.primary))
	// the replica site's mirror holds the backlog now (or soon): apply alone
	t1 := time.Now()
	if err := ha.release(ctx); err != nil {
		return err
	}
	seen, err := waitMarker(wctx, e.xdst, m.id)
	if err != nil {
		return fmt.Errorf("apply: %w; agent log %s", err, e.c.LogPath(e.replica))
	}
	da := seen.Sub(t1)
	cr, ar := float64(ntx)/dc.Seconds(), float64(ntx)/da.Seconds()
	e.progress("  capture+publish %.2fs (%s txn/s), then apply alone %.2fs (%s txn/s); native catch-up of workload 1: %s txn/s",
		dc.Seconds(), humanize.Comma(int64(cr)), da.Seconds(), humanize.Comma(int64(ar)), humanize.Comma(int64(nativeRate)))
	e.rep.row("capture_alone", "capture+publish alone, pgbench backlog (native: its catch-up)", "txn/s", true).add(nativeRate, cr)
	e.rep.row("apply_alone", "then apply alone from the local mirror (native: its catch-up)", "txn/s", true).add(nativeRate, ar)
	e.rep.row("rss_capture_alone", "peak RSS, capture agent, capture alone", "MiB", false).add(-1, mib(rss))
	if err := e.waitNative(ctx); err != nil {
		return err
	}
	if err := e.verify(ctx, "capture alone", e.xdst, e.ndst); err != nil {
		return err
	}
	return e.vacuum(ctx)
}

// memory is workload 4 at its full size: the agents' peak RSS while they
// drain a pgbench backlog of about Scale.MemoryWAL of WAL.
func (e *env) memory(ctx context.Context, walPerTxn float64) error {
	if walPerTxn <= 0 {
		walPerTxn = 640 // measured for pgbench TPC-B with the history key
	}
	ntx := int(math.Ceil(float64(e.sc.MemoryWAL) / walPerTxn))
	per := (ntx + e.sc.Clients - 1) / e.sc.Clients
	e.progress("memory: a backlog of about %s of WAL (%s transactions)", humanize.IBytes(uint64(e.sc.MemoryWAL)), humanize.Comma(int64(per*e.sc.Clients)))
	h, err := e.holdCapture(ctx)
	if err != nil {
		return err
	}
	defer h.release(context.WithoutCancel(ctx))
	wal, err := e.pgbenchBacklog(ctx, per)
	if err != nil {
		return err
	}
	m, err := e.writeMarker(ctx)
	if err != nil {
		return err
	}
	if err := e.checkpoint(ctx); err != nil {
		return err
	}
	if err := e.armCapture(ctx, h); err != nil {
		return err
	}
	x, err := e.catchupXDCR(ctx, m, h, "")
	if err != nil {
		return err
	}
	e.progress("  xdcr drained %s of WAL in %.1fs (%s txn/s); peak RSS capture agent %.0f MiB, apply agent %.0f MiB",
		humanize.IBytes(wal), x.d.Seconds(), humanize.Comma(int64(float64(per*e.sc.Clients)/x.d.Seconds())),
		mib(x.rss[e.primary]), mib(x.rss[e.replica]))
	e.rep.row("rss_capture_memory", fmt.Sprintf("peak RSS, capture agent, %s WAL backlog", humanize.IBytes(wal)), "MiB", false).add(-1, mib(x.rss[e.primary]))
	e.rep.row("rss_apply_memory", fmt.Sprintf("peak RSS, apply agent, %s WAL backlog", humanize.IBytes(wal)), "MiB", false).add(-1, mib(x.rss[e.replica]))
	e.rep.row("memory_catchup", fmt.Sprintf("xdcr catch-up of the %s WAL backlog", humanize.IBytes(wal)), "txn/s", true).
		add(-1, float64(per*e.sc.Clients)/x.d.Seconds())
	if err := e.waitNative(ctx); err != nil {
		return err
	}
	if err := e.verify(ctx, "memory", e.xdst, e.ndst); err != nil {
		return err
	}
	return e.vacuum(ctx)
}

// peakRSS reads VmHWM (bytes) of a process.
func peakRSS(pid int) (int64, error) {
	if pid == 0 {
		return 0, fmt.Errorf("process not running")
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			f := strings.Fields(v)
			if len(f) == 0 {
				break
			}
			kb, err := strconv.ParseInt(f[0], 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no VmHWM in /proc/%d/status", pid)
}

// resetPeakRSS resets a process's VmHWM to its current RSS
// (proc(5): clear_refs, value 5).
func resetPeakRSS(pid int) error {
	if pid == 0 {
		return nil
	}
	return os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0)
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }
