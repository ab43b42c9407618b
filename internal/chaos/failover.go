package chaos

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/xdcr/xdcr/deploy/topology"
	"github.com/xdcr/xdcr/internal/agent"
	"github.com/xdcr/xdcr/internal/config"
	"github.com/xdcr/xdcr/internal/wait"
	"github.com/xdcr/xdcr/replicator"
	"github.com/xdcr/xdcr/replicator/change"
)

// A LossWindow is what one forced failover was allowed to lose, and what
// the old primary did commit in it. DESIGN.md: a forced failover may lose
// the transactions the old primary committed after the last one the new
// primary applied (Handoff, which `xdcr promote --force` reports). The
// clients write to the old primary's PostgreSQL directly, not through the
// WAN, so the old primary acknowledges transactions after the cut until
// its lease runs out and it fences itself: those are lost, legitimately.
//
// A missing acknowledged transaction is excused only when all of this
// holds: it was acknowledged by Site, no earlier than Start, and its row
// on Site was written by a transaction whose commit record lies after
// Handoff in Site's WAL (read with pg_walinspect; the commit LSN is the
// position the change stream orders transactions by). Anything else
// missing is a real loss. Before the cut, the nemesis read Site's WAL
// position (Barrier) and waited until every replica had applied past it,
// so every transaction acknowledged before Start must survive whatever
// the failover does, and Handoff must not be below Barrier.
type LossWindow struct {
	Site       string     // the old primary
	Epoch      uint64     // the epoch that ended
	NewPrimary string     // the site promoted
	Start      time.Time  // when the nemesis read Barrier, just before the cut
	Barrier    change.LSN // Site's WAL position at Start, applied by every replica before the cut
	Cut        change.LSN // Site's WAL position right after the cut: nothing at or after it can have left the site
	CutAt      time.Time  // when the cut was made
	Handoff    change.LSN // the last commit of Site the new primary applied
	// Commits are the workloads' transactions Site committed after
	// Handoff: xid -> commit LSN.
	Commits map[uint32]change.LSN
	// ReportProblems are what Site's divergence report got wrong about
	// Commits.
	ReportProblems []string
	// AckedAfterStart counts the transfers clients had acknowledged by
	// Site since Start (Run fills it in).
	AckedAfterStart int

	transfers map[string]uint32   // transfer id -> xid, of the rows Commits wrote
	events    map[[2]int64]uint32 // (client, seq) -> xid
}

func (w LossWindow) holdsTransfer(id string) bool {
	_, ok := w.transfers[id]
	return ok
}

func (w LossWindow) holdsEvent(client int, seq int64) bool {
	_, ok := w.events[[2]int64{int64(client), seq}]
	return ok
}

// String summarises the window.
func (w LossWindow) String() string {
	s := fmt.Sprintf("%s -> %s, epoch %d: %s committed %d transactions of the workloads after the handoff %s (%d transfers, %d log rows)",
		w.Site, w.NewPrimary, w.Epoch, w.Site, len(w.Commits), w.Handoff, len(w.transfers), len(w.events))
	if w.AckedAfterStart > 0 {
		s += fmt.Sprintf("; clients had %d transfers acknowledged by it from the barrier on (just before the cut)", w.AckedAfterStart)
	}
	return s
}

// partitionPrimary cuts the primary's site off from every other site
// (leaf, Raft and HTTP links), fails over with `xdcr promote --force` to
// the replica that applied the most, reads what the old primary committed
// in the loss window, heals, and brings the old primary back the way
// DESIGN.md says: it sees the new epoch, stays fenced, writes a divergence
// report, and is re-seeded with `xdcr sync`. The clients go on writing to
// the old primary's database (they reach it directly) until it fences
// itself, and then follow the new primary.
func partitionPrimary(ctx context.Context, e *Env, rng *rand.Rand) (string, func(context.Context) error, error) {
	old, epoch, _, err := e.Status(ctx)
	if err != nil {
		return "", nil, err
	}
	w := &LossWindow{Site: old, Epoch: epoch, Start: time.Now()}
	if w.Barrier, err = walPosition(ctx, e.Cluster.DSN(old)); err != nil {
		return "", nil, err
	}
	if err := e.waitApplied(ctx, old, epoch, w.Barrier); err != nil {
		return "", nil, err
	}
	e.setAside(old, true)
	w.CutAt = time.Now()
	e.WAN.Isolate(old)
	if w.Cut, err = walPosition(ctx, e.Cluster.DSN(old)); err != nil {
		e.WAN.Heal()
		return "", nil, err
	}
	return fmt.Sprintf("cut primary %s off at %s (every replica had applied its WAL up to %s, %s before)",
			old, w.Cut, w.Barrier, w.CutAt.Sub(w.Start).Round(100*time.Millisecond)),
		func(ctx context.Context) error { return e.failOver(ctx, w, rng) }, nil
}

