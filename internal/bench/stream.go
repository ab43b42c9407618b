package bench

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/xdcr/xdcr/transport"
)

// streamWatch follows the primary's stream, headers only, until a batch
// holds a transaction committed after a WAL position.
type streamWatch struct {
	found chan time.Time
	errc  chan error
	stop  func()
}

// watchStream starts watching the primary's stream in site (the index in
// e.sites: 0 the source, 1 the replica's mirror) for a run of
// transactions whose last commit LSN is at or beyond after (a commit
// record starts at or after the insert position its transaction saw). Message ids name the
// LSNs (transport.MsgID), so the payloads need not travel.
func (e *env) watchStream(ctx context.Context, site int, after uint64) (*streamWatch, error) {
	w := &streamWatch{found: make(chan time.Time, 1), errc: make(chan error, 1)}
	stop, err := e.followStream(ctx, site, true, func(m jetstream.Msg, at time.Time) {
		last, ok := runLastLSN(m.Headers().Get(jetstream.MsgIDHeader))
		if ok && last >= after {
			select {
			case w.found <- at:
			default:
			}
		}
	}, func(err error) {
		select {
		case w.errc <- err:
		default:
		}
	})
	if err != nil {
		return nil, err
	}
	w.stop = stop
	return w, nil
}

// followStream calls fn with every message the primary's stream in site
// stores from now on, and when it arrived, until stop is called; gone is
// called if the consumer is deleted underneath.
func (e *env) followStream(ctx context.Context, site int, headersOnly bool,
	fn func(m jetstream.Msg, at time.Time), gone func(error)) (stop func(), err error) {
	nc, err := e.sites.List[site].NATS.Connect()
	if err != nil {
		return nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, err
	}
	name := transport.StreamName(clusterName, e.srcSite)
	st, err := js.Stream(ctx, name)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("stream %s: %w", name, err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		nc.Close()
		return nil, err
	}
	cons, err := st.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{
		DeliverPolicy: jetstream.DeliverByStartSequencePolicy,
		OptStartSeq:   info.State.LastSeq + 1,
		HeadersOnly:   headersOnly,
	})
	if err != nil {
		nc.Close()
		return nil, err
	}
	cc, err := cons.Consume(func(m jetstream.Msg) { fn(m, time.Now()) },
		jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
			if errors.Is(err, jetstream.ErrConsumerDeleted) {
				gone(err)
			}
		}))
	if err != nil {
		nc.Close()
		return nil, err
	}
	return func() {
		cc.Stop()
		nc.Close()
	}, nil
}

// wait returns when the batch was seen.
func (w *streamWatch) wait(ctx context.Context) (time.Time, error) {
	defer w.stop()
	select {
	case t := <-w.found:
		return t, nil
	case err := <-w.errc:
		return time.Time{}, err
	case <-ctx.Done():
		return time.Time{}, fmt.Errorf("wait for the marker in the stream: %w", ctx.Err())
	}
}

// seen returns when the batch was seen, if it was.
func (w *streamWatch) seen() (time.Time, bool) {
	select {
	case t := <-w.found:
		return t, true
	default:
		return time.Time{}, false
	}
}

// runLastLSN reads the last commit LSN from the id of a run of whole
// transactions: <cluster>.<origin>.<epoch>.<first>-<last> (hex).
func runLastLSN(id string) (uint64, bool) {
	i := strings.LastIndexByte(id, '.')
	if i < 0 {
		return 0, false
	}
	_, last, ok := strings.Cut(id[i+1:], "-")
	if !ok {
		return 0, false
	}
	v, err := strconv.ParseUint(last, 16, 64)
	return v, err == nil
}
