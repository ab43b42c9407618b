package verify

import (
	"cmp"
	"context"
	"log/slog"
	"slices"
	"time"

	"github.com/xdcr/xdcr/replicator/change"
)

// digest sums up the rows of a key range on one side.
type digest struct {
	rows int64
	// sum is the sums of the two 64-bit halves of every row's md5: equal
	// sums and counts mean equal multisets of rows, whatever their order.
	sum string
	// versions is the sum of the rows' xmin. It moves whenever a row of the
	// range is written, even back to an earlier value, so two snapshots of
	// the same side with the same versions saw the same rows. It means
	// nothing across sites.
	versions string
}

// sameRows compares a primary's digest with a replica's.
func (d digest) sameRows(o digest) bool { return d.rows == o.rows && d.sum == o.sum }

// row is one row of a small range: its key, the md5 of its text form, and
// (from lookups) its xmin.
type row struct {
	key     Key
	hash    string
	version string
}

// reader reads one table on one side, inside one snapshot.
type reader interface {
	digest(ctx context.Context, r Range) (digest, error)
	// rows returns up to limit rows of r in key order.
	rows(ctx context.Context, r Range, limit int) ([]row, error)
	// lookup returns the rows with the given keys, by Key.id.
	lookup(ctx context.Context, keys []Key) (map[string]row, error)
}

// pair is the primary's and one replica's copy of one table.
type pair interface {
	// primary runs fn in a fresh REPEATABLE READ snapshot of the primary
	// and returns a WAL position that every transaction the snapshot sees
	// committed before.
	primary(ctx context.Context, fn func(reader) error) (change.LSN, error)
	// replica waits until the replica has applied everything the primary
	// committed before lsn, then runs fn in a fresh snapshot of the
	// replica. It returns a *[LaggingError] when the replica does not get
	// there in time.
	replica(ctx context.Context, lsn change.LSN, fn func(reader) error) error
	// splitPoints returns the keys at rows every+1, 2·every+1, … of r in key
	// order, read outside any snapshot (any key inside r splits it
	// correctly), from the replica or from the primary.
	splitPoints(ctx context.Context, onReplica bool, r Range, every int64) ([]Key, error)
}

// tuning holds the knobs of one table's check.
type tuning struct {
	chunkRows     int64         // rows per chunk of the first split
	leafRows      int64         // a range this small is compared row by row
	fanout        int64         // a differing range is split into this many
	maxDepth      int           // splits below a chunk; the last level is compared row by row whatever its size
	maxFetch      int           // rows a range compared row by row may hold on either side
	samples       int           // keys to name per table
	attempts      int           // confirmation attempts
	confirmations int           // stable observations that make a difference real
	pause         time.Duration // before each further attempt, times the attempt number
	drill         int           // ranges drilled into per round, at least
	maxRounds     int           // a guard: rounds before the rest is confirmed as ranges
}

// kind is what a confirmed row is.
type kind int

const (
	kindEqual kind = iota
	kindMissing
	kindExtra
	kindDifferent
)

// classify compares the primary's row with the replica's.
func classify(onPrimary, onReplica, sameHash bool) kind {
	switch {
	case onPrimary && !onReplica:
		return kindMissing
	case !onPrimary && onReplica:
		return kindExtra
	case onPrimary && !sameHash:
		return kindDifferent
	}
	return kindEqual
}

// work is a key range that differed in the last pass, with where it lies
// in key order (its chunk, then its part at every split) and its row counts
// then.
type work struct {
	r       Range
	path    []int // len(path)-1 is its depth below its chunk
	p, rep  int64
	ordinal int // position of a key inside its leaf, for findings
}

func (w work) depth() int { return len(w.path) - 1 }

type finding struct {
	at   work
	key  Key
	kind kind
}

// checker compares one table of one replica with the primary's.
type checker struct {
	p       pair
	t       tuning
	keyless bool
	log     *slog.Logger

	rowsPrimary, rowsReplica *int64
	stuck                    []work    // too big to compare row by row at the last level
	ranges                   []work    // confirmed differing ranges
	found                    []finding // confirmed differing rows
	unsettled                int
	passes                   int
}

