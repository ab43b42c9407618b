package replicator

import (
	"context"
	"log/slog"
	"testing"

	"github.com/xdcr/xdcr/replicator/change"
)

// pendingPublisher stores nothing: every publish stays unacknowledged.
type pendingPublisher struct{ published int }

func (p *pendingPublisher) Resume(context.Context, uint64) (*change.Batch, error) { return nil, nil }
func (p *pendingPublisher) Publish(context.Context, *change.Batch) (<-chan error, error) {
	p.published++
	return make(chan error, 1), nil
}

// TestFlushRunConfirmsOnlyWhatIsStored: a run that waits for room in the
// window (here the earlier publish's acknowledgement) is still buffered
// while it waits, so the slot position must not move past it then, even
// though nothing else is in flight once that acknowledgement arrives.
func TestFlushRunConfirmsOnlyWhatIsStored(t *testing.T) {
	pub := &pendingPublisher{}
	c := NewCapture(CaptureConfig{Cluster: "c", Site: "dc-a", MaxInFlight: 1}, pub, nil, slog.New(slog.DiscardHandler), nil)
	acked := make(chan error, 1)
	acked <- nil
	s := &captureSession{
		Capture:  c,
		inflight: []inflight{{done: acked, confirm: 100}},
		run:      []change.Txn{{Xid: 7, LSN: 150, Changes: []change.Change{{Op: change.Insert}}}},
		runEnd:   200,
		seenEnd:  200,
	}
	if err := s.flushRun(t.Context()); err != nil {
		t.Fatal(err)
	}
	if pub.published != 1 {
		t.Fatalf("published %d batches, want 1", pub.published)
	}
	if s.confirmed != 100 {
		t.Fatalf("confirmed %s while the run up to %s is not acknowledged; want %s", s.confirmed, change.LSN(200), change.LSN(100))
	}
}
