package config

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// testSecret is what ${PGPASSWORD} and the other secret variables expand to
// in tests. No error message may ever contain it.
const testSecret = "Pw-4f9q-SECRET"

func testEnv(name string) (string, bool) {
	switch name {
	case "PGPASSWORD", "REDIS_PASSWORD":
		return testSecret, true
	}
	return "", false
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func mustParse(t *testing.T, data []byte) *Config {
	t.Helper()
	c, err := Parse(data, testEnv)
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return c
}

func TestParseDesignExample(t *testing.T) {
	c := mustParse(t, readFile(t, "testdata/design.yaml"))
	want := &Config{
		Cluster: "shop",
		Primary: "dc-a",
		Tables:  []string{"public.accounts", "public.orders"},
		Sites: map[string]Site{
			"dc-a": {
				Postgres: "postgres://xdcr:" + testSecret + "@10.1.0.5:5432/shop",
				NATS:     "nats://10.1.0.6:4222",
				Redis:    "redis://10.1.0.7:6379/0",
			},
			"dc-b": {
				Postgres: "postgres://xdcr:" + testSecret + "@10.2.0.5:5432/shop",
				NATS:     "nats://10.2.0.6:4222",
			},
		},
		Nodes: map[string]Node{
			"a1": {Site: "dc-a", Raft: "10.1.0.5:7000", HTTP: "10.1.0.5:7070"},
			"b1": {Site: "dc-b", Raft: "10.2.0.5:7000", HTTP: "10.2.0.5:7070"},
			"w1": {Site: WitnessSite, Raft: "10.3.0.5:7000", HTTP: "10.3.0.5:7070"},
		},
		Cache:        map[string]CacheTable{"public.accounts": {Keys: []string{"account:{id}"}}},
		Capture:      DefaultCapture(),
		Apply:        DefaultApply(),
		Stream:       DefaultStream(),
		Invalidation: DefaultInvalidation(),
	}
	if !reflect.DeepEqual(c, want) {
		t.Fatalf("got  %+v\nwant %+v", c, want)
	}
}

func TestParseDesignExampleNeedsPassword(t *testing.T) {
	_, err := Parse(readFile(t, "testdata/design.yaml"), nil)
	if err == nil {
		t.Fatal("got no error without PGPASSWORD")
	}
	want := "sites.dc-a.postgres: environment variable PGPASSWORD is not set (line 6); fix: export it or remove ${PGPASSWORD}"
	if !strings.Contains(err.Error(), want) {
		t.Fatalf("got %q, want it to contain %q", err, want)
	}
	if n := len(fieldErrors(err)); n != 2 {
		t.Errorf("got %d errors, want 2 (one per site):\n%v", n, err)
	}
}

func TestDefaults(t *testing.T) {
	c := mustParse(t, readFile(t, "testdata/design.yaml"))
	if got, want := c.Capture, (Capture{MaxBatchBytes: 1 << 20, FlushInterval: 5 * time.Millisecond, MaxInFlight: 256, StatusInterval: time.Second, MaxRetainedWAL: 10 << 30, CatchUpRange: 96 << 20, Compression: "zstd"}); got != want {
		t.Errorf("capture: got %+v, want %+v", got, want)
	}
	if got, want := c.Apply, (Apply{MaxBatchTxns: 1000, MaxBatchBytes: 8 << 20}); got != want {
		t.Errorf("apply: got %+v, want %+v", got, want)
	}
	if got, want := c.Stream, (Stream{MaxAge: 168 * time.Hour, MaxBytes: 0, DuplicateWindow: 2 * time.Minute}); got != want {
		t.Errorf("stream: got %+v, want %+v", got, want)
	}

	// Explicit zeros and empty blocks mean the defaults too.
	data := string(readFile(t, "testdata/design.yaml")) + `
capture: {max_batch_bytes: 0, flush_interval: 0, max_in_flight: 0, status_interval: 0s}
apply:
stream: {max_bytes: 0, duplicate_window: 0}
`
	z := mustParse(t, []byte(data))
	if z.Capture != c.Capture || z.Apply != c.Apply || z.Stream != c.Stream {
		t.Errorf("zeros: got %+v %+v %+v, want the defaults", z.Capture, z.Apply, z.Stream)
	}

	// A config built in code validates with zero tuning values, and
	// ApplyDefaults fills them.
	b := *c
	b.Capture, b.Apply, b.Stream = Capture{}, Apply{}, Stream{}
	if err := b.Validate(); err != nil {
		t.Fatalf("zero tuning: %v", err)
	}
	b.ApplyDefaults()
	if b.Capture != DefaultCapture() || b.Apply != DefaultApply() || b.Stream != DefaultStream() {
		t.Errorf("ApplyDefaults: got %+v %+v %+v", b.Capture, b.Apply, b.Stream)
	}
}

func TestParseAllKeys(t *testing.T) {
	c := mustParse(t, readFile(t, "testdata/two-sites-witness.yaml"))
	if want := []string{"public.payments", `"Ledger"."Entries"`, "audit.log"}; !reflect.DeepEqual(c.Tables, want) {
		t.Errorf("tables: got %q, want %q", c.Tables, want)
	}
	if want := []string{"entry:{Id}"}; !reflect.DeepEqual(c.Cache[`"Ledger"."Entries"`].Keys, want) {
		t.Errorf("cache: got %q", c.Cache)
	}
	if _, ok := c.Cache["public.payments"]; !ok {
		t.Errorf("cache key payments not normalized: %q", c.Cache)
	}
	want := Capture{MaxBatchBytes: 512 << 10, FlushInterval: 2 * time.Millisecond, MaxInFlight: 1024, StatusInterval: 10 * time.Second, MaxRetainedWAL: 50 << 30, CatchUpRange: 2 << 20, Compression: "none"}
	if c.Capture != want {
		t.Errorf("capture: got %+v, want %+v", c.Capture, want)
	}
	if want := (Apply{MaxBatchTxns: 1, MaxBatchBytes: 64_000_000, SynchronousCommit: true}); c.Apply != want {
		t.Errorf("apply: got %+v, want %+v", c.Apply, want)
	}
	if want := (Stream{MaxAge: Unlimited, MaxBytes: 100 << 30, DuplicateWindow: 5 * time.Minute}); c.Stream != want {
		t.Errorf("stream: got %+v, want %+v", c.Stream, want)
	}
	if got := c.Sites["west"].Postgres; !strings.Contains(got, "password='"+testSecret+"'") {
		t.Errorf("postgres not expanded: %q", got)
	}
	if got, want := c.Sites["west"].NATSServers(), []string{"nats://10.0.1.20:4222", "nats://10.0.1.21:4222"}; !reflect.DeepEqual(got, want) {
		t.Errorf("NATSServers: got %q, want %q", got, want)
	}
}

// TestExampleFile keeps deploy/config/xdcr.example.yaml loadable.
func TestExampleFile(t *testing.T) {
	path := filepath.Join("..", "..", "deploy", "config", "xdcr.example.yaml")
	data := readFile(t, path)
	c := mustParse(t, data)
	if got, want := c.SiteNames(), []string{"dc-ams", "dc-fra", "dc-lon"}; !reflect.DeepEqual(got, want) {
		t.Errorf("sites: got %q, want %q", got, want)
	}
	if len(c.Nodes) != 3 || len(c.Tables) == 0 || len(c.Cache) == 0 {
		t.Errorf("example lost its nodes, tables or cache: %+v", c)
	}
	// Every key of the format appears in the example.
	for _, keys := range [][]string{rootKeys, siteKeys, nodeKeys, cacheTableKeys, captureKeys, applyKeys, streamKeys, invalidationKeys, schemaKeys, httpKeys, tlsKeys} {
		for _, k := range keys {
			if !strings.Contains(string(data), k+":") {
				t.Errorf("the example does not show key %q", k)
			}
		}
	}
	// The tuning values it shows are the defaults, as it says.
	if c.Capture != DefaultCapture() || c.Apply != DefaultApply() || c.Stream != DefaultStream() {
		t.Errorf("example tuning differs from the defaults: %+v %+v %+v", c.Capture, c.Apply, c.Stream)
	}
	// Through Load, with the environment.
	t.Setenv("PGPASSWORD", testSecret)
	t.Setenv("REDIS_PASSWORD", testSecret)
	loaded, err := Load(path)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if !reflect.DeepEqual(loaded, c) {
		t.Errorf("Load and Parse differ:\n%+v\n%+v", loaded, c)
	}
}

func TestLoadErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := Load(filepath.Join(dir, "missing.yaml")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: got %v, want os.ErrNotExist", err)
	}

	path := filepath.Join(dir, "xdcr.yaml")
	if err := os.WriteFile(path, []byte("cluster: Shop\nprimary: dc-a\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Load(path)
	if err == nil {
		t.Fatal("got no error")
	}
	if !strings.HasPrefix(err.Error(), "config "+path+" has ") {
		t.Errorf("got %q, want it to name the file and count the problems", err)
	}
	var fe *FieldError
	if !errors.As(err, &fe) || fe.Path != "cluster" || fe.Line != 1 {
		t.Errorf("errors.As: got %+v, want the cluster error at line 1", fe)
	}
}

func TestMarshalRoundTrip(t *testing.T) {
	for _, path := range []string{
		"testdata/design.yaml",
		"testdata/two-sites-witness.yaml",
		"../../deploy/config/xdcr.example.yaml",
	} {
		t.Run(filepath.Base(path), func(t *testing.T) {
			c, again, out := parseRoundTrip(t, readFile(t, path))
			if !reflect.DeepEqual(again, c) {
				t.Fatalf("round trip:\n got %+v\nwant %+v\n%s", again, c, out)
			}
		})
	}
}

func TestMarshalEscapesDollars(t *testing.T) {
	c := mustParse(t, readFile(t, "testdata/design.yaml"))
	s := c.Sites["dc-b"]
	s.Postgres = "postgres://xdcr:pa$$${HOME}$x@10.2.0.5:5432/shop"
	c.Sites["dc-b"] = s
	c.Tables = append(c.Tables, "public.t$1")
	out, err := c.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	again, err := Parse(out, func(string) (string, bool) { return "expanded", true })
	if err != nil {
		t.Fatalf("Parse: %v\n%s", err, out)
	}
	if !reflect.DeepEqual(again, c) {
		t.Fatalf("got %+v\nwant %+v\n%s", again.Sites["dc-b"], c.Sites["dc-b"], out)
	}
}

func TestMarshalZeroTuningWritesDefaults(t *testing.T) {
	c := mustParse(t, readFile(t, "testdata/design.yaml"))
	c.Capture, c.Apply, c.Stream = Capture{}, Apply{}, Stream{}
	out, err := c.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"max_batch_bytes: 1MiB", "flush_interval: 5ms", "max_age: 168h", "max_bytes: unlimited", "duplicate_window: 2m"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

func TestAccessors(t *testing.T) {
	c := mustParse(t, readFile(t, "testdata/design.yaml"))
	if got, want := c.SiteNames(), []string{"dc-a", "dc-b"}; !reflect.DeepEqual(got, want) {
		t.Errorf("SiteNames: got %q, want %q", got, want)
	}
	if got, want := c.NodeNames(), []string{"a1", "b1", "w1"}; !reflect.DeepEqual(got, want) {
		t.Errorf("NodeNames: got %q, want %q", got, want)
	}
	if n, ok := c.Node("b1"); !ok || n.Site != "dc-b" || n.IsWitness() {
		t.Errorf("Node(b1): got %+v, %v", n, ok)
	}
	if n, ok := c.Node("w1"); !ok || !n.IsWitness() {
		t.Errorf("Node(w1): got %+v, %v", n, ok)
	}
	if _, ok := c.Node("zz"); ok {
		t.Error("Node(zz): found")
	}
	if got, want := c.NodesIn("dc-a"), []string{"a1"}; !reflect.DeepEqual(got, want) {
		t.Errorf("NodesIn: got %q, want %q", got, want)
	}
	c.Cluster = "shop-eu-1"
	if got, want := c.SlotName(), "xdcr_shop_eu_1"; got != want {
		t.Errorf("SlotName: got %q, want %q", got, want)
	}
}

func TestRedacted(t *testing.T) {
	c := mustParse(t, readFile(t, "testdata/design.yaml"))
	r := c.Redacted()
	if got, want := r.Sites["dc-a"].Postgres, "postgres://xdcr:xxxxx@10.1.0.5:5432/shop"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	if !strings.Contains(c.Sites["dc-a"].Postgres, testSecret) {
		t.Error("Redacted changed the original")
	}
	out, err := r.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), testSecret) {
		t.Errorf("redacted output holds the password:\n%s", out)
	}
}

func TestSyntaxErrors(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		line     int
		msg      string
	}{
		{"unclosed flow", "cluster: shop\ntables: [a, b\n", 2, "did not find expected"},
		{"tab indentation", "cluster: shop\nsites:\n\tdc-a: {}\n", 3, "tabs"},
		{"block mapping", "cluster: shop\nsites:\n  dc-a: {}\n - x\n", 4, "did not find expected key"},
		{"first line", "cluster: shop\n- x\n", 2, "did not find expected key"},
		{"unquoted ${VAR} in flow", "cluster: shop\nnodes: {a1: {raft: ${HOST}:7000}}\n", 2, "quote values that contain ${VAR}"},
		{"two documents", "cluster: a\n---\ncluster: b\n", 2, "more than one YAML document"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.in), testEnv)
			var se *SyntaxError
			if !errors.As(err, &se) {
				t.Fatalf("got %v, want a *SyntaxError", err)
			}
			if se.Line != tc.line || !strings.Contains(err.Error(), tc.msg) || !strings.Contains(err.Error(), "fix: ") {
				t.Errorf("got line %d %q, want line %d and %q", se.Line, err, tc.line, tc.msg)
			}
		})
	}
}