// run compares the table and fills the checker's findings. See
// docs/verify.md for the method.
func (c *checker) run(ctx context.Context) error {
	whole := Range{}
	pd, rd, err := c.pass(ctx, []Range{whole})
	if err != nil {
		return err
	}
	c.rowsPrimary, c.rowsReplica = &pd[0].rows, &rd[0].rows
	if pd[0].sameRows(rd[0]) {
		return nil
	}
	if c.keyless {
		return c.settleRanges(ctx, []work{{r: whole, p: pd[0].rows, rep: rd[0].rows}})
	}
	points, err := c.p.splitPoints(ctx, false, whole, c.t.chunkRows)
	if err != nil {
		return err
	}
	chunks := whole.split(points)
	pd, rd, err = c.pass(ctx, chunks)
	if err != nil {
		return err
	}
	var todo []work
	for i, r := range chunks {
		if !pd[i].sameRows(rd[i]) {
			todo = append(todo, work{r: r, path: []int{i}, p: pd[i].rows, rep: rd[i].rows})
		}
	}
	c.log.Debug("chunks compared", "chunks", len(chunks), "differing", len(todo))
	// Each round drills into the first differing ranges in key order: as
	// many as keys are still wanted (each holds a differing row unless it
	// was lag), and at least tuning.drill, since under writes most of them
	// are lag that the next comparison clears. The others wait their turn;
	// once the table has its sample keys they are confirmed as whole
	// ranges, so a replica that lost a whole table is not drilled into
	// row by row.
	var deferred []work
	for round := 0; len(todo) > 0 || len(deferred) > 0; round++ {
		if c.enough() || round >= c.t.maxRounds {
			return c.settleRanges(ctx, append(append(todo, deferred...), c.stuck...))
		}
		if len(todo) == 0 {
			todo, deferred = deferred, nil
		}
		byPath(todo)
		if n := max(c.t.samples-len(c.found), c.t.drill); len(todo) > n {
			deferred = append(deferred, todo[n:]...)
			todo = todo[:n]
		}
		if todo, err = c.round(ctx, todo); err != nil {
			return err
		}
	}
	if len(c.stuck) > 0 {
		return c.settleRanges(ctx, c.stuck)
	}
	return nil
}

func byPath(ws []work) {
	slices.SortFunc(ws, func(a, b work) int { return slices.Compare(a.path, b.path) })
}

// enough reports whether the table has as many sample keys as it may name:
// what still differs is then confirmed range by range, without drilling
// down to rows.
func (c *checker) enough() bool { return len(c.found) >= c.t.samples }

// round splits every differing range that is not small yet and compares
// the parts, and compares the small ones row by row. It returns the ranges
// that still differ and are not settled.
//
// A range stops being split at tuning.maxDepth below its chunk and is
// compared row by row whatever its size: rows inserted between the
// primary's and the replica's reads make a range that receives them (the
// open last range of a table with an ascending key, above all) differ in
// every pass and never shrink below tuning.leafRows, while its rows, once
// fetched, settle like any others.
func (c *checker) round(ctx context.Context, todo []work) ([]work, error) {
	var leaves, parts []work
	for _, w := range todo {
		n := max(w.p, w.rep)
		if n <= c.t.leafRows || w.depth() >= c.t.maxDepth {
			leaves = append(leaves, w)
			continue
		}
		every := (n + c.t.fanout - 1) / c.t.fanout
		points, err := c.p.splitPoints(ctx, w.rep > w.p, w.r, every)
		if err != nil {
			return nil, err
		}
		if len(points) == 0 {
			leaves = append(leaves, w) // it shrank since; rows() is bounded anyway
			continue
		}
		for i, r := range w.r.split(points) {
			parts = append(parts, work{r: r, path: append(slices.Clone(w.path), i)})
		}
	}
	var next []work
	if len(parts) > 0 {
		ranges := make([]Range, len(parts))
		for i, w := range parts {
			ranges[i] = w.r
		}
		pd, rd, err := c.pass(ctx, ranges)
		if err != nil {
			return nil, err
		}
		for i, w := range parts {
			if !pd[i].sameRows(rd[i]) {
				w.p, w.rep = pd[i].rows, rd[i].rows
				next = append(next, w)
			}
		}
	}
	if len(leaves) > 0 {
		again, err := c.leaves(ctx, leaves)
		if err != nil {
			return nil, err
		}
		next = append(next, again...)
	}
	return next, nil
}

