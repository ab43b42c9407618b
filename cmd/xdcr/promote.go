package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/xdcr/xdcr/checkpoints"
	"github.com/xdcr/xdcr/internal/api"
	"github.com/xdcr/xdcr/internal/config"
)

type promoteOptions struct {
	config  string
	force   bool
	yes     bool
	timeout time.Duration
	abort   bool
}

func newPromoteCmd(g *globalOptions) *cobra.Command {
	o := &promoteOptions{}
	cmd := &cobra.Command{
		Use:   "promote SITE --config FILE [--force] [--yes] [--timeout DUR] | promote --abort --config FILE",
		Short: "Move the primary to SITE: a planned switchover, or a forced failover",
		Long: `Make SITE the primary of the next epoch.

Without --force it is a planned switchover, which loses nothing and needs
the current primary healthy: the primary fences its database (its
replicated tables refuse writes from applications), publishes every
transaction committed before the fence, and hands over the LSN of the
last one; SITE applies up to exactly that LSN; the epoch is bumped through
Raft; SITE advances its sequences past the old primary's values, starts
capturing and takes writes; every other site, the old primary included,
follows SITE.

With --force it is a failover, for a primary that is gone: SITE applies
everything that reached it, waits until the old primary's lease has run
out (an old primary cut off from Raft fences itself), and takes over. It
prints the window of transactions that may be lost. The old primary, when
it returns, stays fenced, writes a divergence report of what it committed
that nobody received, and must be re-seeded with ` + "`xdcr sync`" + `.

The promotion is a compare-and-set on the epoch in Raft: of two racing
promotes exactly one wins. It runs in the agents and goes on if this
command stops waiting (--timeout); ` + "`xdcr lag`" + ` shows it, and running the same
promote again waits for it.

--abort drops the promotion in progress, as long as the new epoch has not
begun: the primary stays the primary (an old primary that fenced for a
switchover lifts its fence) and the target applies again. A completed
promotion is undone by promoting the old primary back.

When the config sets an admin token (http.admin_token or
http.admin_token_file), the command sends it; the nodes refuse promote and
abort without it.`,
		Args: cobra.RangeArgs(0, 1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !o.abort && len(args) == 0 {
				return &exitError{exitUsage, errors.New("name the site to promote, e.g. xdcr promote dc-b --config xdcr.yaml (or --abort the promotion in progress)")}
			}
			if o.abort && o.force {
				return &exitError{exitUsage, errors.New("--abort and --force do not go together")}
			}
			cfg, err := config.Load(o.config)
			if err != nil {
				return &exitError{exitUsage, err}
			}
			if o.abort {
				return runAbort(cmd.Context(), cmd.OutOrStdout(), cfg, args)
			}
			return runPromote(cmd.Context(), cmd.InOrStdin(), cmd.OutOrStdout(), cfg, args[0], o)
		},
	}
	cmd.Flags().StringVarP(&o.config, "config", "c", "", "the cluster's config file (YAML)")
	cmd.Flags().BoolVar(&o.force, "force", false, "fail over without the current primary (it is gone); transactions it had not delivered may be lost")
	cmd.Flags().BoolVarP(&o.yes, "yes", "y", false, "do not ask for confirmation")
	cmd.Flags().DurationVar(&o.timeout, "timeout", 3*time.Minute, "how long to wait for the promotion to complete")
	cmd.Flags().BoolVar(&o.abort, "abort", false, "abort the promotion in progress (before its new epoch begins)")
	mustRequire(cmd, "config")
	return cmd
}

