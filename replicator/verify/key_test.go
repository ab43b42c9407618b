package verify

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"github.com/xdcr/xdcr/replicator"
	"github.com/xdcr/xdcr/replicator/change"
)

func TestKeyString(t *testing.T) {
	for _, tc := range []struct {
		key  Key
		want string
	}{
		{Key{"42"}, "42"},
		{Key{"a b"}, "a b"}, // one column: the value as it is
		{Key{"1", "abc"}, "(1,abc)"},
		{Key{"1", ""}, `(1,"")`},
		{Key{"x,y", `say "hi"`, `back\slash`}, `("x,y","say ""hi""","back\\slash")`},
		{Key{"(", "a b"}, `("(","a b")`},
	} {
		if got := tc.key.String(); got != tc.want {
			t.Errorf("%q.String() = %s, want %s", []string(tc.key), got, tc.want)
		}
	}
}

func TestKeyIDIsUnambiguous(t *testing.T) {
	if (Key{"a,b", "c"}).id() == (Key{"a", "b,c"}).id() || (Key{"ab"}).id() == (Key{"a", "b"}).id() {
		t.Error("different keys share an id")
	}
}

func TestRangeSplit(t *testing.T) {
	r := Range{From: Key{"10"}, To: nil}
	got := r.split([]Key{{"20"}, {"30"}})
	want := []Range{{Key{"10"}, Key{"20"}}, {Key{"20"}, Key{"30"}}, {Key{"30"}, nil}}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range got {
		if !slices.Equal(got[i].From, want[i].From) || !slices.Equal(got[i].To, want[i].To) {
			t.Errorf("part %d: got %v, want %v", i, got[i], want[i])
		}
	}
	if got := (Range{}).split(nil); len(got) != 1 || got[0].From != nil || got[0].To != nil {
		t.Errorf("no points: got %v, want the range itself", got)
	}
}

func TestKeyRangeJSON(t *testing.T) {
	b, err := json.Marshal([]KeyRange{Range{From: Key{"1", "a"}}.report(), Range{To: Key{"7"}}.report()})
	if err != nil {
		t.Fatal(err)
	}
	if want := `[{"from":"(1,a)","to":null},{"from":null,"to":"7"}]`; string(b) != want {
		t.Errorf("got %s, want %s", b, want)
	}
	if got := (Range{From: Key{"3"}}).report().String(); got != "[3, …)" {
		t.Errorf("got %s, want [3, …)", got)
	}
}

func TestRecordEnd(t *testing.T) {
	const block, seg = 8192, 16 << 20
	for _, tc := range []struct{ in, want change.LSN }{
		{0x155B830, 0x155B830},                        // inside a page
		{3*block + shortPageHeader, 3 * block},        // just past a page header
		{2*seg + longPageHeader, 2 * seg},             // just past a segment's first page header
		{2*seg + shortPageHeader, 2*seg + 24},         // a segment starts with a long header, not a short one
		{5*block + shortPageHeader + 8, 5*block + 32}, // a record after the header
	} {
		if got := recordEnd(tc.in, block, seg); got != tc.want {
			t.Errorf("recordEnd(%s) = %s, want %s", tc.in, got, tc.want)
		}
	}
}

func TestSQL(t *testing.T) {
	tb := &table{
		name:     replicator.Table{Schema: "public", Name: "Order"},
		columns:  []string{"a", "b", "v"},
		keys:     []string{"a", "b"},
		keyTypes: []string{"integer", "public.code"},
	}
	sql, args := tb.digestSQL(Range{From: Key{"1", "x"}, To: Key{"5", "y"}})
	for _, want := range []string{
		`md5(ROW(t."a", t."b", t."v")::text)`,
		`FROM "public"."Order" t`,
		`(t."a", t."b") >= (CAST($1::text AS integer), CAST($2::text AS public.code))`,
		`(t."a", t."b") < (CAST($3::text AS integer), CAST($4::text AS public.code))`,
	} {
		if !strings.Contains(sql, want) {
			t.Errorf("digest SQL lacks %s:\n%s", want, sql)
		}
	}
	if want := []any{"1", "x", "5", "y"}; !slices.Equal(args, want) {
		t.Errorf("args %v, want %v", args, want)
	}

	sql, args = tb.splitSQL(Range{}, 1000)
	if !strings.Contains(sql, "WHERE true") || !strings.Contains(sql, "rn % $1 = 1 AND rn > 1") || len(args) != 1 {
		t.Errorf("split SQL of the whole table:\n%s\nargs %v", sql, args)
	}

	sql, args = tb.lookupSQL([]Key{{"1", "x"}, {"2", "y"}})
	if want := `WHERE (t."a", t."b") IN ((CAST($1::text AS integer), CAST($2::text AS public.code)), (CAST($3::text AS integer), CAST($4::text AS public.code)))`; !strings.Contains(sql, want) || len(args) != 4 {
		t.Errorf("lookup SQL lacks %s:\n%s", want, sql)
	}

	one := &table{name: tb.name, columns: []string{"id"}, keys: []string{"id"}, keyTypes: []string{"bigint"}}
	sql, _ = one.rowsSQL(Range{To: Key{"9"}}, 400)
	if want := `WHERE t."id" < CAST($1::text AS bigint) ORDER BY t."id" LIMIT $2`; !strings.Contains(sql, want) {
		t.Errorf("rows SQL lacks %s:\n%s", want, sql)
	}
}

func TestReportFlags(t *testing.T) {
	r := &Report{Sites: []SiteReport{
		{Site: "dc-b", Result: ResultLagging, Tables: []TableReport{{Result: ResultLagging}}},
		{Site: "dc-c", Result: ResultEqual, Tables: []TableReport{{Result: ResultEqual}}},
	}}
	if r.Differs() || r.Failed() || !r.Unverified() {
		t.Errorf("lagging only: differs %v failed %v unverified %v", r.Differs(), r.Failed(), r.Unverified())
	}
	r.Sites[1].Tables = append(r.Sites[1].Tables, TableReport{Result: ResultDiffers})
	if !r.Differs() {
		t.Error("a differing table must make the report differ")
	}
}
