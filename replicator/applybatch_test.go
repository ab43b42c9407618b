package replicator

import (
	"bytes"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/xdcr/xdcr/replicator/change"
)

func TestSupersede(t *testing.T) {
	whole := func(id, row string) stmt { return stmt{sql: id, rows: 1, row: row, whole: true} }
	touch := func(id, row string) stmt { return stmt{sql: id, rows: 1, row: row} }
	other := func(id string) stmt { return stmt{sql: id, rows: 1} }
	truncate := func(id string) stmt { return stmt{sql: id, rows: -1, c: &change.Change{Op: change.Truncate}} }

	cases := []struct {
		name string
		in   []stmt
		want []string
	}{
		{"hot rows keep their last update",
			[]stmt{other("pos"), whole("u1", "a"), whole("u2", "b"), other("outbox"), whole("u3", "a"), whole("u4", "a"), whole("u5", "b")},
			[]string{"pos", "outbox", "u4", "u5"}},
		{"a partial update in between keeps the earlier one",
			[]stmt{whole("u1", "a"), touch("p2", "a"), whole("u3", "a")},
			[]string{"u1", "p2", "u3"}},
		{"delete and insert in between keep it",
			[]stmt{whole("u1", "a"), touch("d2", "a"), touch("i3", "a"), whole("u4", "a")},
			[]string{"u1", "d2", "i3", "u4"}},
		{"an insert before the updates stays",
			[]stmt{touch("i1", "a"), whole("u2", "a"), whole("u3", "a")},
			[]string{"i1", "u3"}},
		{"a truncate in between keeps it",
			[]stmt{whole("u1", "a"), truncate("t2"), whole("u3", "a")},
			[]string{"u1", "t2", "u3"}},
		{"updates of rows on tables that do not allow it stay",
			[]stmt{other("u1"), other("u2")},
			[]string{"u1", "u2"}},
		{"only the last of a run before a barrier is dropped against the run after",
			[]stmt{whole("u1", "a"), whole("u2", "a"), touch("p3", "a"), whole("u4", "a"), whole("u5", "a")},
			[]string{"u2", "p3", "u5"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var got []string
			for _, s := range supersede(slices.Clone(tc.in)) {
				got = append(got, s.sql)
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("supersede kept %v, want %v", got, tc.want)
			}
		})
	}
}

func TestRowName(t *testing.T) {
	tg := &target{table: Table{Schema: "public", Name: "t"}, keys: []int{0, 2}}
	v := func(s string) change.Value { return change.Value{Kind: change.Text, Data: []byte(s)} }
	a := rowName(tg, []change.Value{v("1"), v("x"), v("23")})
	if b := rowName(tg, []change.Value{v("1"), v("y"), v("23")}); a != b {
		t.Fatalf("same key, other non-key value: %q != %q", a, b)
	}
	// keys that concatenate to the same text must not collide
	if b := rowName(tg, []change.Value{v("12"), v("x"), v("3")}); a == b {
		t.Fatalf("different keys named the same row %q", a)
	}
	if b := rowName(&target{table: Table{Schema: "public", Name: "u"}, keys: []int{0, 2}}, []change.Value{v("1"), v("x"), v("23")}); a == b {
		t.Fatalf("same key in another table named the same row %q", a)
	}
}

func TestGatherAndSplit(t *testing.T) {
	a := &target{table: Table{Schema: "public", Name: "a"}}
	b := &target{table: Table{Schema: "public", Name: "b"}}
	ins := func(tg *target, row string) stmt { return stmt{sql: "i" + row, rows: 1, row: row, copy: tg} }
	upd := func(row string) stmt { return stmt{sql: "u" + row, rows: 1, row: row, whole: true} }
	n := copyMin + 2 // inserts into each table: enough for a COPY
	var in []stmt
	in = append(in, stmt{sql: "pos"})
	for i := range n {
		r := strconv.Itoa(i)
		in = append(in, ins(a, "a"+r), upd("x"+r), ins(b, "b"+r))
	}
	// a row inserted and then updated stays where it is, so do the rows
	// after a truncate
	in = append(in, ins(a, "a99"), upd("a99"), stmt{sql: "trunc", c: &change.Change{Op: change.Truncate}}, ins(a, "a100"))
	out := gather(slices.Clone(in))
	var got []string
	for _, s := range out {
		got = append(got, s.sql)
	}
	// ia<n-1> is a's last movable insert and ib<n-1> b's: each table's
	// inserts land where its last one was, so all of a's come before the
	// last update
	want := []string{"pos"}
	for i := range n - 1 {
		want = append(want, "ux"+strconv.Itoa(i))
	}
	for i := range n {
		want = append(want, "ia"+strconv.Itoa(i))
	}
	want = append(want, "ux"+strconv.Itoa(n-1))
	for i := range n {
		want = append(want, "ib"+strconv.Itoa(i))
	}
	want = append(want, "ia99", "ua99", "trunc", "ia100")
	if !slices.Equal(got, want) {
		t.Fatalf("gather:\n got %v\nwant %v", got, want)
	}
	if len(out) != len(in) {
		t.Fatalf("gather returned %d statements for %d", len(out), len(in))
	}
	var sizes []int
	var copies []bool
	for _, p := range split(out) {
		sizes = append(sizes, len(p.stmts))
		copies = append(copies, p.copy)
	}
	if want := []int{n, n, 1, n, 4}; !slices.Equal(sizes, want) {
		t.Fatalf("split into parts of %v, want %v", sizes, want)
	}
	if want := []bool{false, true, false, true, false}; !slices.Equal(copies, want) {
		t.Fatalf("split marked COPY parts %v, want %v", copies, want)
	}
}

