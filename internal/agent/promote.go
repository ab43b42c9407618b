package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/xdcr/xdcr/checkpoints"
	"github.com/xdcr/xdcr/consensus"
	"github.com/xdcr/xdcr/internal/api"
	"github.com/xdcr/xdcr/internal/wait"
	"github.com/xdcr/xdcr/replicator"
	"github.com/xdcr/xdcr/replicator/change"
	"github.com/xdcr/xdcr/transport"
)

// Timing of fencing and promotions.
const (
	// leaseTimeout is how long a primary may publish after Raft last
	// confirmed it (a majority accepted one of its reports). A forced
	// failover waits longer than this before the new primary takes writes.
	leaseTimeout = 6 * time.Second
	// fenceGrace is how long fencing waits for writers in flight before it
	// ends their sessions.
	fenceGrace = 5 * time.Second
)

// sourceLease is a primary's lease: valid while Raft confirmed it recently.
// It uses the monotonic clock only.
type sourceLease struct {
	timeout time.Duration

	mu        sync.Mutex
	confirmed time.Time
}

// Valid reports whether the lease holds.
func (l *sourceLease) Valid() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return !l.confirmed.IsZero() && time.Since(l.confirmed) < l.timeout
}

// confirm renews the lease as of sent, when the confirming proposal left.
func (l *sourceLease) confirm(sent time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if sent.After(l.confirmed) {
		l.confirmed = sent
	}
}

func (l *sourceLease) revoke() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.confirmed = time.Time{}
}

// confirmPrimary makes sure Raft accepts this site as the primary of role's
// epoch before capture starts: it proposes a report and renews the lease.
func (a *Agent) confirmPrimary(ctx context.Context, role Role) error {
	wait := 200 * time.Millisecond
	for {
		sent := time.Now()
		err := a.propose(ctx, checkpoints.SourceReport{Site: a.node.Site, Epoch: role.Epoch, State: checkpoints.StateStarting}.Command(sent.UTC()))
		if err == nil {
			a.lease.confirm(sent)
			return nil
		}
		a.log.Warn("cannot confirm this site as the primary yet", "epoch", role.Epoch, "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		wait = min(2*wait, 5*time.Second)
	}
}

// leaseLost fences this site's database after its capture stopped on an
// expired lease, and waits until Raft confirms the site again (the
// pipeline then restarts and capture lifts the fence) or the role changes.
func (a *Agent) leaseLost(ctx context.Context, role Role) error {
	a.log.Error("lost the primary's lease: no Raft majority confirmed this site; fencing its database and publishing nothing",
		"epoch", role.Epoch, "lease", leaseTimeout)
	tables, err := a.tables()
	if err != nil {
		return err
	}
	if err := a.fenceOwn(ctx, tables); err != nil {
		a.log.Error("fence the database after losing the lease", "err", err)
	}
	for {
		st := a.raft.LocalState()
		if st.Primary != role.Primary || st.Epoch != role.Epoch {
			return nil
		}
		sent := time.Now()
		err := a.propose(ctx, checkpoints.SourceReport{Site: a.node.Site, Epoch: role.Epoch, State: checkpoints.StatePaused,
			Error: "lease lost; fenced"}.Command(sent.UTC()))
		if err == nil {
			a.lease.confirm(sent)
			a.log.Info("Raft confirms this site as the primary again; resuming")
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-a.raft.Changes():
		case <-time.After(time.Second):
		}
	}
}

// fenceOwn makes this site's replicated tables read-only for applications.
func (a *Agent) fenceOwn(ctx context.Context, tables []replicator.Table) error {
	conn, err := replicator.ConnectMeta(ctx, a.cfg.Sites[a.node.Site].Postgres)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	return replicator.Fence(ctx, conn, a.cfg.Cluster, tables, fenceGrace, a.log)
}

func (a *Agent) setCapture(c *replicator.Capture) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.capture = c
}

