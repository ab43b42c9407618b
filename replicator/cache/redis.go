package cache

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
)

// redisBackend deletes keys with pipelined UNLINK (DEL on a server that
// does not know UNLINK, which came with Redis 4.0).
type redisBackend struct {
	c      *redis.Client
	useDel atomic.Bool // the server refused UNLINK
}

var (
	_ Backend        = (*redisBackend)(nil)
	_ patternDeleter = (*redisBackend)(nil)
)

// keysPerCommand bounds the keys of one UNLINK, DEL or MSET, and
// pipelineCommands the commands of one round trip.
const (
	keysPerCommand   = 256
	pipelineCommands = 32
)

func newRedis(setting string) (*redisBackend, error) {
	opt, err := redis.ParseURL(setting)
	if err != nil {
		return nil, fmt.Errorf("parse the redis URL: %w", err)
	}
	opt.DisableIdentity = true // no CLIENT SETINFO: fewer round trips, older servers
	opt.MaintNotificationsConfig = &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}
	opt.ContextTimeoutEnabled = true
	opt.DialTimeout = 2 * time.Second
	opt.ReadTimeout = 5 * time.Second
	opt.WriteTimeout = 5 * time.Second
	opt.MaxRetries = 1 // the worker retries with backoff
	opt.PoolSize = 4
	return &redisBackend{c: redis.NewClient(opt)}, nil
}

func (r *redisBackend) Name() string { return "redis" }

func (r *redisBackend) Close() error { return r.c.Close() }

// Delete sends UNLINK (or DEL) commands of up to keysPerCommand keys,
// pipelined.
func (r *redisBackend) Delete(ctx context.Context, keys []string) error {
	return chunks(keys, keysPerCommand*pipelineCommands, func(batch []string) error {
		err := r.delete(ctx, batch, r.useDel.Load())
		if err != nil && !r.useDel.Load() && unknownCommand(err) {
			r.useDel.Store(true)
			err = r.delete(ctx, batch, true)
		}
		if err != nil {
			return fmt.Errorf("redis: delete %d keys: %w", len(batch), err)
		}
		return nil
	})
}

func (r *redisBackend) delete(ctx context.Context, keys []string, del bool) error {
	_, err := r.c.Pipelined(ctx, func(p redis.Pipeliner) error {
		return chunks(keys, keysPerCommand, func(c []string) error {
			if del {
				p.Del(ctx, c...)
			} else {
				p.Unlink(ctx, c...)
			}
			return nil
		})
	})
	return err
}

func unknownCommand(err error) bool {
	return strings.Contains(strings.ToLower(err.Error()), "unknown command")
}

// DeletePattern walks the keyspace with SCAN MATCH and deletes what
// matches, a batch at a time. It does not block the server the way KEYS
// would; keys written while it runs may or may not be seen.
func (r *redisBackend) DeletePattern(ctx context.Context, pattern string) (int, error) {
	var (
		cursor uint64
		n      int
	)
	for {
		keys, next, err := r.c.Scan(ctx, cursor, pattern, 1000).Result()
		if err != nil {
			return n, fmt.Errorf("redis: scan %q: %w", pattern, err)
		}
		if len(keys) > 0 {
			if err := r.Delete(ctx, keys); err != nil {
				return n, err
			}
			n += len(keys)
		}
		if next == 0 {
			return n, nil
		}
		cursor = next
	}
}

// Set stores items with pipelined SETs.
func (r *redisBackend) Set(ctx context.Context, items []Item) (int, error) {
	_, err := r.c.Pipelined(ctx, func(p redis.Pipeliner) error {
		for _, it := range items {
			p.Set(ctx, it.Key, it.Value, 0)
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("redis: set %d keys: %w", len(items), err)
	}
	return len(items), nil
}
