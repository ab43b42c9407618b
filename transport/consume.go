package transport

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/xdcr/xdcr/replicator/change"
)

// Subscriber reads change streams from the local JetStream domain.
type Subscriber struct {
	js jetstream.JetStream
	// Buffer is how many decoded messages may wait for the reader.
	Buffer int
}

// NewSubscriber returns a subscriber on js.
func NewSubscriber(js jetstream.JetStream) *Subscriber {
	return &Subscriber{js: js, Buffer: 512}
}

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
	it, err := cons.Messages(jetstream.PullMaxMessages(s.Buffer))
	if err != nil {
		return nil, nil, fmt.Errorf("consume stream %s: %w", stream, err)
	}
	out := make(chan change.Delivery, s.Buffer)
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
			d := change.Delivery{Seq: md.Sequence.Stream, Size: len(msg.Data())}
			d.Batch, d.Err = Decode(msg.Data())
			select {
			case out <- d:
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
