package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"

	"github.com/jedib0t/go-pretty/v6/table"
	"github.com/spf13/cobra"

	"github.com/xdcr/xdcr/internal/config"
	"github.com/xdcr/xdcr/internal/preflight"
)

type configCheckOptions struct {
	config  string
	connect bool
	output  string
}

func newConfigCmd(g *globalOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "config",
		Short: "Check the cluster's config file",
	}
	o := &configCheckOptions{}
	check := &cobra.Command{
		Use:   "check --config FILE [--connect] [-o table|json]",
		Short: "Validate the config file and, with --connect, every site it names",
		Long: `Validate the config file: every problem is reported at once with its key,
line and fix, and no message shows a password or a value taken from the
environment.

With --connect, also reach every site and print a checklist:
  PostgreSQL: the connection (TLS and password as configured), the version,
    wal_level, spare max_replication_slots and max_wal_senders,
    max_slot_wal_keep_size, the REPLICATION attribute (primary), CREATE on
    the database, SET on session_replication_role, and every table: it
    exists, has a key (primary), and the role may read and write it;
  NATS: the connection (TLS and credentials as configured), max_payload
    against capture.max_batch_bytes, JetStream with the site's own domain,
    and the account's storage limit.
What only a primary needs (wal_level, replication slots and senders,
REPLICATION, a key on every table) fails on the current primary and is a
warning on the other sites, which need it to be promoted.

Exit status: 0 when nothing failed (warnings allowed); 1 when a check
failed; 2 when the file is invalid.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(o.output); err != nil {
				return err
			}
			cfg, err := config.Load(o.config)
			if err != nil {
				return &exitError{exitUsage, err}
			}
			log, err := g.logger()
			if err != nil {
				return &exitError{exitUsage, err}
			}
			return runConfigCheck(cmd.Context(), cmd.OutOrStdout(), cfg, o, log)
		},
	}
	check.Flags().StringVarP(&o.config, "config", "c", "", "the cluster's config file (YAML)")
	check.Flags().BoolVar(&o.connect, "connect", false, "reach every site's PostgreSQL and NATS and check them")
	check.Flags().StringVarP(&o.output, "output", "o", "table", "table or json")
	mustRequire(check, "config")
	cmd.AddCommand(check)
	return cmd
}

func runConfigCheck(ctx context.Context, w io.Writer, cfg *config.Config, o *configCheckOptions, log *slog.Logger) error {
	summary := fmt.Sprintf("config %s is valid: cluster %s, %d sites, %d nodes, %d tables", o.config, cfg.Cluster, len(cfg.Sites), len(cfg.Nodes), len(cfg.Tables))
	var checks []preflight.Check
	if o.connect {
		tables, err := syncTables(cfg, nil)
		if err != nil {
			return &exitError{exitUsage, err}
		}
		primary, _, err := currentPrimary(ctx, cfg, log)
		if err != nil {
			return err
		}
		checks = preflight.Run(ctx, cfg, tables, primary)
	}
	if o.output == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if err := enc.Encode(struct {
			Valid  bool              `json:"valid"`
			Checks []preflight.Check `json:"checks"`
		}{true, checks}); err != nil {
			return err
		}
	} else {
		fmt.Fprintln(w, summary)
		if len(checks) > 0 {
			t := table.NewWriter()
			t.SetOutputMirror(w)
			t.AppendHeader(table.Row{"Site", "Check", "Result", "Detail", "Fix"})
			for _, c := range checks {
				t.AppendRow(table.Row{c.Site, c.Check, c.Status, clip(c.Detail, 60), c.Fix})
			}
			t.Render()
		}
	}
	if preflight.Failed(checks) {
		return &exitError{exitFailure, errors.New("some checks failed; each says how to fix it")}
	}
	return nil
}

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
