package checkpoints

import (
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/xdcr/xdcr/replicator/change"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

// t0 is the time every test starts from.
var t0 = time.Date(2026, 11, 27, 10, 0, 0, 0, time.UTC)

func at(d time.Duration) time.Time { return t0.Add(d) }

// boot is the bootstrap of the three-site cluster most tests use.
func boot() Command {
	return Bootstrap{Cluster: "shop", Primary: "dc-a", Sites: []string{"dc-c", "dc-a", "dc-b"}}.Command(t0)
}

func srcReport(epoch uint64, sent, wal, commit change.LSN, commitTime time.Time) SourceReport {
	return SourceReport{
		Site: "dc-a", Epoch: epoch, SentLSN: sent, WALLSN: wal,
		LastCommitLSN: commit, LastCommitTime: commitTime, State: StateStreaming,
	}
}

func appReport(site string, epoch uint64, pos change.LSN, commitTime, asOf time.Time) AppliedReport {
	return AppliedReport{
		Site: site, Epoch: epoch, Origin: "dc-a", LSN: pos,
		CommitTime: commitTime, AsOf: asOf, State: StateStreaming,
	}
}

// newState returns a state with cmds applied; each must be accepted.
func newState(t *testing.T, cmds ...Command) *State {
	t.Helper()
	s := New()
	for i, c := range cmds {
		if err := s.Apply(c); err != nil {
			t.Fatalf("setup command %d (%s): %v", i, c.Op, err)
		}
	}
	return s
}

// promote does what the failover command (not part of this package yet)
// will do: bump the epoch and name a new primary.
func promote(s *State, site string) {
	s.Epoch++
	s.Primary = site
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// golden compares got with testdata/name, or rewrites it under -update.
func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test ./checkpoints -update to create it)", err)
	}
	if string(got) != string(want) {
		t.Errorf("%s differs (go test ./checkpoints -update rewrites it)\n got: %s\nwant: %s", path, got, want)
	}
}

func assertUnchanged(t *testing.T, got, want *State) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		t.Errorf("state changed by a rejected command\n got %s\nwant %s", mustJSON(t, got), mustJSON(t, want))
	}
}
