package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/xdcr/xdcr/deploy/local"
	"github.com/xdcr/xdcr/deploy/topology"
	"github.com/xdcr/xdcr/internal/config"
)

// devSchema is the playground's tables, created on every site.
const devSchema = `
CREATE TABLE IF NOT EXISTS public.accounts (
	id         bigint PRIMARY KEY,
	email      text NOT NULL,
	balance    numeric(14,2) NOT NULL DEFAULT 0,
	updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS public.orders (
	id         bigserial PRIMARY KEY,
	account_id bigint NOT NULL,
	amount     numeric(14,2) NOT NULL,
	note       text,
	created_at timestamptz NOT NULL DEFAULT now()
);`

var devTables = []string{"public.accounts", "public.orders"}

type devOptions struct {
	sites    int
	dir      string
	noAgents bool
}

func newDevCmd(g *globalOptions) *cobra.Command {
	o := &devOptions{}
	cmd := &cobra.Command{
		Use:   "dev --sites N --dir DIR [--no-agents]",
		Short: "Run N local sites (PostgreSQL + NATS each, and their agents) until interrupted",
		Long: `Start a playground of N datacenters on this machine: one PostgreSQL
cluster (wal_level=logical, run as a non-root user) and one NATS server
with JetStream per site, all on 127.0.0.1, the NATS servers joined by an
isolated leaf-node mesh, and one xdcr agent per site unless --no-agents.

The config is written to DIR/xdcr.yaml (cluster "shop", primary dc-a,
tables public.accounts and public.orders, created on every site). Every
site's connection strings are printed, then a line "ready" once everything
accepts connections and writes to the primary are being captured. SIGINT
or SIGTERM stops everything that was started; DIR keeps the data.

With --no-agents nothing replicates yet: add tables that exist only on the
primary to tables: in DIR/xdcr.yaml, run ` + "`xdcr sync SITE`" + ` for each
replica, then start ` + "`xdcr agent --config DIR/xdcr.yaml --node ID`" + ` per node.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			if o.sites < 2 || o.sites > 26 {
				return &exitError{exitUsage, fmt.Errorf("--sites %d: want between 2 and 26", o.sites)}
			}
			if err := prepareDir(o.dir); err != nil {
				return &exitError{exitUsage, err}
			}
			env, err := startLocal(cmd.Context(), o.sites, o.dir, !o.noAgents, nil, log)
			if err != nil {
				return err
			}
			defer env.close(log)
			printSites(cmd.OutOrStdout(), env)
			fmt.Fprintln(cmd.OutOrStdout(), "ready")
			<-cmd.Context().Done()
			log.Info("stopping")
			return nil
		},
	}
	cmd.Flags().IntVar(&o.sites, "sites", 3, "number of sites (datacenters)")
	cmd.Flags().StringVar(&o.dir, "dir", "", "directory for the sites' data, logs and xdcr.yaml (must be empty or absent)")
	cmd.Flags().BoolVar(&o.noAgents, "no-agents", false, "start the databases and NATS servers only")
	mustRequire(cmd, "dir")
	return cmd
}

// prepareDir accepts an absent or empty directory.
func prepareDir(dir string) error {
	entries, err := os.ReadDir(dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return os.MkdirAll(dir, 0o755)
	case err != nil:
		return fmt.Errorf("--dir %s: %w", dir, err)
	case len(entries) > 0:
		return fmt.Errorf("--dir %s is not empty: give an empty or new directory", dir)
	}
	return nil
}

// localEnv is a local playground: sites, a cluster on them, maybe agents.
type localEnv struct {
	sites   *local.Sites
	cluster *topology.Cluster
}

// startLocal starts n sites in dir and a cluster on them; tune, when set,
// adjusts its config before it is written.
func startLocal(ctx context.Context, n int, dir string, agents bool, tune func(*config.Config), log *slog.Logger) (env *localEnv, err error) {
	dir, err = filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	bin, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find the xdcr binary to run agents: %w", err)
	}
	env = &localEnv{}
	defer func() {
		if err != nil {
			env.close(log)
		}
	}()
	log.Info("starting sites", "sites", n, "dir", dir)
	env.sites, err = local.StartSites(ctx, local.SitesConfig{Names: local.SiteNames(n), Dir: dir, Logger: log})
	if err != nil {
		return nil, err
	}
	env.cluster, err = topology.New(ctx, env.sites, topology.Options{
		Tables: devTables,
		Schema: devSchema,
		Binary: bin,
		Dir:    dir,
		Tune:   tune,
		Logger: log,
	})
	if err != nil {
		return nil, err
	}
	if !agents {
		return env, nil
	}
	if err := env.cluster.StartAgents(ctx); err != nil {
		return nil, err
	}
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := env.cluster.WaitReady(wctx); err != nil {
		return nil, fmt.Errorf("wait for the agents: %w", err)
	}
	return env, nil
}

func (e *localEnv) close(log *slog.Logger) {
	if e.cluster != nil {
		if err := e.cluster.Close(); err != nil {
			log.Warn("stop agents", "err", err)
		}
	}
	if e.sites != nil {
		if err := e.sites.Close(); err != nil {
			log.Warn("stop sites", "err", err)
		}
	}
}

func printSites(w io.Writer, e *localEnv) {
	cfg := e.cluster.Config
	for _, name := range cfg.SiteNames() {
		role := "replica"
		if name == cfg.Primary {
			role = "primary"
		}
		s := cfg.Sites[name]
		fmt.Fprintf(w, "%-6s %-8s postgres=%s nats=%s node=%s\n", name, role, s.Postgres, s.NATS, topology.NodeID(name))
	}
	fmt.Fprintf(w, "config %s\n", e.cluster.ConfigPath)
}
