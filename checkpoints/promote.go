package checkpoints

import (
	"fmt"
	"maps"
	"slices"
	"time"
	"unicode/utf8"

	"github.com/xdcr/xdcr/replicator/change"
)

// The promotion ops of a [Command]. A promotion moves the primary to
// another site and ends the current epoch; docs/failover.md tells the
// whole story.
const (
	// OpPromote starts a promotion: a compare-and-set on the epoch.
	OpPromote = "promote"
	// OpFenced: the old primary fenced its database and published its last
	// transaction (switchover only).
	OpFenced = "fenced"
	// OpPromoted: the target applied the old epoch up to the handoff; the
	// epoch ends and the target becomes the primary of the next one.
	OpPromoted = "promoted"
	// OpAbortPromotion drops a promotion that has not completed.
	OpAbortPromotion = "abort-promotion"
)

// Promotion kinds.
const (
	// KindSwitchover is planned: the old primary fences itself and hands
	// over its last transaction, so nothing is lost.
	KindSwitchover = "switchover"
	// KindFailover is forced: the old primary is gone; the target applies
	// what reached its site and takes over. Transactions the old primary
	// had not delivered may be lost.
	KindFailover = "failover"
)

// Promotion phases.
const (
	// PhaseFence: the old primary fences its database and publishes its
	// last transactions (switchover).
	PhaseFence = "fence"
	// PhaseCatchUp: the target applies the old epoch up to the handoff
	// (switchover) or everything that reached it (failover).
	PhaseCatchUp = "catch-up"
)

// Promotion is a promotion in progress.
type Promotion struct {
	ID    string `json:"id"`
	Kind  string `json:"kind"`
	From  string `json:"from"`  // the primary being replaced
	To    string `json:"to"`    // the site being promoted
	Epoch uint64 `json:"epoch"` // the epoch that ends; the target's is Epoch+1
	Phase string `json:"phase"`
	// HandoffLSN is the commit LSN of the old primary's last published
	// transaction (set when it fenced; switchover).
	HandoffLSN change.LSN `json:"handoff_lsn,omitempty"`
	// Sequences are the old primary's sequence values when it fenced, for
	// the target to start above (switchover).
	Sequences map[string]int64 `json:"sequences,omitempty"`
	StartedAt time.Time        `json:"started_at"`
	FencedAt  time.Time        `json:"fenced_at,omitempty"`
}

// EpochEnd records how an epoch ended. The new primary's history starts
// right after EndLSN of the old primary's.
type EpochEnd struct {
	Epoch   uint64 `json:"epoch"`
	Primary string `json:"primary"`
	Kind    string `json:"kind"`
	// Successor is the primary of the next epoch.
	Successor string `json:"successor"`
	// EndLSN is the handoff: the commit LSN of the last transaction of this
	// epoch that the successor applied (0 when it applied none). Every site
	// applies the epoch up to exactly here before it follows the successor;
	// a site that applied beyond it holds lost transactions and must be
	// re-synced.
	EndLSN change.LSN `json:"end_lsn"`
	// LostUpTo (failover only) is the last commit LSN the old primary
	// reported as published; when it is past EndLSN, the transactions in
	// (EndLSN, LostUpTo] reached the stream but not the successor. What the
	// old primary committed without publishing is lost as well.
	LostUpTo change.LSN `json:"lost_up_to,omitempty"`
	// Sequences are the old primary's sequence values the successor starts
	// above (switchover).
	Sequences map[string]int64 `json:"sequences,omitempty"`
	EndedAt   time.Time        `json:"ended_at"`
}

// Promote starts a promotion of To. It succeeds only while the state is
// still in ExpectedEpoch and no other promotion runs, so of two racing
// promotes exactly one wins.
type Promote struct {
	ID            string `json:"id"`
	Kind          string `json:"kind"`
	To            string `json:"to"`
	ExpectedEpoch uint64 `json:"expected_epoch"`
}

