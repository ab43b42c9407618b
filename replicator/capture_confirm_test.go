package replicator

import (
	"context"
	"log/slog"
	"reflect"
	"testing"
	"time"

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

// TestLastStoredAfterRestart: a new capture session reports the last
// transaction the stream holds as the source's last commit, whatever the
// stream ends in. It reported nothing after a heartbeat, and a replica
// stopped while the previous session's reports were lost showed no lag.
func TestLastStoredAfterRestart(t *testing.T) {
	at := time.Unix(1_800_000_000, 0).UTC()
	txn := func(lsn change.LSN) change.Txn {
		return change.Txn{Xid: uint32(lsn), LSN: lsn, CommitTime: at, Changes: []change.Change{{Op: change.Insert}}}
	}
	run := &change.Batch{Origin: "dc-a", Epoch: 2, Txns: []change.Txn{txn(0x10), txn(0x20)}}
	final := &change.Batch{Origin: "dc-a", Epoch: 2, Txns: []change.Txn{txn(0x30)}, Chunk: &change.Chunk{Index: 3, Final: true}}
	cut := &change.Batch{Origin: "dc-a", Epoch: 2, Txns: []change.Txn{{LSN: 0x40, PrevLSN: 0x30}}, Chunk: &change.Chunk{Index: 0}}
	hb := &change.Batch{Origin: "dc-a", Epoch: 2, Heartbeat: &change.Heartbeat{WALEnd: 0x90, LastLSN: 0x30, Time: at}}
	for _, tc := range []struct {
		name string
		last *change.Batch
		want change.Txn
	}{
		{"empty stream", nil, change.Txn{}},
		{"run", run, change.Txn{Xid: 0x20, LSN: 0x20, CommitTime: at}},
		{"final chunk", final, change.Txn{Xid: 0x30, LSN: 0x30, CommitTime: at}},
		{"chunk cut short", cut, change.Txn{LSN: 0x30}},
		{"heartbeat", hb, change.Txn{LSN: 0x30}},
		{"another epoch", &change.Batch{Origin: "dc-a", Epoch: 1, Txns: []change.Txn{txn(0x50)}}, change.Txn{}},
	} {
		got := lastStored(tc.last, publishedUpTo(tc.last, "dc-a", 2))
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: got %+v, want %+v", tc.name, got, tc.want)
		}
	}
}
