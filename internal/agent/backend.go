package agent

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/xdcr/xdcr/checkpoints"
	"github.com/xdcr/xdcr/consensus"
	"github.com/xdcr/xdcr/internal/api"
	"github.com/xdcr/xdcr/replicator"
)

// The agent is the backend of its HTTP API.
var _ api.Backend = (*Agent)(nil)

// Status returns the cluster's status read through the Raft leader: on the
// leader after VerifyLeader and Barrier, on a follower by asking the leader.
func (a *Agent) Status(ctx context.Context, forwarded bool) (checkpoints.Status, error) {
	st, err := a.raft.ConsistentState(ctx)
	if err == nil {
		s := st.Status(time.Now().UTC(), downAfter)
		s.Leader = a.id
		return s, nil
	}
	if !errors.Is(err, consensus.ErrNotLeader) {
		return checkpoints.Status{}, noLeader(err)
	}
	addr, err := a.leaderHTTP(forwarded)
	if err != nil {
		return checkpoints.Status{}, err
	}
	s, err := a.client.Status(ctx, addr, true)
	if err != nil {
		return checkpoints.Status{}, noLeader(fmt.Errorf("ask the leader: %w", err))
	}
	return s, nil
}

// Propose applies cmd through Raft: here on the leader, or forwarded to it.
func (a *Agent) Propose(ctx context.Context, cmd []byte, forwarded bool) error {
	err := a.raft.Apply(ctx, cmd)
	if err == nil {
		return nil
	}
	if !errors.Is(err, consensus.ErrNotLeader) {
		if rejected(err) {
			return &api.StatusError{HTTP: http.StatusConflict, Code: api.CodeRejected, Err: err}
		}
		return noLeader(err)
	}
	addr, err := a.leaderHTTP(forwarded)
	if err != nil {
		return err
	}
	if err := a.client.Propose(ctx, addr, cmd, true); err != nil {
		var re *api.RemoteError
		if errors.As(err, &re) && re.Body.Code == api.CodeRejected {
			return &api.StatusError{HTTP: http.StatusConflict, Code: api.CodeRejected, Err: err}
		}
		return noLeader(fmt.Errorf("forward to the leader: %w", err))
	}
	return nil
}

