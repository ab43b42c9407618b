package artefacts

import (
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"regexp"
	"slices"
	"strings"

	"go.yaml.in/yaml/v3"
)

// The artefacts that name metrics, relative to deploy/.
const (
	AlertsFile    = "prometheus/alerts.yaml"
	DashboardFile = "grafana/xdcr-dashboard.json"
)

// RuleFile is a Prometheus rule file (groups/rules format).
type RuleFile struct {
	Groups []RuleGroup `yaml:"groups"`
}

// RuleGroup is one group of a rule file.
type RuleGroup struct {
	Name     string `yaml:"name"`
	Interval string `yaml:"interval"`
	Rules    []Rule `yaml:"rules"`
}

// Rule is an alerting rule (Alert set) or a recording rule (Record set).
type Rule struct {
	Alert         string            `yaml:"alert"`
	Record        string            `yaml:"record"`
	Expr          string            `yaml:"expr"`
	For           string            `yaml:"for"`
	KeepFiringFor string            `yaml:"keep_firing_for"`
	Labels        map[string]string `yaml:"labels"`
	Annotations   map[string]string `yaml:"annotations"`
}

// LoadRules reads a rule file, refusing keys Prometheus would not know.
func LoadRules(path string) (*RuleFile, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	dec := yaml.NewDecoder(f)
	dec.KnownFields(true)
	var rf RuleFile
	if err := dec.Decode(&rf); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &rf, nil
}

// Query is one PromQL expression of an artefact.
type Query struct {
	// Where says where it is, e.g. "alert XdcrReplicationLagHigh" or
	// "panels[3].targets[0]".
	Where string
	// Expr is the PromQL expression.
	Expr string
	// Label is, for a Grafana label_values(expr, label) variable, the label
	// it lists; every metric of Expr must have it.
	Label string
}

// RuleQueries returns the expression of every rule in the file at path.
func RuleQueries(path string) ([]Query, error) {
	rf, err := LoadRules(path)
	if err != nil {
		return nil, err
	}
	var out []Query
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			name := "alert " + r.Alert
			if r.Record != "" {
				name = "record " + r.Record
			}
			out = append(out, Query{Where: g.Name + ": " + name, Expr: r.Expr})
		}
	}
	return out, nil
}

// labelValuesRE matches Grafana's label_values(expr, label) and
// label_values(label) variable queries.
var labelValuesRE = regexp.MustCompile(`^\s*label_values\(\s*(?:(.*\S)\s*,\s*)?([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$`)

// queryResultRE matches Grafana's query_result(expr).
var queryResultRE = regexp.MustCompile(`^\s*query_result\((.*)\)\s*$`)

// DashboardQueries returns every PromQL expression of the Grafana dashboard
// at path: each "expr" anywhere in it (the panels' targets, rows'
// panels included), and the queries of its template variables, with
// Grafana's label_values(expr, label) and query_result(expr) unwrapped.
func DashboardQueries(path string) ([]Query, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var doc map[string]any
	if err := json.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	var out []Query
	var walk func(v any, where string)
	walk = func(v any, where string) {
		switch v := v.(type) {
		case map[string]any:
			if e, ok := v["expr"].(string); ok {
				out = append(out, Query{Where: where, Expr: e})
			}
			for _, k := range slices.Sorted(maps.Keys(v)) {
				if where == "" && k == "templating" {
					continue // below
				}
				walk(v[k], strings.TrimPrefix(where+"."+k, "."))
			}
		case []any:
			for i, c := range v {
				walk(c, fmt.Sprintf("%s[%d]", where, i))
			}
		}
	}
	walk(doc, "")

	tmpl, _ := doc["templating"].(map[string]any)
	list, _ := tmpl["list"].([]any)
	for i, item := range list {
		v, _ := item.(map[string]any)
		if v["type"] != "query" {
			continue
		}
		q, _ := v["query"].(string)
		if obj, ok := v["query"].(map[string]any); ok {
			q, _ = obj["query"].(string)
		}
		where := fmt.Sprintf("templating.list[%d] (%v)", i, v["name"])
		switch {
		case labelValuesRE.MatchString(q):
			m := labelValuesRE.FindStringSubmatch(q)
			out = append(out, Query{Where: where, Expr: m[1], Label: m[2]})
		case queryResultRE.MatchString(q):
			out = append(out, Query{Where: where, Expr: queryResultRE.FindStringSubmatch(q)[1]})
		default:
			return nil, fmt.Errorf("%s: %s: query %q is not label_values(...) or query_result(...)", path, where, q)
		}
	}
	return out, nil
}
