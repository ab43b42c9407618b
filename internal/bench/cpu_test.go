package bench

import (
	"os"
	"os/exec"
	"runtime"
	"testing"
)

// TestReapedTicks: the CPU of a child that ended and was waited for shows
// in its parent's count, which is how the bench sees backends that exited
// inside a timed window (a catch-up's peek sessions).
func TestReapedTicks(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("reads /proc")
	}
	before, ok := reapedTicks(os.Getpid())
	if !ok {
		t.Fatal("no /proc/self/stat")
	}
	own, _ := procTicks(os.Getpid())
	// about a quarter of a second of CPU in a child
	cmd := exec.Command("sh", "-c", `i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done`)
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	after, _ := reapedTicks(os.Getpid())
	if after-before < 5 {
		t.Errorf("reaped children's CPU grew by %d ticks, want at least 5 (the child's loop)", after-before)
	}
	if ownAfter, _ := procTicks(os.Getpid()); ownAfter-own >= after-before {
		t.Errorf("own CPU grew by %d ticks, the child's by %d: the child's CPU was counted as ours", ownAfter-own, after-before)
	}
}