func runPromote(ctx context.Context, stdin io.Reader, stdout io.Writer, cfg *config.Config, site string, o *promoteOptions) error {
	if n, ok := cfg.Node(site); ok && n.IsWitness() || site == config.WitnessSite {
		return &exitError{exitUsage, fmt.Errorf("%s is a witness: it has no database and cannot be primary", site)}
	}
	if _, ok := cfg.Sites[site]; !ok {
		return &exitError{exitUsage, fmt.Errorf("site %q is not in the config (sites: %v)", site, cfg.SiteNames())}
	}
	client, err := newClient(cfg, 5*time.Second)
	if err != nil {
		return err
	}
	st, err := fetchStatus(ctx, client, cfg)
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, "Current cluster:")
	renderLag(stdout, st)
	waiting := st.Promotion != nil && st.Promotion.To == site
	if st.Primary == site && !waiting {
		return &exitError{exitFailure, fmt.Errorf("%s is already the primary (epoch %d)", site, st.Epoch)}
	}
	if !o.yes && !waiting {
		question := fmt.Sprintf("Are you sure you want to switch over to %s, demoting current primary %s? [y/N]: ", site, st.Primary)
		if o.force {
			question = fmt.Sprintf("Are you sure you want to fail over to %s without %s? Transactions %s has not delivered may be lost. [y/N]: ",
				site, st.Primary, st.Primary)
		}
		if err := confirm(stdin, stdout, question); err != nil {
			return err
		}
	}
	req := api.PromoteRequest{To: site, Force: o.force, ExpectedEpoch: st.Epoch}
	if waiting {
		req.ID = st.Promotion.ID
	}
	resp, err := startPromotion(ctx, client, cfg, req)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s promotion %s started: %s -> %s (%s), ending epoch %d\n",
		stamp(), resp.ID, resp.From, resp.To, resp.Kind, resp.Epoch)
	return watchPromotion(ctx, stdout, client, cfg, resp, o.timeout)
}

// confirm asks question on a terminal; without one it refuses.
func confirm(stdin io.Reader, stdout io.Writer, question string) error {
	f, ok := stdin.(*os.File)
	if !ok || !isTerminal(f) {
		return &exitError{exitUsage, errors.New("not asking for confirmation without a terminal: add --yes")}
	}
	fmt.Fprint(stdout, question)
	line, _ := bufio.NewReader(stdin).ReadString('\n')
	if a := strings.ToLower(strings.TrimSpace(line)); a != "y" && a != "yes" {
		return &exitError{exitFailure, errors.New("aborted")}
	}
	return nil
}

// startPromotion asks the nodes in turn; a refusal is final.
func startPromotion(ctx context.Context, client *api.Client, cfg *config.Config, req api.PromoteRequest) (api.PromoteResponse, error) {
	return askNodes(cfg, "start the promotion", func(addr string) (api.PromoteResponse, error) {
		return client.Promote(ctx, addr, req, false)
	})
}

// askNodes calls each node in turn until one answers. A refusal (the
// request is wrong, conflicts with the state, or lacks the token) is final:
// every node would say the same.
func askNodes(cfg *config.Config, what string, call func(addr string) (api.PromoteResponse, error)) (api.PromoteResponse, error) {
	var errs []string
	for _, id := range cfg.NodeNames() {
		n, _ := cfg.Node(id)
		resp, err := call(n.HTTP)
		if err == nil {
			return resp, nil
		}
		var re *api.RemoteError
		if errors.As(err, &re) && (re.Body.Code == api.CodeRejected || re.Body.Code == api.CodeBadRequest || re.Body.Code == api.CodeUnauthorized) {
			return api.PromoteResponse{}, &exitError{exitFailure, fmt.Errorf("refused to %s: %s", what, re.Body.Error)}
		}
		errs = append(errs, fmt.Sprintf("%s (%s): %v", id, n.HTTP, err))
	}
	return api.PromoteResponse{}, fmt.Errorf("no node could %s:\n  %s", what, strings.Join(errs, "\n  "))
}

// watchPromotion prints each step as the cluster's state shows it, until
// the new epoch begins or timeout.
func watchPromotion(ctx context.Context, w io.Writer, client *api.Client, cfg *config.Config, resp api.PromoteResponse, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var said string
	say := func(s string) {
		if s != said {
			fmt.Fprintf(w, "%s %s\n", stamp(), s)
			said = s
		}
	}
	for {
		st, err := fetchStatus(ctx, client, cfg)
		switch {
		case err != nil:
			say(fmt.Sprintf("cannot read the cluster state: %v", err))
		case st.Epoch > resp.Epoch && primaryStreaming(st):
			return promotionDone(w, st, resp)
		case st.Epoch > resp.Epoch:
			say(fmt.Sprintf("epoch %d: %s is the primary; waiting for it to capture and take writes", st.Epoch, st.Primary))
		case st.Promotion == nil:
			return &exitError{exitFailure, fmt.Errorf("promotion %s ended without a new epoch (aborted?); the primary is %s", resp.ID, st.Primary)}
		default:
			say(describePhase(st.Promotion))
		}
		if time.Now().After(deadline) {
			phase := "unknown"
			if err == nil && st.Promotion != nil {
				phase = st.Promotion.Phase
			}
			return &exitError{exitFailure, fmt.Errorf("promotion %s is still in progress (phase %s) after %s; it goes on in the agents: "+
				"`xdcr lag` shows it, and `xdcr promote %s` again waits for it", resp.ID, phase, timeout, resp.To)}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(300 * time.Millisecond):
		}
	}
}

