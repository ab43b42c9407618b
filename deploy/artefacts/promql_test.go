package artefacts

import (
	"reflect"
	"strings"
	"testing"
)

func TestSelectors(t *testing.T) {
	for _, tt := range []struct {
		expr string
		want []Selector
	}{
		{`up == 0`, []Selector{{Name: "up"}}},
		{`up{job=~"xdcr.*"} == 0`, []Selector{{Name: "up", Matchers: []Matcher{{"job", "=~", "xdcr.*"}}}}},
		{`max by (job, site) (xdcr_replication_lag_seconds and on (job, instance) (xdcr_raft_leader == 1)) > 30`,
			[]Selector{{Name: "xdcr_replication_lag_seconds"}, {Name: "xdcr_raft_leader"}}},
		{`sum(rate(xdcr_applied_transactions_total{job="$job", instance=~"${instance:regex}"}[$__rate_interval])) by (instance)`,
			[]Selector{{Name: "xdcr_applied_transactions_total", Matchers: []Matcher{{"job", "=", "$job"}, {"instance", "=~", "${instance:regex}"}}}}},
		{`histogram_quantile(0.99, sum by (le) (rate(xdcr_apply_batch_duration_seconds_bucket[5m])))`,
			[]Selector{{Name: "xdcr_apply_batch_duration_seconds_bucket"}}},
		{`max(xdcr_epoch) > max(xdcr_epoch offset 15m)`, []Selector{{Name: "xdcr_epoch"}, {Name: "xdcr_epoch"}}},
		{`count without (version) (xdcr_build_info) * on (job) group_left count by (job) (up)`,
			[]Selector{{Name: "xdcr_build_info"}, {Name: "up"}}},
		{`label_replace(xdcr_site_state{state!="streaming",}, "x", "$1", "site", "(.*)") # comment up`,
			[]Selector{{Name: "xdcr_site_state", Matchers: []Matcher{{"state", "!=", "streaming"}}}}},
		{`{__name__="xdcr_epoch"}`, []Selector{{Name: "xdcr_epoch", Matchers: []Matcher{{"__name__", "=", "xdcr_epoch"}}}}},
		{`{"xdcr_epoch", job="x"}`, []Selector{{Name: "xdcr_epoch", Matchers: []Matcher{{"job", "=", "x"}}}}},
		{`predict_linear(xdcr_slot_retained_wal_bytes[1h:5m], 4 * 3600) > 1e+10 and xdcr_epoch @ end()`,
			[]Selector{{Name: "xdcr_slot_retained_wal_bytes"}, {Name: "xdcr_epoch"}}},
		{`SUM BY (site) (x) > bool Inf`, []Selector{{Name: "x"}}},
	} {
		got, err := Selectors(tt.expr)
		if err != nil {
			t.Errorf("%s: %v", tt.expr, err)
			continue
		}
		if !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%s:\n got %+v\nwant %+v", tt.expr, got, tt.want)
		}
	}
}

func TestSelectorsErrors(t *testing.T) {
	for _, tt := range []struct{ expr, want string }{
		{`rat(x[5m])`, "not a PromQL function"},
		{`sum(x`, "unclosed ("},
		{`sum(x]`, "closes ("},
		{`x{job="a"`, "unclosed {"},
		{`x{job}`, "incomplete"},
		{`x{job=a}`, "quoted string"},
		{`x{job=="a"}`, "not =, !=, =~ or !~"},
		{`x{job="a" site="b"}`, "want ,"},
		{`{job="a"}`, "names no metric"},
		{`x{"y"}`, "twice"},
		{`x{job="a}`, "unterminated string"},
		{`x ; y`, "unexpected character"},
		{`x[$]`, "lone $"},
	} {
		_, err := Selectors(tt.expr)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: got %v, want an error with %q", tt.expr, err, tt.want)
		}
	}
}

// An unknown keyword is not silently skipped: it comes back as a metric
// name, which no agent exports, so the artefact test fails on it.
func TestSelectorsUnknownWordIsAMetric(t *testing.T) {
	got, err := Selectors(`x unles y`)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 || got[1].Name != "unles" {
		t.Errorf("got %+v", got)
	}
}