func TestTrailingDocumentMarker(t *testing.T) {
	if _, err := Parse([]byte(base+"---\n...\n"), testEnv); err != nil {
		t.Fatalf("got %v", err)
	}
}

func TestEmptyFile(t *testing.T) {
	for _, in := range []string{"", "# only a comment\n", "~\n"} {
		_, err := Parse([]byte(in), nil)
		paths := map[string]bool{}
		for _, fe := range fieldErrors(err) {
			paths[fe.Path] = true
		}
		for _, want := range []string{"cluster", "primary", "tables", "sites", "nodes"} {
			if !paths[want] {
				t.Errorf("%q: no error for %s in:\n%v", in, want, err)
			}
		}
	}
}

func TestErrorsOrderedByLine(t *testing.T) {
	in := strings.Replace(string(readFile(t, "testdata/design.yaml")), "nats://10.2.0.6:4222", "nats://10.2.0.6", 1)
	in = strings.Replace(in, "cluster: shop", "cluster: Shop", 1)
	in += "capture: {max_in_flight: 0x10}\n"
	_, err := Parse([]byte(in), testEnv)
	var lines []int
	for _, fe := range fieldErrors(err) {
		lines = append(lines, fe.Line)
	}
	if want := []int{1, 11, 18}; !reflect.DeepEqual(lines, want) {
		t.Errorf("got lines %v, want %v:\n%v", lines, want, err)
	}
}

