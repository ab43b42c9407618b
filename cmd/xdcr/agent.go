package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/xdcr/xdcr/internal/agent"
	"github.com/xdcr/xdcr/internal/config"
)

type agentOptions struct {
	config  string
	node    string
	dataDir string
	pprof   string
	dialVia map[string]string
}

func newAgentCmd(g *globalOptions) *cobra.Command {
	o := &agentOptions{}
	cmd := &cobra.Command{
		Use:   "agent --config FILE --node ID",
		Short: "Run one node: capture in the primary site, apply in the others",
		Long: `Run the xdcr agent of one node of the config's nodes.

In the primary site the agent owns the logical replication slot
xdcr_<cluster> and a publication of the configured tables, and publishes
every committed transaction to the site's NATS JetStream. In every other
site it applies the primary's transactions, mirrored into the site's own
NATS, to the site's PostgreSQL, exactly once and in commit order.

SIGTERM or SIGINT stops it cleanly: nothing half-applied is committed, and
anything not yet confirmed is sent again after a restart.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			cfg, err := config.Load(o.config)
			if err != nil {
				return &exitError{exitUsage, err}
			}
			dir := o.dataDir
			if dir == "" {
				dir = filepath.Join("/var/lib/xdcr", o.node)
			}
			a, err := agent.New(cfg, o.node, agent.Options{DataDir: dir, Version: version, DialVia: o.dialVia}, log)
			if err != nil {
				return &exitError{exitUsage, err}
			}
			gc := tuneGC(os.Getenv)
			log.Info("agent starting", "version", version, "node", o.node, "cluster", cfg.Cluster, "gc", gc)
			if o.pprof != "" {
				stop, err := servePprof(cmd.Context(), o.pprof, log)
				if err != nil {
					return &exitError{exitUsage, err}
				}
				defer stop()
			}
			if err := a.Run(cmd.Context()); err != nil {
				return fmt.Errorf("agent %s: %w", o.node, err)
			}
			log.Info("agent stopped", "node", o.node)
			return nil
		},
	}
	cmd.Flags().StringVarP(&o.config, "config", "c", "", "the cluster's config file (YAML)")
	cmd.Flags().StringVar(&o.node, "node", "", "which of the config's nodes this agent is")
	cmd.Flags().StringVar(&o.dataDir, "data-dir", "", "where the node keeps its Raft log and snapshots (default /var/lib/xdcr/NODE)")
	cmd.Flags().StringVar(&o.pprof, "pprof", "", "serve Go's /debug/pprof/ profiles on this host:port (off by default; for profiling only, never expose it)")
	// for the fault-injection tests (deploy/faults): reach the other nodes
	// through a proxy on each link
	cmd.Flags().StringToStringVar(&o.dialVia, "dial-via", nil, "ADDR=PROXY: dial PROXY whenever this node would dial another node at ADDR (Raft and HTTP)")
	if err := cmd.Flags().MarkHidden("dial-via"); err != nil {
		panic(err) // the flag is defined just above
	}
	mustRequire(cmd, "config", "node")
	return cmd
}

func mustRequire(cmd *cobra.Command, flags ...string) {
	for _, f := range flags {
		if err := cmd.MarkFlagRequired(f); err != nil {
			panic(errors.Join(fmt.Errorf("flag %s", f), err)) // a programming error in this file
		}
	}
}

// Garbage collection of the agent, unless GOGC or GOMEMLIMIT say
// otherwise: the data path allocates per change, and at Go's default
// (collect when the heap doubles) a catch-up spends a fifth of the agents'
// CPU in the collector. A heap of up to five times what is live costs tens
// of MiB here (the live heap is bounded by the batch and in-flight
// limits); the soft limit keeps the heap under the 256 MiB an agent may
// use, collecting more often near it.
const (
	agentGCPercent   = 400
	agentMemoryLimit = 192 << 20
)

// tuneGC applies the agent's GC settings where the environment sets none,
// and describes what is in force for the log.
func tuneGC(getenv func(string) string) string {
	gogc, limit := getenv("GOGC"), getenv("GOMEMLIMIT")
	if gogc == "" {
		debug.SetGCPercent(agentGCPercent)
		gogc = strconv.Itoa(agentGCPercent)
	}
	if limit == "" {
		debug.SetMemoryLimit(agentMemoryLimit)
		limit = strconv.Itoa(agentMemoryLimit>>20) + "MiB"
	}
	return "GOGC=" + gogc + " GOMEMLIMIT=" + limit
}