// failOver is partition-primary's heal: the forced failover, the heal of
// the partition and the old primary's return.
func (e *Env) failOver(ctx context.Context, w *LossWindow, rng *rand.Rand) error {
	target, err := e.mostApplied(ctx, w.Site, w.Epoch, rng)
	if err != nil {
		return err
	}
	e.logf("%s applied the most of %s's epoch %d; xdcr promote %s --force", target, w.Site, w.Epoch, target)
	out, err := e.promote(ctx, target)
	if err != nil {
		return err
	}
	m := lossWindowRE.FindStringSubmatch(out)
	if m == nil {
		return fmt.Errorf("xdcr promote %s --force printed no loss window:\n%s", target, out)
	}
	if m[1] != w.Site || m[3] != target {
		return fmt.Errorf("xdcr promote %s --force: loss window %q names the wrong sites (old primary %s)", target, m[0], w.Site)
	}
	if w.Handoff, err = change.ParseLSN(m[2]); err != nil {
		return fmt.Errorf("loss window %q: %w", m[0], err)
	}
	w.NewPrimary = target
	switch {
	case w.Handoff < w.Barrier:
		return fmt.Errorf("%s took over at %s, below %s, which it had applied before the cut", target, w.Handoff, w.Barrier)
	case w.Handoff >= w.Cut:
		return fmt.Errorf("the partition leaks: %s applied %s's transactions up to %s, committed after the cut at %s", target, w.Site, w.Handoff, w.Cut)
	}
	e.logf("%s is the primary, %s after the cut: %s", target, time.Since(w.CutAt).Round(100*time.Millisecond), m[0])
	// a site other than the new primary that applied beyond the handoff
	// diverged too (the target applied the most, so none should)
	var reseed []string
	for _, s := range e.Cluster.Config.SiteNames() {
		if s == w.Site || s == target {
			continue
		}
		p, err := e.position(ctx, s)
		if err != nil {
			return err
		}
		if p.Origin == w.Site && p.Epoch == w.Epoch && p.LSN > w.Handoff {
			e.setAside(s, true)
			reseed = append(reseed, s)
		}
	}
	// the old primary fences its database when its lease runs out: from
	// then on nothing commits there, and its window is complete
	if err := e.waitFenced(ctx, w.Site); err != nil {
		return err
	}
	all, err := e.readWindow(ctx, w)
	if err != nil {
		return err
	}
	e.logf("forced failover %s", w)
	serr := wait.Sleep(ctx, hold)
	cerr := e.checkCut(w.Site)
	e.WAN.Heal()
	if err := errors.Join(serr, cerr); err != nil {
		return err
	}

	// the old primary sees the new epoch, reports what it committed that
	// nobody received, and waits to be re-seeded
	if err := e.waitReturned(ctx, w.Site, w.Epoch); err != nil {
		return err
	}
	report := agent.DivergencePath(filepath.Join(filepath.Dir(e.Cluster.ConfigPath), topology.NodeID(w.Site)), w.Epoch)
	reported, err := readDivergence(report)
	if err != nil {
		return err
	}
	w.ReportProblems = w.checkReport(reported, all, report)
	if len(w.Commits) > 0 || len(reported) > 0 {
		reseed = append([]string{w.Site}, reseed...)
	}
	for _, s := range reseed {
		if out, err := e.xdcr(ctx, "sync", s, "--config", e.Cluster.ConfigPath, "--log-format", "text"); err != nil {
			return fmt.Errorf("re-seed %s: %w\n%s", s, err, out)
		}
	}
	// the sites set aside come back to the sampler once they follow the
	// new primary (the final check waits for the others)
	if !slices.Contains(reseed, w.Site) {
		reseed = append(reseed, w.Site)
	}
	for _, s := range reseed {
		if err := e.waitFollowing(ctx, s, w.Epoch); err != nil {
			return err
		}
		e.setAside(s, false)
	}
	e.logf("%s returned: divergence report of %d transactions; re-seeded %v", w.Site, len(reported), reseed)
	e.addWindow(*w)
	return nil
}