// Fenced is the old primary's report that its database refuses writes and
// that its last transaction (HandoffLSN) is in the stream.
type Fenced struct {
	ID         string           `json:"id"`
	Site       string           `json:"site"`
	Epoch      uint64           `json:"epoch"`
	HandoffLSN change.LSN       `json:"handoff_lsn"`
	Sequences  map[string]int64 `json:"sequences,omitempty"`
}

// Promoted is the target's report that it applied the old epoch up to
// HandoffLSN and takes over.
type Promoted struct {
	ID         string     `json:"id"`
	Site       string     `json:"site"`
	Epoch      uint64     `json:"epoch"` // the epoch that ends
	HandoffLSN change.LSN `json:"handoff_lsn"`
}

// AbortPromotion drops the promotion ID before it completes.
type AbortPromotion struct {
	ID string `json:"id"`
}

// Command returns the command made at time at.
func (p Promote) Command(at time.Time) Command {
	return Command{Version: Version, Op: OpPromote, At: at, Promote: &p}
}

// Command returns the command made at time at.
func (f Fenced) Command(at time.Time) Command {
	return Command{Version: Version, Op: OpFenced, At: at, Fenced: &f}
}

// Command returns the command made at time at.
func (p Promoted) Command(at time.Time) Command {
	return Command{Version: Version, Op: OpPromoted, At: at, Promoted: &p}
}

// Command returns the command made at time at.
func (a AbortPromotion) Command(at time.Time) Command {
	return Command{Version: Version, Op: OpAbortPromotion, At: at, Abort: &a}
}

func validID(what, id string) error {
	if id == "" || len(id) > 64 || !utf8.ValidString(id) {
		return fmt.Errorf("%s: promotion id %q: want 1 to 64 bytes of UTF-8: %w", what, id, ErrInvalidCommand)
	}
	return nil
}

func (p *Promote) validate() error {
	what := "promote " + quoteEmpty(p.To)
	if err := validID(what, p.ID); err != nil {
		return err
	}
	switch {
	case p.Kind != KindSwitchover && p.Kind != KindFailover:
		return fmt.Errorf("%s: kind %q (want %s or %s): %w", what, p.Kind, KindSwitchover, KindFailover, ErrInvalidCommand)
	case p.To == "":
		return fmt.Errorf("%s: no target site: %w", what, ErrInvalidCommand)
	case p.ExpectedEpoch == 0:
		return fmt.Errorf("%s: expected epoch 0 (epochs start at 1): %w", what, ErrInvalidCommand)
	}
	return nil
}

func (f *Fenced) validate() error {
	what := "fenced report from " + quoteEmpty(f.Site)
	if err := validID(what, f.ID); err != nil {
		return err
	}
	if f.Site == "" || f.Epoch == 0 {
		return fmt.Errorf("%s: needs a site and an epoch: %w", what, ErrInvalidCommand)
	}
	return nil
}

func (p *Promoted) validate() error {
	what := "promoted report from " + quoteEmpty(p.Site)
	if err := validID(what, p.ID); err != nil {
		return err
	}
	if p.Site == "" || p.Epoch == 0 {
		return fmt.Errorf("%s: needs a site and an epoch: %w", what, ErrInvalidCommand)
	}
	return nil
}

func (a *AbortPromotion) validate() error { return validID("abort promotion", a.ID) }

// promote starts a promotion (a compare-and-set on the epoch).
func (s *State) promote(at time.Time, p *Promote) error {
	what := fmt.Sprintf("promote %s (%s)", p.To, p.Kind)
	if !s.Bootstrapped() {
		return fmt.Errorf("%s: %w", what, ErrNotBootstrapped)
	}
	if cur := s.Promotion; cur != nil {
		if cur.ID == p.ID {
			return nil // the same request again
		}
		return fmt.Errorf("%s: promotion %s of %s (%s) is in progress, in phase %s: %w",
			what, cur.ID, cur.To, cur.Kind, cur.Phase, ErrPromotionInProgress)
	}
	switch {
	case p.ExpectedEpoch != s.Epoch:
		return fmt.Errorf("%s: expected epoch %d, but the cluster is in epoch %d with primary %s: %w",
			what, p.ExpectedEpoch, s.Epoch, s.Primary, ErrEpochMoved)
	case p.To == witnessSite:
		return fmt.Errorf("%s: a witness has no database and cannot be primary: %w", what, ErrUnknownSite)
	case !slices.Contains(s.Sites, p.To):
		return fmt.Errorf("%s: %q is not one of the data sites %v: %w", what, p.To, s.Sites, ErrUnknownSite)
	case p.To == s.Primary:
		return fmt.Errorf("%s: %s is already the primary of epoch %d: %w", what, p.To, s.Epoch, ErrNotReplica)
	}
	phase := PhaseFence
	if p.Kind == KindFailover {
		phase = PhaseCatchUp
	}
	s.Promotion = &Promotion{ID: p.ID, Kind: p.Kind, From: s.Primary, To: p.To, Epoch: s.Epoch, Phase: phase, StartedAt: at}
	return nil
}

