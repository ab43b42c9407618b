package transport

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/xdcr/xdcr/replicator/change"
)

// Publisher publishes one origin's batches to its change stream. Every
// publish names the stream sequence it must follow, so the stream holds an
// exact, gap-free run of batches: if one publish is lost, every later one
// is refused until [Publisher.Resume] re-reads the stream.
//
// A Publisher is used by one goroutine at a time.
type Publisher struct {
	js      jetstream.JetStream
	cluster string
	origin  string
	stream  string
	subject string
	expect  uint64 // stream sequence the next publish must follow
	zc      *compressor
	dec     Decoder
	// Sent, when set, is told the size of every message handed to the
	// stream: as encoded, and as sent (compressed, or the same).
	Sent func(encoded, sent int)
}

// NewPublisher returns a publisher for site origin of cluster. js should be
// made with [jetstream.WithPublishAsyncMaxPending] at least as large as the
// caller's window and a [jetstream.WithPublishAsyncTimeout].
func NewPublisher(js jetstream.JetStream, cluster, origin string) *Publisher {
	return &Publisher{
		js:      js,
		cluster: cluster,
		origin:  origin,
		stream:  StreamName(cluster, origin),
		subject: Subject(cluster, origin),
	}
}

// Compress sets how the publisher compresses messages from now on
// ([CompressNone] unless set); an unknown c is an error and changes nothing.
func (p *Publisher) Compress(c Compression) error {
	zc, err := newCompressor(c)
	if err != nil {
		return err
	}
	p.zc = zc
	return nil
}

// resumeScan bounds how far back Resume looks past messages it cannot read
// (junk published on the subject by someone else).
const resumeScan = 1000

// Resume reads the end of the stream: it returns the last batch the stream
// holds from this origin in epoch (nil when there is none within the last
// messages) and makes the next publish follow the stream's last message.
// Messages it cannot read, or of other origins or epochs (a stale
// message injected at the end), are passed over.
func (p *Publisher) Resume(ctx context.Context, epoch uint64) (*change.Batch, error) {
	st, err := p.js.Stream(ctx, p.stream)
	if err != nil {
		return nil, fmt.Errorf("look up stream %s: %w", p.stream, err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("read stream %s: %w", p.stream, err)
	}
	p.expect = info.State.LastSeq
	for seq, n := info.State.LastSeq, 0; seq >= info.State.FirstSeq && seq > 0 && n < resumeScan; seq, n = seq-1, n+1 {
		raw, err := st.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read stream %s seq %d: %w", p.stream, seq, err)
		}
		if raw.Subject != p.subject {
			continue
		}
		b, err := p.dec.Decode(raw.Data)
		if err != nil || b.Origin != p.origin || b.Epoch != epoch {
			continue // not ours; apply agents report it
		}
		return b, nil
	}
	return nil, nil
}

// Publish sends b without waiting for the acknowledgement. The returned
// channel yields nil once the stream stored b, or the error.
func (p *Publisher) Publish(ctx context.Context, b *change.Batch) (<-chan error, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	data, err := Encode(nil, b)
	if err != nil {
		return nil, fmt.Errorf("encode batch: %w", err)
	}
	encoded := len(data)
	data = p.zc.compress(data)
	if max := p.js.Conn().MaxPayload(); int64(len(data)) > max {
		return nil, fmt.Errorf("a message of %d bytes exceeds the NATS server's max_payload of %d bytes: "+
			"raise max_payload (e.g. to 8MB) on every site's NATS server, or lower capture.max_batch_bytes", len(data), max)
	}
	id := MsgID(p.cluster, b)
	if b.Chunk != nil {
		// A transaction cut short by a restart is published again from its
		// first chunk, after the chunks already stored: the repeat must not
		// be dropped as a duplicate of them.
		id += "@" + strconv.FormatUint(p.expect+1, 10)
	}
	msg := &nats.Msg{Subject: p.subject, Data: data}
	fut, err := p.js.PublishMsgAsync(msg, jetstream.WithMsgID(id), jetstream.WithExpectLastSequence(p.expect))
	if err != nil {
		return nil, fmt.Errorf("publish to %s: %w", p.subject, err)
	}
	p.expect++
	if p.Sent != nil {
		p.Sent(encoded, len(data))
	}
	done := make(chan error, 1)
	go func() {
		select {
		case ack := <-fut.Ok():
			if ack.Duplicate {
				// the stream already had it, so the sequence we expect next is off
				done <- fmt.Errorf("stream %s already holds message %s", p.stream, id)
				return
			}
			done <- nil
		case err := <-fut.Err():
			done <- fmt.Errorf("publish to stream %s: %w", p.stream, err)
		}
	}()
	return done, nil
}
