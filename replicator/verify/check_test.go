package verify

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/xdcr/xdcr/replicator/change"
)

// fakeRow is a row of the fake table: an int key, a value, and the
// "xmin" of its last write.
type fakeRow struct {
	val string
	ver int
}

type fakeOp struct {
	key int
	val string
	del bool
}

// fake is a primary and a replica of one table with integer keys. The
// primary's history is a log of writes; its LSN is the log's length. The
// replica applies the log in order when asked to reach a position, plus
// `ahead` more writes (it may be past the primary's snapshot, as a real
// one is). Writes made directly on either side bypass the log.
type fake struct {
	primaryRows map[int]fakeRow
	replicaRows map[int]fakeRow
	log         []fakeOp
	applied     int
	ahead       int
	lagging     bool
	ver         int
	// afterPrimary runs after every primary snapshot, like a workload
	// writing between verify's reads.
	afterPrimary func(f *fake)
	primaries    int
}

func newFake(n int) *fake {
	f := &fake{primaryRows: make(map[int]fakeRow), replicaRows: make(map[int]fakeRow)}
	for k := 1; k <= n; k++ {
		f.primaryRows[k] = fakeRow{val: "v" + strconv.Itoa(k), ver: 1}
		f.replicaRows[k] = fakeRow{val: "v" + strconv.Itoa(k), ver: 1}
	}
	return f
}

// write commits a change on the primary; the replica gets it by applying
// the log.
func (f *fake) write(key int, val string, del bool) {
	f.log = append(f.log, fakeOp{key: key, val: val, del: del})
	f.ver++
	if del {
		delete(f.primaryRows, key)
	} else {
		f.primaryRows[key] = fakeRow{val: val, ver: f.ver}
	}
}

func (f *fake) applyUpTo(n int) {
	for ; f.applied < min(n, len(f.log)); f.applied++ {
		op := f.log[f.applied]
		if op.del {
			delete(f.replicaRows, op.key)
		} else {
			f.replicaRows[op.key] = fakeRow{val: op.val, ver: 1}
		}
	}
}

func (f *fake) primary(ctx context.Context, fn func(reader) error) (change.LSN, error) {
	f.primaries++
	snap := fakeReader{data: clone(f.primaryRows)}
	lsn := change.LSN(len(f.log))
	err := fn(snap)
	if f.afterPrimary != nil {
		f.afterPrimary(f)
	}
	return lsn, err
}

func (f *fake) replica(ctx context.Context, lsn change.LSN, fn func(reader) error) error {
	if f.lagging {
		return &LaggingError{Site: "dc-b", Want: lsn, Wait: time.Second}
	}
	f.applyUpTo(int(lsn) + f.ahead)
	return fn(fakeReader{data: clone(f.replicaRows)})
}

func (f *fake) splitPoints(ctx context.Context, onReplica bool, r Range, every int64) ([]Key, error) {
	rows := f.primaryRows
	if onReplica {
		rows = f.replicaRows
	}
	keys := fakeReader{data: rows}.keys(r)
	var out []Key
	for i := every; i < int64(len(keys)); i += every {
		out = append(out, intKey(keys[i]))
	}
	return out, nil
}

