package replicator

import (
	"testing"

	"github.com/xdcr/xdcr/replicator/change"
)

func TestNextRange(t *testing.T) {
	const MiB = 1 << 20
	for _, tc := range []struct {
		name          string
		from, flushed change.LSN
		size          int64
		first         bool
		want          change.LSN
		ok            bool
	}{
		{name: "a range of size", from: 100 * MiB, flushed: 1000 * MiB, size: 96 * MiB, first: true, want: 196 * MiB, ok: true},
		{name: "later ranges too", from: 100 * MiB, flushed: 1000 * MiB, size: 192 * MiB, want: 292 * MiB, ok: true},
		{name: "takes a rest under 16MiB", from: 100 * MiB, flushed: 211 * MiB, size: 96 * MiB, want: 211 * MiB, ok: true},
		{name: "a rest of 16MiB is a range", from: 100 * MiB, flushed: 212 * MiB, size: 96 * MiB, want: 196 * MiB, ok: true},
		{name: "less than fits", from: 100 * MiB, flushed: 150 * MiB, size: 96 * MiB, want: 150 * MiB, ok: true},
		{name: "under 16MiB left", from: 100 * MiB, flushed: 115 * MiB, size: 96 * MiB},
		{name: "under 16MiB left, first range", from: 100 * MiB, flushed: 115 * MiB, size: 96 * MiB, first: true, want: 115 * MiB, ok: true},
		{name: "nothing left", from: 100 * MiB, flushed: 100 * MiB, size: 96 * MiB, first: true},
		{name: "flush behind", from: 100 * MiB, flushed: 99 * MiB, size: 96 * MiB, first: true},
	} {
		got, ok := nextRange(tc.from, tc.flushed, tc.size, tc.first)
		if got != tc.want || ok != tc.ok {
			t.Errorf("%s: nextRange(%d, %d, %d, %v) = %d, %v; want %d, %v", tc.name, tc.from, tc.flushed, tc.size, tc.first, got, ok, tc.want, tc.ok)
		}
	}
}
