package chaos

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// Findings are what the checkers found wrong; the zero value is a pass.
type Findings struct {
	Lost             int // acknowledged transactions a site does not hold (outside a forced failover's loss window)
	Duplicated       int // effects a site holds more often than clients caused them, or that clients never caused
	PrefixViolations int // samples or final states where a client's log was not a gap-free prefix 1..n, or went back
	ReportErrors     int // transactions of a loss window an old primary's divergence report left out or got wrong
	Problems         []string
}

// maxProblems bounds how many descriptions Findings keeps.
const maxProblems = 20

func (f *Findings) add(counter *int, format string, args ...any) {
	*counter++
	if len(f.Problems) < maxProblems {
		f.Problems = append(f.Problems, fmt.Sprintf(format, args...))
	}
}

// Merge adds o's counts and problems to f.
func (f *Findings) Merge(o Findings) {
	f.Lost += o.Lost
	f.Duplicated += o.Duplicated
	f.PrefixViolations += o.PrefixViolations
	f.ReportErrors += o.ReportErrors
	for _, p := range o.Problems {
		if len(f.Problems) < maxProblems {
			f.Problems = append(f.Problems, p)
		}
	}
}

// OK reports whether nothing was found.
func (f Findings) OK() bool {
	return f.Lost == 0 && f.Duplicated == 0 && f.PrefixViolations == 0 && f.ReportErrors == 0
}

