package bench

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/xdcr/xdcr/transport"
)

// stageTrace records when each transaction reached the primary's stream
// and the replica's mirror of it, so a steady run can say where its lag
// goes. Transactions are known by their commit time: the one pgoutput
// sends (and the stream carries) is the one pg_xact_commit_timestamp
// reads on the source.
type stageTrace struct {
	mu   sync.Mutex
	at   [2]map[int64]time.Time // commit time (unix µs) → when it arrived in e.sites[i]
	bad  int                    // messages that did not decode
	gone [2]error               // why a site's consumer went away, if it did
	stop []func()
}

// traceStages follows the primary's stream on both sites from now on.
func (e *env) traceStages(ctx context.Context) (*stageTrace, error) {
	t := &stageTrace{at: [2]map[int64]time.Time{{}, {}}}
	for site := range t.at {
		var dec transport.Decoder
		stop, err := e.followStream(ctx, site, false, func(m jetstream.Msg, at time.Time) {
			b, err := dec.Decode(m.Data())
			t.mu.Lock()
			defer t.mu.Unlock()
			if err != nil {
				t.bad++
				return
			}
			for i := range b.Txns {
				t.at[site][b.Txns[i].CommitTime.UnixMicro()] = at
			}
		}, func(err error) {
			t.mu.Lock()
			defer t.mu.Unlock()
			t.gone[site] = err
		})
		if err != nil {
			t.close()
			return nil, err
		}
		t.stop = append(t.stop, stop)
	}
	return t, nil
}

func (t *stageTrace) close() {
	for _, stop := range t.stop {
		stop()
	}
	t.stop = nil
}

// stages splits the lag of transactions (commit and apply times) at the
// stream and the mirror, and says it in one line.
func (t *stageTrace) stages(commits, applied []time.Time, src, dst string) string {
	t.close()
	t.mu.Lock()
	defer t.mu.Unlock()
	var parts [3][]float64
	for i, c := range commits {
		s0, ok0 := t.at[0][c.UnixMicro()]
		s1, ok1 := t.at[1][c.UnixMicro()]
		if !ok0 || !ok1 {
			continue
		}
		for j, d := range []time.Duration{s0.Sub(c), s1.Sub(s0), applied[i].Sub(s1)} {
			parts[j] = append(parts[j], float64(d.Microseconds())/1000)
		}
	}
	var missing string
	if t.bad > 0 {
		missing = fmt.Sprintf(" (%d messages did not decode)", t.bad)
	}
	for site, err := range t.gone {
		if err != nil {
			missing += fmt.Sprintf(" (the consumer on site %d stopped: %v)", site, err)
		}
	}
	n := len(parts[0])
	if n == 0 {
		return "no transaction traced" + missing
	}
	stat := func(v []float64) string {
		slices.Sort(v)
		return fmt.Sprintf("%.2f / %.2f / %.1f", percentile(v, 0.5), percentile(v, 0.99), v[len(v)-1])
	}
	return fmt.Sprintf("lag by stage, p50 / p99 / max ms, %d of %d transactions traced%s: commit → %s's stream %s; → %s's mirror %s; → applied %s",
		n, len(commits), missing, src, stat(parts[0]), dst, stat(parts[1]), stat(parts[2]))
}