// current returns the promotion ID, or an error saying why there is none.
func (s *State) current(what, id string) (*Promotion, error) {
	if !s.Bootstrapped() {
		return nil, fmt.Errorf("%s: %w", what, ErrNotBootstrapped)
	}
	if s.Promotion == nil || s.Promotion.ID != id {
		return nil, fmt.Errorf("%s: promotion %s is not in progress: %w", what, id, ErrNoPromotion)
	}
	return s.Promotion, nil
}

func (s *State) fenced(at time.Time, f *Fenced) error {
	what := "fenced report from " + f.Site
	p, err := s.current(what, f.ID)
	if err != nil {
		return err
	}
	switch {
	case p.Phase != PhaseFence:
		return fmt.Errorf("%s: promotion %s is in phase %s: %w", what, p.ID, p.Phase, ErrNoPromotion)
	case f.Site != p.From || f.Epoch != p.Epoch:
		return fmt.Errorf("%s of epoch %d: promotion %s waits for %s of epoch %d: %w", what, f.Epoch, p.ID, p.From, p.Epoch, ErrNotPrimary)
	}
	np := *p
	np.Phase, np.HandoffLSN, np.Sequences, np.FencedAt = PhaseCatchUp, f.HandoffLSN, maps.Clone(f.Sequences), at
	s.Promotion = &np
	return nil
}

func (s *State) promoted(at time.Time, r *Promoted) error {
	what := "promoted report from " + r.Site
	p, err := s.current(what, r.ID)
	if err != nil {
		return err
	}
	switch {
	case p.Phase != PhaseCatchUp:
		return fmt.Errorf("%s: promotion %s is in phase %s: %w", what, p.ID, p.Phase, ErrNoPromotion)
	case r.Site != p.To || r.Epoch != p.Epoch:
		return fmt.Errorf("%s of epoch %d: promotion %s waits for %s in epoch %d: %w", what, r.Epoch, p.ID, p.To, p.Epoch, ErrNotPrimary)
	case p.Kind == KindSwitchover && r.HandoffLSN != p.HandoffLSN:
		return fmt.Errorf("%s: applied up to %s, but the old primary handed over at %s: %w", what, r.HandoffLSN, p.HandoffLSN, ErrRegression)
	}
	end := EpochEnd{
		Epoch: s.Epoch, Primary: s.Primary, Kind: p.Kind, Successor: p.To,
		EndLSN: r.HandoffLSN, Sequences: maps.Clone(p.Sequences), EndedAt: at,
	}
	if p.Kind == KindFailover {
		if src, ok := s.currentSource(); ok && src.LastCommitLSN > r.HandoffLSN {
			end.LostUpTo = src.LastCommitLSN
		}
	}
	s.History = append(s.History, end)
	s.Epoch++
	s.Primary = p.To
	s.Promotion = nil
	s.Source = SourceState{}
	return nil
}

func (s *State) abortPromotion(a *AbortPromotion) error {
	if _, err := s.current("abort promotion", a.ID); err != nil {
		return err
	}
	s.Promotion = nil
	return nil
}

// EpochEnded returns how epoch ended, if it did.
func (s *State) EpochEnded(epoch uint64) (EpochEnd, bool) {
	for _, e := range s.History {
		if e.Epoch == epoch {
			return e, true
		}
	}
	return EpochEnd{}, false
}
