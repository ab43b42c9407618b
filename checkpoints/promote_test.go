package checkpoints

import (
	"errors"
	"testing"
	"time"
)

func TestSwitchover(t *testing.T) {
	s := newState(t, boot(), srcReport(1, 0x500, 0x500, 0x400, at(time.Second)).Command(at(time.Second)))
	steps := []struct {
		name string
		cmd  Command
		want error
	}{
		{"fenced before a promotion", Fenced{ID: "p1", Site: "dc-a", Epoch: 1, HandoffLSN: 0x400}.Command(at(2 * time.Second)), ErrNoPromotion},
		{"promote", Promote{ID: "p1", Kind: KindSwitchover, To: "dc-b", ExpectedEpoch: 1}.Command(at(3 * time.Second)), nil},
		{"same promote again is harmless", Promote{ID: "p1", Kind: KindSwitchover, To: "dc-b", ExpectedEpoch: 1}.Command(at(3 * time.Second)), nil},
		{"a racing promote loses", Promote{ID: "p2", Kind: KindSwitchover, To: "dc-c", ExpectedEpoch: 1}.Command(at(3 * time.Second)), ErrPromotionInProgress},
		{"promoted before the fence", Promoted{ID: "p1", Site: "dc-b", Epoch: 1, HandoffLSN: 0x400}.Command(at(4 * time.Second)), ErrNoPromotion},
		{"fenced from the wrong site", Fenced{ID: "p1", Site: "dc-c", Epoch: 1, HandoffLSN: 0x400}.Command(at(4 * time.Second)), ErrNotPrimary},
		{"fenced", Fenced{ID: "p1", Site: "dc-a", Epoch: 1, HandoffLSN: 0x400, Sequences: map[string]int64{"public.s": 42}}.Command(at(5 * time.Second)), nil},
		{"promoted short of the handoff", Promoted{ID: "p1", Site: "dc-b", Epoch: 1, HandoffLSN: 0x300}.Command(at(6 * time.Second)), ErrRegression},
		{"promoted from the wrong site", Promoted{ID: "p1", Site: "dc-c", Epoch: 1, HandoffLSN: 0x400}.Command(at(6 * time.Second)), ErrNotPrimary},
		{"promoted", Promoted{ID: "p1", Site: "dc-b", Epoch: 1, HandoffLSN: 0x400}.Command(at(7 * time.Second)), nil},
		{"the old primary cannot report any more", srcReport(1, 0x600, 0x600, 0x500, at(8*time.Second)).Command(at(8 * time.Second)), ErrStaleEpoch},
		{"a promote of the old epoch loses", Promote{ID: "p3", Kind: KindSwitchover, To: "dc-c", ExpectedEpoch: 1}.Command(at(9 * time.Second)), ErrEpochMoved},
	}
	for _, st := range steps {
		before := s.Clone()
		err := s.Apply(st.cmd)
		if !errors.Is(err, st.want) || (st.want == nil && err != nil) {
			t.Fatalf("%s: got %v, want %v", st.name, err, st.want)
		}
		if st.want != nil {
			assertUnchanged(t, s, before)
		}
	}
	if s.Epoch != 2 || s.Primary != "dc-b" || s.Promotion != nil {
		t.Fatalf("after the switchover: epoch %d, primary %s, promotion %+v; want 2, dc-b, none", s.Epoch, s.Primary, s.Promotion)
	}
	end, ok := s.EpochEnded(1)
	if !ok || end.EndLSN != 0x400 || end.Successor != "dc-b" || end.Sequences["public.s"] != 42 || end.LostUpTo != 0 {
		t.Fatalf("epoch 1 ended %+v", end)
	}
	if st := s.Status(at(10*time.Second), 5*time.Second); st.LossWindow != nil || st.LastEpochEnd == nil {
		t.Errorf("status after a switchover: loss window %+v, last end %+v", st.LossWindow, st.LastEpochEnd)
	}
	// the snapshot keeps the history
	data, err := s.MarshalSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	r, err := RestoreSnapshot(data)
	if err != nil {
		t.Fatal(err)
	}
	if e, ok := r.EpochEnded(1); !ok || e.EndLSN != 0x400 {
		t.Errorf("restored history: %+v", r.History)
	}
}

