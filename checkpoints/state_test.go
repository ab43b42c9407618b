package checkpoints

import (
	"errors"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/xdcr/xdcr/replicator/change"
)

type applyCase struct {
	name   string
	before []Command    // applied to New() first; each must be accepted
	setup  func(*State) // then this (e.g. promote)
	cmd    Command      // the command under test
	want   error        // nil: accepted
	also   error        // a second sentinel the error must wrap
	msg    []string     // what the error must say
	check  func(*testing.T, *State)
}

func runApplyCases(t *testing.T, cases []applyCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := newState(t, tc.before...)
			if tc.setup != nil {
				tc.setup(s)
			}
			before := s.Clone()
			err := s.Apply(tc.cmd)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("Apply: got error %v, want none", err)
				}
				if tc.check != nil {
					tc.check(t, s)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("Apply: got error %v, want %v", err, tc.want)
			}
			if tc.also != nil && !errors.Is(err, tc.also) {
				t.Errorf("Apply: got error %v, want it to wrap %v too", err, tc.also)
			}
			for _, m := range tc.msg {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("Apply: got error %q, want it to mention %q", err, m)
				}
			}
			assertUnchanged(t, s, before)
		})
	}
}

func TestApplyBootstrap(t *testing.T) {
	runApplyCases(t, []applyCase{
		{
			name: "first bootstrap",
			cmd:  boot(),
			check: func(t *testing.T, s *State) {
				want := &State{Version: Version, Cluster: "shop", Primary: "dc-a", Epoch: 1,
					Sites: []string{"dc-a", "dc-b", "dc-c"}, Applied: map[string]SiteState{}}
				if !reflect.DeepEqual(s, want) {
					t.Errorf("got %s, want %s", mustJSON(t, s), mustJSON(t, want))
				}
				if !s.Bootstrapped() {
					t.Error("Bootstrapped: got false, want true")
				}
			},
		},
		{
			name:   "second bootstrap of the same cluster",
			before: []Command{boot()},
			cmd:    Bootstrap{Cluster: "shop", Primary: "dc-b", Sites: []string{"dc-a", "dc-b"}}.Command(at(time.Second)),
			want:   ErrAlreadyBootstrapped,
			msg:    []string{"shop", "dc-a", "epoch 1"},
		},
		{
			name:   "bootstrap of another cluster",
			before: []Command{boot()},
			cmd:    Bootstrap{Cluster: "shop2", Primary: "dc-a", Sites: []string{"dc-a", "dc-b"}}.Command(t0),
			want:   ErrClusterMismatch,
			msg:    []string{`"shop2"`, `"shop"`},
		},
		{
			name: "empty cluster name",
			cmd:  Bootstrap{Primary: "dc-a", Sites: []string{"dc-a"}}.Command(t0),
			want: ErrInvalidCommand,
		},
		{
			name: "no sites",
			cmd:  Bootstrap{Cluster: "shop", Primary: "dc-a"}.Command(t0),
			want: ErrInvalidCommand,
		},
		{
			name: "duplicate site",
			cmd:  Bootstrap{Cluster: "shop", Primary: "dc-a", Sites: []string{"dc-a", "dc-b", "dc-a"}}.Command(t0),
			want: ErrInvalidCommand,
			msg:  []string{"dc-a listed twice"},
		},
		{
			name: "empty site",
			cmd:  Bootstrap{Cluster: "shop", Primary: "dc-a", Sites: []string{"dc-a", ""}}.Command(t0),
			want: ErrInvalidCommand,
		},
		{
			name: "site name not UTF-8",
			cmd:  Bootstrap{Cluster: "shop", Primary: "dc-a", Sites: []string{"dc-a", "dc-\xff"}}.Command(t0),
			want: ErrInvalidCommand,
		},
		{
			name: "witness as a data site",
			cmd:  Bootstrap{Cluster: "shop", Primary: "dc-a", Sites: []string{"dc-a", "witness"}}.Command(t0),
			want: ErrInvalidCommand,
		},
		{
			name: "primary not among the sites",
			cmd:  Bootstrap{Cluster: "shop", Primary: "dc-x", Sites: []string{"dc-a", "dc-b"}}.Command(t0),
			want: ErrInvalidCommand,
			msg:  []string{`"dc-x"`},
		},
		{
			name: "source report before bootstrap",
			cmd:  srcReport(1, 100, 100, 90, t0).Command(t0),
			want: ErrNotBootstrapped,
		},
		{
			name: "applied report before bootstrap",
			cmd:  appReport("dc-b", 1, 90, t0, t0).Command(t0),
			want: ErrNotBootstrapped,
		},
	})
}