func (a *Agent) currentCapture() *replicator.Capture {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.capture
}

func (a *Agent) setPipelineCancel(cancel context.CancelFunc) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.cancel = cancel
}

func (a *Agent) held() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.hold
}

// setHold holds (or releases) the pipeline; holding ends the running one.
func (a *Agent) setHold(h bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.hold = h
	if h && a.cancel != nil {
		a.cancel()
	}
}

// waitRoleChange waits until the primary or epoch differs from role, or a
// held pipeline is released; it releases the hold on a role change.
func (a *Agent) waitRoleChange(ctx context.Context, role Role) error {
	for {
		st := a.raft.LocalState()
		if st.Primary != role.Primary || st.Epoch != role.Epoch {
			a.setHold(false)
			return nil
		}
		if !a.held() && st.Promotion == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-a.raft.Changes():
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// promotions drives this site's part of a promotion recorded in Raft: the
// old primary fences and hands over, the target catches up and takes over.
func (a *Agent) promotions(ctx context.Context) error {
	if a.node.IsWitness() {
		<-ctx.Done()
		return ctx.Err()
	}
	handedOver := map[string]change.LSN{} // promotion id -> handoff, once drained
	fenced := map[string]uint64{}         // promotion id -> epoch, once this site fenced for it
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-a.raft.Changes():
		case <-time.After(time.Second):
		}
		st := a.raft.LocalState()
		p := st.Promotion
		if err := a.liftAbortedFences(ctx, st, fenced); err != nil && ctx.Err() == nil {
			a.log.Warn("lift the fence of an aborted switchover; retrying", "err", err)
		}
		if p == nil {
			continue
		}
		var err error
		switch {
		case p.From == a.node.Site && p.Phase == checkpoints.PhaseFence:
			err = a.handOver(ctx, p, handedOver, fenced)
		case p.To == a.node.Site && p.Phase == checkpoints.PhaseCatchUp:
			err = a.takeOver(ctx, p)
		}
		if err != nil && ctx.Err() == nil {
			a.log.Warn("promotion step failed; retrying", "promotion", p.ID, "phase", p.Phase, "err", err)
		}
	}
}

// handOver is the old primary's part of a switchover: fence the database,
// publish everything committed before the fence, and report the handoff
// with the sequence values.
func (a *Agent) handOver(ctx context.Context, p *checkpoints.Promotion, handedOver map[string]change.LSN, fenced map[string]uint64) error {
	tables, err := a.tables()
	if err != nil {
		return err
	}
	handoff, done := handedOver[p.ID]
	if !done {
		a.log.Info("switchover: fencing this site's database", "promotion", p.ID, "to", p.To)
		conn, err := replicator.ConnectMeta(ctx, a.cfg.Sites[a.node.Site].Postgres)
		if err != nil {
			return err
		}
		defer conn.Close(context.WithoutCancel(ctx))
		fenced[p.ID] = p.Epoch // before Fence: a failed fence may have fenced some tables
		if err := replicator.Fence(ctx, conn, a.cfg.Cluster, tables, fenceGrace, a.log); err != nil {
			return err
		}
		var wal string
		if err := conn.QueryRow(ctx, "SELECT pg_current_wal_insert_lsn()::text").Scan(&wal); err != nil {
			return fmt.Errorf("read the WAL position after the fence: %w", err)
		}
		fenceLSN, err := change.ParseLSN(wal)
		if err != nil {
			return err
		}
		c := a.currentCapture()
		if c == nil {
			return errors.New("capture is not running here; it must publish the last transactions first")
		}
		dctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
		if handoff, err = c.Drain(dctx, fenceLSN); err != nil {
			return fmt.Errorf("publish everything committed before the fence: %w", err)
		}
		handedOver[p.ID] = handoff
		a.log.Info("switchover: published everything before the fence", "fence_lsn", fenceLSN, "handoff_lsn", handoff)
	}
	conn, err := replicator.ConnectMeta(ctx, a.cfg.Sites[a.node.Site].Postgres)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	seqs, err := replicator.Sequences(ctx, conn, tables)
	if err != nil {
		return err
	}
	err = a.propose(ctx, checkpoints.Fenced{ID: p.ID, Site: a.node.Site, Epoch: p.Epoch, HandoffLSN: handoff, Sequences: seqs}.Command(time.Now().UTC()))
	if err != nil {
		return fmt.Errorf("report the handoff: %w", err)
	}
	a.log.Info("switchover: fenced and handed over", "promotion", p.ID, "handoff_lsn", handoff, "sequences", len(seqs))
	return nil
}

