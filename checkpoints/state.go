package checkpoints

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/xdcr/xdcr/replicator/change"
)

// maxErrorBytes bounds the error text kept per site, so that a runaway
// message cannot bloat every Raft log entry and snapshot.
const maxErrorBytes = 1024

// SourceState is the latest accepted report of the primary's capture agent.
type SourceState struct {
	Site           string     `json:"site"`
	Epoch          uint64     `json:"epoch"`
	SentLSN        change.LSN `json:"sent_lsn"`
	WALLSN         change.LSN `json:"wal_lsn"`
	LastCommitLSN  change.LSN `json:"last_commit_lsn"`
	LastCommitTime time.Time  `json:"last_commit_time"`
	State          string     `json:"state"`
	Error          string     `json:"error,omitempty"`
	// ReportedAt is the report's Command.At (the reporter's clock); zero
	// when the source never reported.
	ReportedAt time.Time `json:"reported_at"`
}

// SiteState is the latest accepted report of a replica site's apply agent.
type SiteState struct {
	Epoch      uint64     `json:"epoch"`
	Origin     string     `json:"origin"`
	LSN        change.LSN `json:"lsn"`
	CommitTime time.Time  `json:"commit_time"`
	AsOf       time.Time  `json:"as_of"`
	State      string     `json:"state"`
	Error      string     `json:"error,omitempty"`
	ReportedAt time.Time  `json:"reported_at"` // the report's Command.At
}

// State is the replicated checkpoint state. Every node of the Raft group
// holds one and changes it only through [State.Apply], in log order.
//
// A State is not safe for concurrent use: the FSM adapter serialises Apply
// with readers, and hands [State.Clone] to snapshots and status readers.
// Use [New] for an empty state; the zero State works too, but its snapshot
// restores as New().
type State struct {
	// Version is the format of the state: always [Version] once made by
	// New, Apply's bootstrap or RestoreSnapshot (which upgrades older
	// snapshots).
	Version int    `json:"v"`
	Cluster string `json:"cluster"`
	Primary string `json:"primary"`
	// Epoch is the fencing token of the current primary: 1 after
	// bootstrap, and it only grows.
	Epoch uint64   `json:"epoch"`
	Sites []string `json:"sites"` // data sites, sorted
	// Source is the latest report of the primary of the current epoch. It
	// is zero until that primary reports; a Source of another site or
	// epoch (left from before a failover) counts as no report.
	Source SourceState `json:"source"`
	// Applied holds the latest applied report per replica site; a site
	// that never reported has no entry.
	Applied map[string]SiteState `json:"applied"`
	// Promotion is the promotion in progress, if any.
	Promotion *Promotion `json:"promotion,omitempty"`
	// History says how every earlier epoch ended, oldest first.
	History []EpochEnd `json:"history,omitempty"`
}

// New returns an empty, not yet bootstrapped state.
func New() *State {
	return &State{Version: Version, Applied: map[string]SiteState{}}
}

// Bootstrapped reports whether a bootstrap command has been applied.
func (s *State) Bootstrapped() bool {
	return s != nil && s.Cluster != ""
}

// Clone returns a deep copy of s.
func (s *State) Clone() *State {
	c := *s
	c.Sites = slices.Clone(s.Sites)
	c.Applied = maps.Clone(s.Applied)
	if s.Promotion != nil {
		p := *s.Promotion
		p.Sequences = maps.Clone(p.Sequences)
		c.Promotion = &p
	}
	c.History = slices.Clone(s.History)
	for i := range c.History {
		c.History[i].Sequences = maps.Clone(c.History[i].Sequences)
	}
	return &c
}

