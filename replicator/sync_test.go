package replicator

import (
	"slices"
	"testing"
)

func TestSplitBlocks(t *testing.T) {
	if got := splitBlocks(10, 1); !slices.Equal(got, []blockRange{{}}) {
		t.Fatalf("one range: %v", got)
	}
	if got := splitBlocks(3, 8); !slices.Equal(got, []blockRange{{}}) {
		t.Fatalf("fewer blocks than ranges: %v", got)
	}
	got := splitBlocks(100, 3)
	want := []blockRange{{0, 33}, {33, 66}, {66, 0}}
	if !slices.Equal(got, want) {
		t.Fatalf("splitBlocks(100, 3) = %v, want %v", got, want)
	}
	var conds []string
	for _, r := range got {
		conds = append(conds, r.where())
	}
	wantConds := []string{"ctid < '(33,0)'::tid", "ctid >= '(33,0)'::tid AND ctid < '(66,0)'::tid", "ctid >= '(66,0)'::tid"}
	if !slices.Equal(conds, wantConds) {
		t.Fatalf("conditions %q, want %q", conds, wantConds)
	}
	if w := (blockRange{}).where(); w != "" {
		t.Fatalf("whole table: %q", w)
	}
}

func TestRangesFor(t *testing.T) {
	for _, c := range []struct {
		name               string
		rows, bytes, total int64
		workers            int
		chunkRows, want    int64
	}{
		{"two equal tables, two workers: one each", 5e6, 1 << 30, 2 << 30, 2, 0, 1},
		{"one table, two workers: split in two", 5e6, 1 << 30, 1 << 30, 2, 0, 2},
		{"one table, three workers", 5e6, 1 << 30, 1 << 30, 3, 0, 3},
		{"big table beside a small one", 5e6, 10 << 30, 11 << 30, 2, 0, 2},
		{"small table beside a big one", 5e5, 1 << 30, 11 << 30, 2, 0, 1},
		{"a cap on rows splits further", 5e6, 1 << 30, 2 << 30, 2, 1e6, 5},
		{"empty table", 0, 0, 0, 2, 0, 1},
	} {
		if got := rangesFor(c.rows, c.bytes, c.total, c.workers, c.chunkRows); got != c.want {
			t.Errorf("%s: rangesFor(%d, %d, %d, %d, %d) = %d, want %d", c.name, c.rows, c.bytes, c.total, c.workers, c.chunkRows, got, c.want)
		}
	}
}