// liftAbortedFences unfences this site's database when a switchover it
// fenced for was aborted and it is still the primary of that epoch. When
// the promotion completed instead, the fence stays: the site is no longer
// primary.
func (a *Agent) liftAbortedFences(ctx context.Context, st *checkpoints.State, fenced map[string]uint64) error {
	for id, epoch := range fenced {
		switch {
		case st.Promotion != nil && st.Promotion.ID == id:
			continue // still running
		case st.Epoch != epoch || st.Primary != a.node.Site:
			delete(fenced, id) // it completed: stay fenced
			continue
		}
		tables, err := a.tables()
		if err != nil {
			return err
		}
		conn, err := replicator.ConnectMeta(ctx, a.cfg.Sites[a.node.Site].Postgres)
		if err != nil {
			return err
		}
		err = replicator.Unfence(ctx, conn, tables)
		conn.Close(context.WithoutCancel(ctx))
		if err != nil {
			return err
		}
		delete(fenced, id)
		a.log.Warn("switchover aborted: lifted the fence; this site stays the primary and takes writes", "promotion", id, "epoch", epoch)
	}
	return nil
}

// takeOver is the target's part: apply the old epoch up to the handoff
// (switchover) or everything that reached this site (failover), stop
// applying, and report the position it holds.
func (a *Agent) takeOver(ctx context.Context, p *checkpoints.Promotion) error {
	if p.Kind == checkpoints.KindFailover {
		// the old primary may still be publishing until its lease runs out
		a.log.Info("failover: waiting for the old primary's lease to run out", "promotion", p.ID, "lease", leaseTimeout)
		if err := wait.Sleep(ctx, leaseTimeout+2*time.Second); err != nil {
			return err
		}
		if err := a.waitApplyIdle(ctx, 2*time.Second); err != nil {
			return err
		}
	} else if err := a.waitApplied(ctx, p); err != nil {
		return err
	}
	a.setHold(true)
	release := true
	defer func() {
		if release {
			a.setHold(false)
		}
	}()
	if err := a.waitPipelineStopped(ctx); err != nil {
		return err
	}
	conn, err := replicator.ConnectMeta(ctx, a.cfg.Sites[a.node.Site].Postgres)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if err := replicator.EnsureApplySchema(ctx, conn); err != nil {
		return err
	}
	pos, err := replicator.ReadPosition(ctx, conn, a.cfg.Cluster)
	if err != nil {
		return err
	}
	handoff, err := a.handoffFrom(pos, p)
	if err != nil {
		return err
	}
	if p.Kind == checkpoints.KindSwitchover && handoff != p.HandoffLSN {
		return fmt.Errorf("applied up to %s, the old primary handed over at %s; waiting", handoff, p.HandoffLSN)
	}
	err = a.propose(ctx, checkpoints.Promoted{ID: p.ID, Site: a.node.Site, Epoch: p.Epoch, HandoffLSN: handoff}.Command(time.Now().UTC()))
	if err != nil {
		return fmt.Errorf("report the takeover: %w", err)
	}
	release = false // the pipeline restarts as capture in the new epoch
	a.log.Info("promoted: this site is the primary of the next epoch", "promotion", p.ID, "epoch", p.Epoch+1, "handoff_lsn", handoff)
	return nil
}