// TestApplyBootstrapOnZeroState: the zero State works like New().
func TestApplyBootstrapOnZeroState(t *testing.T) {
	var s State
	if s.Bootstrapped() {
		t.Fatal("Bootstrapped: got true for the zero state, want false")
	}
	if err := s.Apply(boot()); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	if want := newState(t, boot()); !reflect.DeepEqual(&s, want) {
		t.Errorf("got %s, want %s", mustJSON(t, &s), mustJSON(t, want))
	}
}

// TestBootstrapRace: nodes that race to bootstrap all propose; Raft orders
// the proposals, and every node ends with the first one.
func TestBootstrapRace(t *testing.T) {
	fromA := Bootstrap{Cluster: "shop", Primary: "dc-a", Sites: []string{"dc-a", "dc-b", "dc-c"}}.Command(t0)
	fromB := Bootstrap{Cluster: "shop", Primary: "dc-a", Sites: []string{"dc-c", "dc-b", "dc-a"}}.Command(at(time.Millisecond))
	log := []Command{fromA, fromB}
	var nodes [3]*State
	for i := range nodes {
		nodes[i] = New()
		for j, c := range log {
			err := nodes[i].Apply(c)
			switch {
			case j == 0 && err != nil:
				t.Fatalf("node %d, first bootstrap: got %v, want no error", i, err)
			case j > 0 && !errors.Is(err, ErrAlreadyBootstrapped):
				t.Fatalf("node %d, later bootstrap: got %v, want %v", i, err, ErrAlreadyBootstrapped)
			case j > 0 && errors.Is(err, ErrClusterMismatch):
				t.Fatalf("node %d, later bootstrap of the same cluster: got %v, which is not harmless", i, err)
			}
		}
	}
	for i := 1; i < len(nodes); i++ {
		if !reflect.DeepEqual(nodes[i], nodes[0]) {
			t.Errorf("node %d differs from node 0:\n got %s\nwant %s", i, mustJSON(t, nodes[i]), mustJSON(t, nodes[0]))
		}
	}
	other := Bootstrap{Cluster: "blog", Primary: "dc-a", Sites: []string{"dc-a", "dc-b"}}.Command(t0)
	err := nodes[0].Apply(other)
	if !errors.Is(err, ErrClusterMismatch) || errors.Is(err, ErrAlreadyBootstrapped) {
		t.Errorf("bootstrap of another cluster: got %v, want %v and not %v", err, ErrClusterMismatch, ErrAlreadyBootstrapped)
	}
}