func clone(m map[int]fakeRow) map[int]fakeRow {
	out := make(map[int]fakeRow, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func intKey(k int) Key { return Key{strconv.Itoa(k)} }

func keyInt(t testing.TB, k string) int {
	t.Helper()
	n, err := strconv.Atoi(k)
	if err != nil {
		t.Fatalf("key %q: %v", k, err)
	}
	return n
}

type fakeReader struct{ data map[int]fakeRow }

func (s fakeReader) keys(r Range) []int {
	var out []int
	for k := range s.data {
		if r.From != nil && k < mustInt(r.From) || r.To != nil && k >= mustInt(r.To) {
			continue
		}
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func mustInt(k Key) int {
	n, err := strconv.Atoi(k[0])
	if err != nil {
		panic(err)
	}
	return n
}

func hashOf(k int, v string) string {
	h := fnv.New64a()
	io.WriteString(h, strconv.Itoa(k)+"|"+v)
	return strconv.FormatUint(h.Sum64(), 16)
}

func (s fakeReader) digest(ctx context.Context, r Range) (digest, error) {
	var sum uint64
	var vers, n int
	for _, k := range s.keys(r) {
		h := fnv.New64a()
		io.WriteString(h, strconv.Itoa(k)+"|"+s.data[k].val)
		sum += h.Sum64()
		vers += s.data[k].ver
		n++
	}
	return digest{rows: int64(n), sum: strconv.FormatUint(sum, 16), versions: strconv.Itoa(vers)}, nil
}

func (s fakeReader) rows(ctx context.Context, r Range, limit int) ([]row, error) {
	var out []row
	for _, k := range s.keys(r) {
		if len(out) == limit {
			break
		}
		out = append(out, row{key: intKey(k), hash: hashOf(k, s.data[k].val)})
	}
	return out, nil
}

func (s fakeReader) lookup(ctx context.Context, keys []Key) (map[string]row, error) {
	out := make(map[string]row)
	for _, k := range keys {
		n := mustInt(k)
		if v, ok := s.data[n]; ok {
			out[k.id()] = row{key: k, hash: hashOf(n, v.val), version: strconv.Itoa(v.ver)}
		}
	}
	return out, nil
}

func testTuning() tuning {
	return tuning{chunkRows: 1000, leafRows: 20, fanout: 8, maxDepth: splitDepth(1000, 20, 8) + 1, maxFetch: 2000,
		samples: 10, attempts: 5, confirmations: 2, drill: 4, maxRounds: 200}
}

func check(t *testing.T, f *fake, tune tuning, keyless bool) (*checker, TableReport) {
	t.Helper()
	c := &checker{p: f, t: tune, keyless: keyless, log: slog.New(slog.DiscardHandler)}
	if err := c.run(t.Context()); err != nil {
		t.Fatalf("run: %v", err)
	}
	var tr TableReport
	c.result(&tr, tune.samples)
	return c, tr
}

// inRange reports whether key k lies in one of the ranges.
func inRange(t *testing.T, ranges []KeyRange, k int) (KeyRange, bool) {
	t.Helper()
	for _, r := range ranges {
		if (r.From == nil || keyInt(t, *r.From) <= k) && (r.To == nil || k < keyInt(t, *r.To)) {
			return r, true
		}
	}
	return KeyRange{}, false
}

func TestCheckEqual(t *testing.T) {
	f := newFake(5000)
	c, tr := check(t, f, testTuning(), false)
	if tr.Result != ResultEqual || len(tr.Ranges) != 0 || *tr.RowsPrimary != 5000 || *tr.RowsReplica != 5000 {
		t.Fatalf("got %+v, want equal with 5000 rows each", tr)
	}
	if c.passes != 1 {
		t.Errorf("got %d passes, want 1 (the whole-table hash)", c.passes)
	}
}

// TestCheckNamesEachKind: one changed, one deleted and one added row on the
// replica of a 50,000-row table are named, each inside a small range.
func TestCheckNamesEachKind(t *testing.T) {
	f := newFake(50000)
	f.replicaRows[12345] = fakeRow{val: "changed", ver: 1}
	delete(f.replicaRows, 30000)
	f.replicaRows[70000] = fakeRow{val: "extra", ver: 1}
	c, tr := check(t, f, testTuning(), false)
	if tr.Result != ResultDiffers {
		t.Fatalf("result %s, want differs", tr.Result)
	}
	if !slices.Equal(tr.Different, []string{"12345"}) || !slices.Equal(tr.Missing, []string{"30000"}) || !slices.Equal(tr.Extra, []string{"70000"}) {
		t.Errorf("got different %v missing %v extra %v, want [12345] [30000] [70000]", tr.Different, tr.Missing, tr.Extra)
	}
	if len(tr.Ranges) != 3 {
		t.Errorf("got ranges %v, want 3", tr.Ranges)
	}
	for _, k := range []int{12345, 30000} {
		r, ok := inRange(t, tr.Ranges, k)
		if !ok {
			t.Errorf("no range holds %d: %v", k, tr.Ranges)
			continue
		}
		if r.From == nil || r.To == nil || keyInt(t, *r.To)-keyInt(t, *r.From) > 25 {
			t.Errorf("range %s holding %d is wider than a leaf", r, k)
		}
	}
	if r, ok := inRange(t, tr.Ranges, 70000); !ok || r.To != nil {
		t.Errorf("the extra row past the primary's last key must be in the open last range: %v", tr.Ranges)
	}
	if *tr.RowsPrimary != 50000 || *tr.RowsReplica != 50000 {
		t.Errorf("rows %d/%d, want 50000/50000", *tr.RowsPrimary, *tr.RowsReplica)
	}
	// whole table, chunks, three rounds of splits and leaves, and two
	// confirmations (each a primary-replica-primary bracket): far fewer
	// than the 50 chunks.
	if c.passes > 12 {
		t.Errorf("%d passes; drill-down should not need more than 12", c.passes)
	}
}

// TestCheckSamplesBound: a replica that lost every row names only the
// first --samples keys, reports the rest as ranges, and stays cheap.
func TestCheckSamplesBound(t *testing.T) {
	f := newFake(20000)
	f.replicaRows = map[int]fakeRow{}
	tune := testTuning()
	c, tr := check(t, f, tune, false)
	if tr.Result != ResultDiffers {
		t.Fatalf("result %s, want differs", tr.Result)
	}
	want := []string{"1", "2", "3", "4", "5", "6", "7", "8", "9", "10"}
	if !slices.Equal(tr.Missing, want) || len(tr.Extra)+len(tr.Different) != 0 {
		t.Errorf("missing %v extra %v different %v, want missing %v only", tr.Missing, tr.Extra, tr.Different, want)
	}
	// the neighbouring differing ranges merge into one that covers it all
	if len(tr.Ranges) != 1 || tr.Ranges[0].From != nil || tr.Ranges[0].To != nil {
		t.Errorf("ranges %v, want the one whole range", tr.Ranges)
	}
	if c.passes > 20 {
		t.Errorf("%d passes for an empty replica; the sample bound should stop the drill-down early", c.passes)
	}
}

func TestCheckSamplesZeroComparesRangesOnly(t *testing.T) {
	f := newFake(5000)
	delete(f.replicaRows, 2500)
	tune := testTuning()
	tune.samples = 0
	_, tr := check(t, f, tune, false)
	if tr.Result != ResultDiffers || len(tr.Missing) != 0 {
		t.Fatalf("got %+v, want differs without keys", tr)
	}
	r, ok := inRange(t, tr.Ranges, 2500)
	if !ok || r.From == nil || r.To == nil || keyInt(t, *r.To)-keyInt(t, *r.From) != 1000 {
		t.Errorf("ranges %v, want the 1000-row chunk holding 2500", tr.Ranges)
	}
}

// TestCheckLagIsNotADifference: while the primary takes writes between
// verify's reads and the replica is behind or ahead of each snapshot, a
// healthy replica is reported equal.
func TestCheckLagIsNotADifference(t *testing.T) {
	for _, tc := range []struct{ ahead, writes int }{{0, 3}, {1, 3}, {3, 3}, {20, 40}, {100, 200}} {
		t.Run(fmt.Sprintf("ahead=%d/writes=%d", tc.ahead, tc.writes), func(t *testing.T) {
			f := newFake(20000)
			f.ahead = tc.ahead
			rng := rand.New(rand.NewPCG(1, uint64(tc.ahead)))
			next := 20001
			f.afterPrimary = func(f *fake) {
				for range tc.writes {
					switch k := 1 + rng.IntN(20000); rng.IntN(3) {
					case 0:
						f.write(k, "u"+strconv.Itoa(f.ver), false)
					case 1:
						f.write(k, "", true)
					default:
						f.write(next, "new", false)
						next++
					}
				}
			}
			f.write(5, "before", false) // not yet applied: the first pass differs
			_, tr := check(t, f, testTuning(), false)
			if tr.Result != ResultEqual {
				t.Fatalf("got %+v, want equal", tr)
			}
		})
	}
}

// TestCheckAppendingTail: a table whose last range gains more rows between
// verify's reads than a leaf holds still settles as equal: the last level
// is compared row by row whatever its size.
func TestCheckAppendingTail(t *testing.T) {
	f := newFake(20000)
	f.ahead = 150
	next := 20001
	f.afterPrimary = func(f *fake) {
		for range 300 {
			f.write(next, "appended", false)
			next++
		}
	}
	f.write(next, "first", false)
	next++
	c, tr := check(t, f, testTuning(), false)
	if tr.Result != ResultEqual {
		t.Fatalf("got %+v, want equal", tr)
	}
	if len(c.stuck) != 0 {
		t.Errorf("%d ranges too big for the last level", len(c.stuck))
	}
	// chunks, a few levels of splits chasing the growing last range, the
	// row-by-row comparison and its confirmations
	if c.passes > 20 {
		t.Errorf("%d passes: the growing last range was chased", c.passes)
	}
	t.Logf("%d passes", c.passes)
}

// TestCheckTooBigForTheLastLevel: a range that still holds more than
// maxFetch rows at the last level is confirmed as a range.
func TestCheckTooBigForTheLastLevel(t *testing.T) {
	f := newFake(5000)
	for k := 1_000_000; k < 1_003_000; k++ {
		f.replicaRows[k] = fakeRow{val: "extra"}
	}
	tune := testTuning()
	tune.maxDepth, tune.maxFetch = 0, 100 // the chunks themselves are the last level
	_, tr := check(t, f, tune, false)
	if tr.Result != ResultDiffers || len(tr.Extra) != 0 {
		t.Fatalf("got %+v, want differs without keys", tr)
	}
	if len(tr.Ranges) != 1 || tr.Ranges[0].To != nil || keyInt(t, *tr.Ranges[0].From) != 4001 {
		t.Errorf("ranges %v, want [4001, …)", tr.Ranges)
	}
}

func TestSplitDepth(t *testing.T) {
	for _, tc := range []struct {
		chunk, leaf, fanout int64
		want                int
	}{{10000, 100, 8, 3}, {1000, 100, 8, 2}, {100, 100, 8, 0}, {101, 100, 8, 1}, {1000, 20, 8, 2}} {
		if got := splitDepth(tc.chunk, tc.leaf, tc.fanout); got != tc.want {
			t.Errorf("splitDepth(%d, %d, %d) = %d, want %d", tc.chunk, tc.leaf, tc.fanout, got, tc.want)
		}
	}
}

// TestCheckHotRowIsUnsettled: a row written between every pair of the
// primary's reads, with the replica always ahead of the first, can be
// shown neither equal nor different.
func TestCheckHotRowIsUnsettled(t *testing.T) {
	f := newFake(3000)
	f.ahead = 1
	f.afterPrimary = func(f *fake) { f.write(7, "hot"+strconv.Itoa(f.ver), false) }
	f.write(7, "hot", false)
	_, tr := check(t, f, testTuning(), false)
	if tr.Result != ResultUnsettled || tr.Unsettled != 1 || len(tr.Ranges) != 0 {
		t.Fatalf("got %+v, want unsettled (1) with no ranges", tr)
	}
}

// TestCheckRealDifferenceUnderWrites: a real difference is still found
// while the rest of the table is written.
func TestCheckRealDifferenceUnderWrites(t *testing.T) {
	f := newFake(20000)
	f.ahead = 2
	rng := rand.New(rand.NewPCG(7, 7))
	f.afterPrimary = func(f *fake) {
		for range 5 {
			if k := 1 + rng.IntN(20000); k != 4242 {
				f.write(k, "u"+strconv.Itoa(f.ver), false)
			}
		}
	}
	f.replicaRows[4242] = fakeRow{val: "diverged", ver: 1}
	_, tr := check(t, f, testTuning(), false)
	if tr.Result != ResultDiffers || !slices.Equal(tr.Different, []string{"4242"}) || len(tr.Missing)+len(tr.Extra) != 0 {
		t.Fatalf("got %+v, want differs naming only 4242", tr)
	}
	if _, ok := inRange(t, tr.Ranges, 4242); !ok {
		t.Errorf("no range holds 4242: %v", tr.Ranges)
	}
}

func TestCheckLagging(t *testing.T) {
	f := newFake(10)
	f.lagging = true
	c := &checker{p: f, t: testTuning(), log: slog.New(slog.DiscardHandler)}
	var le *LaggingError
	if err := c.run(t.Context()); !errors.As(err, &le) {
		t.Fatalf("got %v, want a LaggingError", err)
	}
}

func TestCheckKeyless(t *testing.T) {
	f := newFake(1000)
	if _, tr := check(t, f, testTuning(), true); tr.Result != ResultEqual {
		t.Fatalf("equal keyless table: got %+v", tr)
	}
	f.replicaRows[1001] = fakeRow{val: "dup"}
	c, tr := check(t, f, testTuning(), true)
	if tr.Result != ResultDiffers || len(tr.Ranges) != 0 || len(tr.Extra) != 0 || *tr.RowsPrimary != 1000 || *tr.RowsReplica != 1001 {
		t.Fatalf("got %+v, want differs with counts 1000/1001 and no ranges or keys", tr)
	}
	// the whole-table hash, then two confirming brackets
	if c.passes != 3 {
		t.Errorf("%d passes, want 3", c.passes)
	}
}

func TestConfirmNeedsTwoStableObservations(t *testing.T) {
	f := newFake(10)
	f.replicaRows[3] = fakeRow{val: "x", ver: 1}
	tune := testTuning()
	c := &checker{p: f, t: tune, log: slog.New(slog.DiscardHandler)}
	kinds, err := c.confirmKeys(t.Context(), []Key{intKey(3), intKey(4)})
	if err != nil {
		t.Fatal(err)
	}
	if kinds["3"] != kindDifferent || kinds["4"] != kindEqual {
		t.Errorf("got %v, want 3 different, 4 equal", kinds)
	}
	if f.primaries != 4 {
		t.Errorf("%d primary reads, want 4 (two brackets)", f.primaries)
	}
	tune.attempts = 1
	c.t = tune
	kinds, err = c.confirmKeys(t.Context(), []Key{intKey(3)})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := kinds["3"]; ok {
		t.Errorf("one observation settled key 3 as %v; it needs two", kinds["3"])
	}
}

func TestMismatched(t *testing.T) {
	p := []row{{key: intKey(1), hash: "a"}, {key: intKey(2), hash: "b"}, {key: intKey(3), hash: "c"}}
	r := []row{{key: intKey(1), hash: "a"}, {key: intKey(3), hash: "x"}, {key: intKey(4), hash: "d"}}
	got := mismatched(p, r)
	want := []Key{intKey(2), intKey(3), intKey(4)}
	if !slices.EqualFunc(got, want, func(a, b Key) bool { return a.id() == b.id() }) {
		t.Errorf("got %v, want %v", got, want)
	}
}

func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		p, r, same bool
		want       kind
	}{
		{true, true, true, kindEqual},
		{true, true, false, kindDifferent},
		{true, false, false, kindMissing},
		{false, true, false, kindExtra},
		{false, false, true, kindEqual},
	} {
		if got := classify(tc.p, tc.r, tc.same); got != tc.want {
			t.Errorf("classify(%v, %v, %v) = %v, want %v", tc.p, tc.r, tc.same, got, tc.want)
		}
	}
}
