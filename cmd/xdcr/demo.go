package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/spf13/cobra"

	"github.com/xdcr/xdcr/checkpoints"
	"github.com/xdcr/xdcr/deploy/topology"
	"github.com/xdcr/xdcr/internal/api"
	"github.com/xdcr/xdcr/internal/wait"
	"github.com/xdcr/xdcr/replicator"
)

type demoOptions struct {
	dir  string
	keep bool
}

func newDemoCmd(g *globalOptions) *cobra.Command {
	o := &demoOptions{}
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "A guided tour on three local datacenters",
		Long: `Start three datacenters on this machine (as ` + "`xdcr dev`" + ` does), then walk
through what xdcr does: transactions written on the primary arrive on every
replica whole and in order, each site's cache is invalidated from its own
replica (when redis-server is installed: one per site), a large transaction
is applied atomically, and an agent killed with SIGKILL resumes without
losing or repeating anything.
Everything it starts is stopped at the end; --keep leaves the data behind.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			g.logLevel = "warn"
			log, err := g.logger()
			if err != nil {
				return err
			}
			dir := o.dir
			if dir == "" {
				if dir, err = os.MkdirTemp("", "xdcr-demo-"); err != nil {
					return err
				}
				if !o.keep {
					defer os.RemoveAll(dir)
				}
			} else if err := prepareDir(dir); err != nil {
				return &exitError{exitUsage, err}
			}
			return runDemo(cmd.Context(), cmd.OutOrStdout(), dir, log)
		},
	}
	cmd.Flags().StringVar(&o.dir, "dir", "", "directory for the demo's data (default: a temporary one)")
	cmd.Flags().BoolVar(&o.keep, "keep", false, "keep the data directory afterwards")
	return cmd
}

type tour struct {
	w    io.Writer
	step int
	env  *localEnv
}

func (t *tour) say(format string, args ...any) { fmt.Fprintf(t.w, format+"\n", args...) }

func (t *tour) section(title string) {
	t.step++
	t.say("\n== %d. %s", t.step, title)
}

func runDemo(ctx context.Context, w io.Writer, dir string, log *slog.Logger) error {
	t := &tour{w: w}
	t.section("Three datacenters on this machine")
	t.say("Each site gets its own PostgreSQL 15 cluster and NATS server (JetStream,")
	t.say("fsync before every acknowledgement); the NATS servers form an isolated")
	t.say("leaf-node mesh; one xdcr agent runs per site. Starting…")
	start := time.Now()
	caches, err := startDemoCaches(ctx, dir, log)
	if err != nil {
		return err
	}
	defer caches.close()
	env, err := startLocal(ctx, 3, dir, true, caches.tune, log)
	if err != nil {
		return err
	}
	defer env.close(log)
	t.env = env
	t.say("up in %s:", time.Since(start).Round(100*time.Millisecond))
	printSites(w, env)
	c := env.cluster
	primary := c.Config.Primary

	conn, err := pgx.Connect(ctx, c.DSN(primary))
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))

	t.section("Writes on the primary arrive on every replica")
	t.say("200 transactions on %s, each opening an account and placing an order…", primary)
	for i := 1; i <= 200; i++ {
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `INSERT INTO accounts (id, email, balance) VALUES ($1, $2, 100)`, i, fmt.Sprintf("user%d@example.com", i)); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, `INSERT INTO orders (account_id, amount, note) VALUES ($1, 10, 'welcome order')`, i)
			return err
		})
		if err != nil {
			return err
		}
	}
	if err := t.converge(ctx); err != nil {
		return err
	}

	t.section("Lag, as the Raft group of the agents sees it (`xdcr lag`)")
	t.say("Every agent reports its position once a second through Raft; an idle")
	t.say("primary publishes heartbeats, so caught-up replicas show 0 lag.")
	time.Sleep(1500 * time.Millisecond)
	if err := t.lag(ctx); err != nil {
		return err
	}

	t.section("Updates, deletes and a transfer that must stay atomic")
	if err := exec(ctx, conn, `UPDATE accounts SET balance = balance + 5, updated_at = now() WHERE id % 3 = 0`); err != nil {
		return err
	}
	if err := exec(ctx, conn, `DELETE FROM orders WHERE account_id % 10 = 0`); err != nil {
		return err
	}
	if err := exec(ctx, conn, `BEGIN;
		UPDATE accounts SET balance = balance - 50 WHERE id = 1;
		UPDATE accounts SET balance = balance + 50 WHERE id = 2;
		COMMIT`); err != nil {
		return err
	}
	if err := t.converge(ctx); err != nil {
		return err
	}
	if err := t.balances(ctx); err != nil {
		return err
	}

	t.section("Each site's cache is invalidated from its own replica")
	if err := t.cacheStep(ctx, conn, caches); err != nil {
		return err
	}

	t.section("One large transaction, applied all at once")
	t.say("50,000 orders in a single transaction: capture splits it into chunks")
	t.say("below NATS's message size; each replica applies them in one target")
	t.say("transaction, so no replica ever shows part of it.")
	if err := exec(ctx, conn, `INSERT INTO orders (account_id, amount, note)
		SELECT 1 + g % 200, (g % 1000) / 10.0, repeat('x', 40) FROM generate_series(1, 50000) g`); err != nil {
		return err
	}
	if err := t.converge(ctx); err != nil {
		return err
	}

	replica := c.Config.SiteNames()[1]
	node := topology.NodeID(replica)
	t.section("Kill -9 an agent in the middle of a workload")
	t.say("Writing 300 transactions while the agent of %s is killed with SIGKILL", replica)
	t.say("and started again. It resumes from the position it committed together")
	t.say("with the data, so nothing is lost and nothing is applied twice.")
	for i := 201; i <= 500; i++ {
		if i == 300 {
			if err := c.KillAgent(node); err != nil {
				return err
			}
			t.say("  killed %s's agent after transaction %d", replica, i-1)
		}
		if i == 400 {
			t.say("  while it is down, `xdcr lag` shows it falling behind:")
			time.Sleep(2 * time.Second)
			if err := t.lag(ctx); err != nil {
				return err
			}
			if err := c.StartAgent(ctx, node); err != nil {
				return err
			}
			t.say("  restarted it at transaction %d", i)
		}
		if err := exec(ctx, conn, `INSERT INTO accounts (id, email, balance) VALUES ($1, $2, 100)`, i, fmt.Sprintf("user%d@example.com", i)); err != nil {
			return err
		}
	}
	if err := t.converge(ctx); err != nil {
		return err
	}
	for _, s := range c.Config.SiteNames()[1:] {
		rc, err := pgx.Connect(ctx, c.DSN(s))
		if err != nil {
			return err
		}
		pos, err := replicator.ReadPosition(ctx, rc, c.Config.Cluster)
		rc.Close(ctx)
		if err != nil {
			return err
		}
		t.say("  %s has applied %s up to %s (stream seq %d)", s, pos.Origin, pos.LSN, pos.Seq)
	}

	t.section("A planned switchover: " + replica + " becomes the primary")
	t.say("The primary fences its database (its replicated tables refuse writes),")
	t.say("publishes everything committed before the fence and hands over the LSN of")
	t.say("the last transaction; %s applies up to exactly that LSN, the epoch is", replica)
	t.say("bumped through Raft, %s advances its sequences and starts capturing,", replica)
	t.say("and every other site, the old primary included, follows it. Nothing is lost.")
	client := api.NewClient(5*time.Second, "") // the demo's cluster has no admin token
	st, err := fetchStatus(ctx, client, c.Config)
	if err != nil {
		return err
	}
	resp, err := startPromotion(ctx, client, c.Config, api.PromoteRequest{To: replica, ExpectedEpoch: st.Epoch})
	if err != nil {
		return err
	}
	if err := watchPromotion(ctx, w, client, c.Config, resp, 2*time.Minute); err != nil {
		return err
	}
	c.Config.Primary = replica // in memory, for the checks below
	newConn, err := pgx.Connect(ctx, c.DSN(replica))
	if err != nil {
		return err
	}
	defer newConn.Close(context.WithoutCancel(ctx))
	var id int64
	if err := newConn.QueryRow(ctx, `INSERT INTO orders (account_id, amount, note) VALUES (1, 1, 'on the new primary') RETURNING id`).Scan(&id); err != nil {
		return err
	}
	t.say("  an order written on %s got id %d: its sequence continued above the old primary's", replica, id)
	if _, err := conn.Exec(ctx, `INSERT INTO accounts (id, email) VALUES (9999, 'late@example.com')`); err != nil {
		t.say("  and %s now refuses writes: %v", primary, err)
	}
	if err := t.converge(ctx); err != nil {
		return err
	}

	t.section("Done")
	t.say("Try it yourself: `xdcr dev --sites 3 --dir /tmp/xdcr` runs the same")
	t.say("playground until you press Ctrl-C, and prints its connection strings.")
	return nil
}

// lag prints what `xdcr lag` prints.
// It retries for a while: right after an agent is killed, the Raft group
// may be electing a new leader.
func (t *tour) lag(ctx context.Context) error {
	var err error
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); {
		var st checkpoints.Status
		if st, err = fetchStatus(ctx, api.NewClient(3*time.Second, ""), t.env.cluster.Config); err == nil {
			renderLag(t.w, st)
			return nil
		}
		if err := wait.Sleep(ctx, 500*time.Millisecond); err != nil {
			return err
		}
	}
	return err
}

// converge waits until every replica equals the primary and says how long
// it took.
func (t *tour) converge(ctx context.Context) error {
	start := time.Now()
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := t.env.cluster.WaitConverged(wctx); err != nil {
		return err
	}
	c := t.env.cluster
	for _, table := range c.Config.Tables {
		sum, err := c.TableChecksum(ctx, c.Config.Primary, table)
		if err != nil {
			return err
		}
		t.say("  %-16s %6d rows, md5 %s… on all %d sites", table, sum.Rows, sum.MD5[:min(12, len(sum.MD5))], len(c.Config.Sites))
	}
	t.say("  replicas identical to the primary %s later", time.Since(start).Round(10*time.Millisecond))
	return nil
}

func (t *tour) balances(ctx context.Context) error {
	c := t.env.cluster
	for _, s := range c.Config.SiteNames() {
		conn, err := pgx.Connect(ctx, c.DSN(s))
		if err != nil {
			return err
		}
		var a, b, total string
		err = conn.QueryRow(ctx, `SELECT (SELECT balance::text FROM accounts WHERE id = 1),
			(SELECT balance::text FROM accounts WHERE id = 2), (SELECT sum(balance)::text FROM accounts)`).Scan(&a, &b, &total)
		conn.Close(ctx)
		if err != nil {
			return err
		}
		t.say("  %s: account 1 = %s, account 2 = %s, total = %s", s, a, b, total)
	}
	return nil
}

func exec(ctx context.Context, conn *pgx.Conn, sql string, args ...any) error {
	_, err := conn.Exec(ctx, sql, args...)
	return err
}