func TestApplySource(t *testing.T) {
	first := srcReport(1, 0x3000100, 0x3000200, 0x3000060, at(-time.Second)).Command(t0)
	epoch2 := func(s *State) { promote(s, "dc-b") }
	fromB := func(epoch uint64, sent change.LSN) Command {
		r := srcReport(epoch, sent, sent, sent-0x40, t0)
		r.Site = "dc-b"
		return r.Command(at(time.Second))
	}
	with := func(f func(*SourceReport)) Command {
		r := srcReport(1, 0x3000100, 0x3000200, 0x3000060, at(-time.Second))
		f(&r)
		return r.Command(at(time.Second))
	}
	runApplyCases(t, []applyCase{
		{
			name:   "first report",
			before: []Command{boot()},
			cmd:    first,
			check: func(t *testing.T, s *State) {
				want := SourceState{Site: "dc-a", Epoch: 1, SentLSN: 0x3000100, WALLSN: 0x3000200,
					LastCommitLSN: 0x3000060, LastCommitTime: at(-time.Second), State: StateStreaming, ReportedAt: t0}
				if s.Source != want {
					t.Errorf("Source: got %+v, want %+v", s.Source, want)
				}
			},
		},
		{
			name:   "positions move forward",
			before: []Command{boot(), first},
			cmd:    srcReport(1, 0x3000300, 0x3000400, 0x3000280, t0).Command(at(time.Second)),
			check: func(t *testing.T, s *State) {
				if s.Source.SentLSN != 0x3000300 || s.Source.WALLSN != 0x3000400 || s.Source.LastCommitLSN != 0x3000280 {
					t.Errorf("Source: got %+v, want sent 0/3000300, wal 0/3000400, commit 0/3000280", s.Source)
				}
				if !s.Source.ReportedAt.Equal(at(time.Second)) {
					t.Errorf("ReportedAt: got %v, want %v", s.Source.ReportedAt, at(time.Second))
				}
			},
		},
		{
			name:   "positions stay (idle source)",
			before: []Command{boot(), first},
			cmd:    srcReport(1, 0x3000100, 0x3000200, 0x3000060, at(-time.Second)).Command(at(time.Second)),
		},
		{
			name:   "sent_lsn moves back",
			before: []Command{boot(), first},
			cmd:    with(func(r *SourceReport) { r.SentLSN = 0x3000060 }),
			want:   ErrRegression,
			msg:    []string{"dc-a", "sent_lsn", "0/3000100", "0/3000060", "epoch 1"},
		},
		{
			name:   "wal_lsn moves back",
			before: []Command{boot(), first},
			cmd:    with(func(r *SourceReport) { r.WALLSN = 0x3000150 }),
			want:   ErrRegression,
			msg:    []string{"wal_lsn", "0/3000200", "0/3000150"},
		},
		{
			name:   "last_commit_lsn moves back",
			before: []Command{boot(), first},
			cmd:    with(func(r *SourceReport) { r.LastCommitLSN = 0x3000050 }),
			want:   ErrRegression,
			msg:    []string{"last_commit_lsn", "0/3000060", "0/3000050"},
		},
		{
			name:   "zero positions are not known: the previous ones stay",
			before: []Command{boot(), first},
			cmd: SourceReport{Site: "dc-a", Epoch: 1, State: StateReconnecting, Error: "connection refused"}.
				Command(at(time.Second)),
			check: func(t *testing.T, s *State) {
				want := SourceState{Site: "dc-a", Epoch: 1, SentLSN: 0x3000100, WALLSN: 0x3000200,
					LastCommitLSN: 0x3000060, LastCommitTime: at(-time.Second), State: StateReconnecting,
					Error: "connection refused", ReportedAt: at(time.Second)}
				if s.Source != want {
					t.Errorf("Source: got %+v, want %+v", s.Source, want)
				}
			},
		},
		{
			name:   "unknown site",
			before: []Command{boot()},
			cmd:    with(func(r *SourceReport) { r.Site = "dc-x" }),
			want:   ErrUnknownSite,
			msg:    []string{`"dc-x"`},
		},
		{
			name:   "from a replica",
			before: []Command{boot()},
			cmd:    fromB(1, 0x5000000),
			want:   ErrNotPrimary,
			msg:    []string{"dc-b", "primary of epoch 1 is dc-a"},
		},
		{
			name:   "future epoch",
			before: []Command{boot()},
			cmd:    with(func(r *SourceReport) { r.Epoch = 2 }),
			want:   ErrFutureEpoch,
		},
		{
			name:   "old primary after a failover",
			before: []Command{boot(), first},
			setup:  epoch2,
			cmd:    with(func(r *SourceReport) { r.SentLSN = 0x3000900 }),
			want:   ErrStaleEpoch,
			also:   ErrNotPrimary,
			msg:    []string{"dc-a", "epoch 1", "current epoch is 2", "dc-b"},
		},
		{
			name:   "primary of two epochs reports the older",
			before: []Command{boot(), first},
			setup:  func(s *State) { promote(s, "dc-a") },
			cmd:    with(func(r *SourceReport) {}),
			want:   ErrStaleEpoch,
		},
		{
			name:   "old primary with the new epoch",
			before: []Command{boot(), first},
			setup:  epoch2,
			cmd:    with(func(r *SourceReport) { r.Epoch = 2 }),
			want:   ErrNotPrimary,
		},
		{
			name:   "new primary: its positions do not compare with the old one's",
			before: []Command{boot(), first},
			setup:  epoch2,
			cmd:    fromB(2, 0x1000),
			check: func(t *testing.T, s *State) {
				if s.Source.Site != "dc-b" || s.Source.Epoch != 2 || s.Source.SentLSN != 0x1000 {
					t.Errorf("Source: got %+v, want dc-b's report of epoch 2 at 0/1000", s.Source)
				}
			},
		},
		{
			name:   "new primary moves back within its epoch",
			before: []Command{boot(), first},
			setup: func(s *State) {
				promote(s, "dc-b")
				if err := s.Apply(fromB(2, 0x2000)); err != nil {
					t.Fatal(err)
				}
			},
			cmd:  fromB(2, 0x1000),
			want: ErrRegression,
			msg:  []string{"dc-b", "epoch 2", "0/2000", "0/1000"},
		},
		{
			name:   "state down is derived, not reported",
			before: []Command{boot()},
			cmd:    with(func(r *SourceReport) { r.State = StateDown }),
			want:   ErrInvalidCommand,
		},
		{
			name:   "state unknown is derived, not reported",
			before: []Command{boot()},
			cmd:    with(func(r *SourceReport) { r.State = StateUnknown }),
			want:   ErrInvalidCommand,
		},
		{
			name:   "no state",
			before: []Command{boot()},
			cmd:    with(func(r *SourceReport) { r.State = "" }),
			want:   ErrInvalidCommand,
		},
		{
			name:   "no site",
			before: []Command{boot()},
			cmd:    with(func(r *SourceReport) { r.Site = "" }),
			want:   ErrInvalidCommand,
		},
		{
			name:   "epoch 0",
			before: []Command{boot()},
			cmd:    with(func(r *SourceReport) { r.Epoch = 0 }),
			want:   ErrInvalidCommand,
		},
		{
			name:   "error text not UTF-8",
			before: []Command{boot()},
			cmd:    with(func(r *SourceReport) { r.State, r.Error = StatePaused, "bad byte \xff\xfe here" }),
			check: func(t *testing.T, s *State) {
				if want := "bad byte \uFFFD here"; s.Source.Error != want {
					t.Errorf("Error: got %q, want %q", s.Source.Error, want)
				}
				snapshotRoundTrip(t, s)
			},
		},
		{
			name:   "paused with a long error",
			before: []Command{boot()},
			cmd: with(func(r *SourceReport) {
				r.State = StatePaused
				r.Error = strings.Repeat("é", 2000)
			}),
			check: func(t *testing.T, s *State) {
				if n := len(s.Source.Error); n > maxErrorBytes || !strings.HasSuffix(s.Source.Error, "(cut)") {
					t.Errorf("Error: got %d bytes ending %q, want at most %d ending (cut)", n, s.Source.Error[n-10:], maxErrorBytes)
				}
				if !strings.HasPrefix(s.Source.Error, "éé") || !utf8.ValidString(s.Source.Error) {
					t.Errorf("Error: got %q, want valid UTF-8 starting with the message", s.Source.Error)
				}
			},
		},
	})
}

