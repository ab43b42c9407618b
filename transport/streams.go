package transport

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// StreamName is the stream that holds the changes site publishes while it is
// the primary. Every site's JetStream domain has a stream of that name: the
// site itself holds the original, every other site a mirror.
func StreamName(cluster, site string) string { return "xdcr_" + cluster + "_" + site }

// Subject is the subject site publishes its changes on.
func Subject(cluster, site string) string { return "xdcr." + cluster + "." + site + ".changes" }

// StreamSettings are the limits of every change stream and mirror.
type StreamSettings struct {
	// MaxAge is how long messages are kept; 0 keeps them forever. A replica
	// that is down for longer than MaxAge finds a gap and must be re-synced.
	MaxAge time.Duration
	// MaxBytes bounds a stream's size; 0 is unlimited. A full stream refuses
	// new messages (capture then stops confirming the slot, and PostgreSQL
	// keeps the WAL) rather than dropping old ones that replicas still need.
	MaxBytes int64
	// DuplicateWindow is how long JetStream remembers message ids.
	DuplicateWindow time.Duration
}

// EnsureStreams creates, in the JetStream domain of site local, the stream
// local publishes to when it is primary, and a mirror of every other site's
// stream, so that a failover never waits for a mirror to be set up across
// the WAN. It is idempotent and updates limits that changed. The mirrors
// can be created while the other sites are unreachable; they catch up once
// the leaf connections are up.
//
// A mirror created before its source stream exists starts syncing only
// after nats-server's retry (about 12 s, longer after repeated failures), so
// the other sites' own streams are created first, in their domains over the
// leaf links, where those sites are reachable; the agents there would create
// the very same streams.
func EnsureStreams(ctx context.Context, js jetstream.JetStream, cluster, local string, sites []string, s StreamSettings) error {
	if err := ensure(ctx, js, originConfig(cluster, local, s)); err != nil {
		return err
	}
	for _, site := range sites {
		if site == local {
			continue
		}
		remote, err := jetstream.NewWithDomain(js.Conn(), site)
		if err != nil {
			return err
		}
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_ = ensure(rctx, remote, originConfig(cluster, site, s)) // best effort: the site may be unreachable
		cancel()
	}
	for _, site := range sites {
		if site == local {
			continue
		}
		// a mirror has the origin's limits, but no subjects of its own
		mirror := originConfig(cluster, site, s)
		mirror.Description = fmt.Sprintf("xdcr: mirror of site %s's change stream of cluster %s", site, cluster)
		mirror.Subjects, mirror.Duplicates = nil, 0
		mirror.Mirror = &jetstream.StreamSource{Name: mirror.Name, Domain: site}
		if err := ensure(ctx, js, mirror); err != nil {
			return err
		}
	}
	return nil
}

// sameSource reports whether have mirrors what want names. The server
// stores a source's domain as the external API prefix it stands for.
func sameSource(have, want *jetstream.StreamSource) bool {
	if have == nil || have.Name != want.Name {
		return false
	}
	if have.Domain == want.Domain {
		return true
	}
	return have.External != nil && have.External.APIPrefix == "$JS."+want.Domain+".API"
}

// originConfig is the stream site publishes to when it is primary.
func originConfig(cluster, site string, s StreamSettings) jetstream.StreamConfig {
	return jetstream.StreamConfig{
		Name:        StreamName(cluster, site),
		Description: fmt.Sprintf("xdcr: changes of cluster %s published while site %s is primary", cluster, site),
		Subjects:    []string{Subject(cluster, site)},
		Storage:     jetstream.FileStorage,
		Retention:   jetstream.LimitsPolicy,
		Discard:     jetstream.DiscardNew,
		MaxAge:      s.MaxAge,
		MaxBytes:    orUnlimited(s.MaxBytes),
		MaxMsgs:     -1,
		Duplicates:  s.DuplicateWindow,
		DenyPurge:   true,
	}
}

func orUnlimited(n int64) int64 {
	if n <= 0 {
		return -1
	}
	return n
}

func ensure(ctx context.Context, js jetstream.JetStream, cfg jetstream.StreamConfig) error {
	st, err := js.Stream(ctx, cfg.Name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		if _, err := js.CreateStream(ctx, cfg); err != nil {
			return fmt.Errorf("create stream %s: %w", cfg.Name, err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("look up stream %s: %w", cfg.Name, err)
	}
	have := st.CachedInfo().Config
	switch {
	case cfg.Mirror != nil && !sameSource(have.Mirror, cfg.Mirror):
		return fmt.Errorf("stream %s exists but is not a mirror of site %s's stream: "+
			"delete it (nats stream rm %s) so the agent can create the mirror", cfg.Name, cfg.Mirror.Domain, cfg.Name)
	case cfg.Mirror == nil && have.Mirror != nil:
		return fmt.Errorf("stream %s exists as a mirror, but this site publishes to it: "+
			"delete it (nats stream rm %s) so the agent can create it", cfg.Name, cfg.Name)
	}
	if have.MaxAge == cfg.MaxAge && have.MaxBytes == cfg.MaxBytes && (cfg.Mirror != nil || have.Duplicates == cfg.Duplicates) {
		return nil
	}
	if _, err := js.UpdateStream(ctx, cfg); err != nil {
		return fmt.Errorf("update limits of stream %s: %w", cfg.Name, err)
	}
	return nil
}
