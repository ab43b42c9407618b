package checkpoints

import (
	"errors"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/xdcr/xdcr/replicator/change"
)

// randomCommand returns a command that is accepted about half of the time:
// mostly reports close to the state's positions, some of them from the
// wrong site or epoch, moving back, or malformed.
func randomCommand(rng *rand.Rand, s *State, step int) Command {
	now := at(time.Duration(step) * time.Second)
	pick := func(xs ...string) string { return xs[rng.IntN(len(xs))] }
	sites := append(slices.Clone(s.Sites), "dc-x")
	epoch := s.Epoch
	switch rng.IntN(8) {
	case 0:
		epoch = s.Epoch + 1
	case 1:
		epoch = uint64(rng.IntN(int(s.Epoch) + 1))
	}
	near := func(l change.LSN) change.LSN {
		switch rng.IntN(6) {
		case 0:
			return 0
		case 1:
			return l - min(l, change.LSN(rng.IntN(0x100)))
		}
		return l + change.LSN(rng.IntN(0x1000))
	}
	when := func() time.Time {
		if rng.IntN(8) == 0 {
			return time.Time{}
		}
		return now.Add(-time.Duration(rng.IntN(5000)) * time.Millisecond).In(time.FixedZone("", 3600*(rng.IntN(5)-2)))
	}
	state := pick(StateStarting, StateStreaming, StateStreaming, StateCatchingUp, StatePaused, StateReconnecting)
	if rng.IntN(50) == 0 {
		state = StateDown
	}
	msg := ""
	if state == StatePaused || state == StateReconnecting {
		msg = pick("schema drift on public.orders", "connection refused", strings.Repeat("x", 1100))
	}
	switch rng.IntN(20) {
	case 0:
		return Bootstrap{Cluster: pick("shop", "blog"), Primary: "dc-a", Sites: []string{"dc-a", "dc-b"}}.Command(now)
	case 1, 2, 3, 4, 5, 6, 7:
		site := s.Primary
		if rng.IntN(6) == 0 {
			site = pick(sites...)
		}
		return SourceReport{
			Site: site, Epoch: epoch,
			SentLSN: near(s.Source.SentLSN), WALLSN: near(s.Source.WALLSN), LastCommitLSN: near(s.Source.LastCommitLSN),
			LastCommitTime: when(), State: state, Error: msg,
		}.Command(now)
	default:
		site := pick(sites...)
		prev := s.Applied[site]
		origin := s.Primary
		if epoch != s.Epoch || rng.IntN(10) == 0 {
			origin = pick(sites...)
		}
		return AppliedReport{
			Site: site, Epoch: epoch, Origin: origin, LSN: near(prev.LSN),
			CommitTime: when(), AsOf: when(), State: state, Error: msg,
		}.Command(now)
	}
}

// TestSnapshotRoundTrip applies a random sequence of commands, with
// failovers in between, and checks along the way that a snapshot restores
// to an equal state, and that the restored state goes on exactly like the
// original.
func TestSnapshotRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	s := newState(t, boot())
	var restored *State
	accepted := 0
	for step := range 4000 {
		if rng.IntN(400) == 0 {
			site := s.Sites[rng.IntN(len(s.Sites))]
			promote(s, site)
			if restored != nil {
				promote(restored, site)
			}
		}
		c := randomCommand(rng, s, step)
		err := s.Apply(c)
		if err == nil {
			accepted++
		}
		if restored != nil {
			if err2 := restored.Apply(c); !sameError(err2, err) {
				t.Fatalf("step %d: restored state: got %v, the original %v", step, err2, err)
			}
		}
		if step%250 == 0 {
			got := snapshotRoundTrip(t, s)
			if step == 2000 {
				restored = got
			}
		}
	}
	if restored == nil || !reflect.DeepEqual(restored, s) {
		t.Errorf("after the same commands, the restored state differs:\n got %s\nwant %s", mustJSON(t, restored), mustJSON(t, s))
	}
	if accepted < 1000 || accepted > 3500 {
		t.Errorf("%d of 4000 random commands accepted; the generator should mix accepted and refused ones", accepted)
	}
	if s.Epoch < 3 {
		t.Errorf("epoch %d at the end; want several failovers", s.Epoch)
	}
}

func sameError(a, b error) bool {
	if a == nil || b == nil {
		return a == nil && b == nil
	}
	return a.Error() == b.Error()
}

