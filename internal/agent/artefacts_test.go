package agent

import (
	"fmt"
	"maps"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"unsafe"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/xdcr/xdcr/deploy/artefacts"
)

// TestArtefactsNameExportedMetrics holds the Prometheus alert rules and the
// Grafana dashboard that deploy/ ships to the metrics a node really
// exports: every metric their PromQL selects must be one the agent's
// registry has (or a series Prometheus makes itself, like up), and every
// label a selector matches on must be one of that metric's labels (or a
// target label: job, instance). Grafana's label_values(expr, label)
// variables must list a label the metrics have.
func TestArtefactsNameExportedMetrics(t *testing.T) {
	exported := exportedFamilies(t)
	for _, name := range []string{"xdcr_replication_lag_seconds", "xdcr_epoch", "xdcr_sync_rows", "xdcr_cache_invalidation_duration_seconds"} {
		if _, ok := exported[name]; !ok { // the catalog itself must not miss unobserved series
			t.Fatalf("the catalog of exported metrics lacks %s: %v", name, slices.Sorted(maps.Keys(exported)))
		}
	}
	deploy := filepath.Join("..", "..", "deploy")

	alerts, err := artefacts.RuleQueries(filepath.Join(deploy, artefacts.AlertsFile))
	if err != nil {
		t.Fatal(err)
	}
	dashboard, err := artefacts.DashboardQueries(filepath.Join(deploy, artefacts.DashboardFile))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []struct {
		file    string
		queries []artefacts.Query
		atLeast int
	}{
		{artefacts.AlertsFile, alerts, 8},
		{artefacts.DashboardFile, dashboard, 15},
	} {
		t.Run(filepath.Base(f.file), func(t *testing.T) {
			if len(f.queries) < f.atLeast {
				t.Fatalf("found %d queries, want at least %d: is the file read right?", len(f.queries), f.atLeast)
			}
			used := 0
			for _, q := range f.queries {
				sels, err := artefacts.Selectors(q.Expr)
				if err != nil {
					t.Errorf("%s: %s: %v\n\t%s", f.file, q.Where, err, q.Expr)
					continue
				}
				if len(sels) == 0 {
					t.Errorf("%s: %s: the expression selects no metric: %s", f.file, q.Where, q.Expr)
				}
				for _, s := range sels {
					used++
					fam, ok := exported.lookup(s.Name)
					if !ok {
						t.Errorf("%s: %s: %s is not a metric the agent exports%s\n\t%s", f.file, q.Where, s.Name, exported.suggest(s.Name), q.Expr)
						continue
					}
					for _, m := range s.Matchers {
						if !fam[m.Label] {
							t.Errorf("%s: %s: %s has no label %q (it has %v)", f.file, q.Where, s.Name, m.Label, slices.Sorted(maps.Keys(fam)))
						}
					}
					if q.Label != "" && !fam[q.Label] {
						t.Errorf("%s: %s: label_values lists %q, which %s lacks (it has %v)", f.file, q.Where, q.Label, s.Name, slices.Sorted(maps.Keys(fam)))
					}
				}
			}
			t.Logf("%d queries, %d selectors checked", len(f.queries), used)
		})
	}
}

// family is a metric family the agent exports: its type as Gather
// reports it ("COUNTER", "HISTOGRAM", ...; "" when only described) and its
// label names.
type family struct {
	typ    string
	labels map[string]bool
}

type catalog map[string]family

// targetLabels are the labels Prometheus adds to every scraped series.
var targetLabels = []string{"job", "instance"}

// builtins are the series Prometheus records for every scrape.
var builtins = []string{"up", "scrape_duration_seconds", "scrape_samples_scraped",
	"scrape_samples_post_metric_relabeling", "scrape_series_added"}

// lookup resolves a selected series name to the labels it may be matched
// on: a family's own name, or a histogram's or summary's _bucket, _sum and
// _count series.
func (c catalog) lookup(name string) (map[string]bool, bool) {
	labels := func(f family, extra ...string) map[string]bool {
		out := maps.Clone(f.labels)
		for _, l := range append(extra, append(targetLabels, "__name__")...) {
			out[l] = true
		}
		return out
	}
	if f, ok := c[name]; ok {
		if f.typ == "SUMMARY" {
			return labels(f, "quantile"), true
		}
		return labels(f), true
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		f, ok := c[strings.TrimSuffix(name, suffix)]
		if !ok || !strings.HasSuffix(name, suffix) {
			continue
		}
		switch {
		case f.typ == "HISTOGRAM" && suffix == "_bucket":
			return labels(f, "le"), true
		case (f.typ == "HISTOGRAM" || f.typ == "SUMMARY") && suffix != "_bucket":
			return labels(f), true
		}
	}
	if slices.Contains(builtins, name) {
		return labels(family{labels: map[string]bool{}}), true
	}
	return nil, false
}

