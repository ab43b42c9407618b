package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/jedib0t/go-pretty/v6/table"
	"github.com/spf13/cobra"

	"github.com/xdcr/xdcr/internal/api"
	"github.com/xdcr/xdcr/internal/config"
	"github.com/xdcr/xdcr/replicator/change"
	"github.com/xdcr/xdcr/replicator/verify"
)

type verifyOptions struct {
	config    string
	sites     []string
	tables    []string
	output    string
	samples   int
	wait      time.Duration
	chunkRows int64
	timeout   time.Duration
}

func newVerifyCmd(g *globalOptions) *cobra.Command {
	o := &verifyOptions{}
	cmd := &cobra.Command{
		Use:   "verify --config FILE [--site S] [--table T] [-o table|json]",
		Short: "Compare every replica's tables with the primary's, row by row",
		Long: `Compare each replica site's copy (or only --site ones) of each configured
table (or only --table ones) with the current primary's, without locking
anything, while the primary keeps taking writes.

Per table: a hash of the whole table first; if it differs, hashes of
key-range chunks of --chunk-rows rows, then of smaller and smaller parts of
the chunks that differ, then the rows of the small parts that still
differ. Every comparison reads the primary in one snapshot, waits (at most
--wait) until the replica has applied everything that snapshot holds, and
reads the replica in one snapshot. A row is reported only once two checks
saw it differ while it did not change on the primary around the replica's
read, so lag is not taken for a difference. See docs/verify.md.

Tables without a key (REPLICA IDENTITY FULL) are compared as a whole and
report row counts only.

Exit status: 0 every table is equal; 4 differences were found (with the
tables, key ranges and at most --samples keys); 3 nothing differs but a
site did not reach the primary's position within --wait ("lagging") or
rows kept changing on the primary during every check ("unsettled"), so
they were not verified; 1 on errors.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(o.output); err != nil {
				return err
			}
			if o.samples < 0 {
				return &exitError{exitUsage, fmt.Errorf("--samples %d: want 0 or more", o.samples)}
			}
			log, err := g.logger()
			if err != nil {
				return err
			}
			cfg, err := config.Load(o.config)
			if err != nil {
				return &exitError{exitUsage, err}
			}
			return runVerify(cmd.Context(), cmd.OutOrStdout(), cfg, o, log)
		},
	}
	cmd.Flags().StringVarP(&o.config, "config", "c", "", "the cluster's config file (YAML)")
	cmd.Flags().StringSliceVar(&o.sites, "site", nil, "compare only this replica site (repeatable)")
	cmd.Flags().StringSliceVar(&o.tables, "table", nil, "compare only this table (repeatable; schema.table)")
	cmd.Flags().StringVarP(&o.output, "output", "o", "table", "output format: table or json")
	cmd.Flags().IntVar(&o.samples, "samples", 10, "name at most this many differing keys per table")
	cmd.Flags().DurationVar(&o.wait, "wait", 30*time.Second, "how long to wait each time for a replica to reach the primary's position")
	cmd.Flags().Int64Var(&o.chunkRows, "chunk-rows", 10000, "rows per key-range chunk when a table's hash differs")
	cmd.Flags().DurationVar(&o.timeout, "timeout", 3*time.Second, "how long to wait for each node's HTTP API")
	mustRequire(cmd, "config")
	return cmd
}

func runVerify(ctx context.Context, stdout io.Writer, cfg *config.Config, o *verifyOptions, log *slog.Logger) error {
	tables, err := syncTables(cfg, o.tables)
	if err != nil {
		return &exitError{exitUsage, err}
	}
	primary, epoch, err := currentPrimary(ctx, cfg, log)
	if err != nil {
		return err
	}
	client, err := newClient(cfg, o.timeout)
	if err != nil {
		return err
	}
	replicas, err := verifySites(cfg, primary, o.sites)
	if err != nil {
		return &exitError{exitUsage, err}
	}
	vc := verify.Config{
		Cluster:     cfg.Cluster,
		Primary:     verify.Site{Name: primary, DSN: cfg.Sites[primary].Postgres},
		Replicas:    replicas,
		Tables:      tables,
		Epoch:       epoch,
		ReportedLSN: reportedLSN(client, cfg, primary, epoch),
		Samples:     o.samples,
		Wait:        o.wait,
		ChunkRows:   o.chunkRows,
	}
	rep, err := verify.Run(ctx, vc, log)
	if err != nil {
		return err
	}
	if o.output == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return err
		}
	} else {
		renderVerify(stdout, rep)
	}
	return verifyExit(rep)
}

// verifySites picks the replicas to compare: --site ones, or every site
// but the primary.
func verifySites(cfg *config.Config, primary string, only []string) ([]verify.Site, error) {
	names := only
	if len(names) == 0 {
		for _, s := range cfg.SiteNames() {
			if s != primary {
				names = append(names, s)
			}
		}
	}
	var out []verify.Site
	for _, s := range names {
		site, ok := cfg.Sites[s]
		switch {
		case !ok:
			return nil, fmt.Errorf("--site %s is not in the config (sites: %v)", s, cfg.SiteNames())
		case s == primary:
			return nil, fmt.Errorf("--site %s is the primary: verify compares the replicas with it", s)
		}
		out = append(out, verify.Site{Name: s, DSN: site.Postgres})
	}
	return out, nil
}

// reportedLSN reads a site's applied position from the cluster status, as
// long as the status is of the primary and epoch verify compares with.
func reportedLSN(client *api.Client, cfg *config.Config, primary string, epoch uint64) func(context.Context, string) (change.LSN, error) {
	return func(ctx context.Context, site string) (change.LSN, error) {
		st, err := fetchStatus(ctx, client, cfg)
		if err != nil {
			return 0, err
		}
		if st.Primary != primary || st.Epoch != epoch {
			return 0, fmt.Errorf("the cluster is now at primary %s epoch %d, not %s epoch %d", st.Primary, st.Epoch, primary, epoch)
		}
		for _, s := range st.Sites {
			// lag_bytes is null when the site's report is of another
			// primary or epoch, or the primary has not reported
			if s.Site == site && s.LagBytes != nil && s.AppliedLSN != "" {
				return change.ParseLSN(s.AppliedLSN)
			}
		}
		return 0, nil
	}
}

// verifyExit chooses the exit status: differences first, then errors,
// then what could not be verified.
func verifyExit(rep *verify.Report) error {
	var differ, failed, unverified []string
	for _, s := range rep.Sites {
		if s.Error != "" {
			failed = append(failed, s.Site)
		}
		for _, t := range s.Tables {
			name := s.Site + " " + t.Table
			switch t.Result {
			case verify.ResultDiffers:
				differ = append(differ, name)
			case verify.ResultError:
				failed = append(failed, name)
			case verify.ResultLagging, verify.ResultUnsettled:
				unverified = append(unverified, name+" ("+t.Result+")")
			}
		}
	}
	switch {
	case len(differ) > 0:
		return &exitError{exitDiff, fmt.Errorf("differences found: %s", strings.Join(differ, ", "))}
	case len(failed) > 0:
		return &exitError{exitFailure, fmt.Errorf("could not compare: %s", strings.Join(failed, ", "))}
	case len(unverified) > 0:
		return &exitError{exitLag, fmt.Errorf("nothing differs, but not verified: %s", strings.Join(unverified, ", "))}
	}
	return nil
}

// maxRangesShown bounds the ranges listed per table in the table output;
// -o json lists them all.
const maxRangesShown = 8

func renderVerify(w io.Writer, rep *verify.Report) {
	t := table.NewWriter()
	t.SetOutputMirror(w)
	title := fmt.Sprintf("Cluster: %s   primary %s", rep.Cluster, rep.Primary)
	if rep.Epoch != 0 {
		title += fmt.Sprintf("   epoch %d", rep.Epoch)
	}
	t.SetTitle(title)
	t.AppendHeader(table.Row{"Site", "Table", "Rows primary", "Rows replica", "Result", "Differing key ranges"})
	var notes []string
	for _, s := range rep.Sites {
		if s.Error != "" {
			t.AppendRow(table.Row{s.Site, "-", "-", "-", s.Result, ""})
			notes = append(notes, fmt.Sprintf("%s: %s", s.Site, s.Error))
			continue
		}
		for _, tr := range s.Tables {
			var ranges []string
			for i, r := range tr.Ranges {
				if i == maxRangesShown {
					ranges = append(ranges, fmt.Sprintf("… %d more", len(tr.Ranges)-i))
					break
				}
				ranges = append(ranges, r.String())
			}
			if tr.Result == verify.ResultDiffers && len(tr.Ranges) == 0 {
				ranges = []string{"whole table"}
			}
			t.AppendRow(table.Row{s.Site, tr.Table, count(tr.RowsPrimary), count(tr.RowsReplica), tr.Result, strings.Join(ranges, "\n")})
			where := s.Site + " " + tr.Table
			for _, l := range []struct {
				what string
				keys []string
			}{{"missing", tr.Missing}, {"extra", tr.Extra}, {"different", tr.Different}} {
				if len(l.keys) > 0 {
					notes = append(notes, fmt.Sprintf("%s: %s %s %s", where, l.what, keyNoun(tr.Key), strings.Join(l.keys, " ")))
				}
			}
			if tr.Unsettled > 0 {
				notes = append(notes, fmt.Sprintf("%s: %d row(s) changed on the primary during every check", where, tr.Unsettled))
			}
			for _, n := range []string{tr.Note, tr.Error} {
				if n != "" {
					notes = append(notes, where+": "+n)
				}
			}
		}
	}
	t.Render()
	for _, n := range notes {
		fmt.Fprintln(w, n)
	}
}

// keyNoun names the key in notes: "id", or "(a,b)" for a composite one.
func keyNoun(key []string) string {
	if len(key) == 1 {
		return key[0]
	}
	return "(" + strings.Join(key, ",") + ")"
}

func count(n *int64) string {
	if n == nil {
		return "-"
	}
	return humanize.Comma(*n)
}
