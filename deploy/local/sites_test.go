package local

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

func TestSiteNames(t *testing.T) {
	tests := []struct {
		n         int
		wantFirst string
		wantLast  string
	}{
		{1, "dc-a", "dc-a"},
		{3, "dc-a", "dc-c"},
		{26, "dc-a", "dc-z"},
		{27, "dc-a", "dc-aa"},
		{28, "dc-a", "dc-ab"},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprint(tt.n), func(t *testing.T) {
			got := SiteNames(tt.n)
			if len(got) != tt.n || got[0] != tt.wantFirst || got[len(got)-1] != tt.wantLast {
				t.Errorf("got %v, want %d names from %s to %s", got, tt.n, tt.wantFirst, tt.wantLast)
			}
			if len(slices.Compact(slices.Clone(got))) != len(got) {
				t.Errorf("got duplicates in %v", got)
			}
		})
	}
	if got := SiteNames(0); len(got) != 0 {
		t.Errorf("SiteNames(0): got %v, want none", got)
	}
}

func TestStartSitesRejectsBadConfig(t *testing.T) {
	tests := []struct {
		name string
		cfg  SitesConfig
		want string
	}{
		{"no names", SitesConfig{Dir: t.TempDir()}, "no site names"},
		{"no dir", SitesConfig{Names: SiteNames(2)}, "no directory"},
		{"duplicate", SitesConfig{Names: []string{"dc-a", "dc-b", "dc-a"}, Dir: t.TempDir()}, "listed twice"},
		{"dot in name", SitesConfig{Names: []string{"dc.a"}, Dir: t.TempDir()}, "only letters"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := StartSites(t.Context(), tt.cfg)
			if err == nil {
				s.Close()
				t.Fatal("got no error")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("got %q, want an error containing %q", err, tt.want)
			}
		})
	}
}

func TestStartSites(t *testing.T) {
	if testing.Short() {
		t.Skip("starts three PostgreSQL clusters")
	}
	logger, tl := newTestLogger(t)
	ctx := t.Context()
	start := time.Now()
	sites, err := StartSites(ctx, SitesConfig{
		Names:            SiteNames(3),
		Dir:              t.TempDir(),
		PostgresSettings: map[string]string{"max_connections": "40"},
		Logger:           logger,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sites.Close() })
	t.Logf("three sites ready in %v", time.Since(start).Round(time.Millisecond))

	if got := sites.Names(); !slices.Equal(got, SiteNames(3)) {
		t.Errorf("Names: got %v, want %v", got, SiteNames(3))
	}
	if sites.Site("dc-b") != sites.List[1] || sites.Site("dc-x") != nil {
		t.Error("Site: lookup by name is wrong")
	}
	var trees [][]int
	ports := map[int]bool{}
	for _, site := range sites.List {
		pg := site.Postgres
		if got := queryString(t, ctx, pg.DSN("postgres"), "SHOW wal_level"); got != "logical" {
			t.Errorf("%s wal_level: got %s, want logical", site.Name, got)
		}
		if got := queryString(t, ctx, pg.DSN("postgres"), "SHOW max_connections"); got != "40" {
			t.Errorf("%s max_connections: got %s, want 40 (PostgresSettings)", site.Name, got)
		}
		if got := site.NATS.LeafConnections(); got != 2 {
			t.Errorf("%s leaf connections: got %d, want 2", site.Name, got)
		}
		nc, err := nats.Connect(site.NATS.URL())
		if err != nil {
			t.Fatal(err)
		}
		js, _ := jetstream.New(nc)
		info, err := js.AccountInfo(ctx)
		nc.Close()
		if err != nil {
			t.Fatal(err)
		}
		if info.Domain != site.Name {
			t.Errorf("%s jetstream domain: got %q, want %q", site.Name, info.Domain, site.Name)
		}
		trees = append(trees, processTree(pg.PID()))
		for _, p := range []int{pg.Port(), portOf(site.NATS.URL()), portOf(site.NATS.LeafURL())} {
			if ports[p] {
				t.Errorf("port %d used twice", p)
			}
			ports[p] = true
		}
	}
	if err := sites.Close(); err != nil {
		t.Fatal(err)
	}
	for i, tree := range trees {
		if left := stillRunning(tree); len(left) > 0 {
			t.Errorf("%s: postgres processes %v still run after Close", sites.List[i].Name, left)
		}
		if sites.List[i].NATS.Running() {
			t.Errorf("%s: nats running after Close", sites.List[i].Name)
		}
	}
	if err := sites.Close(); err != nil { // idempotent
		t.Fatal(err)
	}
	if loops := tl.matching("Loop detected"); len(loops) > 0 {
		t.Errorf("leafnode loops detected:\n%s", strings.Join(loops, "\n"))
	}
}

