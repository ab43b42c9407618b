package cache

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/bradfitz/gomemcache/memcache"
)

// memcachedBackend deletes keys with gomemcache, several at a time (the
// text protocol has no multi-key delete). memcached cannot list its keys,
// so it has no DeletePattern: a table flush derives the keys from the
// site's rows.
type memcachedBackend struct {
	mc *memcache.Client
}

var _ Backend = (*memcachedBackend)(nil)

// memcachedParallel is how many requests run at once.
const memcachedParallel = 8

func newMemcached(setting string) (*memcachedBackend, error) {
	hosts := strings.TrimSuffix(strings.TrimPrefix(setting, "memcache://"), "/")
	var servers []string
	for _, h := range strings.Split(hosts, ",") {
		if h = strings.TrimSpace(h); h != "" {
			servers = append(servers, h)
		}
	}
	if len(servers) == 0 {
		return nil, errors.New("the memcache URL names no server")
	}
	mc := memcache.New(servers...)
	mc.Timeout = 2 * time.Second
	mc.MaxIdleConns = memcachedParallel
	return &memcachedBackend{mc: mc}, nil
}

func (m *memcachedBackend) Name() string { return "memcached" }

func (m *memcachedBackend) Close() error { return m.mc.Close() }

// Delete deletes every key; a miss is success, and so is a key memcached
// cannot hold (too long, spaces or control characters): nothing can be
// stored under it either.
func (m *memcachedBackend) Delete(ctx context.Context, keys []string) error {
	return m.each(ctx, len(keys), func(i int) error {
		err := m.mc.Delete(keys[i])
		if err == nil || errors.Is(err, memcache.ErrCacheMiss) || errors.Is(err, memcache.ErrMalformedKey) {
			return nil
		}
		return fmt.Errorf("memcached: delete %q: %w", keys[i], err)
	})
}

// Set stores items; one the server refuses (larger than its item size
// limit) or whose key it cannot hold is skipped.
func (m *memcachedBackend) Set(ctx context.Context, items []Item) (int, error) {
	var (
		mu     sync.Mutex
		stored int
	)
	err := m.each(ctx, len(items), func(i int) error {
		err := m.mc.Set(&memcache.Item{Key: items[i].Key, Value: items[i].Value})
		switch {
		case err == nil:
			mu.Lock()
			stored++
			mu.Unlock()
		case errors.Is(err, memcache.ErrMalformedKey), strings.Contains(err.Error(), "SERVER_ERROR"):
			// gomemcache reports "SERVER_ERROR object too large for cache"
			// as an unexpected response line
		default:
			return fmt.Errorf("memcached: set %q: %w", items[i].Key, err)
		}
		return nil
	})
	return stored, err
}

// each runs f for 0..n-1 on memcachedParallel goroutines and returns the
// first error; it stops early when one fails or ctx ends.
func (m *memcachedBackend) each(ctx context.Context, n int, f func(i int) error) error {
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
		next  int
	)
	take := func() (int, bool) {
		mu.Lock()
		defer mu.Unlock()
		if first != nil || next >= n || ctx.Err() != nil {
			return 0, false
		}
		next++
		return next - 1, true
	}
	for range min(memcachedParallel, n) {
		wg.Go(func() {
			for {
				i, ok := take()
				if !ok {
					return
				}
				if err := f(i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
					return
				}
			}
		})
	}
	wg.Wait()
	if first == nil {
		first = ctx.Err()
	}
	return first
}
