package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/jedib0t/go-pretty/v6/table"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/xdcr/xdcr/internal/api"
	"github.com/xdcr/xdcr/internal/config"
	"github.com/xdcr/xdcr/internal/natsconn"
	"github.com/xdcr/xdcr/internal/progress"
	"github.com/xdcr/xdcr/replicator"
	"github.com/xdcr/xdcr/transport"
)

type syncOptions struct {
	config    string
	tables    []string
	parallel  int
	chunkRows int64
}

func newSyncCmd(g *globalOptions) *cobra.Command {
	o := &syncOptions{}
	cmd := &cobra.Command{
		Use:   "sync SITE --config FILE [--table T]...",
		Short: "Copy the primary's tables into a site, consistent with the change stream",
		Long: `Copy every configured table (or only --table ones) from the current
primary into SITE, so that SITE's agent continues applying the change
stream from exactly where the copy ends: nothing missed, nothing twice.

Tables missing on SITE are created from the primary's definition (columns,
types, defaults, primary key, unique constraints, indexes, and the enum
types and sequences they use). A table that exists but differs is refused
with the difference and the fix. Existing tables are emptied and refilled.

The copy reads one snapshot of the primary, taken through a temporary
logical replication slot whose consistent point orders it against the
stream, with binary COPY and several workers (large tables split into ranges of
heap blocks); the primary keeps taking writes. While it runs, the
site's agent (if running) waits on the tables being copied and reports
"syncing". An interrupted sync leaves SITE waiting and can simply be run
again: it starts over.

With --table, only those tables are copied into a site that keeps
streaming the others (a table newly added to tables:).`,
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
			return runSync(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr(), cfg, args[0], o, log)
		},
	}
	cmd.Flags().StringVarP(&o.config, "config", "c", "", "the cluster's config file (YAML)")
	cmd.Flags().StringSliceVar(&o.tables, "table", nil, "copy only this table (repeatable; schema.table)")
	cmd.Flags().IntVar(&o.parallel, "parallel", 0, "copy workers (default one per CPU, at least 2)")
	cmd.Flags().Int64Var(&o.chunkRows, "chunk-rows", 0, "copy at most this many rows per range of heap blocks (default: split tables only as far as it takes to keep every worker busy)")
	mustRequire(cmd, "config")
	return cmd
}

func runSync(ctx context.Context, stdout, stderr io.Writer, cfg *config.Config, site string, o *syncOptions, log *slog.Logger) error {
	if _, ok := cfg.Sites[site]; !ok {
		return &exitError{exitUsage, fmt.Errorf("site %q is not in the config (sites: %v)", site, cfg.SiteNames())}
	}
	primary, epoch, err := currentPrimary(ctx, cfg, log)
	if err != nil {
		return err
	}
	if site == primary {
		return &exitError{exitUsage, fmt.Errorf("site %s is the primary: sync copies from the primary into another site", site)}
	}
	tables, err := syncTables(cfg, o.tables)
	if err != nil {
		return &exitError{exitUsage, err}
	}
	stream := transport.StreamName(cfg.Cluster, primary)
	fmt.Fprintf(stdout, "Copying %d table(s) from %s (epoch %d) into %s\n", len(tables), primary, epoch, site)
	disp := progress.New(stderr, isTerminal(stderr), log, 5*time.Second)
	res, err := replicator.Sync(ctx, replicator.SyncConfig{
		Cluster:        cfg.Cluster,
		Site:           site,
		SourceDSN:      cfg.Sites[primary].Postgres,
		TargetDSN:      cfg.Sites[site].Postgres,
		Origin:         primary,
		Epoch:          epoch,
		Stream:         stream,
		StreamPosition: func(ctx context.Context) (uint64, error) { return streamEnd(ctx, cfg, site, stream, log) },
		Tables:         tables,
		Partial:        len(o.tables) > 0,
		Parallel:       o.parallel,
		ChunkRows:      o.chunkRows,
	}, syncDisplay{disp}, log)
	disp.Close()
	if err != nil {
		return err
	}
	t := table.NewWriter()
	t.SetOutputMirror(stdout)
	t.SetTitle(fmt.Sprintf("%s synced at %s (stream seq %d)", site, res.LSN, res.StreamSeq))
	t.AppendHeader(table.Row{"Table", "Created", "Rows", "Bytes", "Duration", "Rows/s"})
	for _, tc := range res.Tables {
		rate := float64(tc.Rows) / max(tc.Duration.Seconds(), 0.001)
		t.AppendRow(table.Row{tc.Table, tc.Created, humanize.Comma(tc.Rows), humanize.IBytes(uint64(tc.Bytes)),
			tc.Duration.Round(time.Millisecond), humanize.Comma(int64(rate))})
	}
	t.Render()
	return nil
}