func portOf(url string) int {
	var p int
	_, _ = fmt.Sscanf(url[strings.LastIndexByte(url, ':')+1:], "%d", &p)
	return p
}

// siteJS is a JetStream client of one site's own domain.
type siteJS struct {
	nc *nats.Conn
	js jetstream.JetStream
}

func connectJS(t *testing.T, n *NATS) siteJS {
	t.Helper()
	nc, err := nats.Connect(n.URL(), nats.Name("test-"+n.Name()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return siteJS{nc: nc, js: js}
}

// publishN publishes n messages to subject asynchronously and waits until
// JetStream has acknowledged every one.
func publishN(t *testing.T, ctx context.Context, js jetstream.JetStream, subject string, n int) {
	t.Helper()
	futures := make([]jetstream.PubAckFuture, 0, n)
	for i := range n {
		f, err := js.PublishAsync(subject, fmt.Appendf(nil, "msg %d", i))
		if err != nil {
			t.Fatal(err)
		}
		futures = append(futures, f)
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-ctx.Done():
		t.Fatal(ctx.Err())
	case <-time.After(30 * time.Second):
		t.Fatalf("publish %d to %s: not all acked within 30 s", n, subject)
	}
	for _, f := range futures {
		select {
		case <-f.Ok():
		case err := <-f.Err():
			t.Fatalf("publish to %s: %v", subject, err)
		}
	}
}

// waitMsgs waits up to 30 s until stream in js holds want messages and
// returns how long that took.
func waitMsgs(t *testing.T, ctx context.Context, where string, js jetstream.JetStream, stream string, want uint64) time.Duration {
	t.Helper()
	return waitMsgsFor(t, ctx, 30*time.Second, where, js, stream, want)
}

func waitMsgsFor(t *testing.T, ctx context.Context, timeout time.Duration, where string, js jetstream.JetStream, stream string, want uint64) time.Duration {
	t.Helper()
	return eventually(t, ctx, timeout, fmt.Sprintf("%s: %s holds %d", where, stream, want), func(ctx context.Context) error {
		s, err := js.Stream(ctx, stream)
		if err != nil {
			return err
		}
		info := s.CachedInfo()
		if info.State.Msgs == want {
			return nil
		}
		mirror := ""
		if m := info.Mirror; m != nil {
			mirror = fmt.Sprintf(" (mirror lag %d, active %v, error %v)", m.Lag, m.Active, m.Error)
		}
		return fmt.Errorf("has %d%s", info.State.Msgs, mirror)
	})
}

// TestMeshSurvivesSiteLoss is the topology test the product relies on: one
// site's NATS server dies and the two others still mirror between them;
// when it comes back, its store is intact and it catches up.
func TestMeshSurvivesSiteLoss(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-site test")
	}
	logger, tl := newTestLogger(t)
	ctx := t.Context()
	sites, err := StartSites(ctx, SitesConfig{Names: SiteNames(3), Dir: t.TempDir(), NoPostgres: true, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sites.Close() })
	for _, site := range sites.List {
		if got := site.NATS.LeafConnections(); got != 2 {
			t.Errorf("%s: got %d leaf connections, want 2 (one per other site)", site.Name, got)
		}
		if site.Postgres != nil {
			t.Errorf("%s: got a postgres with NoPostgres", site.Name)
		}
	}

	// Each site owns S_<site>; every site mirrors every other site's stream
	// ahead of time, under the same name in its own domain. Own streams
	// come first: a mirror whose source does not exist yet gets "stream not
	// found" and nats-server retries it only after a 10 s backoff.
	clients := map[string]siteJS{}
	for _, site := range sites.List {
		c := connectJS(t, site.NATS)
		clients[site.Name] = c
		if _, err := c.js.CreateStream(ctx, jetstream.StreamConfig{
			Name: "S_" + site.Name, Subjects: []string{"x." + site.Name + ".>"}, Storage: jetstream.FileStorage,
		}); err != nil {
			t.Fatalf("%s: create own stream: %v", site.Name, err)
		}
	}
	for _, site := range sites.List {
		for _, other := range sites.List {
			if other == site {
				continue
			}
			if _, err := clients[site.Name].js.CreateStream(ctx, jetstream.StreamConfig{
				Name:    "S_" + other.Name,
				Mirror:  &jetstream.StreamSource{Name: "S_" + other.Name, Domain: other.Name},
				Storage: jetstream.FileStorage,
			}); err != nil {
				t.Fatalf("%s: create mirror of S_%s: %v", site.Name, other.Name, err)
			}
		}
	}
	a, b, c := sites.List[0], sites.List[1], sites.List[2]

	phase := time.Now()
	publishN(t, ctx, clients[a.Name].js, "x.dc-a.orders", 1000)
	t.Logf("published 1000 to dc-a in %v", time.Since(phase).Round(time.Millisecond))
	for _, s := range []*Site{b, c} {
		d := waitMsgs(t, ctx, s.Name, clients[s.Name].js, "S_dc-a", 1000)
		t.Logf("%s mirrored S_dc-a (1000) in %v", s.Name, d.Round(time.Millisecond))
	}

	// dc-a dies. dc-b and dc-c keep their direct link.
	a.NATS.Stop()
	if a.NATS.Running() {
		t.Fatal("dc-a still running after Stop")
	}
	if err := sites.WaitMesh(ctx); err != nil {
		t.Fatalf("mesh without dc-a: %v", err)
	}
	waitMsgs(t, ctx, "dc-b (dc-a down)", clients[b.Name].js, "S_dc-a", 1000) // still readable locally
	phase = time.Now()
	publishN(t, ctx, clients[b.Name].js, "x.dc-b.orders", 1000)
	t.Logf("published 1000 to dc-b in %v", time.Since(phase).Round(time.Millisecond))
	d := waitMsgs(t, ctx, "dc-c (dc-a down)", clients[c.Name].js, "S_dc-b", 1000)
	t.Logf("dc-c mirrored S_dc-b (1000) with dc-a down in %v", d.Round(time.Millisecond))

	// dc-a comes back on the same store and ports.
	start := time.Now()
	if err := a.NATS.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := sites.WaitMesh(ctx); err != nil {
		t.Fatalf("mesh after dc-a restart: %v", err)
	}
	ca := connectJS(t, a.NATS)
	waitMsgs(t, ctx, "dc-a (restarted)", ca.js, "S_dc-a", 1000)
	waitMsgs(t, ctx, "dc-a (restarted)", ca.js, "S_dc-b", 1000)
	t.Logf("restarted dc-a mirrored S_dc-b (1000) %v after its start", time.Since(start).Round(time.Millisecond))

	// dc-a's own stream takes writes again and both mirrors follow. This
	// is slow: dc-b's and dc-c's mirrors lost their source when dc-a went
	// down, and nats-server re-creates a mirror's consumer only after its
	// stall check (every 10 s) plus a backoff of 10 s per failed attempt,
	// capped at 2 min (server/stream.go). 10-20 s is typical here.
	phase = time.Now()
	publishN(t, ctx, ca.js, "x.dc-a.orders", 10)
	waitMsgsFor(t, ctx, 2*time.Minute, "dc-b", clients[b.Name].js, "S_dc-a", 1010)
	waitMsgsFor(t, ctx, 2*time.Minute, "dc-c", clients[c.Name].js, "S_dc-a", 1010)
	t.Logf("dc-b and dc-c mirrored 10 new messages of restarted dc-a in %v", time.Since(phase).Round(time.Millisecond))

	for _, site := range sites.List {
		if got := site.NATS.LeafConnections(); got != 2 {
			t.Errorf("%s: got %d leaf connections at the end, want 2", site.Name, got)
		}
	}
	if loops := tl.matching("Loop detected"); len(loops) > 0 {
		t.Errorf("leafnode loops detected:\n%s", strings.Join(loops, "\n"))
	}
}

func TestStartSitesStopsWhatItStartedOnFailure(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL clusters")
	}
	logger, _ := newTestLogger(t)
	dir := t.TempDir()
	sites, err := StartSites(t.Context(), SitesConfig{
		Names:            SiteNames(2),
		Dir:              dir,
		PostgresSettings: map[string]string{"shared_buffers": "lots"},
		Logger:           logger,
	})
	if err == nil {
		sites.Close()
		t.Fatal("got no error for shared_buffers=lots")
	}
	if want := `invalid value for parameter "shared_buffers"`; !strings.Contains(err.Error(), want) {
		t.Errorf("got %q, want it to contain %q", err, want)
	}
	for _, name := range SiteNames(2) {
		b, err := os.ReadFile(filepath.Join(dir, name, "nats", "nats.log"))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(b), "Server Exiting") {
			t.Errorf("%s: nats.log does not show a shutdown:\n%s", name, b)
		}
	}
}
