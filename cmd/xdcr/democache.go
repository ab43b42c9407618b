package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	osexec "os/exec"
	"path/filepath"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/redis/go-redis/v9"

	"github.com/xdcr/xdcr/deploy/local"
	"github.com/xdcr/xdcr/internal/config"
	"github.com/xdcr/xdcr/replicator/cache"
)

// demoCaches are the demo's redis-servers, one per site, when redis-server
// is installed.
type demoCaches struct {
	servers map[string]*local.Redis
	missing error // why there are none
}

// startDemoCaches starts a redis-server per demo site, or none (with the
// reason kept for the tour) when redis-server is not on PATH.
func startDemoCaches(ctx context.Context, dir string, log *slog.Logger) (*demoCaches, error) {
	c := &demoCaches{servers: map[string]*local.Redis{}}
	for _, site := range local.SiteNames(3) {
		r, err := local.StartRedis(ctx, local.RedisConfig{Dir: filepath.Join(dir, site, "redis"), Logger: log})
		if errors.Is(err, osexec.ErrNotFound) {
			c.close()
			return &demoCaches{missing: err}, nil
		}
		if err != nil {
			c.close()
			return nil, err
		}
		c.servers[site] = r
	}
	return c, nil
}

// tune gives every site its redis and caches accounts by id.
func (c *demoCaches) tune(cfg *config.Config) {
	if len(c.servers) == 0 {
		return
	}
	for site, r := range c.servers {
		s := cfg.Sites[site]
		s.Redis = r.URL()
		cfg.Sites[site] = s
	}
	cfg.Cache = map[string]config.CacheTable{
		"public.accounts": {Keys: []string{"account:{id}"}, Warm: "SELECT id, email, balance FROM public.accounts"},
	}
}

func (c *demoCaches) close() {
	for _, r := range c.servers {
		_ = r.Close()
	}
}

// cacheStep caches an account in every site's redis, as the sites'
// applications would after reading their replica, updates it on the
// primary, and shows each site's agent deleting the key once the update
// is committed in that site.
func (t *tour) cacheStep(ctx context.Context, conn *pgx.Conn, caches *demoCaches) error {
	if len(caches.servers) == 0 {
		t.say("(skipped: %v)", caches.missing)
		return nil
	}
	c := t.env.cluster
	primary := c.Config.Primary
	replica := c.Config.SiteNames()[1]
	t.say("Every site has its own redis; the config caches accounts as account:{id}.")
	t.say("Caches are never copied between sites: after a transaction commits in a")
	t.say("site, that site's agent deletes the keys it made stale, and publishes them")
	t.say("on the site's NATS subject %s for in-process caches.", cache.Subject(c.Config.Cluster, replica))

	clients := map[string]*redis.Client{}
	for site, r := range caches.servers {
		clients[site] = redis.NewClient(&redis.Options{Addr: r.Addr()})
		defer clients[site].Close()
	}
	// what an application caches: the row as its own replica has it
	for _, site := range c.Config.SiteNames() {
		sc, err := pgx.Connect(ctx, c.DSN(site))
		if err != nil {
			return err
		}
		var row string
		err = sc.QueryRow(ctx, `SELECT row_to_json(a)::text FROM (SELECT id, email, balance FROM accounts WHERE id = 7) a`).Scan(&row)
		sc.Close(ctx)
		if err != nil {
			return err
		}
		if err := clients[site].Set(ctx, "account:7", row, 0).Err(); err != nil {
			return err
		}
	}
	v, _ := clients[replica].Get(ctx, "account:7").Result()
	t.say("  %s's redis: account:7 = %s", replica, v)

	nc, err := nats.Connect(c.Config.Sites[replica].NATS)
	if err != nil {
		return err
	}
	defer nc.Close()
	events, err := nc.SubscribeSync(cache.Subject(c.Config.Cluster, replica))
	if err != nil {
		return err
	}
	if err := nc.Flush(); err != nil {
		return err
	}

	t.say("  UPDATE accounts SET balance = balance + 25 WHERE id = 7   (on %s)", primary)
	start := time.Now()
	if err := exec(ctx, conn, `UPDATE accounts SET balance = balance + 25, updated_at = now() WHERE id = 7`); err != nil {
		return err
	}
	for _, site := range []string{replica, primary, c.Config.SiteNames()[2]} {
		for {
			n, err := clients[site].Exists(ctx, "account:7").Result()
			if err != nil {
				return err
			}
			if n == 0 {
				break
			}
			if time.Since(start) > time.Minute {
				return fmt.Errorf("site %s: account:7 is still cached a minute after the update", site)
			}
			time.Sleep(5 * time.Millisecond)
		}
		t.say("  %s's redis: account:7 is gone %s after the commit on %s", site, time.Since(start).Round(time.Millisecond), primary)
	}
	if msg, err := events.NextMsg(10 * time.Second); err == nil {
		t.say("  event on %s: %s", cache.Subject(c.Config.Cluster, replica), msg.Data)
	}
	t.say("The application reads its replica again and caches the new balance. To")
	t.say("refill a whole cache from a site's replica: `xdcr cache rebuild %s`.", replica)
	return nil
}
