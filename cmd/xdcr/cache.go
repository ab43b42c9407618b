package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/jedib0t/go-pretty/v6/table"
	"github.com/nats-io/nats.go"
	"github.com/spf13/cobra"

	"github.com/xdcr/xdcr/internal/agent"
	"github.com/xdcr/xdcr/internal/config"
	"github.com/xdcr/xdcr/internal/natsconn"
	"github.com/xdcr/xdcr/internal/progress"
	"github.com/xdcr/xdcr/replicator/cache"
)

func newCacheCmd(g *globalOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cache",
		Short: "Work on a site's cache (see docs/cache.md)",
		Args:  cobra.NoArgs,
	}
	cmd.AddCommand(newCacheRebuildCmd(g))
	return cmd
}

type cacheRebuildOptions struct {
	config   string
	tables   []string
	parallel int
}

func newCacheRebuildCmd(g *globalOptions) *cobra.Command {
	o := &cacheRebuildOptions{}
	cmd := &cobra.Command{
		Use:   "rebuild SITE --config FILE [--table T]...",
		Short: "Drop a site's cache keys and warm them again from the site's own database",
		Long: `Rebuild the cache of SITE from SITE's own database (its replica, or the
primary's database on the primary): for every cached table (or each
--table), read the table's rows, build every key its templates give
(cache: in the config) and delete those keys from the site's cache
(sites.SITE.redis) — only those: the rest of the cache is left alone.
Where the table has a warm query, run it and store each row, as JSON,
under the row's keys. Then publish a flush event per table on the site's
NATS subject xdcr.<cluster>.cache.<site>, for caches inside applications.

Agents may keep running. A row that replication changes while its table
is being warmed can keep the warmed (older) value until it changes again:
run it on a quiet site, or give warmed entries a TTL.

Progress is drawn on a terminal, and logged every 5 s otherwise.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			cfg, err := config.Load(o.config)
			if err != nil {
				return &exitError{exitUsage, err}
			}
			return runCacheRebuild(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr(), cfg, args[0], o, log)
		},
	}
	cmd.Flags().StringVarP(&o.config, "config", "c", "", "the cluster's config file (YAML)")
	cmd.Flags().StringSliceVar(&o.tables, "table", nil, "rebuild only this table (repeatable; schema.table, as under cache:)")
	cmd.Flags().IntVar(&o.parallel, "parallel", 4, "tables rebuilt at once")
	mustRequire(cmd, "config")
	return cmd
}

func runCacheRebuild(ctx context.Context, stdout, stderr io.Writer, cfg *config.Config, site string, o *cacheRebuildOptions, log *slog.Logger) error {
	s, ok := cfg.Sites[site]
	switch {
	case !ok:
		return &exitError{exitUsage, fmt.Errorf("site %q is not in the config (sites: %v)", site, cfg.SiteNames())}
	case len(cfg.Cache) == 0:
		return &exitError{exitUsage, fmt.Errorf("the config has no cache: entries, so no keys to rebuild")}
	case s.Redis == "":
		return &exitError{exitUsage, fmt.Errorf("site %s has no cache: set sites.%s.redis in the config", site, site)}
	}
	var only []string
	for _, t := range o.tables {
		norm, err := config.NormalizeTable(t)
		if err != nil {
			return &exitError{exitUsage, fmt.Errorf("--table %s: %w", t, err)}
		}
		if _, ok := cfg.Cache[norm]; !ok {
			return &exitError{exitUsage, fmt.Errorf("--table %s has no entry under cache: in the config", t)}
		}
		if !slices.Contains(only, norm) {
			only = append(only, norm)
		}
	}
	tables, err := agent.CacheTables(cfg)
	if err != nil {
		return &exitError{exitUsage, err}
	}
	keys, err := cache.NewKeys(tables, log)
	if err != nil {
		return &exitError{exitUsage, err}
	}
	backend, err := cache.Open(s.Redis)
	if err != nil {
		return &exitError{exitUsage, fmt.Errorf("sites.%s.redis: %w", site, err)}
	}
	defer backend.Close()

	// The flush events are a courtesy to in-process caches: a NATS that
	// cannot be reached does not stop the rebuild.
	var pub cache.Publisher
	nc, err := natsconn.Connect(cfg, site, nats.Name("xdcr-cache-rebuild"), nats.Timeout(3*time.Second))
	if err != nil {
		log.Warn("cannot reach the site's NATS: no flush events will be published", "err", err)
	} else {
		defer nc.Close()
		pub = nc
	}

	n := len(only)
	if n == 0 {
		n = len(tables)
	}
	fmt.Fprintf(stdout, "Rebuilding the cache of %s (%s) for %d table(s) from its own database\n", site, config.RedactDSN(s.Redis), n)
	disp := progress.NewRows(stderr, isTerminal(stderr), log, 5*time.Second)
	res, err := cache.Rebuild(ctx, cache.RebuildConfig{
		Cluster:  cfg.Cluster,
		Site:     site,
		DSN:      s.Postgres,
		Tables:   only,
		Parallel: o.parallel,
	}, keys, backend, pub, rebuildDisplay{disp})
	disp.Close()

	t := table.NewWriter()
	t.SetOutputMirror(stdout)
	t.SetTitle(fmt.Sprintf("cache of %s", site))
	t.AppendHeader(table.Row{"Table", "Rows read", "Keys dropped", "Entries warmed", "Skipped", "Duration", "Result"})
	for _, r := range res {
		result := "ok"
		if r.Err != nil {
			result = "failed"
		}
		t.AppendRow(table.Row{r.Table, humanize.Comma(r.Rows), humanize.Comma(r.Dropped), humanize.Comma(r.Warmed),
			humanize.Comma(r.Skipped), r.Took.Round(time.Millisecond), result})
	}
	if len(res) > 0 {
		t.Render()
	}
	return err
}

// rebuildDisplay shows cache.Rebuild's progress on a progress.Display.
type rebuildDisplay struct{ d *progress.Display }

func (r rebuildDisplay) Begin(table string, rows int64) { r.d.Start(table, rows, 0) }
func (r rebuildDisplay) Rows(table string, n int64)     { r.d.Add(table, n, 0) }
func (r rebuildDisplay) End(res cache.TableResult)      { r.d.Finish(res.Table, res.Rows) }
