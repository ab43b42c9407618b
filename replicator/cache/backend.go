package cache

import (
	"context"
	"fmt"
	"net/url"
	"strings"
)

// Backend is a site's cache store: Redis or memcached.
type Backend interface {
	// Name is "redis" or "memcached", for metrics and logs.
	Name() string
	// Delete removes keys. A key that is not there counts as removed, so
	// retrying after an error is safe. It returns once every key is gone,
	// or the first error.
	Delete(ctx context.Context, keys []string) error
	// Set stores items without expiry. It returns how many it stored:
	// items the store refuses (too large for memcached) are skipped, not
	// an error.
	Set(ctx context.Context, items []Item) (int, error)
	// Close releases the connections.
	Close() error
}

// patternDeleter is what a backend that can list its keys offers: Redis
// (SCAN). A table flush on a backend without it derives the keys from the
// site's rows instead (see [Flusher]).
type patternDeleter interface {
	// DeletePattern removes every key matching a glob and returns how
	// many it removed.
	DeletePattern(ctx context.Context, pattern string) (int, error)
}

// Item is a value to store under a key.
type Item struct {
	Key   string
	Value []byte
}

// Open returns the backend of a site's cache setting: redis://, rediss://
// or memcache://host:port[,host:port…]. It connects lazily: a cache that is
// down is no error here. An empty setting gives nil: the site has no cache
// store (its invalidations are still published on NATS).
func Open(setting string) (Backend, error) {
	if setting == "" {
		return nil, nil
	}
	u, err := url.Parse(setting)
	if err != nil {
		// memcache://a:1,b:2 is no valid URL to net/url in every form
		if strings.HasPrefix(setting, "memcache://") {
			return newMemcached(setting)
		}
		return nil, fmt.Errorf("parse the cache URL: %w", err)
	}
	switch u.Scheme {
	case "redis", "rediss":
		return newRedis(setting)
	case "memcache":
		return newMemcached(setting)
	}
	return nil, fmt.Errorf("cache URL scheme %q: want redis://, rediss:// or memcache://", u.Scheme)
}

// chunks calls f with consecutive pieces of at most n keys.
func chunks(keys []string, n int, f func([]string) error) error {
	for len(keys) > 0 {
		m := min(n, len(keys))
		if err := f(keys[:m]); err != nil {
			return err
		}
		keys = keys[m:]
	}
	return nil
}