// handoffFrom is the last transaction of the ending epoch this site holds.
func (a *Agent) handoffFrom(pos replicator.AppliedPosition, p *checkpoints.Promotion) (change.LSN, error) {
	switch {
	case pos.Epoch == p.Epoch && pos.Origin == p.From:
		return pos.LSN, nil
	case pos.Epoch < p.Epoch:
		// nothing of the ending epoch applied: fine only if every earlier
		// epoch is complete here
		if pos.Origin != "" {
			if end, ok := a.raft.LocalState().EpochEnded(pos.Epoch); ok && (pos.Origin != end.Primary || pos.LSN != end.EndLSN) {
				return 0, fmt.Errorf("this site has not applied epoch %d up to its end (%s of %s)", pos.Epoch, pos.LSN, end.EndLSN)
			}
		}
		return 0, nil
	}
	return 0, fmt.Errorf("this site's position %s is not in epoch %d of %s", pos.Position, p.Epoch, p.From)
}

// waitApplied waits until apply has committed the switchover's handoff.
func (a *Agent) waitApplied(ctx context.Context, p *checkpoints.Promotion) error {
	for {
		ps := a.pipelineSnapshot()
		if ap := ps.applied; p.HandoffLSN == 0 || (ap != nil && ap.Position.Epoch == p.Epoch && ap.Position.Origin == p.From && ap.Position.LSN >= p.HandoffLSN) {
			return nil
		}
		if err := wait.Sleep(ctx, 100*time.Millisecond); err != nil {
			return err
		}
		if q := a.raft.LocalState().Promotion; q == nil || q.ID != p.ID {
			return errors.New("the promotion ended")
		}
	}
}

// waitApplyIdle waits until apply has had nothing to do for quiet: every
// message that reached this site is applied.
func (a *Agent) waitApplyIdle(ctx context.Context, quiet time.Duration) error {
	var last replicator.AppliedPosition
	since := time.Now()
	for {
		ps := a.pipelineSnapshot()
		var pos replicator.AppliedPosition
		if ps.applied != nil {
			pos = ps.applied.Position
		}
		if pos != last || ps.catchUp {
			last, since = pos, time.Now()
		}
		if time.Since(since) >= quiet {
			return nil
		}
		if err := wait.Sleep(ctx, 200*time.Millisecond); err != nil {
			return err
		}
	}
}

func (a *Agent) waitPipelineStopped(ctx context.Context) error {
	for a.pipelineSnapshot().running {
		if err := wait.Sleep(ctx, 50*time.Millisecond); err != nil {
			return err
		}
	}
	return nil
}

