package local

import (
	"context"
	"errors"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/bradfitz/gomemcache/memcache"
	"github.com/redis/go-redis/v9"
)

// startRedisT starts a redis-server for a test, or skips it when
// redis-server is not installed.
func startRedisT(t *testing.T, dir string) *Redis {
	t.Helper()
	logger, _ := newTestLogger(t)
	r, err := StartRedis(t.Context(), RedisConfig{Dir: dir, Logger: logger})
	if errors.Is(err, exec.ErrNotFound) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return r
}

func TestRedisLifecycle(t *testing.T) {
	if testing.Short() {
		t.Skip("starts redis-server")
	}
	ctx := t.Context()
	dir := filepath.Join(t.TempDir(), "redis")
	r := startRedisT(t, dir)
	if got, want := r.URL(), "redis://127.0.0.1:"+strconv.Itoa(r.Port())+"/0"; got != want {
		t.Errorf("URL: got %q, want %q", got, want)
	}
	opt, err := redis.ParseURL(r.URL())
	if err != nil {
		t.Fatal(err)
	}
	opt.MaxRetries = -1
	client := redis.NewClient(opt)
	defer client.Close()
	if err := client.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}

	// Stop keeps the keys for the next start, on the same port.
	port := r.Port()
	if err := r.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if r.Running() {
		t.Fatal("running after Stop")
	}
	if err := client.Ping(ctx).Err(); err == nil {
		t.Fatal("PING answered while stopped")
	}
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if r.Port() != port {
		t.Errorf("port changed from %d to %d", port, r.Port())
	}
	if got, err := client.Get(ctx, "k").Result(); err != nil || got != "v" {
		t.Errorf("after restart: got %q, %v, want \"v\"", got, err)
	}

	// Kill is a crash: what was set since the last Stop is gone.
	if err := client.Set(ctx, "k2", "v2", 0).Err(); err != nil {
		t.Fatal(err)
	}
	if err := r.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if n, err := client.Exists(ctx, "k2").Result(); err != nil || n != 0 {
		t.Errorf("a key set before Kill survived: %d, %v", n, err)
	}
}

func TestRedisArgs(t *testing.T) {
	if testing.Short() {
		t.Skip("starts redis-server")
	}
	logger, _ := newTestLogger(t)
	r, err := StartRedis(t.Context(), RedisConfig{Dir: t.TempDir(), Logger: logger, Args: []string{"--rename-command", "UNLINK", ""}})
	if errors.Is(err, exec.ErrNotFound) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	client := redis.NewClient(&redis.Options{Addr: r.Addr()})
	defer client.Close()
	if err := client.Unlink(t.Context(), "k").Err(); err == nil {
		t.Error("UNLINK works although it was renamed away")
	}
}

func TestRedisPortTaken(t *testing.T) {
	if testing.Short() {
		t.Skip("starts redis-server")
	}
	r := startRedisT(t, t.TempDir())
	logger, _ := newTestLogger(t)
	_, err := StartRedis(t.Context(), RedisConfig{Dir: t.TempDir(), Port: r.Port(), Logger: logger})
	if err == nil || !errors.Is(err, errPortInUse) {
		t.Fatalf("got %v, want a port-in-use error", err)
	}
}

func TestMemcachedLifecycle(t *testing.T) {
	if testing.Short() {
		t.Skip("starts memcached")
	}
	logger, _ := newTestLogger(t)
	m, err := StartMemcached(t.Context(), MemcachedConfig{Dir: t.TempDir(), Logger: logger})
	if errors.Is(err, exec.ErrNotFound) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	if got, want := m.URL(), "memcache://127.0.0.1:"+strconv.Itoa(m.Port()); got != want {
		t.Errorf("URL: got %q, want %q", got, want)
	}
	mc := memcache.New(m.Addr())
	defer mc.Close()
	if err := mc.Set(&memcache.Item{Key: "k", Value: []byte("v")}); err != nil {
		t.Fatal(err)
	}
	if it, err := mc.Get("k"); err != nil || string(it.Value) != "v" {
		t.Fatalf("get: %v", err)
	}
	port := m.Port()
	if err := m.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := mc.Set(&memcache.Item{Key: "k", Value: []byte("v")}); err == nil {
		t.Fatal("set succeeded while stopped")
	}
	if err := m.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	if m.Port() != port {
		t.Errorf("port changed from %d to %d", port, m.Port())
	}
	if _, err := mc.Get("k"); !errors.Is(err, memcache.ErrCacheMiss) {
		t.Errorf("after restart: got %v, want a miss", err)
	}
}