// suggest names the exported metrics that share the longest prefix with
// an unknown name, five at most.
func (c catalog) suggest(name string) string {
	common := func(a string) int {
		n := 0
		for n < len(a) && n < len(name) && a[n] == name[n] {
			n++
		}
		return n
	}
	names := slices.Collect(maps.Keys(c))
	slices.SortFunc(names, func(a, b string) int {
		if d := common(b) - common(a); d != 0 {
			return d
		}
		return strings.Compare(a, b)
	})
	if len(names) > 5 {
		names = names[:5]
	}
	if len(names) == 0 || common(names[0]) < len("xdcr_") {
		return ""
	}
	return fmt.Sprintf(" (closest: %s)", strings.Join(names, ", "))
}

// exportedFamilies builds the registry the way an agent does
// (newMetrics, plus the stateCollector that Run registers) and returns
// every family it can export: those Gather returns now, and those of
// vectors and collectors that have no series before their first
// observation or before the Raft state exists, from their descriptors.
func exportedFamilies(t *testing.T) catalog {
	t.Helper()
	m := newMetrics("test")
	out := catalog{}
	mfs, err := m.registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		f := family{typ: mf.GetType().String(), labels: map[string]bool{}}
		for _, metric := range mf.GetMetric() {
			for _, l := range metric.GetLabel() {
				f.labels[l.GetName()] = true
			}
		}
		out[mf.GetName()] = f
	}
	// collectorsOf(m) includes m.registry, whose descriptors are those of
	// everything newMetrics registered; the typed fields tell histogram
	// and summary vectors apart.
	collectors := append(collectorsOf(m), &stateCollector{})
	for _, c := range collectors {
		typ := ""
		switch c.(type) {
		case *prometheus.HistogramVec:
			typ = "HISTOGRAM"
		case *prometheus.SummaryVec:
			typ = "SUMMARY"
		case *stateCollector:
			typ = "GAUGE" // every series it makes is a gauge
		}
		for _, d := range describe(c) {
			name, labels := descFamily(t, d)
			f, ok := out[name]
			if !ok {
				f = family{labels: map[string]bool{}}
			}
			if f.typ == "" {
				f.typ = typ
			}
			for _, l := range labels {
				f.labels[l] = true
			}
			out[name] = f
		}
	}
	return out
}

// collectorsOf returns every prometheus.Collector held in a field of the
// struct v points to, and in the fields of this package's structs it
// points to in turn (metrics.cache), so a metric added to the agent is
// covered without editing this test. The fields are unexported, hence
// unsafe.
func collectorsOf(v any) []prometheus.Collector {
	pkg := reflect.TypeOf(metrics{}).PkgPath()
	var out []prometheus.Collector
	var walk func(s reflect.Value)
	walk = func(s reflect.Value) {
		for i := range s.NumField() {
			f := s.Field(i)
			f = reflect.NewAt(f.Type(), unsafe.Pointer(f.UnsafeAddr())).Elem()
			if (f.Kind() == reflect.Pointer || f.Kind() == reflect.Interface) && f.IsNil() {
				continue
			}
			if c, ok := f.Interface().(prometheus.Collector); ok {
				out = append(out, c)
				continue
			}
			if f.Kind() == reflect.Pointer && f.Type().Elem().Kind() == reflect.Struct && f.Type().Elem().PkgPath() == pkg {
				walk(f.Elem())
			}
		}
	}
	walk(reflect.ValueOf(v).Elem())
	return out
}

func describe(c prometheus.Collector) []*prometheus.Desc {
	ch := make(chan *prometheus.Desc)
	go func() {
		c.Describe(ch)
		close(ch)
	}()
	var out []*prometheus.Desc
	for d := range ch {
		out = append(out, d)
	}
	return out
}

// descFamily returns a descriptor's metric name and label names (variable
// and constant). Desc has no accessors, so it makes a series of it, trying
// label counts until the descriptor accepts one, and gathers that.
func descFamily(t *testing.T, d *prometheus.Desc) (string, []string) {
	t.Helper()
	for n := range 16 {
		values := make([]string, n)
		for i := range values {
			values[i] = fmt.Sprint("v", i)
		}
		metric, err := prometheus.NewConstMetric(d, prometheus.UntypedValue, 0, values...)
		if err != nil {
			continue
		}
		r := prometheus.NewRegistry()
		r.MustRegister(constCollector{d, metric})
		mfs, err := r.Gather()
		if err != nil || len(mfs) != 1 {
			t.Fatalf("gather %s: %v", d, err)
		}
		var labels []string
		for _, l := range mfs[0].GetMetric()[0].GetLabel() {
			labels = append(labels, l.GetName())
		}
		return mfs[0].GetName(), labels
	}
	t.Fatalf("no series fits descriptor %s", d)
	return "", nil
}

type constCollector struct {
	desc   *prometheus.Desc
	metric prometheus.Metric
}

func (c constCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }
func (c constCollector) Collect(ch chan<- prometheus.Metric) { ch <- c.metric }
