package local

import (
	"os"
	"testing"
)

func TestParseProcStat(t *testing.T) {
	tests := []struct {
		name      string
		line      string
		wantState byte
		wantPPID  int
		wantOK    bool
	}{
		{"plain", "123 (postgres) S 100 123 123 0 -1", 'S', 100, true},
		{"parens and spaces in comm", "124 (postgres: a (b) c) Z 1 124 124 0", 'Z', 1, true},
		{"truncated", "125 (postgres)", 0, 0, false},
		{"no comm", "garbage", 0, 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			state, ppid, ok := parseProcStat([]byte(tt.line))
			if state != tt.wantState || ppid != tt.wantPPID || ok != tt.wantOK {
				t.Errorf("got (%q, %d, %v), want (%q, %d, %v)", state, ppid, ok, tt.wantState, tt.wantPPID, tt.wantOK)
			}
		})
	}
}

func TestProcessAliveSelf(t *testing.T) {
	if !processAlive(os.Getpid()) {
		t.Error("processAlive(self): got false, want true")
	}
	if processAlive(1 << 30) {
		t.Error("processAlive(huge pid): got true, want false")
	}
}