// Apply applies one command. It is deterministic: every time it records
// comes from the command, so every node that applies the same log holds
// the same state. A rejected command leaves the state unchanged; the error
// wraps one of the package's sentinels and names the site, the field, and
// the old and new values.
//
// The command must pass [Command.Validate]. Then:
//
//   - bootstrap: only on an empty state (ErrAlreadyBootstrapped, or
//     ErrClusterMismatch when the state is of another cluster). It sets
//     the cluster, the sorted sites and the primary, with epoch 1.
//   - every other op needs a bootstrapped state (ErrNotBootstrapped) and
//     known sites (ErrUnknownSite).
//   - source: from the primary (ErrNotPrimary) of the current epoch
//     (ErrStaleEpoch, ErrFutureEpoch). Within the epoch SentLSN, WALLSN and
//     LastCommitLSN never move backwards (ErrRegression).
//   - applied: not from the primary (ErrNotReplica); epoch not above the
//     current one (ErrFutureEpoch) nor below the site's last report
//     (ErrStaleEpoch); an origin that is the primary of that epoch
//     (ErrNotPrimary: the current primary for the current epoch, the one
//     reported before for an older epoch); within the epoch the LSN never
//     moves backwards (ErrRegression).
//
// Zero LSNs and times in a report keep the previous values of the same
// site and epoch (see [SourceReport]). Error texts longer than 1 KiB are
// cut.
func (s *State) Apply(c Command) error {
	if err := c.Validate(); err != nil {
		return err
	}
	c = c.normalized()
	switch c.Op {
	case OpBootstrap:
		return s.bootstrap(c.Bootstrap)
	case OpSource:
		return s.applySource(c.At, c.Source)
	case OpPromote:
		return s.promote(c.At, c.Promote)
	case OpFenced:
		return s.fenced(c.At, c.Fenced)
	case OpPromoted:
		return s.promoted(c.At, c.Promoted)
	case OpAbortPromotion:
		return s.abortPromotion(c.Abort)
	default:
		return s.applyApplied(c.At, c.Applied)
	}
}

func (s *State) bootstrap(b *Bootstrap) error {
	if s.Bootstrapped() {
		if b.Cluster != s.Cluster {
			return fmt.Errorf("bootstrap of cluster %q: the state belongs to cluster %q: %w", b.Cluster, s.Cluster, ErrClusterMismatch)
		}
		return fmt.Errorf("bootstrap of cluster %q: bootstrapped before, now primary %s in epoch %d: %w", b.Cluster, s.Primary, s.Epoch, ErrAlreadyBootstrapped)
	}
	sites := slices.Clone(b.Sites)
	slices.Sort(sites)
	*s = State{
		Version: Version,
		Cluster: b.Cluster,
		Primary: b.Primary,
		Epoch:   1,
		Sites:   sites,
		Applied: map[string]SiteState{},
	}
	return nil
}

func (s *State) applySource(at time.Time, r *SourceReport) error {
	what := "source report from " + r.Site
	if err := s.checkReport(what, r.Site); err != nil {
		return err
	}
	switch {
	case r.Epoch < s.Epoch && r.Site != s.Primary:
		return fmt.Errorf("%s of epoch %d: the current epoch is %d, with primary %s: %w, %w", what, r.Epoch, s.Epoch, s.Primary, ErrStaleEpoch, ErrNotPrimary)
	case r.Epoch < s.Epoch:
		return fmt.Errorf("%s of epoch %d: the current epoch is %d: %w", what, r.Epoch, s.Epoch, ErrStaleEpoch)
	case r.Epoch > s.Epoch:
		return fmt.Errorf("%s of epoch %d: the current epoch is %d: %w", what, r.Epoch, s.Epoch, ErrFutureEpoch)
	case r.Site != s.Primary:
		return fmt.Errorf("%s: the primary of epoch %d is %s: %w", what, s.Epoch, s.Primary, ErrNotPrimary)
	case s.Promotion != nil && s.Promotion.Kind == KindFailover:
		// a primary being failed over is deposed already: its lease must
		// not be renewed
		return fmt.Errorf("%s: %s is being failed over to %s (promotion %s): %w", what, s.Primary, s.Promotion.To, s.Promotion.ID, ErrStaleEpoch)
	}
	next := SourceState{
		Site:           r.Site,
		Epoch:          r.Epoch,
		SentLSN:        r.SentLSN,
		WALLSN:         r.WALLSN,
		LastCommitLSN:  r.LastCommitLSN,
		LastCommitTime: r.LastCommitTime,
		State:          r.State,
		Error:          truncateError(r.Error),
		ReportedAt:     at,
	}
	if prev := s.Source; prev.Site == r.Site && prev.Epoch == r.Epoch && !prev.ReportedAt.IsZero() {
		where := fmt.Sprintf("%s in epoch %d", what, r.Epoch)
		var err error
		next.SentLSN, err = advance(where, "sent_lsn", prev.SentLSN, r.SentLSN)
		if err != nil {
			return err
		}
		next.WALLSN, err = advance(where, "wal_lsn", prev.WALLSN, r.WALLSN)
		if err != nil {
			return err
		}
		next.LastCommitLSN, err = advance(where, "last_commit_lsn", prev.LastCommitLSN, r.LastCommitLSN)
		if err != nil {
			return err
		}
		next.LastCommitTime = keepTime(prev.LastCommitTime, r.LastCommitTime)
	}
	s.Source = next
	return nil
}