func TestFailoverRecordsTheLossWindow(t *testing.T) {
	s := newState(t, boot(),
		srcReport(1, 0x900, 0x900, 0x800, at(time.Second)).Command(at(time.Second)),
		Promote{ID: "f1", Kind: KindFailover, To: "dc-c", ExpectedEpoch: 1}.Command(at(2*time.Second)),
	)
	if s.Promotion.Phase != PhaseCatchUp {
		t.Fatalf("a failover starts in phase %s, want %s", s.Promotion.Phase, PhaseCatchUp)
	}
	if err := s.Apply(Promoted{ID: "f1", Site: "dc-c", Epoch: 1, HandoffLSN: 0x600}.Command(at(3 * time.Second))); err != nil {
		t.Fatal(err)
	}
	st := s.Status(at(4*time.Second), 5*time.Second)
	want := LossWindow{Epoch: 1, OldPrimary: "dc-a", NewPrimary: "dc-c", AppliedLSN: "0/600", PublishedLSN: "0/800"}
	if st.LossWindow == nil || *st.LossWindow != want {
		t.Fatalf("loss window %+v, want %+v", st.LossWindow, want)
	}
}

func TestPromoteRefusals(t *testing.T) {
	s := newState(t, boot())
	for _, tc := range []struct {
		name string
		p    Promote
		want error
	}{
		{"the current primary", Promote{ID: "x", Kind: KindSwitchover, To: "dc-a", ExpectedEpoch: 1}, ErrNotReplica},
		{"an unknown site", Promote{ID: "x", Kind: KindSwitchover, To: "dc-z", ExpectedEpoch: 1}, ErrUnknownSite},
		{"the witness", Promote{ID: "x", Kind: KindFailover, To: "witness", ExpectedEpoch: 1}, ErrUnknownSite},
		{"a stale epoch", Promote{ID: "x", Kind: KindSwitchover, To: "dc-b", ExpectedEpoch: 7}, ErrEpochMoved},
		{"no kind", Promote{ID: "x", To: "dc-b", ExpectedEpoch: 1}, ErrInvalidCommand},
		{"no id", Promote{Kind: KindSwitchover, To: "dc-b", ExpectedEpoch: 1}, ErrInvalidCommand},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := s.Clone()
			if err := s.Apply(tc.p.Command(t0)); !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			assertUnchanged(t, s, before)
		})
	}
	if err := s.Apply(Promote{ID: "a", Kind: KindSwitchover, To: "dc-b", ExpectedEpoch: 1}.Command(t0)); err != nil {
		t.Fatal(err)
	}
	if err := s.Apply(AbortPromotion{ID: "b"}.Command(t0)); !errors.Is(err, ErrNoPromotion) {
		t.Fatalf("abort of another promotion: %v", err)
	}
	if err := s.Apply(AbortPromotion{ID: "a"}.Command(t0)); err != nil || s.Promotion != nil || s.Epoch != 1 {
		t.Fatalf("abort: %v, promotion %+v, epoch %d", err, s.Promotion, s.Epoch)
	}
	// commands round-trip through the log format
	for _, c := range []Command{
		Promote{ID: "a", Kind: KindSwitchover, To: "dc-b", ExpectedEpoch: 1}.Command(t0),
		Fenced{ID: "a", Site: "dc-a", Epoch: 1, HandoffLSN: 9, Sequences: map[string]int64{"s": 1}}.Command(t0),
		Promoted{ID: "a", Site: "dc-b", Epoch: 1, HandoffLSN: 9}.Command(t0),
		AbortPromotion{ID: "a"}.Command(t0),
	} {
		data, err := EncodeCommand(c)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := DecodeCommand(data); err != nil {
			t.Fatalf("%s: %v", c.Op, err)
		}
	}
}
