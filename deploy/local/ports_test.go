package local

import (
	"net"
	"strconv"
	"testing"
)

// TestFreePortsBelowEphemeralRange: the ports are distinct, free, and out
// of the range the kernel hands to outgoing connections.
func TestFreePortsBelowEphemeralRange(t *testing.T) {
	ports, err := FreePorts(20)
	if err != nil {
		t.Fatal(err)
	}
	low := ephemeralLow()
	seen := make(map[int]bool)
	for _, p := range ports {
		if seen[p] {
			t.Errorf("port %d handed out twice", p)
		}
		seen[p] = true
		if low > lowestPort && (p < lowestPort || p >= low) {
			t.Errorf("port %d is not in [%d, %d): an outgoing connection could take it", p, lowestPort, low)
		}
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			t.Errorf("port %d is not free: %v", p, err)
			continue
		}
		l.Close()
	}
}
