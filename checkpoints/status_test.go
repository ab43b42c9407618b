package checkpoints

import (
	"bytes"
	"encoding/json"
	"reflect"
	"slices"
	"testing"
	"time"
)

func i64(v int64) *int64          { return &v }
func f64(v float64) *float64      { return &v }
func tp(t time.Time) *time.Time   { return &t }
func sec(d time.Duration) float64 { return d.Seconds() }

// idleCluster: the source is idle; both replicas processed its latest
// heartbeat, so they report the source's SentLSN.
func idleCluster(t *testing.T) *State {
	t.Helper()
	return newState(t, boot(),
		srcReport(1, 0x3000100, 0x3000100, 0x3000060, at(-10*time.Second)).Command(at(-200*time.Millisecond)),
		appReport("dc-b", 1, 0x3000100, at(-10*time.Second), at(-500*time.Millisecond)).Command(at(-300*time.Millisecond)),
		appReport("dc-c", 1, 0x3000100, at(-10*time.Second), at(-time.Second)).Command(at(-900*time.Millisecond)),
	)
}

// stalledCluster: epoch 2 (dc-a primary again after a switchover back);
// the source moved on to 0/3000900; dc-b still reports every second but is
// stuck at 0/3000100 as of a minute ago; dc-c has not followed the
// failover and last reported epoch 1, 20 s ago.
func stalledCluster(t *testing.T) *State {
	t.Helper()
	s := newState(t, boot(), appReport("dc-c", 1, 0x5000000, at(-30*time.Second), at(-25*time.Second)).Command(at(-20*time.Second)))
	promote(s, "dc-a")
	for _, c := range []Command{
		srcReport(2, 0x3000900, 0x3000A00, 0x3000800, at(-time.Second)).Command(t0),
		AppliedReport{Site: "dc-b", Epoch: 2, Origin: "dc-a", LSN: 0x3000100, CommitTime: at(-time.Minute),
			AsOf: at(-time.Minute), State: StateCatchingUp}.Command(t0),
	} {
		if err := s.Apply(c); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

func TestStatus(t *testing.T) {
	primaryAt := func(s *State) SiteStatus {
		return SiteStatus{Site: "dc-a", Role: RolePrimary, State: StateStreaming, AppliedLSN: s.Source.SentLSN.String(),
			LagBytes: i64(int64(s.Source.WALLSN - s.Source.SentLSN)), LagSeconds: f64(0), UpdatedAt: tp(s.Source.ReportedAt)}
	}
	for _, tc := range []struct {
		name      string
		state     func(t *testing.T) *State
		now       time.Time
		downAfter time.Duration
		want      func(s *State) Status
	}{
		{
			name:      "idle cluster, caught up",
			state:     idleCluster,
			now:       t0,
			downAfter: 5 * time.Second,
			want: func(s *State) Status {
				return Status{Cluster: "shop", Epoch: 1, Primary: "dc-a", SourceLSN: "0/3000100", SourceWALLSN: "0/3000100", GeneratedAt: t0,
					Sites: []SiteStatus{
						primaryAt(s),
						{Site: "dc-b", Role: RoleReplica, State: StateStreaming, AppliedLSN: "0/3000100", LagBytes: i64(0), LagSeconds: f64(0), UpdatedAt: tp(at(-300 * time.Millisecond))},
						{Site: "dc-c", Role: RoleReplica, State: StateStreaming, AppliedLSN: "0/3000100", LagBytes: i64(0), LagSeconds: f64(0), UpdatedAt: tp(at(-900 * time.Millisecond))},
					}}
			},
		},
		{
			name: "idle cluster, replicas between a commit and the next heartbeat",
			state: func(t *testing.T) *State {
				return newState(t, boot(),
					srcReport(1, 0x3000100, 0x3000100, 0x3000060, at(-10*time.Second)).Command(at(-200*time.Millisecond)),
					appReport("dc-b", 1, 0x3000060, at(-10*time.Second), at(-10*time.Second)).Command(at(-9*time.Second)),
				)
			},
			now: t0,
			want: func(s *State) Status {
				return Status{Cluster: "shop", Epoch: 1, Primary: "dc-a", SourceLSN: "0/3000100", SourceWALLSN: "0/3000100", GeneratedAt: t0,
					Sites: []SiteStatus{
						primaryAt(s),
						// Applied the last commit: caught up in time, behind only by the WAL after it.
						{Site: "dc-b", Role: RoleReplica, State: StateStreaming, AppliedLSN: "0/3000060", LagBytes: i64(0xA0), LagSeconds: f64(0), UpdatedAt: tp(at(-9 * time.Second))},
						{Site: "dc-c", Role: RoleReplica, State: StateUnknown},
					}}
			},
		},
		{
			name:      "stalled replica while the source moves on; replica of an older epoch",
			state:     stalledCluster,
			now:       at(10 * time.Second),
			downAfter: 30 * time.Second,
			want: func(s *State) Status {
				return Status{Cluster: "shop", Epoch: 2, Primary: "dc-a", SourceLSN: "0/3000900", SourceWALLSN: "0/3000A00", GeneratedAt: at(10 * time.Second),
					Sites: []SiteStatus{
						primaryAt(s),
						{Site: "dc-b", Role: RoleReplica, State: StateCatchingUp, AppliedLSN: "0/3000100", LagBytes: i64(0x800), LagSeconds: f64(70), UpdatedAt: tp(t0)},
						// epoch 1: its LSN does not compare with epoch 2's, its time does.
						{Site: "dc-c", Role: RoleReplica, State: StateStreaming, AppliedLSN: "0/5000000", LagBytes: nil, LagSeconds: f64(35), UpdatedAt: tp(at(-20 * time.Second))},
					}}
			},
		},
		{
			name:      "down sites still show the lag of their last report",
			state:     stalledCluster,
			now:       at(10 * time.Second),
			downAfter: 5 * time.Second,
			want: func(s *State) Status {
				st := s.Status(at(10*time.Second), 30*time.Second)
				for i := range st.Sites {
					st.Sites[i].State = StateDown
				}
				return st
			},
		},
		{
			name: "never reported",
			state: func(t *testing.T) *State {
				return newState(t, boot(), appReport("dc-c", 1, 0x100, t0, t0).Command(t0))
			},
			now:       t0,
			downAfter: time.Second,
			want: func(s *State) Status {
				return Status{Cluster: "shop", Epoch: 1, Primary: "dc-a", GeneratedAt: t0,
					Sites: []SiteStatus{
						{Site: "dc-a", Role: RolePrimary, State: StateUnknown},
						{Site: "dc-b", Role: RoleReplica, State: StateUnknown},
						{Site: "dc-c", Role: RoleReplica, State: StateStreaming, AppliedLSN: "0/100", LagSeconds: f64(0), UpdatedAt: tp(t0)},
					}}
			},
		},
		{
			name: "new primary has not reported yet; source report of the old epoch ignored",
			state: func(t *testing.T) *State {
				s := idleCluster(t)
				promote(s, "dc-b")
				r := appReport("dc-c", 2, 0x1000, t0, at(-2*time.Second))
				r.Origin = "dc-b"
				apply(t, s, r.Command(t0))
				return s
			},
			now: t0,
			want: func(s *State) Status {
				return Status{Cluster: "shop", Epoch: 2, Primary: "dc-b", GeneratedAt: t0,
					Sites: []SiteStatus{
						{Site: "dc-b", Role: RolePrimary, State: StateUnknown},
						// dc-a was the primary: it never reported as a replica.
						{Site: "dc-a", Role: RoleReplica, State: StateUnknown},
						{Site: "dc-c", Role: RoleReplica, State: StateStreaming, AppliedLSN: "0/1000", LagSeconds: f64(2), UpdatedAt: tp(t0)},
					}}
			},
		},
		{
			name: "replica reports ahead of the source's last report, clock skew puts as_of ahead of now",
			state: func(t *testing.T) *State {
				s := idleCluster(t)
				apply(t, s, appReport("dc-b", 1, 0x3000200, at(time.Second), at(2*time.Second)).Command(at(time.Second)))
				apply(t, s, srcReport(1, 0x3000180, 0x3000100, 0x3000300, at(time.Second)).Command(at(time.Second)))
				return s
			},
			now: t0,
			want: func(s *State) Status {
				st := s.Status(t0, 0)
				// wal_lsn read before sent_lsn: clamped. dc-b is 0x80 past sent_lsn: clamped.
				st.Sites[0].LagBytes = i64(0)
				st.Sites[1].LagBytes, st.Sites[1].LagSeconds = i64(0), f64(0)
				return st
			},
		},
		{
			name: "paused replica with an error; behind with no as_of known",
			state: func(t *testing.T) *State {
				return newState(t, boot(),
					srcReport(1, 0x3000900, 0x3000900, 0x3000800, t0).Command(t0),
					AppliedReport{Site: "dc-b", Epoch: 1, Origin: "dc-a", LSN: 0x3000100, State: StatePaused, Error: "schema drift"}.Command(t0),
				)
			},
			now: t0,
			want: func(s *State) Status {
				return Status{Cluster: "shop", Epoch: 1, Primary: "dc-a", SourceLSN: "0/3000900", SourceWALLSN: "0/3000900", GeneratedAt: t0,
					Sites: []SiteStatus{
						primaryAt(s),
						{Site: "dc-b", Role: RoleReplica, State: StatePaused, AppliedLSN: "0/3000100", LagBytes: i64(0x800), UpdatedAt: tp(t0), Error: "schema drift"},
						{Site: "dc-c", Role: RoleReplica, State: StateUnknown},
					}}
			},
		},
		{
			name:  "not bootstrapped",
			state: func(*testing.T) *State { return New() },
			now:   t0,
			want:  func(*State) Status { return Status{GeneratedAt: t0, Sites: []SiteStatus{}} },
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := tc.state(t)
			before := s.Clone()
			got := s.Status(tc.now, tc.downAfter)
			if want := tc.want(s); !reflect.DeepEqual(got, want) {
				t.Errorf("Status:\n got %s\nwant %s", mustJSON(t, got), mustJSON(t, want))
			}
			if !reflect.DeepEqual(s, before) {
				t.Errorf("Status changed the state")
			}
		})
	}
}

func TestStatusNilState(t *testing.T) {
	var s *State
	got := s.Status(t0, time.Second)
	if want := (Status{GeneratedAt: t0, Sites: []SiteStatus{}}); !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v, want %+v", got, want)
	}
}

