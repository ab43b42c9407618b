package checkpoints

import (
	"encoding/json"
	"fmt"
	"slices"
	"time"
)

// MarshalSnapshot encodes the state for a Raft snapshot: one JSON object,
// the state's fields with "v" set to [Version]. Restore it with
// [RestoreSnapshot].
func (s *State) MarshalSnapshot() ([]byte, error) {
	c := *s
	c.Version = Version
	data, err := json.Marshal(&c)
	if err != nil {
		return nil, fmt.Errorf("marshal snapshot: %w", err)
	}
	return data, nil
}

// RestoreSnapshot decodes a snapshot written by [State.MarshalSnapshot] of
// this or an older build. It refuses newer versions (ErrUnsupportedVersion)
// and, with ErrInvalidSnapshot, data that does not parse, has unknown
// fields, or describes a state that Apply could not have built (unsorted or
// duplicate sites, a primary that is not a site, reports of unknown sites
// or future epochs, …).
func RestoreSnapshot(data []byte) (*State, error) {
	var head struct {
		V *int `json:"v"`
	}
	if err := json.Unmarshal(data, &head); err != nil {
		return nil, fmt.Errorf("restore snapshot: %w: %w", ErrInvalidSnapshot, err)
	}
	if head.V == nil {
		return nil, fmt.Errorf("restore snapshot: no version (\"v\"): %w", ErrInvalidSnapshot)
	}
	if err := checkVersion("snapshot", *head.V); err != nil {
		return nil, fmt.Errorf("restore snapshot: %w", err)
	}
	s := &State{}
	if err := decodeStrict(data, s); err != nil {
		return nil, fmt.Errorf("restore snapshot: %w: %w", ErrInvalidSnapshot, err)
	}
	// Version 1 is the only format so far; an upgrade of older snapshots
	// goes here.
	s.Version = Version
	if s.Applied == nil {
		s.Applied = map[string]SiteState{}
	}
	s.normalize()
	if err := s.validate(); err != nil {
		return nil, fmt.Errorf("restore snapshot: %w: %w", ErrInvalidSnapshot, err)
	}
	return s, nil
}

// normalize puts every time in UTC.
func (s *State) normalize() {
	s.Source.LastCommitTime = s.Source.LastCommitTime.UTC()
	s.Source.ReportedAt = s.Source.ReportedAt.UTC()
	for site, a := range s.Applied {
		a.CommitTime = a.CommitTime.UTC()
		a.AsOf = a.AsOf.UTC()
		a.ReportedAt = a.ReportedAt.UTC()
		s.Applied[site] = a
	}
}

// validate checks the invariants that Apply maintains.
func (s *State) validate() error {
	if !s.Bootstrapped() {
		if s.Primary != "" || s.Epoch != 0 || len(s.Sites) != 0 || s.Source != (SourceState{}) || len(s.Applied) != 0 {
			return fmt.Errorf("no cluster name, but primary %q, epoch %d, %d sites and reports", s.Primary, s.Epoch, len(s.Sites))
		}
		return nil
	}
	if s.Epoch == 0 {
		return fmt.Errorf("cluster %q has epoch 0", s.Cluster)
	}
	if len(s.Sites) == 0 {
		return fmt.Errorf("cluster %q has no sites", s.Cluster)
	}
	for i, site := range s.Sites {
		switch {
		case site == "" || site == witnessSite:
			return fmt.Errorf("site name %q", site)
		case i > 0 && s.Sites[i-1] >= site:
			return fmt.Errorf("sites %v are not sorted and unique", s.Sites)
		}
	}
	if !slices.Contains(s.Sites, s.Primary) {
		return fmt.Errorf("primary %q is not one of the sites %v", s.Primary, s.Sites)
	}
	if src := s.Source; src != (SourceState{}) {
		if err := s.checkPositionOwner("source", src.Site, src.Epoch, src.State, src.ReportedAt); err != nil {
			return err
		}
		if err := checkTime("source last_commit_time", src.LastCommitTime); err != nil {
			return err
		}
	}
	for site, a := range s.Applied {
		if !slices.Contains(s.Sites, site) {
			return fmt.Errorf("applied position of unknown site %q", site)
		}
		what := "applied position of " + site
		if !slices.Contains(s.Sites, a.Origin) {
			return fmt.Errorf("%s: unknown origin %q", what, a.Origin)
		}
		if err := s.checkPositionOwner(what, site, a.Epoch, a.State, a.ReportedAt); err != nil {
			return err
		}
		if err := checkTime(what+" commit_time", a.CommitTime); err != nil {
			return err
		}
		if err := checkTime(what+" as_of", a.AsOf); err != nil {
			return err
		}
	}
	return nil
}

func (s *State) checkPositionOwner(what, site string, epoch uint64, state string, reportedAt time.Time) error {
	switch {
	case !slices.Contains(s.Sites, site):
		return fmt.Errorf("%s: unknown site %q", what, site)
	case epoch == 0 || epoch > s.Epoch:
		return fmt.Errorf("%s: epoch %d outside 1..%d", what, epoch, s.Epoch)
	case !slices.Contains(reportedStates, state):
		return fmt.Errorf("%s: state %q", what, state)
	case reportedAt.IsZero():
		return fmt.Errorf("%s: no report time", what)
	}
	return checkTime(what+" reported_at", reportedAt)
}
