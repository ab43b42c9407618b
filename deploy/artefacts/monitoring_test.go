package artefacts

import (
	"encoding/json"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/common/model"
)

// TestAlertRules checks the shape of deploy/prometheus/alerts.yaml: known
// keys only, every rule an alert with an expression that tokenizes, a
// severity, a summary and a description, valid durations, unique names,
// and alerts on each thing an SRE must hear about. That the metrics exist
// is internal/agent's TestArtefactsNameExportedMetrics.
func TestAlertRules(t *testing.T) {
	rf, err := LoadRules(filepath.Join(deployDir, AlertsFile))
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	metrics := map[string]bool{}
	for _, g := range rf.Groups {
		if g.Name == "" || len(g.Rules) == 0 {
			t.Errorf("group %q: needs a name and rules", g.Name)
		}
		for _, r := range g.Rules {
			if r.Alert == "" || r.Record != "" {
				t.Errorf("group %s: rule %q/%q: want alerting rules only", g.Name, r.Alert, r.Record)
				continue
			}
			if seen[r.Alert] {
				t.Errorf("alert %s: defined twice", r.Alert)
			}
			seen[r.Alert] = true
			sels, err := Selectors(r.Expr)
			if err != nil || len(sels) == 0 {
				t.Errorf("alert %s: expr %q: %v (%d selectors)", r.Alert, r.Expr, err, len(sels))
			}
			for _, s := range sels {
				metrics[s.Name] = true
			}
			for _, d := range []string{r.For, r.KeepFiringFor} {
				if d == "" {
					continue
				}
				if _, err := model.ParseDuration(d); err != nil {
					t.Errorf("alert %s: duration %q: %v", r.Alert, d, err)
				}
			}
			if s := r.Labels["severity"]; !slices.Contains([]string{"critical", "warning", "info"}, s) {
				t.Errorf("alert %s: severity %q, want critical, warning or info", r.Alert, s)
			}
			if r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
				t.Errorf("alert %s: needs a summary and a description", r.Alert)
			}
		}
	}
	// What issue 9 asks the rules to cover, by the metric that shows it.
	for what, metric := range map[string]string{
		"replication lag (seconds)": "xdcr_replication_lag_seconds",
		"replication lag (bytes)":   "xdcr_replication_lag_bytes",
		"slot retained WAL":         "xdcr_slot_retained_wal_bytes",
		"no Raft leader":            "xdcr_raft_leader",
		"apply paused":              "xdcr_site_state",
		"pipeline errors":           "xdcr_pipeline_errors_total",
		"epoch changed":             "xdcr_epoch",
		"agent down":                "up",
	} {
		if !metrics[metric] {
			t.Errorf("no alert on %s (%s)", what, metric)
		}
	}
}

// TestPromtool runs Prometheus's own checks when promtool is installed
// (Debian: apt-get install prometheus): the rule file, its unit tests in
// alerts.test.yaml (the rules fire, and stay quiet, when they should) and
// the example scrape config.
func TestPromtool(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("promtool is not installed")
	}
	dir := filepath.Join(deployDir, "prometheus")
	for _, args := range [][]string{
		{"check", "rules", "alerts.yaml"},
		{"test", "rules", "alerts.test.yaml"},
		{"check", "config", "prometheus.example.yaml"},
	} {
		cmd := exec.Command(promtool, args...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// TestDashboard checks the Grafana dashboard's shape: an uid and title,
// unique panel ids, panels inside the 24-column grid, and a Prometheus
// query with a datasource for every panel that is not a row.
func TestDashboard(t *testing.T) {
	var d struct {
		UID           string  `json:"uid"`
		Title         string  `json:"title"`
		SchemaVersion int     `json:"schemaVersion"`
		Panels        []panel `json:"panels"`
	}
	if err := json.Unmarshal(readDeploy(t, DashboardFile), &d); err != nil {
		t.Fatal(err)
	}
	if d.UID == "" || d.Title == "" || d.SchemaVersion == 0 {
		t.Errorf("uid %q, title %q, schemaVersion %d: want all three", d.UID, d.Title, d.SchemaVersion)
	}
	ids := map[int]bool{}
	var walk func(ps []panel)
	n := 0
	walk = func(ps []panel) {
		for _, p := range ps {
			n++
			if ids[p.ID] {
				t.Errorf("panel %q: id %d is used twice", p.Title, p.ID)
			}
			ids[p.ID] = true
			if p.Title == "" {
				t.Errorf("panel %d has no title", p.ID)
			}
			g := p.GridPos
			if g.W <= 0 || g.H <= 0 || g.X < 0 || g.X+g.W > 24 || g.Y < 0 {
				t.Errorf("panel %q: gridPos %+v is outside the 24-column grid", p.Title, g)
			}
			walk(p.Panels)
			if p.Type == "row" {
				continue
			}
			if len(p.Targets) == 0 {
				t.Errorf("panel %q has no query", p.Title)
			}
			for _, tg := range p.Targets {
				if tg.Expr == "" || tg.RefID == "" || tg.Datasource.UID == "" {
					t.Errorf("panel %q: target %+v needs expr, refId and a datasource", p.Title, tg)
				}
			}
		}
	}
	walk(d.Panels)
	if n < 10 {
		t.Errorf("only %d panels", n)
	}
	qs, err := DashboardQueries(filepath.Join(deployDir, DashboardFile))
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range qs {
		if _, err := Selectors(q.Expr); err != nil {
			t.Errorf("%s: %v\n\t%s", q.Where, err, q.Expr)
		}
	}
}

type panel struct {
	ID      int    `json:"id"`
	Type    string `json:"type"`
	Title   string `json:"title"`
	GridPos struct {
		H, W, X, Y int
	} `json:"gridPos"`
	Targets []struct {
		Expr       string `json:"expr"`
		RefID      string `json:"refId"`
		Datasource struct {
			UID string `json:"uid"`
		} `json:"datasource"`
	} `json:"targets"`
	Panels []panel `json:"panels"`
}