func TestApplyApplied(t *testing.T) {
	src := srcReport(1, 0x3000100, 0x3000200, 0x3000060, at(-time.Second)).Command(t0)
	first := appReport("dc-b", 1, 0x3000060, at(-time.Second), at(-time.Second)).Command(t0)
	epoch2 := func(s *State) { promote(s, "dc-b") }
	with := func(f func(*AppliedReport)) Command {
		r := appReport("dc-b", 1, 0x3000100, at(-time.Second), t0)
		f(&r)
		return r.Command(at(time.Second))
	}
	runApplyCases(t, []applyCase{
		{
			name:   "first report",
			before: []Command{boot(), src},
			cmd:    first,
			check: func(t *testing.T, s *State) {
				want := map[string]SiteState{"dc-b": {Epoch: 1, Origin: "dc-a", LSN: 0x3000060,
					CommitTime: at(-time.Second), AsOf: at(-time.Second), State: StateStreaming, ReportedAt: t0}}
				if !reflect.DeepEqual(s.Applied, want) {
					t.Errorf("Applied: got %+v, want %+v", s.Applied, want)
				}
			},
		},
		{
			name:   "position moves forward",
			before: []Command{boot(), first},
			cmd:    with(func(r *AppliedReport) {}),
			check: func(t *testing.T, s *State) {
				if got := s.Applied["dc-b"]; got.LSN != 0x3000100 || !got.AsOf.Equal(t0) || !got.ReportedAt.Equal(at(time.Second)) {
					t.Errorf("Applied[dc-b]: got %+v, want lsn 0/3000100, as_of %v, reported %v", got, t0, at(time.Second))
				}
			},
		},
		{
			name:   "position moves back",
			before: []Command{boot(), first},
			cmd:    with(func(r *AppliedReport) { r.LSN = 0x3000050 }),
			want:   ErrRegression,
			msg:    []string{"dc-b", "lsn", "0/3000060", "0/3000050", "epoch 1"},
		},
		{
			name:   "zero position and times are not known: the previous ones stay",
			before: []Command{boot(), first},
			cmd: AppliedReport{Site: "dc-b", Epoch: 1, Origin: "dc-a", State: StatePaused, Error: "schema drift"}.
				Command(at(time.Second)),
			check: func(t *testing.T, s *State) {
				want := SiteState{Epoch: 1, Origin: "dc-a", LSN: 0x3000060, CommitTime: at(-time.Second),
					AsOf: at(-time.Second), State: StatePaused, Error: "schema drift", ReportedAt: at(time.Second)}
				if got := s.Applied["dc-b"]; got != want {
					t.Errorf("Applied[dc-b]: got %+v, want %+v", got, want)
				}
			},
		},
		{
			name:   "unknown site",
			before: []Command{boot()},
			cmd:    with(func(r *AppliedReport) { r.Site = "dc-x" }),
			want:   ErrUnknownSite,
			msg:    []string{`"dc-x"`},
		},
		{
			name:   "unknown origin",
			before: []Command{boot()},
			cmd:    with(func(r *AppliedReport) { r.Origin = "dc-x" }),
			want:   ErrUnknownSite,
			msg:    []string{`origin "dc-x"`},
		},
		{
			name:   "from the primary",
			before: []Command{boot()},
			cmd:    with(func(r *AppliedReport) { r.Site = "dc-a" }),
			want:   ErrNotReplica,
			msg:    []string{"dc-a"},
		},
		{
			name:   "future epoch",
			before: []Command{boot()},
			cmd:    with(func(r *AppliedReport) { r.Epoch = 2 }),
			want:   ErrFutureEpoch,
			msg:    []string{"epoch 2", "current epoch is 1"},
		},
		{
			name:   "origin is not the primary of the current epoch",
			before: []Command{boot()},
			cmd:    with(func(r *AppliedReport) { r.Origin = "dc-c" }),
			want:   ErrNotPrimary,
			msg:    []string{"dc-c", "dc-a"},
		},
		{
			name:   "older epoch, site has not followed the failover yet",
			before: []Command{boot(), appReport("dc-c", 1, 0x3000060, t0, t0).Command(t0)},
			setup:  epoch2,
			cmd: func() Command {
				r := appReport("dc-c", 1, 0x3000100, t0, at(time.Second))
				return r.Command(at(time.Second))
			}(),
			check: func(t *testing.T, s *State) {
				if got := s.Applied["dc-c"]; got.Epoch != 1 || got.LSN != 0x3000100 {
					t.Errorf("Applied[dc-c]: got %+v, want epoch 1 at 0/3000100", got)
				}
			},
		},
		{
			name:   "older epoch than the site's last report",
			before: []Command{boot()},
			setup: func(s *State) {
				promote(s, "dc-b")
				r := appReport("dc-c", 2, 0x1000, t0, t0)
				r.Origin = "dc-b"
				if err := s.Apply(r.Command(t0)); err != nil {
					t.Fatal(err)
				}
			},
			cmd:  appReport("dc-c", 1, 0x3000100, t0, t0).Command(at(time.Second)),
			want: ErrStaleEpoch,
			msg:  []string{"dc-c", "epoch 1", "epoch 2"},
		},
		{
			name:   "new epoch: positions of the new primary do not compare",
			before: []Command{boot(), appReport("dc-c", 1, 0x3000060, t0, t0).Command(t0)},
			setup:  epoch2,
			cmd: func() Command {
				r := appReport("dc-c", 2, 0x1000, t0, t0)
				r.Origin = "dc-b"
				return r.Command(at(time.Second))
			}(),
			check: func(t *testing.T, s *State) {
				if got := s.Applied["dc-c"]; got.Epoch != 2 || got.Origin != "dc-b" || got.LSN != 0x1000 {
					t.Errorf("Applied[dc-c]: got %+v, want epoch 2 of dc-b at 0/1000", got)
				}
			},
		},
		{
			name:   "another origin within the same older epoch",
			before: []Command{boot(), appReport("dc-c", 1, 0x3000060, t0, t0).Command(t0)},
			setup:  func(s *State) { promote(s, "dc-b"); promote(s, "dc-a") },
			cmd: func() Command {
				r := appReport("dc-c", 1, 0x3000100, t0, t0)
				r.Origin = "dc-b"
				return r.Command(at(time.Second))
			}(),
			want: ErrNotPrimary,
			msg:  []string{"origin dc-b", "origin dc-a"},
		},
		{
			name:   "the old primary, now a replica",
			before: []Command{boot()},
			setup:  epoch2,
			cmd: func() Command {
				r := appReport("dc-a", 2, 0x1000, t0, t0)
				r.Origin = "dc-b"
				return r.Command(t0)
			}(),
		},
		{
			name:   "state down is derived, not reported",
			before: []Command{boot()},
			cmd:    with(func(r *AppliedReport) { r.State = StateDown }),
			want:   ErrInvalidCommand,
		},
		{
			name:   "state of another tool",
			before: []Command{boot()},
			cmd:    with(func(r *AppliedReport) { r.State = "Streaming" }),
			want:   ErrInvalidCommand,
		},
		{
			name:   "no site",
			before: []Command{boot()},
			cmd:    with(func(r *AppliedReport) { r.Site = "" }),
			want:   ErrInvalidCommand,
		},
		{
			name:   "no origin",
			before: []Command{boot()},
			cmd:    with(func(r *AppliedReport) { r.Origin = "" }),
			want:   ErrInvalidCommand,
		},
		{
			name:   "epoch 0",
			before: []Command{boot()},
			cmd:    with(func(r *AppliedReport) { r.Epoch = 0 }),
			want:   ErrInvalidCommand,
		},
	})
}

