package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/xdcr/xdcr/deploy/topology"
)

// lagJSON is DESIGN.md's documented shape of `xdcr lag -o json`; the
// decoder refuses nothing, so the test checks each field by hand.
type lagJSON struct {
	Cluster   *string `json:"cluster"`
	Epoch     *uint64 `json:"epoch"`
	Primary   *string `json:"primary"`
	SourceLSN *string `json:"source_lsn"`
	Sites     []struct {
		Site       *string  `json:"site"`
		Role       *string  `json:"role"`
		State      *string  `json:"state"`
		AppliedLSN *string  `json:"applied_lsn"`
		LagBytes   *int64   `json:"lag_bytes"`
		LagSeconds *float64 `json:"lag_seconds"`
		UpdatedAt  *string  `json:"updated_at"`
	} `json:"sites"`
}

// xdcrLag runs the real `xdcr lag` and returns its output and exit code.
func xdcrLag(t *testing.T, c *topology.Cluster, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, env.binary, append([]string{"lag", "--config", c.ConfigPath}, args...)...)
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return out.String(), 0
	case errors.As(err, &ee):
		return out.String() + stderr.String(), ee.ExitCode()
	}
	t.Fatalf("xdcr lag: %v", err)
	return "", -1
}

func lagStatus(t *testing.T, c *topology.Cluster) lagJSON {
	t.Helper()
	st, err := tryLagStatus(t, c)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func tryLagStatus(t *testing.T, c *topology.Cluster) (lagJSON, error) {
	t.Helper()
	var st lagJSON
	out, code := xdcrLag(t, c, "-o", "json")
	if code != 0 {
		return st, fmt.Errorf("xdcr lag -o json exited %d: %s", code, out)
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return st, fmt.Errorf("xdcr lag -o json printed %q: %v", out, err)
	}
	return st, nil
}

func siteRow(t *testing.T, st lagJSON, site string) (lagBytes int64, lagSeconds float64, state string) {
	t.Helper()
	for _, s := range st.Sites {
		if s.Site != nil && *s.Site == site {
			if s.LagBytes == nil || s.LagSeconds == nil || s.State == nil {
				return -1, -1, deref(s.State)
			}
			return *s.LagBytes, *s.LagSeconds, *s.State
		}
	}
	t.Fatalf("xdcr lag has no row for site %s", site)
	return 0, 0, ""
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// eventually polls f until it returns nil.
func eventually(t *testing.T, timeout time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v", what, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// TestLagJSONAndIdle: the JSON has DESIGN.md's fields with their types, and
// an idle cluster shows lag under 2 s everywhere (heartbeats).
func TestLagJSONAndIdle(t *testing.T) {
	c := newCluster(t, clusterOpts{schema: padSchema, tables: []string{"items"}})
	execOn(t, c, c.Config.Primary, `INSERT INTO items VALUES (1, 'a')`)
	converge(t, c, time.Minute)
	time.Sleep(3 * time.Second) // idle
	eventually(t, 20*time.Second, "idle lag", func() error {
		st := lagStatus(t, c)
		if st.Cluster == nil || *st.Cluster != c.Config.Cluster || st.Epoch == nil || *st.Epoch != 1 ||
			st.Primary == nil || *st.Primary != c.Config.Primary || st.SourceLSN == nil || *st.SourceLSN == "" {
			return fmt.Errorf("header fields: %+v", st)
		}
		if len(st.Sites) != len(c.Config.Sites) {
			return fmt.Errorf("%d site rows, want %d", len(st.Sites), len(c.Config.Sites))
		}
		for _, s := range st.Sites {
			if s.Site == nil || s.Role == nil || s.State == nil || s.AppliedLSN == nil || s.LagBytes == nil ||
				s.LagSeconds == nil || s.UpdatedAt == nil {
				return fmt.Errorf("site row misses a documented field: %+v", s)
			}
			if _, err := time.Parse(time.RFC3339, *s.UpdatedAt); err != nil {
				return fmt.Errorf("updated_at %q: %v", *s.UpdatedAt, err)
			}
			if *s.LagSeconds >= 2 || *s.State != "streaming" {
				return fmt.Errorf("site %s: state %s, lag %.2fs on an idle cluster", *s.Site, *s.State, *s.LagSeconds)
			}
		}
		return nil
	})
	out, code := xdcrLag(t, c)
	if code != 0 || !strings.Contains(out, c.Config.Primary) || !strings.Contains(strings.ToLower(out), "applied lsn") {
		t.Fatalf("xdcr lag (table) exited %d:\n%s", code, out)
	}
	t.Logf("\n%s", out)
}

// TestLagGrowsWhileReplicaStopped: a stopped replica's lag grows, `xdcr lag
// --max-lag 1s` exits 3, and after a restart lag returns to 0.
func TestLagGrowsWhileReplicaStopped(t *testing.T) {
	c := newCluster(t, clusterOpts{schema: padSchema, tables: []string{"items"}})
	site := replicas(c)[0]
	node := topology.NodeID(site)
	eventually(t, 30*time.Second, "every site reporting", func() error {
		for s := range c.Config.Sites {
			if b, _, state := siteRow(t, lagStatus(t, c), s); b < 0 {
				return fmt.Errorf("site %s: state %s, lag unknown", s, state)
			}
		}
		return nil
	})
	if err := c.StopAgent(node, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	var lastSeconds float64
	for i := 1; i <= 4; i++ {
		execOn(t, c, c.Config.Primary, `INSERT INTO items VALUES ($1, repeat('x', 1000))`, i)
		time.Sleep(time.Second)
	}
	eventually(t, 30*time.Second, "lag of the stopped site", func() error {
		// the stopped agent may have led the Raft group: until the others
		// elect a leader, xdcr lag says so and exits 1
		st, err := tryLagStatus(t, c)
		if err != nil {
			return err
		}
		b, s, _ := siteRow(t, st, site)
		if b <= 0 || s < 2 {
			return fmt.Errorf("lag_bytes %d, lag_seconds %.2f; want both growing", b, s)
		}
		lastSeconds = s
		return nil
	})
	time.Sleep(1500 * time.Millisecond)
	if _, s, state := siteRow(t, lagStatus(t, c), site); s <= lastSeconds || state != "down" {
		t.Errorf("site %s: lag_seconds %.2f after %.2f, state %s; want it growing while stalled, state down", site, s, lastSeconds, state)
	}
	if out, code := xdcrLag(t, c, "--max-lag", "1s"); code != 3 {
		t.Errorf("xdcr lag --max-lag 1s exited %d, want 3:\n%s", code, out)
	}
	if err := c.StartAgent(t.Context(), node); err != nil {
		t.Fatal(err)
	}
	eventually(t, time.Minute, "lag after the restart", func() error {
		st, err := tryLagStatus(t, c)
		if err != nil {
			return err
		}
		b, s, state := siteRow(t, st, site)
		if b != 0 || s != 0 || state != "streaming" {
			return fmt.Errorf("lag_bytes %d, lag_seconds %.2f, state %s; want 0, 0, streaming", b, s, state)
		}
		return nil
	})
	if out, code := xdcrLag(t, c, "--max-lag", "5s"); code != 0 {
		t.Errorf("xdcr lag --max-lag 5s exited %d after the catch-up:\n%s", code, out)
	}
}

// TestRaftLeaderKilled: killing the Raft leader's agent elects another,
// checkpoints keep advancing, `xdcr lag` keeps answering, and the killed
// node comes back from its data dir without bootstrapping again.
func TestRaftLeaderKilled(t *testing.T) {
	c := newCluster(t, clusterOpts{schema: padSchema, tables: []string{"items"}})
	ctx := t.Context()
	primaryNode := topology.NodeID(c.Config.Primary)
	var leader string
	// the test wants a replica's agent to be the leader, so that capture
	// keeps running: move leadership off the primary's agent if needed
	for attempt := 0; ; attempt++ {
		eventually(t, 30*time.Second, "a raft leader", func() error {
			st := statusFrom(t, c.HTTPAddr(primaryNode))
			if st.Leader == "" {
				return errors.New("no leader")
			}
			leader = st.Leader
			return nil
		})
		if leader != primaryNode || attempt == 5 {
			break
		}
		if err := c.KillAgent(leader); err != nil {
			t.Fatal(err)
		}
		time.Sleep(3 * time.Second)
		if err := c.StartAgent(ctx, leader); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Second)
	}
	if leader == primaryNode {
		t.Skip("leadership stayed on the primary's agent")
	}
	var other string
	for _, s := range replicas(c) {
		if n := topology.NodeID(s); n != leader {
			other = n
		}
	}
	before := appliedLSN(t, c, other)
	if err := c.KillAgent(leader); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 5; i++ {
		execOn(t, c, c.Config.Primary, `INSERT INTO items VALUES ($1, 'x')`, i)
	}
	eventually(t, time.Minute, "a new leader and advancing checkpoints", func() error {
		if _, err := tryLagStatus(t, c); err != nil {
			return err
		}
		s := statusFrom(t, c.HTTPAddr(primaryNode))
		if s.Leader == "" || s.Leader == leader {
			return fmt.Errorf("leader %q", s.Leader)
		}
		if after := appliedLSN(t, c, other); after <= before {
			return fmt.Errorf("site of %s still at %s", other, after)
		}
		return nil
	})
	if err := c.StartAgent(ctx, leader); err != nil {
		t.Fatal(err)
	}
	eventually(t, time.Minute, "the killed node rejoins", func() error {
		s := statusFrom(t, c.HTTPAddr(leader))
		if s.Leader == "" {
			return errors.New("no leader seen from the restarted node")
		}
		return nil
	})
	converge(t, c, time.Minute)
	starts, boots := 0, 0
	for _, e := range readLog(c.LogPath(leader)) {
		if e["msg"] == "raft node started" {
			starts++
			if e["bootstrapped"] == true {
				boots++
			}
		}
	}
	if starts < 2 || boots != 1 {
		t.Errorf("node %s started raft %d times and bootstrapped %d times; want a bootstrap only at the first start", leader, starts, boots)
	}
}

type nodeStatus struct {
	Leader  string `json:"leader"`
	Primary string `json:"primary"`
	Epoch   uint64 `json:"epoch"`
	Sites   []struct {
		Site       string `json:"site"`
		AppliedLSN string `json:"applied_lsn"`
	} `json:"sites"`
}

func statusFrom(t *testing.T, addr string) nodeStatus {
	t.Helper()
	var st nodeStatus
	resp, err := http.Get("http://" + addr + "/v1/status")
	if err != nil {
		return st
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return st
	}
	_ = json.NewDecoder(resp.Body).Decode(&st)
	return st
}

func appliedLSN(t *testing.T, c *topology.Cluster, node string) string {
	t.Helper()
	n, _ := c.Config.Node(node)
	for _, s := range statusFrom(t, c.HTTPAddr(topology.NodeID(c.Config.Primary))).Sites {
		if s.Site == n.Site {
			return fmt.Sprintf("%20s", s.AppliedLSN)
		}
	}
	return ""
}

// TestMetrics: /metrics parses as Prometheus text and has the lag series
// of every site; the primary's agent counts the bytes it published, fewer
// sent than encoded for rows that compress.
func TestMetrics(t *testing.T) {
	c := newCluster(t, clusterOpts{schema: padSchema, tables: []string{"items"}})
	execOn(t, c, c.Config.Primary, `INSERT INTO items SELECT g, repeat('compressible ', 20) FROM generate_series(1, 2000) g`)
	converge(t, c, time.Minute)
	published := 0
	for _, node := range c.Nodes() {
		eventually(t, 30*time.Second, "metrics of "+node, func() error {
			resp, err := http.Get("http://" + c.HTTPAddr(node) + "/metrics")
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			p := expfmt.NewTextParser(model.LegacyValidation)
			families, err := p.TextToMetricFamilies(bytes.NewReader(body))
			if err != nil {
				return fmt.Errorf("parse: %v", err)
			}
			for _, name := range []string{"xdcr_replication_lag_seconds", "xdcr_replication_lag_bytes"} {
				f, ok := families[name]
				if !ok {
					return fmt.Errorf("no %s", name)
				}
				sites := map[string]bool{}
				for _, m := range f.GetMetric() {
					for _, l := range m.GetLabel() {
						if l.GetName() == "site" {
							sites[l.GetValue()] = true
						}
					}
				}
				for s := range c.Config.Sites {
					if !sites[s] {
						return fmt.Errorf("%s has no series for site %s", name, s)
					}
				}
			}
			for _, name := range []string{"xdcr_raft_term", "xdcr_epoch", "xdcr_raft_leader"} {
				if _, ok := families[name]; !ok {
					return fmt.Errorf("no %s", name)
				}
			}
			sizes := map[string]float64{}
			for _, m := range families["xdcr_published_bytes_total"].GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "form" {
						sizes[l.GetValue()] = m.GetCounter().GetValue()
					}
				}
			}
			if enc, sent := sizes["encoded"], sizes["sent"]; enc > 0 {
				if sent <= 0 || sent > enc/2 {
					return fmt.Errorf("xdcr_published_bytes_total: encoded %.0f, sent %.0f; want under half sent", enc, sent)
				}
				published++
			}
			return nil
		})
	}
	if published != 1 {
		t.Errorf("%d agents counted published bytes, want 1 (the primary's)", published)
	}
}