// leaves fetches the rows of small ranges from both sides, and confirms
// the rows that differ. Ranges that turned out not to be small any more
// are returned to be split, or, at the last level, left to be confirmed as
// ranges.
func (c *checker) leaves(ctx context.Context, leaves []work) ([]work, error) {
	limit := func(w work) int {
		if w.depth() >= c.t.maxDepth {
			return c.t.maxFetch
		}
		return int(4 * c.t.leafRows)
	}
	pr := make([][]row, len(leaves))
	rr := make([][]row, len(leaves))
	fetch := func(into [][]row) func(reader) error {
		return func(s reader) error {
			for i, w := range leaves {
				rows, err := s.rows(ctx, w.r, limit(w))
				if err != nil {
					return err
				}
				into[i] = rows
			}
			return nil
		}
	}
	if err := c.both(ctx, fetch(pr), fetch(rr)); err != nil {
		return nil, err
	}
	var (
		again []work
		cands []finding
		keys  []Key
	)
	for i, w := range leaves {
		if n := limit(w); len(pr[i]) >= n || len(rr[i]) >= n {
			w.p, w.rep = int64(len(pr[i])), int64(len(rr[i]))
			if w.depth() >= c.t.maxDepth {
				c.stuck = append(c.stuck, w)
			} else {
				again = append(again, w)
			}
			continue
		}
		for j, k := range mismatched(pr[i], rr[i]) {
			at := w
			at.ordinal = j
			cands = append(cands, finding{at: at, key: k})
			keys = append(keys, k)
		}
	}
	if len(keys) == 0 {
		return again, nil
	}
	kinds, err := c.confirmKeys(ctx, keys)
	if err != nil {
		return nil, err
	}
	reported := make(map[string]bool) // leaves already in c.ranges, by path
	for _, f := range cands {
		k, ok := kinds[f.key.id()]
		switch {
		case !ok:
			c.unsettled++
		case k != kindEqual:
			f.kind = k
			c.found = append(c.found, f)
			if id := pathID(f.at.path); !reported[id] {
				reported[id] = true
				c.ranges = append(c.ranges, f.at)
			}
		}
	}
	return again, nil
}

func pathID(p []int) string {
	b := make([]byte, 0, 4*len(p))
	for _, i := range p {
		b = append(b, byte(i>>24), byte(i>>16), byte(i>>8), byte(i))
	}
	return string(b)
}

// mismatched returns the keys whose rows differ between the primary's rows
// p and the replica's rows r: the primary's in its order, then the
// replica's own.
func mismatched(p, r []row) []Key {
	onReplica := make(map[string]string, len(r))
	for _, x := range r {
		onReplica[x.key.id()] = x.hash
	}
	var out []Key
	onPrimary := make(map[string]bool, len(p))
	for _, x := range p {
		id := x.key.id()
		onPrimary[id] = true
		if h, ok := onReplica[id]; !ok || h != x.hash {
			out = append(out, x.key)
		}
	}
	for _, x := range r {
		if !onPrimary[x.key.id()] {
			out = append(out, x.key)
		}
	}
	return out
}

// confirmKeys decides, for each key, whether its row really differs.
//
// One attempt reads the rows on the primary (P1, at position L), on the
// replica once it has applied everything before L (R), and on the primary
// again (P2). A row that P1 and P2 show identically, xmin included, was
// not written between them, so the replica, whose state lies between P1 and
// P2 in the primary's history, must show it that way too: a difference
// then is real. A row written in between is tried again in the next
// attempt. A difference counts once it has been seen in
// tuning.confirmations attempts; the first stable equality settles it as
// equal. Keys that never settle are left out of the result.
func (c *checker) confirmKeys(ctx context.Context, keys []Key) (map[string]kind, error) {
	out := make(map[string]kind, len(keys))
	seen := make(map[string]int)
	pending := keys
	for attempt := 0; attempt < c.t.attempts && len(pending) > 0; attempt++ {
		if err := c.pauseBefore(ctx, attempt); err != nil {
			return nil, err
		}
		var p1, r, p2 map[string]row
		err := c.bracket(ctx,
			func(s reader) (err error) { p1, err = s.lookup(ctx, pending); return err },
			func(s reader) (err error) { r, err = s.lookup(ctx, pending); return err },
			func(s reader) (err error) { p2, err = s.lookup(ctx, pending); return err })
		if err != nil {
			return nil, err
		}
		var still []Key
		for _, k := range pending {
			id := k.id()
			a, inP1 := p1[id]
			b, inP2 := p2[id]
			if inP1 != inP2 || a.hash != b.hash || a.version != b.version {
				still = append(still, k) // written on the primary meanwhile
				continue
			}
			x, inR := r[id]
			switch kd := classify(inP1, inR, a.hash == x.hash); {
			case kd == kindEqual:
				out[id] = kindEqual
			case seen[id]+1 >= c.t.confirmations:
				out[id] = kd
			default:
				seen[id]++
				still = append(still, k)
			}
		}
		pending = still
	}
	if len(pending) > 0 {
		c.log.Debug("rows kept changing on the primary", "rows", len(pending), "first", pending[0].String())
	}
	return out, nil
}

