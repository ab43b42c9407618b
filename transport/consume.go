package transport

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/xdcr/xdcr/internal/wait"
	"github.com/xdcr/xdcr/replicator/change"
)

// Subscriber reads change streams from the local JetStream domain.
//
// What it holds for a slow reader is bounded in bytes, not messages: a
// message is anything from a heartbeat to a chunk of a large transaction
// (capture.max_batch_bytes), and a thousand of the latter would be a
// gigabyte.
type Subscriber struct {
	js jetstream.JetStream
	// Prefetch bounds the raw messages the client library fetches ahead
	// (at least twice the server's max_payload is used).
	Prefetch int
	// Decoded bounds the decoded messages waiting for the reader, counted
	// by their encoded size; one message always fits. Decoded changes
	// take several times their encoded size, all of it pointers the
	// collector scans: with 16 MiB the apply agent's live heap stayed near
	// its memory limit through a long backlog, and collecting took most of
	// its CPU (docs/performance.md, change 21). A few messages are enough
	// to keep the reader fed.
	Decoded int
}

// NewSubscriber returns a subscriber on js.
func NewSubscriber(js jetstream.JetStream) *Subscriber {
	return &Subscriber{js: js, Prefetch: 32 << 20, Decoded: 4 << 20}
}

// subscriberBuffer is the channel capacity: enough small messages (a
// pgbench transaction is ~1 KiB encoded) to keep a grouping reader fed.
const subscriberBuffer = 1024

// ErrStreamBehind means a stream holds fewer messages than the reader has
// already consumed: it was recreated, or lost data.
var ErrStreamBehind = errors.New("stream is behind the reader")

// Subscribe delivers the messages of stream after sequence afterSeq in
// order, decoded, on the returned channel, through an ordered consumer
// (ephemeral, no acknowledgements: the reader's own stored position says
// where to start). The channel closes when the subscription ends; stop ends
// it, waits for the delivering goroutine and returns why it ended. stop is
// safe to call more than once.
func (s *Subscriber) Subscribe(ctx context.Context, stream string, afterSeq uint64) (<-chan change.Delivery, func() error, error) {
	st, err := s.js.Stream(ctx, stream)
	if err != nil {
		return nil, nil, fmt.Errorf("look up stream %s: %w", stream, err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("read stream %s: %w", stream, err)
	}
	if info.State.LastSeq < afterSeq {
		return nil, nil, fmt.Errorf("%w: %s ends at seq %d but seq %d was already applied here: the stream was "+
			"recreated or lost messages; re-seed this site with `xdcr sync`", ErrStreamBehind, stream, info.State.LastSeq, afterSeq)
	}
	cfg := jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverAllPolicy}
	if afterSeq > 0 {
		cfg = jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: afterSeq + 1}
	}
	cons, err := st.OrderedConsumer(ctx, cfg)
	if err != nil {
		return nil, nil, fmt.Errorf("consume stream %s: %w", stream, err)
	}
	prefetch := max(s.Prefetch, 2*int(s.js.Conn().MaxPayload()))
	it, err := cons.Messages(jetstream.PullMaxBytes(prefetch))
	if err != nil {
		return nil, nil, fmt.Errorf("consume stream %s: %w", stream, err)
	}
	out := make(chan change.Delivery, subscriberBuffer)
	queued := &queuedBytes{limit: s.Decoded}
	var dec Decoder
	runCtx, cancel := context.WithCancel(ctx)
	var (
		wg      sync.WaitGroup
		failure error
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(out)
		for {
			msg, err := it.Next(jetstream.NextContext(runCtx))
			if err != nil {
				if runCtx.Err() == nil && !errors.Is(err, jetstream.ErrMsgIteratorClosed) {
					failure = fmt.Errorf("read stream %s: %w", stream, err)
				}
				return
			}
			md, err := msg.Metadata()
			if err != nil {
				failure = fmt.Errorf("read stream %s: %w", stream, err)
				return
			}
			d := change.Delivery{Seq: md.Sequence.Stream, Size: plainLen(msg.Data())}
			if err := queued.wait(runCtx, func() int { return len(out) }, d.Size); err != nil {
				return
			}
			d.Batch, d.Err = dec.Decode(msg.Data())
			select {
			case out <- d:
				queued.add(d.Size)
			case <-runCtx.Done():
				return
			}
		}
	}()
	var once sync.Once
	stop := func() error {
		once.Do(func() {
			cancel()
			it.Stop()
			wg.Wait()
		})
		return failure
	}
	return out, stop, nil
}

// queuedBytes bounds the bytes of the messages in a delivery channel
// without the reader's help: the channel holds the last len(ch) messages
// sent, and a ring of running totals over the last cap(ch) sends gives
// their size.
type queuedBytes struct {
	limit int
	sent  int                       // messages sent
	total [subscriberBuffer + 1]int // total[k % len] = bytes of the first k messages sent
}

// wait returns once a message of size fits beside the messages still in
// the channel (or the channel is empty), polling while the reader is busy.
func (q *queuedBytes) wait(ctx context.Context, queued func() int, size int) error {
	for {
		n := queued()
		if n == 0 || q.inChannel(n)+size <= q.limit {
			return nil
		}
		if err := wait.Sleep(ctx, time.Millisecond); err != nil {
			return err
		}
	}
}

func (q *queuedBytes) inChannel(n int) int {
	const l = subscriberBuffer + 1
	return q.total[q.sent%l] - q.total[(q.sent-min(n, q.sent))%l]
}

func (q *queuedBytes) add(size int) {
	const l = subscriberBuffer + 1
	q.total[(q.sent+1)%l] = q.total[q.sent%l] + size
	q.sent++
}