// rejected reports whether the state machine refused a command (as
// opposed to Raft failing to commit it).
func rejected(err error) bool {
	for _, e := range []error{checkpoints.ErrNotBootstrapped, checkpoints.ErrAlreadyBootstrapped, checkpoints.ErrClusterMismatch,
		checkpoints.ErrUnknownSite, checkpoints.ErrNotPrimary, checkpoints.ErrNotReplica, checkpoints.ErrStaleEpoch,
		checkpoints.ErrFutureEpoch, checkpoints.ErrRegression, checkpoints.ErrUnsupportedVersion, checkpoints.ErrInvalidCommand,
		checkpoints.ErrEpochMoved, checkpoints.ErrPromotionInProgress, checkpoints.ErrNoPromotion} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

func noLeader(err error) error {
	return &api.StatusError{HTTP: http.StatusServiceUnavailable, Code: api.CodeNoLeader, Err: err}
}

// leaderHTTP is the HTTP address of the current leader, unless this
// request was already forwarded once.
func (a *Agent) leaderHTTP(forwarded bool) (string, error) {
	if forwarded {
		return "", noLeader(errors.New("this node is not the raft leader either (leadership is changing)"))
	}
	id, _ := a.raft.Leader()
	if id == "" {
		return "", noLeader(errors.New("no raft leader: fewer than a majority of the nodes can reach each other"))
	}
	addr, ok := a.httpAddr(id)
	if !ok {
		return "", noLeader(fmt.Errorf("the raft leader %q is not in this node's config", id))
	}
	return addr, nil
}

// Ready says whether the node serves its purpose.
func (a *Agent) Ready() error {
	if a.raft == nil {
		return errors.New("raft is not running")
	}
	if id, _ := a.raft.Leader(); id == "" {
		return errors.New("the raft group has no leader")
	}
	if a.node.IsWitness() {
		return nil
	}
	p := a.pipelineSnapshot()
	switch {
	case !p.running:
		return errors.New("the pipeline is not running")
	case p.state == replicator.StatePaused:
		return fmt.Errorf("the pipeline is paused: %v", p.err)
	case p.state != replicator.StateStreaming:
		return fmt.Errorf("the pipeline is %s", p.state)
	}
	return nil
}

// propose encodes and proposes cmd.
func (a *Agent) propose(ctx context.Context, cmd checkpoints.Command) error {
	data, err := checkpoints.EncodeCommand(cmd)
	if err != nil {
		return err
	}
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return a.Propose(pctx, data, false)
}

// report proposes the pipeline's position about once a second. The Raft
// state only moves forward within an epoch, so what was already accepted
// is the floor of every report: a restarted pipeline that has not caught
// up with its old position yet does not report going backwards.
func (a *Agent) report(ctx context.Context) error {
	if a.node.IsWitness() {
		<-ctx.Done()
		return ctx.Err()
	}
	t := time.NewTicker(reportInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		cmd, ok := a.reportCommand()
		if !ok {
			continue
		}
		sent := time.Now()
		err := a.propose(ctx, cmd)
		if cmd.Op == checkpoints.OpSource {
			// a majority accepted this site as the primary of the epoch
			switch {
			case err == nil:
				a.lease.confirm(sent)
			case errors.Is(err, checkpoints.ErrStaleEpoch), errors.Is(err, checkpoints.ErrNotPrimary):
				a.lease.revoke()
			}
		}
		if err != nil && ctx.Err() == nil {
			a.log.Debug("report position", "err", err)
		}
	}
}

func (a *Agent) reportCommand() (checkpoints.Command, bool) {
	p := a.pipelineSnapshot()
	st := a.raft.LocalState()
	if !p.running || !st.Bootstrapped() {
		return checkpoints.Command{}, false
	}
	state, errText := p.state, ""
	if p.err != nil {
		errText = p.err.Error()
	}
	if state == replicator.StateStreaming && p.catchUp {
		state = checkpoints.StateCatchingUp
	}
	if errText == "" && p.role.Primary == a.node.Site {
		// shown as the primary's error in /v1/status and xdcr lag
		errText = retainedWALWarning(a.cfg.Cluster, p.source.RetainedWALBytes, a.cfg.Capture.MaxRetainedWAL)
	}
	cmd := checkpoints.Command{Version: checkpoints.Version, At: time.Now().UTC()}
	site := a.node.Site
	if p.role.Primary == site {
		if st.Primary != site || st.Epoch != p.role.Epoch {
			return cmd, false
		}
		r := &checkpoints.SourceReport{
			Site: site, Epoch: p.role.Epoch, State: state, Error: errText,
			SentLSN: p.source.SentLSN, WALLSN: p.source.WALLSN,
			LastCommitLSN: p.source.LastCommitLSN, LastCommitTime: p.source.LastCommitTime,
		}
		if old := st.Source; old.Site == site && old.Epoch == r.Epoch {
			r.SentLSN = max(r.SentLSN, old.SentLSN)
			r.WALLSN = max(r.WALLSN, old.WALLSN)
			if r.LastCommitLSN < old.LastCommitLSN {
				r.LastCommitLSN, r.LastCommitTime = old.LastCommitLSN, old.LastCommitTime
			}
		}
		cmd.Op, cmd.Source = checkpoints.OpSource, r
		return cmd, true
	}
	r := &checkpoints.AppliedReport{Site: site, State: state, Error: errText}
	if ap := p.applied; ap != nil {
		r.Epoch, r.Origin = ap.Position.Epoch, ap.Position.Origin
		r.LSN, r.CommitTime, r.AsOf = ap.UpTo, ap.Position.CommitTime, ap.AsOf
	}
	if old, ok := st.Applied[site]; ok {
		if r.Epoch < old.Epoch || (r.Epoch == old.Epoch && r.Origin == "") {
			// nothing applied in this session yet: keep what is known
			r.Epoch, r.Origin, r.LSN, r.CommitTime, r.AsOf = old.Epoch, old.Origin, old.LSN, old.CommitTime, old.AsOf
		} else if r.Epoch == old.Epoch && r.Origin == old.Origin {
			if r.LSN < old.LSN {
				r.LSN, r.CommitTime = old.LSN, old.CommitTime
			}
			if r.AsOf.Before(old.AsOf) {
				r.AsOf = old.AsOf
			}
		}
	}
	cmd.Op, cmd.Applied = checkpoints.OpApplied, r
	return cmd, true
}
