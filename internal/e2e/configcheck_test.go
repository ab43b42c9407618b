package e2e

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/xdcr/xdcr/internal/preflight"
)

// TestConfigCheck: `xdcr config check --connect` passes on a cluster that
// is ready, and on one that is not names the site, the check and the fix:
// a table without a key, a table a replica lacks.
func TestConfigCheck(t *testing.T) {
	c := newCluster(t, clusterOpts{schema: padSchema, tables: []string{"items"}, noAgents: true})
	out, code := xdcrCmd(t, time.Minute, "config", "check", "--config", c.ConfigPath, "--connect")
	if code != 0 {
		t.Fatalf("config check of a ready cluster exited %d:\n%s", code, out)
	}
	for _, want := range []string{"postgres: wal_level", "nats: jetstream domain", "table public.items"} {
		if !strings.Contains(out, want) {
			t.Errorf("the checklist lacks %q:\n%s", want, out)
		}
	}

	bad := newCluster(t, clusterOpts{
		schema:      padSchema + `CREATE TABLE public.nokey (v int);`,
		primaryOnly: `CREATE TABLE public.late (id int PRIMARY KEY)`,
		tables:      []string{"items", "nokey", "late"},
		noAgents:    true,
	})
	out, code = xdcrCmd(t, time.Minute, "config", "check", "--config", bad.ConfigPath, "--connect", "-o", "json")
	if code != 1 {
		t.Fatalf("config check of a cluster with problems exited %d, want 1:\n%s", code, out)
	}
	var res struct {
		Checks []preflight.Check `json:"checks"`
	}
	doc := out[strings.Index(out, "{\n  \"valid\""):] // after the log lines on stderr
	if err := json.Unmarshal([]byte(doc[:strings.LastIndex(doc, "}")+1]), &res); err != nil {
		t.Fatalf("decode %q: %v", out, err)
	}
	failed := map[string]preflight.Check{}
	for _, ch := range res.Checks {
		if ch.Status == preflight.Fail {
			failed[ch.Site+" "+ch.Check] = ch
		}
	}
	primary := bad.Config.Primary
	if ch, ok := failed[primary+" table public.nokey"]; !ok || !strings.Contains(ch.Fix, "ADD PRIMARY KEY") {
		t.Errorf("no failure with a fix for the keyless table on %s: %+v", primary, failed)
	}
	for _, site := range replicas(bad) {
		if ch, ok := failed[site+" table public.late"]; !ok || !strings.Contains(ch.Fix, "xdcr sync "+site) {
			t.Errorf("no failure with a fix for the table %s lacks: %+v", site, failed)
		}
	}
	if len(failed) != 1+len(replicas(bad)) {
		t.Errorf("failures: %+v", failed)
	}
}
