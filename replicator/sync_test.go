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