func snapshotRoundTrip(t *testing.T, s *State) *State {
	t.Helper()
	data, err := s.MarshalSnapshot()
	if err != nil {
		t.Fatalf("MarshalSnapshot: %v", err)
	}
	got, err := RestoreSnapshot(data)
	if err != nil {
		t.Fatalf("RestoreSnapshot: %v\n%s", err, data)
	}
	if !reflect.DeepEqual(got, s) {
		t.Fatalf("snapshot round trip:\n got %s\nwant %s", mustJSON(t, got), mustJSON(t, s))
	}
	again, err := got.MarshalSnapshot()
	if err != nil || string(again) != string(data) {
		t.Fatalf("snapshot of the restored state: got %s, %v; want %s", again, err, data)
	}
	return got
}

func TestSnapshotEmpty(t *testing.T) {
	got := snapshotRoundTrip(t, New())
	if got.Bootstrapped() {
		t.Error("restored empty state is bootstrapped")
	}
	var zero State
	data, err := zero.MarshalSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	if got, err := RestoreSnapshot(data); err != nil || !reflect.DeepEqual(got, New()) {
		t.Errorf("restore of the zero state's snapshot: got %+v, %v; want New()", got, err)
	}
}

// TestSnapshotGolden pins the version 1 snapshot format: a new build must
// restore it.
func TestSnapshotGolden(t *testing.T) {
	s := stalledCluster(t)
	data, err := s.MarshalSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "snapshot-v1.json", append(data, '\n'))
	got, err := RestoreSnapshot(data)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, s) {
		t.Errorf("got %s, want %s", mustJSON(t, got), mustJSON(t, s))
	}
}

func TestRestoreSnapshotRefuses(t *testing.T) {
	good, err := stalledCluster(t).MarshalSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := RestoreSnapshot(good); err != nil {
		t.Fatalf("RestoreSnapshot of a good snapshot: %v", err)
	}
	edit := func(old, new string) string {
		if !strings.Contains(string(good), old) {
			t.Fatalf("snapshot %s has no %s", good, old)
		}
		return strings.Replace(string(good), old, new, 1)
	}
	for _, tc := range []struct {
		name string
		data string
		want error
	}{
		{"empty", ``, ErrInvalidSnapshot},
		{"garbage", "\x00\x01garbage", ErrInvalidSnapshot},
		{"truncated", string(good[:len(good)/2]), ErrInvalidSnapshot},
		{"a command", `{"v":1,"op":"bootstrap","at":"2026-11-27T10:00:00Z","bootstrap":{"cluster":"shop","primary":"dc-a","sites":["dc-a"]}}`, ErrInvalidSnapshot},
		{"no version", edit(`"v":1,`, ``), ErrInvalidSnapshot},
		{"version 0", edit(`"v":1,`, `"v":0,`), ErrUnsupportedVersion},
		{"newer version", edit(`"v":1,`, `"v":2,`), ErrUnsupportedVersion},
		{"newer version with new fields", edit(`"v":1,`, `"v":2,"history":[],`), ErrUnsupportedVersion},
		{"unknown field", edit(`"v":1,`, `"v":1,"not_a_field":[],`), ErrInvalidSnapshot},
		{"trailing data", string(good) + `{}`, ErrInvalidSnapshot},
		{"epoch 0", edit(`"epoch":2,"sites"`, `"epoch":0,"sites"`), ErrInvalidSnapshot},
		{"unsorted sites", edit(`["dc-a","dc-b","dc-c"]`, `["dc-b","dc-a","dc-c"]`), ErrInvalidSnapshot},
		{"duplicate sites", edit(`["dc-a","dc-b","dc-c"]`, `["dc-a","dc-b","dc-b"]`), ErrInvalidSnapshot},
		{"no sites", edit(`["dc-a","dc-b","dc-c"]`, `[]`), ErrInvalidSnapshot},
		{"primary not a site", edit(`"primary":"dc-a"`, `"primary":"dc-x"`), ErrInvalidSnapshot},
		{"report of an unknown site", edit(`"dc-c":{`, `"dc-x":{`), ErrInvalidSnapshot},
		{"report of a future epoch", edit(`"dc-b":{"epoch":2`, `"dc-b":{"epoch":3`), ErrInvalidSnapshot},
		{"derived state stored", edit(`"state":"catching-up"`, `"state":"down"`), ErrInvalidSnapshot},
		{"reports without a cluster", edit(`"cluster":"shop"`, `"cluster":""`), ErrInvalidSnapshot},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := RestoreSnapshot([]byte(tc.data))
			if !errors.Is(err, tc.want) || s != nil {
				t.Fatalf("RestoreSnapshot(%s): got %+v, %v; want error %v", tc.data, s, err, tc.want)
			}
		})
	}
}