// primaryStreaming reports whether the primary's capture runs (it lifted
// its fence once its slot was in place).
func primaryStreaming(st checkpoints.Status) bool {
	for _, s := range st.Sites {
		if s.Role == checkpoints.RolePrimary {
			return s.State == checkpoints.StateStreaming || s.State == checkpoints.StateCatchingUp
		}
	}
	return false
}

func describePhase(p *checkpoints.Promotion) string {
	switch {
	case p.Phase == checkpoints.PhaseFence:
		return fmt.Sprintf("fencing %s: its replicated tables refuse writes, and it publishes every transaction committed before", p.From)
	case p.Kind == checkpoints.KindSwitchover:
		return fmt.Sprintf("%s fenced and handed over at %s; %s applies up to exactly that LSN", p.From, p.HandoffLSN, p.To)
	}
	return fmt.Sprintf("%s applies everything that reached it and waits for %s's lease to run out", p.To, p.From)
}

func promotionDone(w io.Writer, st checkpoints.Status, resp api.PromoteResponse) error {
	end := st.LastEpochEnd
	if end == nil || end.Epoch != resp.Epoch {
		fmt.Fprintf(w, "%s epoch %d: %s is the primary\n", stamp(), st.Epoch, st.Primary)
		renderLag(w, st)
		return nil
	}
	fmt.Fprintf(w, "%s epoch %d: %s is the primary and takes writes; it took over from %s at handoff LSN %s\n",
		stamp(), st.Epoch, st.Primary, end.Primary, end.EndLSN)
	if lw := st.LossWindow; lw != nil && lw.Epoch == resp.Epoch {
		fmt.Fprintf(w, "loss window: transactions %s committed after %s (what %s applied) may be lost; it had published up to %s, "+
			"and anything it committed without publishing is lost too\n", lw.OldPrimary, lw.AppliedLSN, lw.NewPrimary, lw.PublishedLSN)
	}
	renderLag(w, st)
	if st.Primary != resp.To {
		return &exitError{exitFailure, fmt.Errorf("the primary is %s, not %s", st.Primary, resp.To)}
	}
	return nil
}

func stamp() string { return time.Now().UTC().Format("2006-01-02 15:04:05") }

// runAbort aborts the promotion in progress; args may name its target
// site, as a check.
func runAbort(ctx context.Context, stdout io.Writer, cfg *config.Config, args []string) error {
	client, err := newClient(cfg, 5*time.Second)
	if err != nil {
		return err
	}
	st, err := fetchStatus(ctx, client, cfg)
	if err != nil {
		return err
	}
	p := st.Promotion
	switch {
	case p == nil:
		return &exitError{exitFailure, fmt.Errorf("no promotion is in progress: %s is the primary in epoch %d", st.Primary, st.Epoch)}
	case len(args) == 1 && args[0] != p.To:
		return &exitError{exitFailure, fmt.Errorf("the promotion in progress (%s) moves the primary to %s, not %s", p.ID, p.To, args[0])}
	}
	resp, err := askNodes(cfg, "abort the promotion", func(addr string) (api.PromoteResponse, error) {
		return client.AbortPromotion(ctx, addr, api.AbortRequest{ID: p.ID}, false)
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s promotion %s (%s %s -> %s) aborted; %s stays the primary in epoch %d\n",
		stamp(), resp.ID, resp.Kind, resp.From, resp.To, resp.From, resp.Epoch)
	return nil
}