// reconcileOldPrimary runs when this site starts as a replica after it was
// the primary of an epoch that has ended. Its database holds its own
// history of that epoch: after a switchover exactly up to the handoff, so
// that becomes its position. After a failover it may hold transactions the
// new primary never received: they are written to a divergence report
// (JSON lines in the data directory), and the site then needs `xdcr sync`.
// Either way its capture slot is dropped: it must not retain WAL.
func (a *Agent) reconcileOldPrimary(ctx context.Context, js jetstream.JetStream, tables []replicator.Table) error {
	st := a.raft.LocalState()
	var end *checkpoints.EpochEnd
	for i := len(st.History) - 1; i >= 0; i-- {
		if st.History[i].Primary == a.node.Site {
			end = &st.History[i]
			break
		}
	}
	if end == nil {
		return nil
	}
	dsn := a.cfg.Sites[a.node.Site].Postgres
	conn, err := replicator.ConnectMeta(ctx, dsn)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if err := replicator.EnsureApplySchema(ctx, conn); err != nil {
		return err
	}
	pos, err := replicator.ReadPosition(ctx, conn, a.cfg.Cluster)
	if err != nil {
		return err
	}
	if pos.Epoch > end.Epoch || (pos.Epoch == end.Epoch && pos.Origin == a.node.Site) {
		return nil // reconciled before
	}
	own := replicator.AppliedPosition{
		Position: change.Position{Origin: a.node.Site, Epoch: end.Epoch, LSN: end.EndLSN},
		Stream:   transport.StreamName(a.cfg.Cluster, a.node.Site),
	}
	if end.Kind == checkpoints.KindFailover {
		lost, err := a.divergence(ctx, js, end)
		if err != nil {
			return fmt.Errorf("find the transactions lost in the failover: %w", err)
		}
		if len(lost) > 0 {
			path, err := a.writeDivergence(end, lost)
			if err != nil {
				return err
			}
			own.LSN = lost[len(lost)-1].LSN
			a.log.Error("this site committed transactions the new primary never received; it must be re-synced",
				"epoch", end.Epoch, "new_primary", end.Successor, "handoff_lsn", end.EndLSN, "transactions", len(lost), "report", path)
		}
	}
	if err := replicator.SetPosition(ctx, conn, a.cfg.Cluster, own); err != nil {
		return err
	}
	if dropped, err := replicator.DropSlot(ctx, dsn, a.cfg.Cluster); err != nil {
		return err
	} else if dropped {
		a.log.Info("dropped this site's capture slot: it is a replica now", "slot", replicator.SlotName(a.cfg.Cluster))
	}
	a.log.Info("this site was the primary of an ended epoch; it follows the new primary from its handoff",
		"epoch", end.Epoch, "handoff_lsn", end.EndLSN, "position", own.Position)
	return nil
}

// divergence lists the transactions this site committed in the ended epoch
// after its handoff: those it published that the new primary did not
// apply (from its own stream), and those it never published (from its
// slot).
func (a *Agent) divergence(ctx context.Context, js jetstream.JetStream, end *checkpoints.EpochEnd) ([]change.Txn, error) {
	byLSN := map[change.LSN]change.Txn{}
	stream := transport.StreamName(a.cfg.Cluster, a.node.Site)
	if err := readStream(ctx, js, stream, func(b *change.Batch) {
		if b.Origin != a.node.Site || b.Epoch != end.Epoch || b.Chunk != nil {
			return
		}
		for _, t := range b.Txns {
			if t.LSN > end.EndLSN {
				byLSN[t.LSN] = t
			}
		}
	}); err != nil {
		return nil, err
	}
	unpublished, err := replicator.UnconsumedTxns(ctx, a.cfg.Sites[a.node.Site].Postgres, a.cfg.Cluster)
	if err != nil {
		return nil, err
	}
	for _, t := range unpublished {
		if t.LSN > end.EndLSN {
			byLSN[t.LSN] = t
		}
	}
	out := make([]change.Txn, 0, len(byLSN))
	for _, t := range byLSN {
		out = append(out, t)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].LSN < out[j].LSN })
	return out, nil
}

// readStream calls fn with every batch a local stream holds now.
func readStream(ctx context.Context, js jetstream.JetStream, stream string, fn func(*change.Batch)) error {
	st, err := js.Stream(ctx, stream)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	info, err := st.Info(ctx)
	if err != nil {
		return err
	}
	if info.State.LastSeq == 0 {
		return nil
	}
	msgs, stop, err := transport.NewSubscriber(js).Subscribe(ctx, stream, 0)
	if err != nil {
		return err
	}
	defer stop()
	for d := range msgs {
		if d.Err == nil {
			fn(d.Batch)
		}
		if d.Seq >= info.State.LastSeq {
			return nil
		}
	}
	return stop()
}

// divergenceLine is one change of the divergence report.
type divergenceLine struct {
	Epoch      uint64            `json:"epoch"`
	LSN        string            `json:"lsn"`
	CommitTime time.Time         `json:"commit_time"`
	Xid        uint32            `json:"xid"`
	Table      string            `json:"table"`
	Op         string            `json:"op"`
	Key        map[string]string `json:"key,omitempty"`
}