func fieldErrors(err error) []*FieldError {
	var out []*FieldError
	var walk func(error)
	walk = func(err error) {
		if fe, ok := err.(*FieldError); ok {
			out = append(out, fe)
			return
		}
		switch u := err.(type) {
		case interface{ Unwrap() []error }:
			for _, e := range u.Unwrap() {
				walk(e)
			}
		case interface{ Unwrap() error }:
			walk(u.Unwrap())
		}
	}
	if err != nil {
		walk(err)
	}
	return out
}

func TestSchemaAndHTTP(t *testing.T) {
	for _, spelling := range []string{"auto_add_columns", "auto-add-columns"} {
		c := mustParse(t, []byte(base+"schema: {"+spelling+": true}\n"))
		if !c.Schema.AutoAddColumns {
			t.Errorf("%s: true read as false", spelling)
		}
	}
	if c := mustParse(t, []byte(base+"apply: {synchronous_commit: true}\n")); !c.Apply.SynchronousCommit {
		t.Errorf("apply.synchronous_commit: true read as false")
	}
	if c := mustParse(t, []byte(base)); c.Schema.AutoAddColumns || c.Apply.SynchronousCommit || c.HTTP != (HTTP{}) {
		t.Errorf("defaults: got %+v %+v %+v, want auto_add_columns and apply's synchronous_commit off and no token", c.Schema, c.Apply, c.HTTP)
	}

	token := strings.Repeat("t0k", 8)
	c := mustParse(t, []byte(base+"http: {admin_token: "+token+", protect_reads: yes}\n"))
	if got, err := c.HTTP.Token(); err != nil || got != token || !c.HTTP.ProtectReads {
		t.Errorf("inline token: got %q, %v, %+v", got, err, c.HTTP)
	}
	if r := c.Redacted(); r.HTTP.AdminToken == token {
		t.Error("Redacted kept the admin token")
	}
	out, err := c.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if back := mustParse(t, out); !reflect.DeepEqual(back, c) {
		t.Errorf("round trip: got %+v, want %+v", back.HTTP, c.HTTP)
	}

	dir := t.TempDir()
	file := filepath.Join(dir, "token")
	c = mustParse(t, []byte(base+"http: {admin_token_file: "+file+"}\n"))
	if _, err := c.HTTP.Token(); !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), "openssl rand") {
		t.Errorf("missing token file: got %v, want ErrNotExist with the fix", err)
	}
	if err := os.WriteFile(file, []byte("short\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := c.HTTP.Token(); err == nil || strings.Contains(err.Error(), "short") && !strings.Contains(err.Error(), "shorter") {
		t.Errorf("short token file: got %v", err)
	}
	if err := os.WriteFile(file, []byte("  "+token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got, err := c.HTTP.Token(); err != nil || got != token {
		t.Errorf("token file: got %q, %v, want %q", got, err, token)
	}
}

func TestTLSAndNATSAuth(t *testing.T) {
	yaml := strings.Replace(base, "    nats: nats://10.2.0.6:4222\n",
		"    nats: tls://10.2.0.6:4222\n    nats_ca_file: /etc/xdcr/nats-ca.pem\n    nats_cert_file: /etc/xdcr/c.pem\n    nats_key_file: /etc/xdcr/c-key.pem\n    nats_creds_file: /etc/xdcr/b.creds\n", 1) +
		"tls:\n  ca_file: /etc/xdcr/tls/ca.pem\n  cert_file: /etc/xdcr/tls/{node}.pem\n  key_file: /etc/xdcr/tls/{node}-key.pem\n"
	c := mustParse(t, []byte(yaml))
	want := NATSAuth{CAFile: "/etc/xdcr/nats-ca.pem", CertFile: "/etc/xdcr/c.pem", KeyFile: "/etc/xdcr/c-key.pem", CredsFile: "/etc/xdcr/b.creds"}
	if got := c.Sites["dc-b"].NATSAuth; got != want {
		t.Errorf("nats auth: got %+v, want %+v", got, want)
	}
	if got, want := c.TLS.ForNode("b1"), (TLS{CAFile: "/etc/xdcr/tls/ca.pem", CertFile: "/etc/xdcr/tls/b1.pem", KeyFile: "/etc/xdcr/tls/b1-key.pem"}); got != want {
		t.Errorf("ForNode: got %+v, want %+v", got, want)
	}
	out, err := c.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if back := mustParse(t, out); !reflect.DeepEqual(back, c) {
		t.Errorf("round trip lost something:\n%s", out)
	}
}

// TestWALSizes: the retained-WAL warning threshold defaults to 10GiB, and
// 0 and "off" turn it off; the first catch-up range defaults to 96MiB, and
// "off" and -1 read every backlog through the replication protocol. Every
// value survives a Marshal round trip.
func TestWALSizes(t *testing.T) {
	retained := func(c *Capture) int64 { return c.MaxRetainedWAL }
	catchUp := func(c *Capture) int64 { return c.CatchUpRange }
	for _, tc := range []struct {
		yaml  string
		field func(*Capture) int64
		want  int64
	}{
		{"", retained, 10 << 30},
		{"capture: {max_retained_wal: 2GiB}\n", retained, 2 << 30},
		{"capture: {max_retained_wal: 0}\n", retained, NoWALLimit},
		{"capture: {max_retained_wal: off}\n", retained, NoWALLimit},
		{"", catchUp, 96 << 20},
		{"capture: {catch_up_range: 4MiB}\n", catchUp, 4 << 20},
		{"capture: {catch_up_range: off}\n", catchUp, NoCatchUp},
		{"capture: {catch_up_range: -1}\n", catchUp, NoCatchUp},
	} {
		c, again, out := parseRoundTrip(t, append(readFile(t, "testdata/design.yaml"), tc.yaml...))
		if got := tc.field(&c.Capture); got != tc.want {
			t.Errorf("%q: got %d, want %d", tc.yaml, got, tc.want)
		}
		if got := tc.field(&again.Capture); got != tc.want {
			t.Errorf("%q: after a round trip %d, want %d\n%s", tc.yaml, got, tc.want, out)
		}
	}
}

// parseRoundTrip parses data, and parses again what Marshal writes of it
// (with no environment: the marshalled file holds the values); it returns
// both and what Marshal wrote.
func parseRoundTrip(t *testing.T, data []byte) (c, again *Config, out []byte) {
	t.Helper()
	c = mustParse(t, data)
	out, err := c.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if again, err = Parse(out, nil); err != nil {
		t.Fatalf("Parse(Marshal): %v\n%s", err, out)
	}
	return c, again, out
}
