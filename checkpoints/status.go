package checkpoints

import (
	"math"
	"slices"
	"time"

	"github.com/xdcr/xdcr/replicator/change"
)

// The roles of a site in a [SiteStatus].
const (
	RolePrimary = "primary"
	RoleReplica = "replica"
)

// Status is what `xdcr lag -o json` prints and /v1/status serves. The
// fields DESIGN.md shows are never renamed or dropped; fields may be added.
// docs/lag.md defines every value.
type Status struct {
	Cluster string `json:"cluster"`
	Epoch   uint64 `json:"epoch"`
	Primary string `json:"primary"`
	// SourceLSN is the primary's SentLSN in PostgreSQL's text form
	// ("0/3000060"), "" until the primary of this epoch reports.
	SourceLSN string `json:"source_lsn"`
	// SourceWALLSN is the primary database's WAL insert position, "" until
	// the primary of this epoch reports.
	SourceWALLSN string `json:"source_wal_lsn"`
	// Leader is the Raft leader's node id; Status leaves it empty for the
	// caller to fill in.
	Leader      string       `json:"leader,omitempty"`
	GeneratedAt time.Time    `json:"generated_at"`
	Sites       []SiteStatus `json:"sites"` // primary first, then replicas by name; never null
	// Promotion is the promotion in progress, if any.
	Promotion *Promotion `json:"promotion,omitempty"`
	// LastEpochEnd says how the previous epoch ended, if one did.
	LastEpochEnd *EpochEnd `json:"last_epoch_end,omitempty"`
	// LossWindow is set when the previous epoch ended in a failover.
	LossWindow *LossWindow `json:"loss_window,omitempty"`
}

// LossWindow is what a failover may have lost: transactions the old
// primary committed after AppliedLSN, the last one the new primary applied.
// Those up to PublishedLSN (the last the old primary reported as
// published) reached the change stream but not the new primary; anything
// it committed later never left its site.
type LossWindow struct {
	Epoch        uint64 `json:"epoch"`
	OldPrimary   string `json:"old_primary"`
	NewPrimary   string `json:"new_primary"`
	AppliedLSN   string `json:"applied_lsn"`
	PublishedLSN string `json:"published_lsn"`
}

// SiteStatus is one data site's row of a [Status].
type SiteStatus struct {
	Site       string     `json:"site"`
	Role       string     `json:"role"` // RolePrimary or RoleReplica
	State      string     `json:"state"`
	AppliedLSN string     `json:"applied_lsn"` // "" when unknown
	LagBytes   *int64     `json:"lag_bytes"`   // null when unknown
	LagSeconds *float64   `json:"lag_seconds"` // null when unknown
	UpdatedAt  *time.Time `json:"updated_at"`  // time of the last report, null if never
	Error      string     `json:"error,omitempty"`
}

// Status computes every data site's row, primary first and then the
// replicas sorted by name, as of now (the caller's wall clock). A site
// whose last report is older than downAfter shows the state "down" (its lag
// is still computed from that report); downAfter <= 0 never marks a site
// down. Status does not change s; GeneratedAt and every time are in UTC.
//
// See docs/lag.md for the definitions and their clock-skew caveat.
func (s *State) Status(now time.Time, downAfter time.Duration) Status {
	now = now.UTC()
	if !s.Bootstrapped() {
		return Status{GeneratedAt: now, Sites: []SiteStatus{}}
	}
	st := Status{
		Cluster:     s.Cluster,
		Epoch:       s.Epoch,
		Primary:     s.Primary,
		GeneratedAt: now,
		Sites:       []SiteStatus{},
	}
	src, haveSrc := s.currentSource()
	if haveSrc {
		st.SourceLSN = src.SentLSN.String()
		st.SourceWALLSN = src.WALLSN.String()
	}
	if s.Promotion != nil {
		p := *s.Promotion
		st.Promotion = &p
	}
	if n := len(s.History); n > 0 {
		e := s.History[n-1]
		st.LastEpochEnd = &e
		if e.Kind == KindFailover {
			st.LossWindow = &LossWindow{Epoch: e.Epoch, OldPrimary: e.Primary, NewPrimary: e.Successor,
				AppliedLSN: e.EndLSN.String(), PublishedLSN: max(e.LostUpTo, e.EndLSN).String()}
		}
	}
	st.Sites = append(st.Sites, s.primaryRow(now, downAfter))
	sites := slices.Clone(s.Sites)
	slices.Sort(sites)
	for _, site := range sites {
		if site != s.Primary {
			st.Sites = append(st.Sites, s.replicaRow(site, now, downAfter))
		}
	}
	return st
}

// currentSource returns the report of the primary of the current epoch, if
// there is one.
func (s *State) currentSource() (SourceState, bool) {
	src := s.Source
	ok := !src.ReportedAt.IsZero() && src.Site == s.Primary && src.Epoch == s.Epoch
	return src, ok
}

func (s *State) primaryRow(now time.Time, downAfter time.Duration) SiteStatus {
	row := SiteStatus{Site: s.Primary, Role: RolePrimary, State: StateUnknown}
	src, ok := s.currentSource()
	if !ok {
		return row
	}
	row.State = reportedState(src.State, src.ReportedAt, now, downAfter)
	row.Error = src.Error
	row.AppliedLSN = src.SentLSN.String()
	row.LagBytes = lsnDistance(src.WALLSN, src.SentLSN)
	row.LagSeconds = ptr(0.0)
	row.UpdatedAt = ptr(src.ReportedAt)
	return row
}

func (s *State) replicaRow(site string, now time.Time, downAfter time.Duration) SiteStatus {
	row := SiteStatus{Site: site, Role: RoleReplica, State: StateUnknown}
	a, ok := s.Applied[site]
	if !ok {
		return row
	}
	row.State = reportedState(a.State, a.ReportedAt, now, downAfter)
	row.Error = a.Error
	row.AppliedLSN = a.LSN.String()
	row.UpdatedAt = ptr(a.ReportedAt)

	// How far behind the source's clock the site's applied history is; null
	// when the site never said.
	var behind *float64
	if !a.AsOf.IsZero() {
		behind = ptr(max(0, now.Sub(a.AsOf).Seconds()))
	}
	src, haveSrc := s.currentSource()
	switch {
	case a.Epoch != s.Epoch || a.Origin != s.Primary:
		// The site has not followed a failover yet: LSNs of another
		// primary's WAL do not compare with this one's.
		row.LagSeconds = behind
	case !haveSrc:
		// The primary of this epoch has not reported yet, so neither the
		// byte distance nor "caught up" is known.
		row.LagSeconds = behind
	default:
		row.LagBytes = lsnDistance(src.SentLSN, a.LSN)
		if a.LSN >= src.LastCommitLSN {
			row.LagSeconds = ptr(0.0) // caught up: applied all the source published
		} else {
			row.LagSeconds = behind
		}
	}
	return row
}

// reportedState returns state, or StateDown when the report is older than
// downAfter.
func reportedState(state string, reportedAt, now time.Time, downAfter time.Duration) string {
	if downAfter > 0 && now.Sub(reportedAt) > downAfter {
		return StateDown
	}
	return state
}

// lsnDistance returns max(0, to − from) in bytes.
func lsnDistance(to, from change.LSN) *int64 {
	if to <= from {
		return ptr(int64(0))
	}
	return ptr(int64(min(uint64(to-from), math.MaxInt64)))
}

func ptr[T any](v T) *T { return &v }
