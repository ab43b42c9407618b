package replicator

import (
	"slices"
	"testing"
)

func TestNextRound(t *testing.T) {
	const base = 500_000
	size := base
	var got []int
	for range 4 {
		size = nextRound(base, size, false)
		got = append(got, size)
	}
	if want := []int{1_000_000, 2_000_000, 2_000_000, 2_000_000}; !slices.Equal(got, want) {
		t.Errorf("rounds while restart_lsn stays put: %v, want %v", got, want)
	}
	if n := nextRound(base, 2_000_000, true); n != base {
		t.Errorf("after restart_lsn moved: %d, want %d", n, base)
	}
}