func apply(t *testing.T, s *State, c Command) {
	t.Helper()
	if err := s.Apply(c); err != nil {
		t.Fatal(err)
	}
}

// TestStatusLagGrows: while a replica is stalled and the source has moved
// on, lag_seconds grows with the wall clock and lag_bytes stays put; once
// the replica catches up, both are 0.
func TestStatusLagGrows(t *testing.T) {
	s := stalledCluster(t)
	var last float64
	for i := range 5 {
		now := at(time.Duration(i) * 7 * time.Second)
		row := s.Status(now, 0).Sites[1]
		if row.Site != "dc-b" || row.LagSeconds == nil || row.LagBytes == nil {
			t.Fatalf("at %v: got row %+v, want dc-b with lag", now, row)
		}
		if want := sec(now.Sub(at(-time.Minute))); *row.LagSeconds != want {
			t.Errorf("at %v: lag_seconds got %v, want %v", now, *row.LagSeconds, want)
		}
		if i > 0 && *row.LagSeconds <= last {
			t.Errorf("at %v: lag_seconds got %v, want more than %v", now, *row.LagSeconds, last)
		}
		if *row.LagBytes != 0x800 {
			t.Errorf("at %v: lag_bytes got %d, want %d", now, *row.LagBytes, 0x800)
		}
		last = *row.LagSeconds
	}
	apply(t, s, AppliedReport{Site: "dc-b", Epoch: 2, Origin: "dc-a", LSN: 0x3000900, CommitTime: at(-time.Second),
		AsOf: at(time.Second), State: StateStreaming}.Command(at(2*time.Second)))
	row := s.Status(at(time.Hour), 0).Sites[1]
	if *row.LagSeconds != 0 || *row.LagBytes != 0 {
		t.Errorf("caught up: got lag %v s, %d bytes; want 0 and 0", *row.LagSeconds, *row.LagBytes)
	}
}