// syncDisplay shows replicator.SyncProgress on a progress.Display.
type syncDisplay struct{ d *progress.Display }

func (s syncDisplay) Start(table string, rows, bytes int64)  { s.d.Start(table, rows, bytes) }
func (s syncDisplay) Copied(table string, rows, bytes int64) { s.d.Add(table, rows, bytes) }
func (s syncDisplay) Finish(table string, rows int64)        { s.d.Finish(table, rows) }

// currentPrimary asks the nodes for the primary and epoch; when no node
// answers (no agent runs yet) it falls back to the config's bootstrap
// primary in epoch 1.
func currentPrimary(ctx context.Context, cfg *config.Config, log *slog.Logger) (string, uint64, error) {
	client, err := newClient(cfg, 3*time.Second)
	if err != nil {
		return "", 0, err
	}
	st, err := fetchStatus(ctx, client, cfg)
	if err == nil && st.Primary != "" {
		return st.Primary, st.Epoch, nil
	}
	var re *api.RemoteError
	if errors.As(err, &re) && re.Body.Code == api.CodeUnauthorized {
		return "", 0, &exitError{exitUsage, fmt.Errorf("the nodes refuse to tell the cluster state: %w", err)}
	}
	log.Warn("no node told the current primary; using the config's bootstrap primary in epoch 1", "primary", cfg.Primary, "err", err)
	return cfg.Primary, 1, nil
}

func syncTables(cfg *config.Config, only []string) ([]replicator.Table, error) {
	names := cfg.Tables
	if len(only) > 0 {
		names = nil
		for _, t := range only {
			norm, err := config.NormalizeTable(t)
			if err != nil {
				return nil, fmt.Errorf("--table %s: %w", t, err)
			}
			if !slices.Contains(cfg.Tables, norm) {
				return nil, fmt.Errorf("--table %s is not in the config's tables; add it there first", t)
			}
			names = append(names, norm)
		}
	}
	out := make([]replicator.Table, 0, len(names))
	for _, n := range names {
		schema, name, err := config.SplitTable(n)
		if err != nil {
			return nil, err
		}
		out = append(out, replicator.Table{Schema: schema, Name: name})
	}
	return out, nil
}

// streamEnd reads the last sequence of the primary's stream in site's NATS.
// Without it, apply reads the stream from its start and skips what the copy
// holds: slower, but as correct.
func streamEnd(ctx context.Context, cfg *config.Config, site, stream string, log *slog.Logger) (uint64, error) {
	nc, err := natsconn.Connect(cfg, site, nats.Name("xdcr-sync"), nats.Timeout(5*time.Second))
	if natsconn.Permanent(err) {
		return 0, &exitError{exitFailure, err}
	}
	if err != nil {
		log.Warn("cannot reach the site's NATS; apply will read the stream from its start", "err", err)
		return 0, nil
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return 0, err
	}
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	st, err := js.Stream(sctx, stream)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return 0, nil
	}
	if err != nil {
		log.Warn("cannot read the site's stream; apply will read it from its start", "stream", stream, "err", err)
		return 0, nil
	}
	info, err := st.Info(sctx)
	if err != nil {
		return 0, err
	}
	return info.State.LastSeq, nil
}