// settleRanges is confirmKeys for whole ranges: digests instead of rows.
// It is used for tables without a key, and for the ranges left once a
// table has its sample keys. Confirmed ranges go to c.ranges, those that
// never settle count as unsettled.
func (c *checker) settleRanges(ctx context.Context, todo []work) error {
	seen := make(map[int]int)
	pending := make([]int, len(todo))
	for i := range pending {
		pending[i] = i
	}
	var confirmed []int
	for attempt := 0; attempt < c.t.attempts && len(pending) > 0; attempt++ {
		if err := c.pauseBefore(ctx, attempt); err != nil {
			return err
		}
		digests := func(into []digest) func(reader) error {
			return func(s reader) error {
				for j, i := range pending {
					d, err := s.digest(ctx, todo[i].r)
					if err != nil {
						return err
					}
					into[j] = d
				}
				return nil
			}
		}
		p1, r, p2 := make([]digest, len(pending)), make([]digest, len(pending)), make([]digest, len(pending))
		if err := c.bracket(ctx, digests(p1), digests(r), digests(p2)); err != nil {
			return err
		}
		var still []int
		for j, i := range pending {
			switch {
			case p1[j] != p2[j]:
				still = append(still, i)
			case p1[j].sameRows(r[j]):
				// equal at a settled position: it was lag
			case seen[i]+1 >= c.t.confirmations:
				todo[i].p, todo[i].rep = p1[j].rows, r[j].rows
				confirmed = append(confirmed, i)
			default:
				seen[i]++
				still = append(still, i)
			}
		}
		pending = still
	}
	for _, i := range confirmed {
		c.ranges = append(c.ranges, todo[i])
		if c.keyless {
			c.rowsPrimary, c.rowsReplica = &todo[i].p, &todo[i].rep
		}
	}
	if len(pending) > 0 {
		c.log.Debug("ranges kept changing on the primary", "ranges", len(pending), "first", todo[pending[0]].r.report().String())
	}
	c.unsettled += len(pending)
	return nil
}

func (c *checker) pauseBefore(ctx context.Context, attempt int) error {
	if attempt == 0 {
		return nil
	}
	t := time.NewTimer(c.t.pause * time.Duration(attempt))
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// pass compares digests of ranges: the primary in one snapshot, then the
// replica in one snapshot once it has applied what the primary's showed.
func (c *checker) pass(ctx context.Context, ranges []Range) (pd, rd []digest, err error) {
	pd, rd = make([]digest, len(ranges)), make([]digest, len(ranges))
	digests := func(into []digest) func(reader) error {
		return func(s reader) error {
			for i, r := range ranges {
				d, err := s.digest(ctx, r)
				if err != nil {
					return err
				}
				into[i] = d
			}
			return nil
		}
	}
	err = c.both(ctx, digests(pd), digests(rd))
	return pd, rd, err
}

// both runs fp on the primary, then fr on the replica at or past the
// primary's position.
func (c *checker) both(ctx context.Context, fp, fr func(reader) error) error {
	c.passes++
	lsn, err := c.p.primary(ctx, fp)
	if err != nil {
		return err
	}
	return c.p.replica(ctx, lsn, fr)
}

// bracket is both, followed by fp2 on the primary again.
func (c *checker) bracket(ctx context.Context, fp1, fr, fp2 func(reader) error) error {
	if err := c.both(ctx, fp1, fr); err != nil {
		return err
	}
	_, err := c.p.primary(ctx, fp2)
	return err
}

// result fills out from the checker's findings: ranges in key order with
// neighbours merged, and at most samples keys, the first in key order.
func (c *checker) result(out *TableReport, samples int) {
	out.RowsPrimary, out.RowsReplica = c.rowsPrimary, c.rowsReplica
	byPath(c.ranges)
	var merged []Range
	for _, w := range c.ranges {
		if n := len(merged); n > 0 && merged[n-1].To != nil && w.r.From != nil && merged[n-1].To.id() == w.r.From.id() {
			merged[n-1].To = w.r.To
			continue
		}
		merged = append(merged, w.r)
	}
	for _, r := range merged {
		if !c.keyless {
			out.Ranges = append(out.Ranges, r.report())
		}
	}
	slices.SortFunc(c.found, func(a, b finding) int {
		return cmp.Or(slices.Compare(a.at.path, b.at.path), cmp.Compare(a.at.ordinal, b.at.ordinal))
	})
	for i, f := range c.found {
		if i >= samples {
			break
		}
		switch f.kind {
		case kindMissing:
			out.Missing = append(out.Missing, f.key.String())
		case kindExtra:
			out.Extra = append(out.Extra, f.key.String())
		case kindDifferent:
			out.Different = append(out.Different, f.key.String())
		}
	}
	out.Unsettled = c.unsettled
	switch {
	case len(c.ranges) > 0:
		out.Result = ResultDiffers
	case c.unsettled > 0:
		out.Result = ResultUnsettled
	default:
		out.Result = ResultEqual
	}
}