func TestApplyMalformed(t *testing.T) {
	good := srcReport(1, 0x100, 0x100, 0x80, t0).Command(t0)
	with := func(f func(*Command)) Command {
		c := good
		r := *c.Source
		c.Source = &r
		f(&c)
		return c
	}
	runApplyCases(t, []applyCase{
		{name: "version 0", before: []Command{boot()}, cmd: with(func(c *Command) { c.Version = 0 }), want: ErrUnsupportedVersion},
		{name: "newer version", before: []Command{boot()}, cmd: with(func(c *Command) { c.Version = Version + 1 }), want: ErrUnsupportedVersion,
			msg: []string{"version 2", "1 to 1"}},
		{name: "no time", before: []Command{boot()}, cmd: with(func(c *Command) { c.At = time.Time{} }), want: ErrInvalidCommand},
		{name: "time JSON cannot carry", before: []Command{boot()}, cmd: with(func(c *Command) { c.At = time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC) }), want: ErrInvalidCommand},
		{name: "unknown op", before: []Command{boot()}, cmd: with(func(c *Command) { c.Op = "promote" }), want: ErrInvalidCommand,
			msg: []string{`"promote"`}},
		{name: "missing payload", before: []Command{boot()}, cmd: with(func(c *Command) { c.Source = nil }), want: ErrInvalidCommand},
		{name: "payload of another op", before: []Command{boot()}, cmd: with(func(c *Command) { c.Op = OpApplied }), want: ErrInvalidCommand},
		{name: "two payloads", before: []Command{boot()}, cmd: with(func(c *Command) { c.Applied = &AppliedReport{} }), want: ErrInvalidCommand},
	})
}

