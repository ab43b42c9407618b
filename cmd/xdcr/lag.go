package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/jedib0t/go-pretty/v6/table"
	"github.com/spf13/cobra"

	"github.com/xdcr/xdcr/checkpoints"
	"github.com/xdcr/xdcr/internal/api"
	"github.com/xdcr/xdcr/internal/config"
)

// exitLag is `xdcr lag`'s status when a site is past --max-lag or unknown.
const exitLag = 3

type lagOptions struct {
	config   string
	output   string
	watch    bool
	interval time.Duration
	maxLag   time.Duration
	timeout  time.Duration
}

func newLagCmd(g *globalOptions) *cobra.Command {
	o := &lagOptions{}
	cmd := &cobra.Command{
		Use:   "lag --config FILE [-o table|json] [--watch] [--max-lag DUR]",
		Short: "Show every site's role, state and replication lag",
		Long: `Ask the nodes' HTTP APIs, in turn, for the cluster's state as the Raft
leader sees it, and print one row per site: role, state, the applied
position, how far behind it is in bytes of the source's WAL and in seconds,
and when the site last reported.

lag bytes: WAL the primary's capture has decoded minus what the site has
applied (on the primary's row: WAL not yet decoded). lag seconds: 0 when
the site has applied every transaction the source published, otherwise
how long ago the source committed the state the site shows (see
docs/lag.md, including the clock-skew caveat).

It answers as long as any node can reach a Raft majority; while the nodes
that answer are electing a leader it asks again for up to 10s. Exit status: 0;
3 when --max-lag is given and a site is past it, down or unknown; 1 when
no node could answer.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(o.output); err != nil {
				return err
			}
			cfg, err := config.Load(o.config)
			if err != nil {
				return &exitError{exitUsage, err}
			}
			return runLag(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr(), cfg, o)
		},
	}
	cmd.Flags().StringVarP(&o.config, "config", "c", "", "the cluster's config file (YAML)")
	cmd.Flags().StringVarP(&o.output, "output", "o", "table", "output format: table or json")
	cmd.Flags().BoolVarP(&o.watch, "watch", "w", false, "refresh until interrupted")
	cmd.Flags().DurationVar(&o.interval, "interval", 2*time.Second, "refresh interval with --watch")
	cmd.Flags().DurationVar(&o.maxLag, "max-lag", 0, "exit 3 when a site lags more than this (e.g. 30s), is down or unknown")
	cmd.Flags().DurationVar(&o.timeout, "timeout", 3*time.Second, "how long to wait for each node")
	mustRequire(cmd, "config")
	return cmd
}

func runLag(ctx context.Context, stdout, stderr io.Writer, cfg *config.Config, o *lagOptions) error {
	client, err := newClient(cfg, o.timeout)
	if err != nil {
		return err
	}
	for first := true; ; first = false {
		st, err := fetchStatus(ctx, client, cfg)
		if err != nil && !o.watch {
			return err
		}
		if o.watch && !first && o.output == "table" && isTerminal(stdout) {
			fmt.Fprint(stdout, "\033[H\033[2J") // redraw in place
		}
		var code int
		switch {
		case err != nil:
			fmt.Fprintf(stdout, "%s  %v\n", time.Now().UTC().Format(time.RFC3339), err)
			code = exitFailure
		case o.output == "json":
			enc := json.NewEncoder(stdout)
			if !o.watch {
				enc.SetIndent("", "  ")
			}
			if err := enc.Encode(st); err != nil {
				return err
			}
		default:
			renderLag(stdout, st)
		}
		if err == nil && o.maxLag > 0 {
			if problems := pastMaxLag(st, o.maxLag); len(problems) > 0 {
				for _, p := range problems {
					fmt.Fprintln(stderr, p)
				}
				code = exitLag
			}
		}
		if !o.watch {
			if code != 0 {
				return &exitError{code, fmt.Errorf("%d site(s) past --max-lag %s, down or unknown", len(pastMaxLag(st, o.maxLag)), o.maxLag)}
			}
			return nil
		}
		select {
		case <-ctx.Done():
			if code != 0 {
				return &exitError{code, errors.New("the last refresh found problems")}
			}
			return nil
		case <-time.After(o.interval):
		}
	}
}

// checkOutput checks the value of -o of a status command.
func checkOutput(o string) error {
	if o != "table" && o != "json" {
		return &exitError{exitUsage, fmt.Errorf("-o %q: want table or json", o)}
	}
	return nil
}

// newClient returns a client of the nodes' HTTP APIs that carries the
// config's admin token, if one is configured, and speaks HTTPS when the
// config says so.
func newClient(cfg *config.Config, timeout time.Duration) (*api.Client, error) {
	c, err := api.ClientFor(cfg, timeout)
	if err != nil {
		return nil, &exitError{exitUsage, err}
	}
	return c, nil
}

// electionWait is how long fetchStatus keeps asking while the nodes that
// answer have no Raft leader: an election after a node is lost takes a
// few seconds (pre-vote, then the vote), and a status command run in that
// window should show the new leader's state rather than fail.
const electionWait = 10 * time.Second

// fetchStatus asks the nodes in turn and returns the first answer. While
// the nodes that answer have no leader it asks again, for up to
// electionWait; a node that does not answer at all is not waited for.
func fetchStatus(ctx context.Context, client *api.Client, cfg *config.Config) (checkpoints.Status, error) {
	deadline := time.Now().Add(electionWait)
	for pause := 250 * time.Millisecond; ; pause = min(2*pause, 2*time.Second) {
		st, noLeader, err := statusOnce(ctx, client, cfg)
		if err == nil || !noLeader || time.Now().Add(pause).After(deadline) {
			return st, err
		}
		select {
		case <-ctx.Done():
			return checkpoints.Status{}, ctx.Err()
		case <-time.After(pause):
		}
	}
}

// statusOnce asks every node once. noLeader says whether a node answered
// that it has no leader.
func statusOnce(ctx context.Context, client *api.Client, cfg *config.Config) (checkpoints.Status, bool, error) {
	var errs []string
	noLeader := false
	for _, id := range cfg.NodeNames() {
		n, _ := cfg.Node(id)
		st, err := client.Status(ctx, n.HTTP, false)
		if err == nil {
			return st, false, nil
		}
		var re *api.RemoteError
		if errors.As(err, &re) && re.Body.Code == api.CodeNoLeader {
			noLeader = true
		}
		errs = append(errs, fmt.Sprintf("%s (%s): %v", id, n.HTTP, err))
		if ctx.Err() != nil {
			return checkpoints.Status{}, noLeader, ctx.Err()
		}
	}
	if noLeader {
		return checkpoints.Status{}, true, fmt.Errorf("no Raft majority: the nodes that answered have had no leader for %s, so the cluster state cannot be read:\n  %s",
			electionWait, strings.Join(errs, "\n  "))
	}
	return checkpoints.Status{}, false, fmt.Errorf("no node answered:\n  %s", strings.Join(errs, "\n  "))
}

// pastMaxLag lists the sites past max, down or unknown.
func pastMaxLag(st checkpoints.Status, max time.Duration) []string {
	var out []string
	for _, s := range st.Sites {
		switch {
		case s.State == checkpoints.StateUnknown || s.LagSeconds == nil:
			out = append(out, fmt.Sprintf("site %s: lag unknown (state %s)", s.Site, s.State))
		case s.State == checkpoints.StateDown:
			out = append(out, fmt.Sprintf("site %s: down (no report since %s)", s.Site, formatTime(s.UpdatedAt)))
		case *s.LagSeconds > max.Seconds():
			out = append(out, fmt.Sprintf("site %s: %.1fs behind, more than --max-lag %s", s.Site, *s.LagSeconds, max))
		}
	}
	return out
}

func renderLag(w io.Writer, st checkpoints.Status) {
	t := table.NewWriter()
	t.SetOutputMirror(w)
	title := fmt.Sprintf("Cluster: %s   epoch %d   primary %s", st.Cluster, st.Epoch, st.Primary)
	if st.Leader != "" {
		title += "   raft leader " + st.Leader
	}
	t.SetTitle(title)
	t.AppendHeader(table.Row{"Site", "Role", "State", "Applied LSN", "Lag", "Lag time", "Last update"})
	var notes []string
	for _, s := range st.Sites {
		lag, lagTime := "unknown", "unknown"
		if s.LagBytes != nil {
			lag = humanize.IBytes(uint64(*s.LagBytes))
		}
		if s.LagSeconds != nil {
			lagTime = formatSeconds(*s.LagSeconds)
		}
		t.AppendRow(table.Row{s.Site, s.Role, s.State, orDash(s.AppliedLSN), lag, lagTime, formatTime(s.UpdatedAt)})
		if s.Error != "" {
			notes = append(notes, fmt.Sprintf("%s: %s", s.Site, s.Error))
		}
	}
	t.Render()
	for _, n := range notes {
		fmt.Fprintln(w, n)
	}
	if p := st.Promotion; p != nil {
		fmt.Fprintf(w, "Promotion %s in progress: %s %s -> %s, phase %s, started %s ago (`xdcr promote --abort` aborts it)\n",
			p.ID, p.Kind, p.From, p.To, p.Phase, time.Since(p.StartedAt).Round(time.Second))
	}
	if lw := st.LossWindow; lw != nil && lw.Epoch+1 == st.Epoch {
		fmt.Fprintf(w, "Epoch %d began with a failover from %s to %s; loss window: what %s committed after %s (it had published up to %s)\n",
			st.Epoch, lw.OldPrimary, lw.NewPrimary, lw.OldPrimary, lw.AppliedLSN, lw.PublishedLSN)
	}
}

func formatSeconds(s float64) string {
	switch {
	case s < 10:
		return fmt.Sprintf("%.2fs", s)
	case s < 120:
		return fmt.Sprintf("%.0fs", s)
	}
	return (time.Duration(s) * time.Second).Round(time.Second).String()
}

func formatTime(t *time.Time) string {
	if t == nil || t.IsZero() {
		return "never"
	}
	return t.UTC().Format(time.RFC3339)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
