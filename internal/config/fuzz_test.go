package config

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// fuzzSecret is what every ${VAR} expands to while fuzzing. It must never
// appear in an error unless the input holds it literally.
const fuzzSecret = "Fz-9k2-SECRET-q7"

func fuzzEnv(name string) (string, bool) {
	if name == "UNSET" {
		return "", false
	}
	return fuzzSecret, true
}

// FuzzParse checks that Parse never panics, never echoes a value from the
// environment in an error, and that whatever it accepts survives
// Marshal → Parse unchanged.
func FuzzParse(f *testing.F) {
	seeds, _ := filepath.Glob("testdata/*.yaml")
	seeds = append(seeds, filepath.Join("..", "..", "deploy", "config", "xdcr.example.yaml"))
	for _, path := range seeds {
		data, err := os.ReadFile(path)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add([]byte(base))
	f.Add([]byte(base + "stream: {max_age: unlimited, max_bytes: 1GiB}\ncapture: {max_batch_bytes: 4096, flush_interval: 1s}\n"))
	f.Add([]byte(strings.Replace(base, "public.orders", `'"Odd"."Na""me"'`, 1)))
	f.Add([]byte(strings.Replace(base, "cluster: shop", "cluster: ${UNSET}$$", 1)))
	f.Add([]byte("cluster: [\n"))
	f.Add([]byte("a: &a [*a]\n"))
	f.Add([]byte(""))

	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data, fuzzEnv)
		if err != nil {
			if msg := err.Error(); strings.Contains(msg, fuzzSecret) && !strings.Contains(string(data), fuzzSecret) {
				t.Fatalf("error reveals a value from the environment:\n%s", msg)
			}
			return
		}
		out, err := c.Marshal()
		if err != nil {
			t.Fatalf("Marshal: %v", err)
		}
		again, err := Parse(out, fuzzEnv)
		if err != nil {
			t.Fatalf("Parse(Marshal(c)): %v\ninput:\n%s\nmarshalled:\n%s", err, data, out)
		}
		if !reflect.DeepEqual(c, again) {
			t.Fatalf("round trip differs:\n got %+v\nwant %+v\nmarshalled:\n%s", again, c, out)
		}
	})
}

// FuzzMarshalRoundTrip builds configs with arbitrary strings in the fields
// that hold free text, so that Marshal's quoting and "$" escaping meet
// quotes, newlines, braces and Unicode: any Config that validates must come
// back from Parse(Marshal(c)) unchanged.
func FuzzMarshalRoundTrip(f *testing.F) {
	f.Add("public.orders", "order:{id}", "", "postgres://xdcr:pw@10.2.0.5:5432/shop", "nats://10.2.0.6:4222", "redis://10.1.0.7:6379/0", "10.2.0.5", int64(1<<20), int64(5e6))
	f.Add(`"Odd ""$"".x"`, "a:{b}:$${c}", "SELECT * FROM public.accounts WHERE note = '$$x: {y}'", "host=h password='a b$$c' dbname=x", "tls://h:1, nats://g:2", "memcache://a:1,b:2", "[::1]", int64(4096), int64(-1))
	f.Add("t$1", "\n{x}\t", "with a as (select 1)\nselect *\n  from a -- \"quoted\"", "postgres://u:%24@h/db?application_name=a%20b", "nats://x:4222", "", "Host.Example.", int64(8<<20), int64(1))
	f.Fuzz(func(t *testing.T, table, template, warm, dsn, natsURL, redisURL, host string, batch, window int64) {
		c := &Config{
			Cluster: "shop",
			Primary: "dc-a",
			Tables:  []string{"public.accounts", table},
			Sites: map[string]Site{
				"dc-a": {Postgres: "postgres://xdcr@10.1.0.5:5432/shop", NATS: "nats://10.1.0.6:4222", Redis: redisURL},
				"dc-b": {Postgres: dsn, NATS: natsURL},
			},
			Nodes: map[string]Node{
				"a1": {Site: "dc-a", Raft: "10.1.0.5:7000", HTTP: "10.1.0.5:7070"},
				"b1": {Site: "dc-b", Raft: host + ":7000", HTTP: host + ":7070"},
				"w1": {Site: WitnessSite, Raft: "10.3.0.5:7000", HTTP: "10.3.0.5:7070"},
			},
			Cache: map[string]CacheTable{"public.accounts": {Keys: []string{template}, Warm: warm}},
		}
		if norm, err := NormalizeTable(table); err == nil {
			c.Tables[1] = norm
		}
		c.Capture.MaxBatchBytes = int(batch)
		c.Stream.DuplicateWindow = time.Duration(window)
		c.ApplyDefaults()
		if c.Validate() != nil {
			return
		}
		out, err := c.Marshal()
		if err != nil {
			t.Fatalf("Marshal: %v", err)
		}
		again, err := Parse(out, nil)
		if err != nil {
			t.Fatalf("Parse(Marshal(c)): %v\n%s", err, out)
		}
		if !reflect.DeepEqual(c, again) {
			t.Fatalf("round trip differs:\n got %+v\nwant %+v\n%s", again, c, out)
		}
	})
}