// TestMonotonicPositions feeds random positions, forward, backward and
// unknown (0), and checks that the state only ever holds the highest one
// accepted so far, and that exactly the backward moves are refused.
func TestMonotonicPositions(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	s := newState(t, boot())
	var sent, replica change.LSN
	for i := range 2000 {
		now := at(time.Duration(i) * time.Second)
		next := change.LSN(rng.IntN(64)) * 0x100 // often 0, often equal, often back
		r := srcReport(1, next, next, next, now)
		err := s.Apply(r.Command(now))
		switch wantErr := next != 0 && next < sent; {
		case wantErr && !errors.Is(err, ErrRegression):
			t.Fatalf("step %d: source %s after %s: got %v, want %v", i, next, sent, err, ErrRegression)
		case !wantErr && err != nil:
			t.Fatalf("step %d: source %s after %s: got %v, want no error", i, next, sent, err)
		case !wantErr && next != 0:
			sent = next
		}
		if s.Source.SentLSN != sent || s.Source.WALLSN != sent || s.Source.LastCommitLSN != sent {
			t.Fatalf("step %d: got source %+v, want every position at %s", i, s.Source, sent)
		}

		next = change.LSN(rng.IntN(64)) * 0x100
		err = s.Apply(appReport("dc-b", 1, next, now, now).Command(now))
		switch wantErr := next != 0 && next < replica; {
		case wantErr && !errors.Is(err, ErrRegression):
			t.Fatalf("step %d: applied %s after %s: got %v, want %v", i, next, replica, err, ErrRegression)
		case !wantErr && err != nil:
			t.Fatalf("step %d: applied %s after %s: got %v, want no error", i, next, replica, err)
		case !wantErr && next != 0:
			replica = next
		}
		if got := s.Applied["dc-b"].LSN; got != replica {
			t.Fatalf("step %d: got applied %s, want %s", i, got, replica)
		}
	}
}