// designStatus is the `xdcr lag -o json` example of DESIGN.md ("Outside
// interface"). Its fields are never renamed or dropped.
const designStatus = `{"cluster":"shop","epoch":2,"primary":"dc-a","source_lsn":"0/3000060",
 "sites":[{"site":"dc-b","role":"replica","state":"streaming",
           "applied_lsn":"0/3000060","lag_bytes":0,"lag_seconds":0.08,
           "updated_at":"2026-11-27T10:00:00Z"}]}`

// TestStatusJSONShape checks json.Marshal(Status) against DESIGN.md: every
// documented field is there under its documented name, with its JSON type
// (null allowed where the value can be unknown). Other fields may be added.
func TestStatusJSONShape(t *testing.T) {
	type field = jsonField
	top := map[string]field{"cluster": {"string", false}, "epoch": {"number", false}, "primary": {"string", false},
		"source_lsn": {"string", false}, "sites": {"array", false}}
	site := map[string]field{"site": {"string", false}, "role": {"string", false}, "state": {"string", false},
		"applied_lsn": {"string", false}, "lag_bytes": {"number", true}, "lag_seconds": {"number", true},
		"updated_at": {"string", true}}

	// The documented example itself must carry exactly these fields, and
	// must decode into Status.
	var doc map[string]any
	if err := json.Unmarshal([]byte(designStatus), &doc); err != nil {
		t.Fatal(err)
	}
	checkFields(t, "DESIGN.md", doc, top, site, true)
	dec := json.NewDecoder(bytes.NewReader([]byte(designStatus)))
	dec.DisallowUnknownFields()
	var st Status
	if err := dec.Decode(&st); err != nil {
		t.Fatalf("decode DESIGN.md's example into Status: %v", err)
	}

	for name, s := range map[string]*State{"stalled": stalledCluster(t), "never reported": newState(t, boot())} {
		data, err := json.Marshal(s.Status(at(time.Second), 5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		var got map[string]any
		if err := json.Unmarshal(data, &got); err != nil {
			t.Fatal(err)
		}
		checkFields(t, name, got, top, site, false)
	}
}

type jsonField struct {
	kind     string // JSON type: string, number, array
	nullable bool
}

func checkFields(t *testing.T, name string, obj map[string]any, top, site map[string]jsonField, exact bool) {
	t.Helper()
	check := func(where string, obj map[string]any, want map[string]jsonField) {
		for key, f := range want {
			v, ok := obj[key]
			if !ok {
				t.Errorf("%s: %s.%s missing", name, where, key)
				continue
			}
			if got := jsonKind(v); got != f.kind && !(f.nullable && got == "null") {
				t.Errorf("%s: %s.%s is a JSON %s (%v), want %s", name, where, key, got, v, f.kind)
			}
		}
		if exact {
			for key := range obj {
				if _, ok := want[key]; !ok {
					t.Errorf("%s: %s.%s is not documented", name, where, key)
				}
			}
		}
	}
	check("status", obj, top)
	sites, _ := obj["sites"].([]any)
	if len(sites) == 0 {
		t.Fatalf("%s: no sites in %v", name, obj)
	}
	for _, s := range sites {
		row, ok := s.(map[string]any)
		if !ok {
			t.Fatalf("%s: site %v is not an object", name, s)
		}
		check("sites[]", row, site)
		if u, ok := row["updated_at"].(string); ok {
			if _, err := time.Parse(time.RFC3339Nano, u); err != nil {
				t.Errorf("%s: updated_at %q: %v", name, u, err)
			}
		}
		if role := row["role"]; !slices.Contains([]any{RolePrimary, RoleReplica}, role) {
			t.Errorf("%s: role %v, want primary or replica", name, role)
		}
	}
}

func jsonKind(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case string:
		return "string"
	case float64:
		return "number"
	case bool:
		return "boolean"
	case []any:
		return "array"
	case map[string]any:
		return "object"
	}
	return "?"
}

// TestStatusGolden pins the JSON that /v1/status serves for a cluster with
// a stalled replica and one of an older epoch.
func TestStatusGolden(t *testing.T) {
	st := stalledCluster(t).Status(at(10*time.Second), 30*time.Second)
	st.Leader = "a1"
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "status.golden", append(data, '\n'))
}