// DivergencePath is where an old primary writes the transactions an epoch
// lost in a failover.
func DivergencePath(dataDir string, epoch uint64) string {
	return filepath.Join(dataDir, fmt.Sprintf("divergence-epoch-%d.jsonl", epoch))
}

func (a *Agent) writeDivergence(end *checkpoints.EpochEnd, txns []change.Txn) (string, error) {
	path := DivergencePath(a.opts.DataDir, end.Epoch)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return "", err
	}
	f, err := os.Create(path)
	if err != nil {
		return "", fmt.Errorf("write the divergence report: %w", err)
	}
	enc := json.NewEncoder(f)
	for _, t := range txns {
		for i := range t.Changes {
			c := &t.Changes[i]
			line := divergenceLine{Epoch: end.Epoch, LSN: t.LSN.String(), CommitTime: t.CommitTime, Xid: t.Xid, Op: c.Op.String()}
			if c.Op == change.Truncate {
				for _, r := range c.Truncated {
					line.Table = r.String()
					if err := enc.Encode(line); err != nil {
						f.Close()
						return "", err
					}
				}
				continue
			}
			line.Table, line.Key = c.Rel.String(), replicator.KeyOf(c)
			if err := enc.Encode(line); err != nil {
				f.Close()
				return "", err
			}
		}
	}
	if err := f.Close(); err != nil {
		return "", err
	}
	return path, nil
}

// leaderState reads the state through Raft when this node leads. When
// another node leads it returns that node's HTTP address instead, for the
// request to be forwarded there (unless it already was).
func (a *Agent) leaderState(ctx context.Context, forwarded bool) (*checkpoints.State, string, error) {
	st, err := a.raft.ConsistentState(ctx)
	if errors.Is(err, consensus.ErrNotLeader) {
		addr, err := a.leaderHTTP(forwarded)
		return nil, addr, err
	}
	if err != nil {
		return nil, "", noLeader(err)
	}
	return st, "", nil
}

// forwarded2 passes a promotion request on to the leader at addr (unless
// err says it cannot be), keeping the leader's refusal a refusal.
func forwardPromotion(err error, addr string, call func(addr string) (api.PromoteResponse, error)) (api.PromoteResponse, error) {
	if err != nil {
		return api.PromoteResponse{}, err
	}
	resp, err := call(addr)
	var re *api.RemoteError
	if errors.As(err, &re) && re.Body.Code == api.CodeRejected {
		return resp, &api.StatusError{HTTP: http.StatusConflict, Code: api.CodeRejected, Err: errors.New(re.Body.Error)}
	}
	return resp, err
}

