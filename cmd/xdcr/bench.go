package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/xdcr/xdcr/internal/bench"
)

type benchOptions struct {
	scale   string
	reps    int
	dir     string
	keep    bool
	only    []string
	profile string
	rates   []int
	stages  bool
}

func newBenchCmd(g *globalOptions) *cobra.Command {
	o := &benchOptions{}
	cmd := &cobra.Command{
		Use:   "bench [--scale tiny|small|full] [--reps N]",
		Short: "Measure xdcr against native logical replication on this machine",
		Long: `Start two local sites (PostgreSQL and NATS with JetStream fsyncing before
every acknowledgement, as ` + "`xdcr dev`" + ` does) and run each workload through
xdcr and through PostgreSQL's own logical replication (a publication and a
subscription between the same two clusters), in the same run, in
alternating order:

  pgbench   catch-up of a pgbench TPC-B backlog built while replication stops
  bulk      catch-up of rows inserted in a few large transactions
  steady    lag of every transaction, source commit to applied, at fixed rates
  capture   capture and publish alone draining the pgbench backlog
  memory    peak RSS of the agents draining a large backlog
  sync      xdcr sync of two tables against pg_dump | psql

After every repetition the targets are compared with the source; a
difference fails the run. Progress goes to stderr; the table of medians and
one "BENCH name=… native=… xdcr=… ratio=… unit=…" line per row go to
stdout. Timings are reported, never checked: a tiny run only shows that
everything works.

--profile DIR also writes CPU and allocation profiles of the agents (and of
this process, which runs the NATS servers) taken while they drain the
pgbench and bulk backlogs of the first repetition, and during each steady
run of xdcr.

--stages splits the lag of every transaction of xdcr's steady runs into
source commit → the primary's stream → the replica's mirror → applied
(two more consumers of the stream, so it adds a little to what it
measures); --rates replaces the steady workload's offered rates.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			bin, err := os.Executable()
			if err != nil {
				return fmt.Errorf("find the xdcr binary to run agents: %w", err)
			}
			dir := o.dir
			if dir == "" {
				if dir, err = os.MkdirTemp("", "xdcr-bench-"); err != nil {
					return err
				}
				if !o.keep {
					defer os.RemoveAll(dir)
				}
			} else if err := prepareDir(dir); err != nil {
				return &exitError{exitUsage, err}
			}
			if dir, err = filepath.Abs(dir); err != nil {
				return err
			}
			if err := os.Chmod(dir, 0o755); err != nil { // the PostgreSQL servers may run as another user
				return err
			}
			if o.profile != "" {
				if o.profile, err = filepath.Abs(o.profile); err != nil {
					return err
				}
			}
			rep, err := bench.Run(cmd.Context(), bench.Options{
				Scale:      o.scale,
				Reps:       o.reps,
				Binary:     bin,
				Dir:        dir,
				Only:       o.only,
				ProfileDir: o.profile,
				Rates:      o.rates,
				Stages:     o.stages,
				Progress:   cmd.ErrOrStderr(),
				Logger:     log,
			})
			if err != nil {
				if o.keep || o.dir != "" {
					return fmt.Errorf("%w (logs under %s)", err, dir)
				}
				return err
			}
			rep.Render(cmd.OutOrStdout())
			return nil
		},
	}
	cmd.Flags().StringVar(&o.scale, "scale", "full", "workload sizes: tiny (CI, under 2 minutes), small, full (the sizes of issue 7)")
	cmd.Flags().IntVar(&o.reps, "reps", 3, "repetitions of each workload")
	cmd.Flags().StringVar(&o.dir, "dir", "", "directory for the sites, logs and config (must be empty or absent; default: a temporary one, removed afterwards)")
	cmd.Flags().BoolVar(&o.keep, "keep", false, "keep the temporary directory afterwards")
	cmd.Flags().StringSliceVar(&o.only, "workload", nil, "run only these workloads: "+strings.Join(bench.Workloads(), ", "))
	cmd.Flags().StringVar(&o.profile, "profile", "", "write pprof profiles of the agents to this directory")
	cmd.Flags().IntSliceVar(&o.rates, "rates", nil, "offered rates of the steady workload, txn/s (default: the scale's, 500,1500 at full)")
	cmd.Flags().BoolVar(&o.stages, "stages", false, "split xdcr's steady lag at the primary's stream and the replica's mirror")
	return cmd
}
