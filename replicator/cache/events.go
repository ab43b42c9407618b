package cache

import (
	"context"
	"encoding/json"
	"fmt"
	"time"
)

// Subject is the NATS subject of a site's invalidation events, on the
// site's own NATS server: xdcr.<cluster>.cache.<site>.
func Subject(cluster, site string) string { return "xdcr." + cluster + ".cache." + site }

// Event is one invalidation as published on [Subject], for caches inside
// applications. Keys are to be dropped; Flush means every key of Table
// (a truncate, a backlog collapsed after an outage, a rebuild). LSN and
// CommitTime are those of the source transaction, when there is one.
//
// An entry with many keys is sent as several events of at most
// [EventKeys] keys. Events are sent at least once, over core NATS: a
// subscriber that is not connected misses them (put a JetStream stream on
// the subject to keep them).
type Event struct {
	Table      string     `json:"table"`
	Op         string     `json:"op"`
	Keys       []string   `json:"keys,omitempty"`
	Flush      bool       `json:"flush,omitempty"`
	LSN        string     `json:"lsn,omitempty"`
	CommitTime *time.Time `json:"commit_time,omitempty"`
}

// EventKeys bounds the keys of one event, to stay well below NATS's
// max_payload.
const EventKeys = 1000

// Publisher is what events need from NATS; *nats.Conn is one.
type Publisher interface {
	Publish(subject string, data []byte) error
	// FlushWithContext returns once the server has received everything
	// published before.
	FlushWithContext(ctx context.Context) error
}

// publishEvents sends events on subject and waits until the server has
// them. It returns how many messages it sent.
func publishEvents(ctx context.Context, pub Publisher, subject string, events []Event) (int, error) {
	n := 0
	for _, e := range events {
		for first := true; first || len(e.Keys) > 0; first = false {
			part := e
			part.Keys = e.Keys[:min(EventKeys, len(e.Keys))]
			e.Keys = e.Keys[len(part.Keys):]
			data, err := json.Marshal(part)
			if err != nil {
				return n, fmt.Errorf("encode an invalidation event: %w", err)
			}
			if err := pub.Publish(subject, data); err != nil {
				return n, fmt.Errorf("publish invalidations on %s: %w", subject, err)
			}
			n++
		}
	}
	if n == 0 {
		return 0, nil
	}
	fctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := pub.FlushWithContext(fctx); err != nil {
		return n, fmt.Errorf("publish invalidations on %s: %w", subject, err)
	}
	return n, nil
}