// Promote starts a promotion on the Raft leader (forwarding it there from
// a follower): a switchover when the primary is healthy, a failover with
// Force when it is gone.
func (a *Agent) Promote(ctx context.Context, req api.PromoteRequest, forwarded bool) (api.PromoteResponse, error) {
	st, leader, err := a.leaderState(ctx, forwarded)
	if err != nil || leader != "" {
		return forwardPromotion(err, leader, func(addr string) (api.PromoteResponse, error) {
			return a.client.Promote(ctx, addr, req, true)
		})
	}
	refuse := func(format string, args ...any) (api.PromoteResponse, error) {
		return api.PromoteResponse{}, &api.StatusError{HTTP: http.StatusConflict, Code: api.CodeRejected, Err: fmt.Errorf(format, args...)}
	}
	if p := st.Promotion; p != nil {
		if p.To == req.To {
			return api.PromoteResponse{ID: p.ID, Kind: p.Kind, From: p.From, To: p.To, Epoch: p.Epoch}, nil
		}
		return refuse("promotion %s of %s (%s) is in progress, in phase %s; wait for it, or abort it", p.ID, p.To, p.Kind, p.Phase)
	}
	switch {
	case req.To == st.Primary:
		return refuse("%s is already the primary (epoch %d)", req.To, st.Epoch)
	case req.ExpectedEpoch != 0 && req.ExpectedEpoch != st.Epoch:
		return refuse("the cluster moved to epoch %d (primary %s) since you looked", st.Epoch, st.Primary)
	}
	src := st.Source
	reported := src.Site == st.Primary && src.Epoch == st.Epoch && !src.ReportedAt.IsZero()
	age := time.Since(src.ReportedAt)
	healthy := reported && age < downAfter && src.State != checkpoints.StatePaused
	kind := checkpoints.KindSwitchover
	switch {
	case req.Force && healthy:
		return refuse("primary %s is healthy (reported %.1fs ago): use a planned switchover (without --force), which loses nothing", st.Primary, age.Seconds())
	case req.Force:
		kind = checkpoints.KindFailover
	case !healthy:
		why := "has never reported"
		if reported {
			why = fmt.Sprintf("has not reported for %.0fs", age.Seconds())
			if src.State == checkpoints.StatePaused {
				why = "is paused: " + src.Error
			}
		}
		return refuse("primary %s %s: a switchover needs it to fence itself and hand over; to fail over without it (transactions it has not delivered may be lost) use --force", st.Primary, why)
	}
	id := req.ID
	if id == "" {
		id = fmt.Sprintf("%d-%s-%d", st.Epoch, req.To, time.Now().UnixNano()%1e6)
	}
	err = a.propose(ctx, checkpoints.Promote{ID: id, Kind: kind, To: req.To, ExpectedEpoch: st.Epoch}.Command(time.Now().UTC()))
	if err != nil {
		return api.PromoteResponse{}, err
	}
	a.log.Info("promotion started", "promotion", id, "kind", kind, "from", st.Primary, "to", req.To, "epoch", st.Epoch)
	return api.PromoteResponse{ID: id, Kind: kind, From: st.Primary, To: req.To, Epoch: st.Epoch}, nil
}

// AbortPromotion drops the promotion in progress. The primary stays what
// it was: if it fenced its database for a switchover it lifts the fence,
// and a target that stopped applying to take over applies again. Once
// the new epoch began, nothing is aborted: a promotion is undone with
// another promotion.
func (a *Agent) AbortPromotion(ctx context.Context, req api.AbortRequest, forwarded bool) (api.PromoteResponse, error) {
	st, leader, err := a.leaderState(ctx, forwarded)
	if err != nil || leader != "" {
		return forwardPromotion(err, leader, func(addr string) (api.PromoteResponse, error) {
			return a.client.AbortPromotion(ctx, addr, req, true)
		})
	}
	p := st.Promotion
	switch {
	case p == nil:
		return api.PromoteResponse{}, &api.StatusError{HTTP: http.StatusConflict, Code: api.CodeRejected,
			Err: fmt.Errorf("no promotion is in progress: %s is the primary in epoch %d", st.Primary, st.Epoch)}
	case req.ID != "" && req.ID != p.ID:
		return api.PromoteResponse{}, &api.StatusError{HTTP: http.StatusConflict, Code: api.CodeRejected,
			Err: fmt.Errorf("promotion %s is not in progress; %s (%s to %s) is", req.ID, p.ID, p.Kind, p.To)}
	}
	if err := a.propose(ctx, checkpoints.AbortPromotion{ID: p.ID}.Command(time.Now().UTC())); err != nil {
		return api.PromoteResponse{}, err
	}
	a.log.Warn("promotion aborted", "promotion", p.ID, "kind", p.Kind, "from", p.From, "to", p.To, "phase", p.Phase, "epoch", p.Epoch)
	return api.PromoteResponse{ID: p.ID, Kind: p.Kind, From: p.From, To: p.To, Epoch: p.Epoch}, nil
}