// TestApplyDoesNotKeepCallerMemory: the state must not share the
// command's slices, or a caller reusing them would change it.
func TestApplyDoesNotKeepCallerMemory(t *testing.T) {
	sites := []string{"dc-b", "dc-a"}
	s := newState(t, Bootstrap{Cluster: "shop", Primary: "dc-a", Sites: sites}.Command(t0))
	sites[0] = "dc-z"
	if want := []string{"dc-a", "dc-b"}; !reflect.DeepEqual(s.Sites, want) {
		t.Errorf("Sites: got %v, want %v", s.Sites, want)
	}
}

func TestClone(t *testing.T) {
	s := newState(t, boot(), appReport("dc-b", 1, 0x100, t0, t0).Command(t0))
	c := s.Clone()
	if !reflect.DeepEqual(c, s) {
		t.Fatalf("Clone: got %s, want %s", mustJSON(t, c), mustJSON(t, s))
	}
	if err := c.Apply(appReport("dc-c", 1, 0x100, t0, t0).Command(t0)); err != nil {
		t.Fatal(err)
	}
	c.Sites[0] = "dc-z"
	if s.Sites[0] != "dc-a" || len(s.Applied) != 1 {
		t.Errorf("changing the clone changed the original: %s", mustJSON(t, s))
	}
}