// CheckSite checks one site's copy of the workloads' tables against the
// history, once writes have stopped and the site has converged:
//
//   - every acknowledged transfer is there, unless a forced failover lost it
//     in its loss window ([LossWindow]); none that was refused, or never
//     sent, is;
//   - the balances add up to Accounts*Opening, and each account's balance
//     is its opening plus the transfers into it minus those out of it;
//   - each client's log is exactly 1..n with n at least its acknowledged
//     prefix and at most one row beyond it (a last row in doubt).
func CheckSite(ctx context.Context, site, dsn string, h *History) (Findings, error) {
	var f Findings
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return f, fmt.Errorf("check %s: %w", site, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	tx, err := conn.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return f, fmt.Errorf("check %s: %w", site, err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	sent, events, pending := h.snapshot()
	_, windows := h.failovers()

	// transfers
	rows, err := tx.Query(ctx, `SELECT id, src, dst, amount FROM public.transfers`)
	if err != nil {
		return f, fmt.Errorf("check %s: %w", site, err)
	}
	held := map[string]bool{}
	want := make([]int64, Accounts+1)
	for i := 1; i <= Accounts; i++ {
		want[i] = Opening
	}
	for rows.Next() {
		var id string
		var src, dst int
		var amount int64
		if err := rows.Scan(&id, &src, &dst, &amount); err != nil {
			rows.Close()
			return f, fmt.Errorf("check %s: %w", site, err)
		}
		held[id] = true
		if src >= 1 && src <= Accounts && dst >= 1 && dst <= Accounts {
			want[src] -= amount
			want[dst] += amount
		}
		t, ok := sent[id]
		switch {
		case !ok:
			f.add(&f.Duplicated, "%s: transfer %s is there but no client sent it", site, id)
		case t.Outcome == Refused:
			f.add(&f.Duplicated, "%s: transfer %s is there but its client was told it failed", site, id)
		case t.Src != src || t.Dst != dst || t.Amount != amount:
			f.add(&f.Duplicated, "%s: transfer %s reads %d->%d %d, its client sent %d->%d %d", site, id, src, dst, amount, t.Src, t.Dst, t.Amount)
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return f, fmt.Errorf("check %s: %w", site, err)
	}
	for _, id := range slices.Sorted(maps.Keys(sent)) {
		if t := sent[id]; t.Outcome == Acked && !held[id] && windowOf(windows, t.Site, t.At, func(w LossWindow) bool { return w.holdsTransfer(id) }) == nil {
			f.add(&f.Lost, "%s: acknowledged transfer %s (%s at %s) is missing", site, id, t.Site, t.At.Format("15:04:05.000"))
		}
	}

	// balances
	rows, err = tx.Query(ctx, `SELECT id, balance FROM public.accounts ORDER BY id`)
	if err != nil {
		return f, fmt.Errorf("check %s: %w", site, err)
	}
	var total int64
	seen := 0
	for rows.Next() {
		var id int
		var balance int64
		if err := rows.Scan(&id, &balance); err != nil {
			rows.Close()
			return f, fmt.Errorf("check %s: %w", site, err)
		}
		seen++
		total += balance
		if id >= 1 && id <= Accounts && balance != want[id] {
			// an update applied twice, or one lost: count it as doubled
			// when the balance moved more than its transfers say
			f.add(&f.Duplicated, "%s: account %d holds %d, its transfers there make it %d", site, id, balance, want[id])
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return f, fmt.Errorf("check %s: %w", site, err)
	}
	if seen != Accounts {
		f.add(&f.Lost, "%s: %d accounts, want %d", site, seen, Accounts)
	}
	if total != Accounts*Opening {
		f.add(&f.Duplicated, "%s: balances add up to %d, want %d", site, total, Accounts*Opening)
	}

	// log
	logs, err := readLogs(ctx, tx)
	if err != nil {
		return f, fmt.Errorf("check %s: %w", site, err)
	}
	logHeld, err := heldBelow(ctx, tx, events)
	if err != nil {
		return f, fmt.Errorf("check %s: %w", site, err)
	}
	clients := map[int]bool{}
	for c := range events {
		clients[c] = true
	}
	for c := range logs {
		clients[c] = true
	}
	for _, c := range slices.Sorted(maps.Keys(clients)) {
		l, acked := logs[c], events[c]
		if !l.prefix() {
			f.add(&f.PrefixViolations, "%s: client %d's log has %d rows from %d to %d: not 1..n", site, c, l.count, l.min, l.max)
		}
		if missing := acked - logHeld[c]; missing > 0 {
			f.add(&f.Lost, "%s: %d of client %d's %d acknowledged log rows are missing", site, missing, c, acked)
		}
		limit := acked
		if pending[c] {
			limit++
		}
		if l.max > limit {
			f.add(&f.Duplicated, "%s: client %d's log reaches %d, only %d were sent with an answer or in doubt", site, c, l.max, limit)
		}
	}
	return f, nil
}

// heldBelow counts, for each client, its log rows up to its acknowledged
// sequence number.
func heldBelow(ctx context.Context, q querier, acked map[int]int64) (map[int]int64, error) {
	clients := make([]int32, 0, len(acked))
	upto := make([]int64, 0, len(acked))
	for c, n := range acked {
		clients = append(clients, int32(c))
		upto = append(upto, n)
	}
	rows, err := q.Query(ctx, `SELECT a.client, count(e.seq) FROM unnest($1::int[], $2::bigint[]) AS a(client, upto)
		LEFT JOIN public.events e ON e.client = a.client AND e.seq <= a.upto GROUP BY a.client`, clients, upto)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[int]int64{}
	for rows.Next() {
		var c int
		var n int64
		if err := rows.Scan(&c, &n); err != nil {
			return nil, err
		}
		out[c] = n
	}
	return out, rows.Err()
}

// clientLog is one client's rows in a site's log.
type clientLog struct{ count, min, max int64 }

func (l clientLog) prefix() bool { return l.count == 0 || (l.min == 1 && l.max == l.count) }

type querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

func readLogs(ctx context.Context, q querier) (map[int]clientLog, error) {
	rows, err := q.Query(ctx, `SELECT client, count(*), min(seq), max(seq) FROM public.events GROUP BY client`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[int]clientLog{}
	for rows.Next() {
		var c int
		var l clientLog
		if err := rows.Scan(&c, &l.count, &l.min, &l.max); err != nil {
			return nil, err
		}
		out[c] = l
	}
	return out, rows.Err()
}

// Target is a replica site the sampler reads. Gen changes when the site
// was re-seeded (after a forced failover): its log then starts a new
// history, which need not reach as far as what the sampler saw before.
type Target struct {
	Site, DSN string
	Gen       int
}

// Sampler checks consistent prefix on replicas while faults are active:
// every Interval it reads each client's log on every replica in one
// statement (one snapshot) and records a violation when a client's rows
// are not 1..n, or n is lower than it was at an earlier sample of the
// same site.
type Sampler struct {
	Replicas func(ctx context.Context) []Target
	Interval time.Duration

	mu       sync.Mutex
	f        Findings
	samples  int
	failures int
	high     map[string]map[int]int64 // site -> client -> highest n seen
	gen      map[string]int           // site -> Target.Gen of high[site]
}

// Run samples until ctx ends.
func (s *Sampler) Run(ctx context.Context) {
	conns := map[string]*pgx.Conn{}
	defer func() {
		for _, c := range conns {
			_ = c.Close(context.Background())
		}
	}()
	t := time.NewTicker(s.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, r := range s.Replicas(ctx) {
			conn := conns[r.Site]
			if conn == nil {
				cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
				c, err := pgx.Connect(cctx, r.DSN)
				cancel()
				if err != nil {
					s.failed()
					continue
				}
				conns[r.Site], conn = c, c
			}
			qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			logs, err := readLogs(qctx, conn)
			cancel()
			if err != nil {
				_ = conn.Close(context.Background())
				delete(conns, r.Site)
				s.failed()
				continue
			}
			s.observe(r.Site, r.Gen, logs)
		}
	}
}

// failed counts a sample that could not be taken.
func (s *Sampler) failed() {
	s.mu.Lock()
	s.failures++
	s.mu.Unlock()
}

// Observe checks one sample of site's logs.
func (s *Sampler) Observe(site string, logs map[int]clientLog) { s.observe(site, 0, logs) }

func (s *Sampler) observe(site string, gen int, logs map[int]clientLog) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.samples++
	if s.high == nil {
		s.high, s.gen = map[string]map[int]int64{}, map[string]int{}
	}
	if s.high[site] == nil || s.gen[site] != gen {
		s.high[site], s.gen[site] = map[int]int64{}, gen
	}
	for _, c := range slices.Sorted(maps.Keys(logs)) {
		l := logs[c]
		if !l.prefix() {
			s.f.add(&s.f.PrefixViolations, "%s at %s: client %d's log has %d rows from %d to %d: a gap", site, time.Now().Format("15:04:05.000"), c, l.count, l.min, l.max)
		}
		if h := s.high[site][c]; l.max < h {
			s.f.add(&s.f.PrefixViolations, "%s at %s: client %d's log went back from %d to %d rows", site, time.Now().Format("15:04:05.000"), c, h, l.max)
		} else {
			s.high[site][c] = l.max
		}
	}
}

// Result returns the findings so far, and how many samples were taken and
// failed (a site down).
func (s *Sampler) Result() (Findings, int, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f := s.f
	f.Problems = slices.Clone(f.Problems)
	return f, s.samples, s.failures
}

// windowOf returns the loss window that excuses the loss of a transaction
// acknowledged by site at at, if in(w) says the window holds it: a window
// of a failover away from site, that began no later than at. Nil: the
// loss is real.
func windowOf(ws []LossWindow, site string, at time.Time, in func(LossWindow) bool) *LossWindow {
	for i := range ws {
		if w := &ws[i]; w.Site == site && !at.Before(w.Start) && in(*w) {
			return w
		}
	}
	return nil
}

// CheckFailovers checks what the forced failovers dropped, once: every
// log row a client had acknowledged that the next primary did not hold
// must lie in that failover's loss window (else it is lost), and each old
// primary's divergence report must list exactly the window's transactions.
// It also returns how many acknowledged transactions (transfers and log
// rows) the loss windows excused.
func CheckFailovers(h *History) (Findings, int) {
	var f Findings
	sent, _, _ := h.snapshot()
	dropped, windows := h.failovers()
	excused := 0
	for _, d := range dropped {
		if windowOf(windows, d.Site, d.At, func(w LossWindow) bool { return w.holdsEvent(d.Client, d.Seq) }) == nil {
			f.add(&f.Lost, "client %d's log row %d, acknowledged by %s at %s, was not on the next primary and is not in a loss window",
				d.Client, d.Seq, d.Site, d.At.Format("15:04:05.000"))
			continue
		}
		excused++
	}
	for _, id := range slices.Sorted(maps.Keys(sent)) {
		t := sent[id]
		if t.Outcome == Acked && windowOf(windows, t.Site, t.At, func(w LossWindow) bool { return w.holdsTransfer(id) }) != nil {
			excused++
		}
	}
	for _, w := range windows {
		for _, p := range w.ReportProblems {
			f.add(&f.ReportErrors, "%s", p)
		}
	}
	return f, excused
}