// TestSplitMixedPart: a part that is not a COPY run may begin with an
// insert and be long; it must stay a batch (it was once sent as a COPY of
// rows of several tables into the first one's).
func TestSplitMixedPart(t *testing.T) {
	a := &target{table: Table{Schema: "public", Name: "a"}}
	b := &target{table: Table{Schema: "public", Name: "b"}}
	var in []stmt
	for i := range 10 {
		r := strconv.Itoa(i)
		in = append(in, stmt{sql: "ia" + r, copy: a}, stmt{sql: "ib" + r, copy: b})
	}
	parts := split(in)
	if len(parts) != 1 || parts[0].copy || len(parts[0].stmts) != len(in) {
		t.Fatalf("alternating inserts into two tables: %d parts (copy %v), want one batch", len(parts), parts[0].copy)
	}
}

func TestAppendCopyRow(t *testing.T) {
	var buf bytes.Buffer
	appendCopyRow(&buf, []change.Value{
		{Kind: change.Text, Data: []byte("a\tb\nc\rd\\e")},
		{Kind: change.Null},
		{Kind: change.Text, Data: []byte(`\N`)},
		{Kind: change.Text, Data: []byte("")},
		{Kind: change.Text, Data: []byte("x\x01y\\")},
	})
	if got, want := buf.String(), "a\\tb\\nc\\rd\\\\e\t\\N\t\\\\N\t\tx\x01y\\\\\n"; got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}

func TestOneCopyRun(t *testing.T) {
	a := &target{table: Table{Schema: "public", Name: "a"}}
	b := &target{table: Table{Schema: "public", Name: "b"}}
	ins := func(tg *target) stmt { return stmt{rows: 1, row: "r", copy: tg} }
	other := stmt{sql: "u", rows: 1, row: "x", whole: true}
	for _, tc := range []struct {
		name string
		in   []stmt
		want bool
	}{
		{"none", []stmt{{sql: "BEGIN"}, other}, true},
		{"one table", []stmt{{sql: "BEGIN"}, ins(a), ins(a), ins(a), {sql: "COMMIT"}}, true},
		{"two tables in turn", []stmt{ins(a), ins(a), other, ins(b), ins(b)}, true},
		{"two tables interleaved", []stmt{ins(a), ins(b), ins(a)}, false},
		{"broken by an update", []stmt{ins(a), other, ins(a)}, false},
	} {
		if got := oneCopyRun(tc.in); got != tc.want {
			t.Errorf("%s: oneCopyRun = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// TestSplitShortRun: a run of inserts into one table goes as a COPY from
// copyMin rows on, and as part of the batch below that.
func TestSplitShortRun(t *testing.T) {
	a := &target{table: Table{Schema: "public", Name: "a"}}
	for _, n := range []int{copyMin - 1, copyMin} {
		in := []stmt{{sql: "pos"}}
		for range n {
			in = append(in, stmt{sql: "ia", copy: a})
		}
		parts := split(in)
		copied := len(parts) == 2 && parts[1].copy && len(parts[1].stmts) == n
		if batched := len(parts) == 1 && !parts[0].copy; n < copyMin && !batched || n >= copyMin && !copied {
			t.Errorf("%d inserts: %d parts, want them %s", n, len(parts), map[bool]string{true: "as one COPY", false: "in the batch"}[n >= copyMin])
		}
	}
}

func TestPlanWrapsGroups(t *testing.T) {
	tg := &target{table: Table{Schema: "public", Name: "t"}}
	batch := func(ids ...string) []stmt {
		var out []stmt
		for _, id := range ids {
			out = append(out, stmt{sql: id, rows: 1})
		}
		return out
	}
	inserts := func(n int) []stmt {
		out := make([]stmt, n)
		for i := range out {
			out[i] = stmt{sql: "i" + strconv.Itoa(i), rows: 1, copy: tg}
		}
		return out
	}
	// shape describes parts: a batch as its statements' sql joined by
	// spaces, a COPY as "COPY n"
	shape := func(parts []part) []string {
		var out []string
		for _, p := range parts {
			if p.copy {
				out = append(out, "COPY "+strconv.Itoa(len(p.stmts)))
				if p.batch != nil {
					t.Errorf("a COPY part carries an encoded batch")
				}
				continue
			}
			var ids []string
			for _, s := range p.stmts {
				ids = append(ids, s.sql)
			}
			out = append(out, strings.Join(ids, " "))
			if p.batch == nil {
				t.Errorf("batch part %q is not encoded", out[len(out)-1])
			}
		}
		return out
	}
	cat := func(parts ...[]stmt) []stmt { return slices.Concat(parts...) }
	cases := []struct {
		name    string
		in      []stmt
		inChunk bool
		want    []string
	}{
		{"one batch is one implicit transaction", batch("pos", "u1"), false,
			[]string{"pos u1"}},
		{"BEGIN and COMMIT join the batches around a COPY", cat(batch("pos", "u1"), inserts(copyMin), batch("u2")), false,
			[]string{"BEGIN pos u1", "COPY 64", "u2 COMMIT"}},
		{"a COPY at the end gets a COMMIT of its own", cat(batch("pos"), inserts(copyMin)), false,
			[]string{"BEGIN pos", "COPY 64", "COMMIT"}},
		{"a group that is only a COPY", inserts(copyMin), false,
			[]string{"BEGIN", "COPY 64", "COMMIT"}},
		{"a large transaction's chunk brings its own", cat(batch("u1"), inserts(copyMin)), true,
			[]string{"u1", "COPY 64"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := shape(plan(slices.Clone(tc.in), tc.inChunk))
			if !slices.Equal(got, tc.want) {
				t.Fatalf("plan: %q, want %q", got, tc.want)
			}
		})
	}
}