func (s *State) applyApplied(at time.Time, r *AppliedReport) error {
	what := "applied report from " + r.Site
	if err := s.checkReport(what, r.Site); err != nil {
		return err
	}
	if !slices.Contains(s.Sites, r.Origin) {
		return fmt.Errorf("%s: origin %q is not one of the data sites %v: %w", what, r.Origin, s.Sites, ErrUnknownSite)
	}
	if r.Site == s.Primary {
		return fmt.Errorf("%s: %s is the primary of epoch %d: %w", what, r.Site, s.Epoch, ErrNotReplica)
	}
	if r.Epoch > s.Epoch {
		return fmt.Errorf("%s of epoch %d: the current epoch is %d: %w", what, r.Epoch, s.Epoch, ErrFutureEpoch)
	}
	prev, seen := s.Applied[r.Site]
	if seen && r.Epoch < prev.Epoch {
		return fmt.Errorf("%s of epoch %d: it reported epoch %d before: %w", what, r.Epoch, prev.Epoch, ErrStaleEpoch)
	}
	if r.Epoch == s.Epoch && r.Origin != s.Primary {
		return fmt.Errorf("%s of epoch %d: origin %s is not the primary of that epoch (%s): %w", what, r.Epoch, r.Origin, s.Primary, ErrNotPrimary)
	}
	next := SiteState{
		Epoch:      r.Epoch,
		Origin:     r.Origin,
		LSN:        r.LSN,
		CommitTime: r.CommitTime,
		AsOf:       r.AsOf,
		State:      r.State,
		Error:      truncateError(r.Error),
		ReportedAt: at,
	}
	if seen && r.Epoch == prev.Epoch {
		if r.Origin != prev.Origin {
			return fmt.Errorf("%s of epoch %d: origin %s, but it reported origin %s for that epoch before: %w", what, r.Epoch, r.Origin, prev.Origin, ErrNotPrimary)
		}
		var err error
		next.LSN, err = advance(fmt.Sprintf("%s in epoch %d", what, r.Epoch), "lsn", prev.LSN, r.LSN)
		if err != nil {
			return err
		}
		next.CommitTime = keepTime(prev.CommitTime, r.CommitTime)
		next.AsOf = keepTime(prev.AsOf, r.AsOf)
	}
	if s.Applied == nil {
		s.Applied = map[string]SiteState{}
	}
	s.Applied[r.Site] = next
	return nil
}

// checkReport checks what every report needs: a bootstrapped state and a
// known site.
func (s *State) checkReport(what, site string) error {
	if !s.Bootstrapped() {
		return fmt.Errorf("%s: %w", what, ErrNotBootstrapped)
	}
	if !slices.Contains(s.Sites, site) {
		return fmt.Errorf("%s: %q is not one of the data sites %v: %w", what, site, s.Sites, ErrUnknownSite)
	}
	return nil
}

// advance returns the new value of a position that must not move
// backwards: next, or prev when next is 0 (not known).
func advance(where, field string, prev, next change.LSN) (change.LSN, error) {
	switch {
	case next == 0:
		return prev, nil
	case next < prev:
		return 0, fmt.Errorf("%s: %s moved back from %s to %s: %w", where, field, prev, next, ErrRegression)
	}
	return next, nil
}

// keepTime returns next, or prev when next is zero (not known).
func keepTime(prev, next time.Time) time.Time {
	if next.IsZero() {
		return prev
	}
	return next
}

// truncateError makes an error text valid UTF-8 (as JSON would) and cuts it
// to maxErrorBytes, at a rune boundary.
func truncateError(msg string) string {
	msg = strings.ToValidUTF8(msg, "\uFFFD")
	if len(msg) <= maxErrorBytes {
		return msg
	}
	const tail = " …(cut)"
	cut := maxErrorBytes - len(tail)
	for cut > 0 && !utf8.RuneStart(msg[cut]) {
		cut--
	}
	return msg[:cut] + tail
}