// lossWindowRE reads the loss window `xdcr promote --force` prints.
var lossWindowRE = regexp.MustCompile(`loss window: transactions (\S+) committed after (\S+) \(what (\S+) applied\) may be lost; it had published up to (\S+),`)

// xdcr runs an xdcr command and returns its output.
func (e *Env) xdcr(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, e.Binary, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("xdcr %s: %w", strings.Join(args, " "), err)
	}
	return string(out), nil
}

// promote fails over to target, as an operator would: again and again
// while the cluster cannot do it yet (the other sites have not elected a
// Raft leader without the old primary's node, or not yet seen the old
// primary go quiet). Running the same promote again waits for the one in
// progress.
func (e *Env) promote(ctx context.Context, target string) (string, error) {
	deadline := time.Now().Add(time.Minute)
	for {
		out, err := e.xdcr(ctx, "promote", target, "--config", e.Cluster.ConfigPath, "--yes", "--force")
		if err == nil {
			return out, nil
		}
		if time.Now().After(deadline) {
			return out, fmt.Errorf("%w\n%s", err, out)
		}
		if err := wait.Sleep(ctx, time.Second); err != nil {
			return out, err
		}
	}
}

// walPosition returns a site's current WAL write position. With
// synchronous_commit on, every transaction acknowledged before the call
// has its commit record below it.
func walPosition(ctx context.Context, dsn string) (change.LSN, error) {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return 0, fmt.Errorf("read the WAL position: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var s string
	if err := conn.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text`).Scan(&s); err != nil {
		return 0, fmt.Errorf("read the WAL position: %w", err)
	}
	return change.ParseLSN(s)
}

// position reads the apply position stored with a site's data (zero when
// the site has none yet).
func (e *Env) position(ctx context.Context, site string) (change.Position, error) {
	var p change.Position
	conn, err := pgx.Connect(ctx, e.Cluster.DSN(site))
	if err != nil {
		return p, fmt.Errorf("read %s's apply position: %w", site, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var lsn string
	err = conn.QueryRow(ctx, `SELECT origin, epoch, lsn::text FROM xdcr.apply_position WHERE cluster = $1`,
		e.Cluster.Config.Cluster).Scan(&p.Origin, &p.Epoch, &lsn)
	if errors.Is(err, pgx.ErrNoRows) {
		return change.Position{}, nil
	}
	if err != nil {
		return p, fmt.Errorf("read %s's apply position: %w", site, err)
	}
	if p.LSN, err = change.ParseLSN(lsn); err != nil {
		return p, fmt.Errorf("read %s's apply position: %w", site, err)
	}
	return p, nil
}

// poll calls done every interval until it reports true; after timeout it
// fails with the last reason done gave for not being done.
func poll(ctx context.Context, timeout, interval time.Duration, what string, done func() (bool, error)) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		ok, why := done()
		if ok {
			return nil
		}
		if wait.Sleep(ctx, interval) != nil {
			if why == nil {
				why = ctx.Err()
			}
			return fmt.Errorf("%s: not within %s (last: %w)", what, timeout, why)
		}
	}
}

// waitApplied waits until every replica of primary has applied its epoch
// up to lsn at least.
func (e *Env) waitApplied(ctx context.Context, primary string, epoch uint64, lsn change.LSN) error {
	for _, s := range e.Cluster.Config.SiteNames() {
		if s == primary {
			continue
		}
		var last change.Position
		err := poll(ctx, time.Minute, 100*time.Millisecond, fmt.Sprintf("%s to apply %s's WAL up to %s", s, primary, lsn), func() (bool, error) {
			p, err := e.position(ctx, s)
			last = p
			if err != nil {
				return false, err
			}
			return p.Origin == primary && p.Epoch == epoch && p.LSN >= lsn, fmt.Errorf("at %s", p)
		})
		if err != nil {
			return fmt.Errorf("%w (position %s)", err, last)
		}
	}
	return nil
}

// mostApplied waits until the replicas of the cut-off primary old have
// applied everything that reached them (their positions hold still for
// two seconds) and returns the one that applied the most of its epoch, as
// an operator choosing the target of a forced failover would.
func (e *Env) mostApplied(ctx context.Context, old string, epoch uint64, rng *rand.Rand) (string, error) {
	var last map[string]change.Position
	since := time.Now()
	err := poll(ctx, time.Minute, 250*time.Millisecond, "the replicas to apply what reached them", func() (bool, error) {
		cur := map[string]change.Position{}
		for _, s := range e.Cluster.Config.SiteNames() {
			if s == old {
				continue
			}
			p, err := e.position(ctx, s)
			if err != nil {
				return false, err
			}
			cur[s] = p
		}
		if !maps.Equal(cur, last) {
			last, since = cur, time.Now()
		}
		return time.Since(since) >= 2*time.Second, fmt.Errorf("positions %v", cur)
	})
	if err != nil {
		return "", err
	}
	var best []string
	var most change.LSN
	for _, s := range slices.Sorted(maps.Keys(last)) {
		p := last[s]
		switch {
		case p.Origin != old || p.Epoch != epoch:
			continue
		case len(best) == 0 || p.LSN > most:
			best, most = []string{s}, p.LSN
		case p.LSN == most:
			best = append(best, s)
		}
	}
	if len(best) == 0 {
		return "", fmt.Errorf("no replica applied epoch %d of %s: %v", epoch, old, last)
	}
	return best[rng.IntN(len(best))], nil
}

// waitFenced waits until site's replicated tables refuse writes from
// applications.
func (e *Env) waitFenced(ctx context.Context, site string) error {
	tables := make([]replicator.Table, 0, len(Tables))
	for _, t := range Tables {
		schema, name, err := config.SplitTable(t)
		if err != nil {
			return err
		}
		tables = append(tables, replicator.Table{Schema: schema, Name: name})
	}
	conn, err := pgx.Connect(ctx, e.Cluster.DSN(site))
	if err != nil {
		return fmt.Errorf("connect to the old primary %s: %w", site, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	return poll(ctx, 30*time.Second, 100*time.Millisecond, fmt.Sprintf("old primary %s to fence its tables after the failover", site), func() (bool, error) {
		fenced, err := replicator.Fenced(ctx, conn, tables)
		if err != nil {
			return false, err
		}
		return len(fenced) == len(tables), fmt.Errorf("fenced: %v", fenced)
	})
}

// readWindow fills w.Commits (and which rows they wrote) from the old
// primary: the commit records after w.Handoff in its WAL, read with
// pg_walinspect (installed in its postgres database; the WAL is the whole
// server's), matched by xid with the xmin of its rows of the workloads.
// It returns every commit after the handoff, of any database.
func (e *Env) readWindow(ctx context.Context, w *LossWindow) (map[uint32]change.LSN, error) {
	admin, err := pgx.Connect(ctx, e.site(w.Site).Postgres.DSN("postgres"))
	if err != nil {
		return nil, fmt.Errorf("read %s's WAL: %w", w.Site, err)
	}
	defer admin.Close(context.WithoutCancel(ctx))
	if _, err := admin.Exec(ctx, `CREATE EXTENSION IF NOT EXISTS pg_walinspect`); err != nil {
		return nil, fmt.Errorf("read %s's WAL: %w", w.Site, err)
	}
	rows, err := admin.Query(ctx, `SELECT xid::text, start_lsn::text
		FROM pg_get_wal_records_info($1::pg_lsn, pg_current_wal_flush_lsn())
		WHERE resource_manager = 'Transaction' AND record_type = 'COMMIT' AND start_lsn > $1::pg_lsn`, w.Handoff.String())
	if err != nil {
		return nil, fmt.Errorf("read %s's WAL after %s: %w", w.Site, w.Handoff, err)
	}
	all := map[uint32]change.LSN{}
	for rows.Next() {
		var xid, lsn string
		if err := rows.Scan(&xid, &lsn); err != nil {
			rows.Close()
			return nil, fmt.Errorf("read %s's WAL: %w", w.Site, err)
		}
		x, err := strconv.ParseUint(xid, 10, 32)
		if err != nil {
			rows.Close()
			return nil, fmt.Errorf("read %s's WAL: xid %q: %w", w.Site, xid, err)
		}
		if all[uint32(x)], err = change.ParseLSN(lsn); err != nil {
			rows.Close()
			return nil, fmt.Errorf("read %s's WAL: %w", w.Site, err)
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read %s's WAL after %s: %w", w.Site, w.Handoff, err)
	}

	db, err := pgx.Connect(ctx, e.Cluster.DSN(w.Site))
	if err != nil {
		return nil, fmt.Errorf("read %s's rows: %w", w.Site, err)
	}
	defer db.Close(context.WithoutCancel(ctx))
	xids := make([]int64, 0, len(all))
	for x := range all {
		xids = append(xids, int64(x))
	}
	w.Commits = map[uint32]change.LSN{}
	w.transfers, w.events = map[string]uint32{}, map[[2]int64]uint32{}
	match := func(xid string) (uint32, error) {
		x, err := strconv.ParseUint(xid, 10, 32)
		if err != nil {
			return 0, fmt.Errorf("xmin %q: %w", xid, err)
		}
		w.Commits[uint32(x)] = all[uint32(x)]
		return uint32(x), nil
	}
	var (
		id, xid     string
		client, seq int64
	)
	rows, _ = db.Query(ctx, `SELECT id, xmin::text FROM public.transfers WHERE xmin::text::bigint = ANY($1)`, xids)
	if _, err := pgx.ForEachRow(rows, []any{&id, &xid}, func() (err error) {
		w.transfers[id], err = match(xid)
		return err
	}); err != nil {
		return nil, fmt.Errorf("read %s's transfers: %w", w.Site, err)
	}
	rows, _ = db.Query(ctx, `SELECT client, seq, xmin::text FROM public.events WHERE xmin::text::bigint = ANY($1)`, xids)
	if _, err := pgx.ForEachRow(rows, []any{&client, &seq, &xid}, func() (err error) {
		w.events[[2]int64{client, seq}], err = match(xid)
		return err
	}); err != nil {
		return nil, fmt.Errorf("read %s's log: %w", w.Site, err)
	}
	return all, nil
}

// waitReturned waits until the old primary, its partition healed, has
// seen the new epoch and reconciled: its apply position is its own
// history of the ended epoch, or already the next one.
func (e *Env) waitReturned(ctx context.Context, old string, epoch uint64) error {
	return poll(ctx, 2*time.Minute, 200*time.Millisecond, fmt.Sprintf("old primary %s to return as a replica", old), func() (bool, error) {
		p, err := e.position(ctx, old)
		if err != nil {
			return false, err
		}
		return (p.Origin == old && p.Epoch == epoch) || p.Epoch > epoch, fmt.Errorf("at %s", p)
	})
}

// waitFollowing waits until site applies an epoch after epoch.
func (e *Env) waitFollowing(ctx context.Context, site string, epoch uint64) error {
	return poll(ctx, 2*time.Minute, 200*time.Millisecond, fmt.Sprintf("%s to follow the new primary", site), func() (bool, error) {
		p, err := e.position(ctx, site)
		if err != nil {
			return false, err
		}
		return p.Epoch > epoch, fmt.Errorf("at %s", p)
	})
}

// readDivergence reads a divergence report (JSON lines, one per change)
// into the transactions it lists: xid -> commit LSN. No file: none.
func readDivergence(path string) (map[uint32]change.LSN, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read the divergence report: %w", err)
	}
	defer f.Close()
	out := map[uint32]change.LSN{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var l struct {
			Xid uint32 `json:"xid"`
			LSN string `json:"lsn"`
		}
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			return nil, fmt.Errorf("divergence report %s: %w", path, err)
		}
		lsn, err := change.ParseLSN(l.LSN)
		if err != nil {
			return nil, fmt.Errorf("divergence report %s: %w", path, err)
		}
		out[l.Xid] = lsn
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read the divergence report: %w", err)
	}
	return out, nil
}

// checkReport compares the old primary's divergence report with its WAL:
// it must list every transaction of the workloads committed after the
// handoff, at its commit LSN, and nothing committed at or before it.
// all are every commit after the handoff, of any database.
func (w *LossWindow) checkReport(reported, all map[uint32]change.LSN, path string) []string {
	var out []string
	for _, x := range slices.Sorted(maps.Keys(w.Commits)) {
		switch lsn, ok := reported[x]; {
		case !ok:
			out = append(out, fmt.Sprintf("%s's divergence report (%s) leaves out transaction %d, which it committed at %s, after the handoff %s",
				w.Site, path, x, w.Commits[x], w.Handoff))
		case lsn != w.Commits[x]:
			out = append(out, fmt.Sprintf("%s's divergence report lists transaction %d at %s; its WAL has the commit at %s", w.Site, x, lsn, w.Commits[x]))
		}
	}
	for _, x := range slices.Sorted(maps.Keys(reported)) {
		if _, ok := all[x]; !ok {
			out = append(out, fmt.Sprintf("%s's divergence report lists transaction %d at %s, which its WAL does not have committed after the handoff %s",
				w.Site, x, reported[x], w.Handoff))
		}
	}
	return out
}
