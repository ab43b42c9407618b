package config

import (
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestNormalizeTable(t *testing.T) {
	for _, tc := range []struct{ in, want, err string }{
		{in: "accounts", want: "public.accounts"},
		{in: "Accounts", want: "public.accounts"},
		{in: "public.accounts", want: "public.accounts"},
		{in: "Sales.Orders", want: "sales.orders"},
		{in: `"Sales"."Orders"`, want: `"Sales"."Orders"`},
		{in: `"sales"."orders"`, want: "sales.orders"},
		{in: `"odd.name"`, want: `public."odd.name"`},
		{in: `"say ""hi"""`, want: `public."say ""hi"""`},
		{in: "t$1", want: "public.t$1"},
		{in: "_t", want: "public._t"},
		{in: "Ünïcode", want: `public."Ünïcode"`},
		{in: `"1st"`, want: `public."1st"`},
		{in: "", err: "is empty"},
		{in: "a.b.c", err: "more than two"},
		{in: "a.", err: "ends with a dot"},
		{in: ".a", err: "empty part"},
		{in: "a..b", err: "empty part"},
		{in: "1st", err: "starts with a character other than a letter"},
		{in: "my-table", err: "unexpected character"},
		{in: "a b", err: "unexpected character"},
		{in: `"open`, err: "closing quote"},
		{in: `""`, err: "empty quoted identifier"},
		{in: `"a"b`, err: "unexpected character"},
		{in: strings.Repeat("x", 64), err: "longer than 63 bytes"},
		{in: "\xff", err: "UTF-8"},
		{in: "\"a\x00\"", err: "NUL"},
	} {
		got, err := NormalizeTable(tc.in)
		switch {
		case tc.err != "":
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("NormalizeTable(%q) = %q, %v; want error %q", tc.in, got, err, tc.err)
			}
		case err != nil || got != tc.want:
			t.Errorf("NormalizeTable(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		default:
			if again, err := NormalizeTable(got); err != nil || again != got {
				t.Errorf("NormalizeTable(%q) = %q, %v; not idempotent", got, again, err)
			}
		}
	}
}

func TestSplitTable(t *testing.T) {
	schema, table, err := SplitTable(`"Sales"."Order ""Items"""`)
	if err != nil || schema != "Sales" || table != `Order "Items"` {
		t.Errorf("got %q %q %v", schema, table, err)
	}
	schema, table, err = SplitTable("Accounts")
	if err != nil || schema != "public" || table != "accounts" {
		t.Errorf("got %q %q %v", schema, table, err)
	}
}

func TestTemplateColumns(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string
		err  string
	}{
		{in: "account:{id}", want: []string{"id"}},
		{in: "o:{tenant_id}:{id}", want: []string{"tenant_id", "id"}},
		{in: "all-accounts", want: nil},
		{in: "{Id}", want: []string{"Id"}},
		{in: "", err: "is empty"},
		{in: "a:{id", err: "without its closing"},
		{in: "a:id}", err: "without an opening"},
		{in: "a:{}", err: "empty placeholder"},
		{in: "a:{ }", err: "empty placeholder"},
		{in: "a:{{id}}", err: "do not nest"},
	} {
		got, err := TemplateColumns(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("TemplateColumns(%q) = %q, %v; want error %q", tc.in, got, err, tc.err)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("TemplateColumns(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
}

func TestSizes(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"0", 0, true}, {"4096", 4096, true}, {"-1", -1, true},
		{"512KiB", 512 << 10, true}, {"1MiB", 1 << 20, true}, {"1MB", 1e6, true},
		{"1mib", 1 << 20, true}, {"2 GiB", 2 << 30, true}, {"3TiB", 3 << 40, true},
		{"10kb", 10e3, true}, {"7B", 7, true},
		{"", 0, false}, {"MiB", 0, false}, {"1.5MiB", 0, false}, {"1 M", 0, false},
		{"+1", 0, false}, {"1e6", 0, false}, {"9999999TiB", 0, false}, {"1 iB", 0, false},
	} {
		got, err := parseSize(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d, ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
	for _, n := range []int64{0, 1, 1000, 1024, 4096, 1 << 20, 1e6, 1536, 8 << 20, 1e12, 1 << 40, 123456789, -1, -1024} {
		if got, err := parseSize(formatSize(n)); err != nil || got != n {
			t.Errorf("parseSize(formatSize(%d) = %q) = %d, %v", n, formatSize(n), got, err)
		}
	}
	if got := formatSize(1 << 20); got != "1MiB" {
		t.Errorf("formatSize(1MiB) = %q", got)
	}
	if got := formatSize(64e6); got != "64MB" {
		t.Errorf("formatSize(64MB) = %q", got)
	}
}

func TestFormatDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		168 * time.Hour:                 "168h",
		2 * time.Minute:                 "2m",
		90 * time.Minute:                "1h30m",
		5 * time.Millisecond:            "5ms",
		time.Hour + time.Second:         "1h0m1s",
		0:                               "0s",
		-time.Hour:                      "-1h",
		time.Hour + 500*time.Nanosecond: "1h0m0.0000005s",
	} {
		got := formatDuration(d)
		if got != want {
			t.Errorf("formatDuration(%v) = %q, want %q", d, got, want)
		}
		if back, err := time.ParseDuration(got); err != nil || back != d {
			t.Errorf("ParseDuration(%q) = %v, %v; want %v", got, back, err, d)
		}
	}
}

func TestExpand(t *testing.T) {
	env := func(name string) (string, bool) {
		switch name {
		case "A":
			return "alpha", true
		case "EMPTY":
			return "", true
		case "REF":
			return "${A}", true
		}
		return "", false
	}
	for _, tc := range []struct {
		in, want string
		problem  string
		subst    bool
	}{
		{in: "plain", want: "plain"},
		{in: "${A}", want: "alpha", subst: true},
		{in: "x${A}y${A}", want: "xalphayalpha", subst: true},
		{in: "$$", want: "$"},
		{in: "$${A}", want: "${A}"},
		{in: "$$$${A}", want: "$${A}"},
		{in: "$$${A}", want: "$alpha", subst: true},
		{in: "a$b", want: "a$b"},
		{in: "end$", want: "end$"},
		{in: "${EMPTY}x", want: "x"},
		{in: "${REF}", want: "${A}", subst: true}, // one pass only
		{in: "${NOPE}", problem: "environment variable NOPE is not set"},
		{in: "${}", problem: "not a valid environment variable reference"},
		{in: "${A-B}", problem: "not a valid environment variable reference"},
		{in: "${A", problem: "without a closing }"},
	} {
		x := expand(tc.in, env)
		if tc.problem != "" {
			if len(x.problems) == 0 || !strings.Contains(x.problems[0][0], tc.problem) {
				t.Errorf("expand(%q): problems %q, want %q", tc.in, x.problems, tc.problem)
			}
			continue
		}
		if len(x.problems) > 0 || x.value != tc.want || x.substituted() != tc.subst {
			t.Errorf("expand(%q) = %q (substituted %v, problems %q); want %q (substituted %v)", tc.in, x.value, x.substituted(), x.problems, tc.want, tc.subst)
		}
		if tc.in == "plain" || !x.substituted() {
			continue
		}
	}
	for _, s := range []string{"", "$", "$$", "a$b$${c}", "${A}"} {
		if x := expand(escapeDollars(s), env); x.value != s || len(x.problems) > 0 {
			t.Errorf("expand(escapeDollars(%q)) = %q, %q", s, x.value, x.problems)
		}
	}
}

func TestSuggest(t *testing.T) {
	keys := []string{"postgres", "nats", "redis"}
	for in, want := range map[string]string{
		"postgress": "postgres", "Postgres": "postgres", "nast": "nats", "redis_url": "", "x": "",
	} {
		if got := suggest(in, keys); got != want {
			t.Errorf("suggest(%q) = %q, want %q", in, got, want)
		}
	}
	if got := suggest("dc-c", []string{"dc-a", "dc-b"}); got != "" {
		t.Errorf("suggest on a tie = %q, want none", got)
	}
}

func TestPaths(t *testing.T) {
	for _, tc := range []struct{ path, parent string }{
		{"sites.dc-a.postgres", "sites.dc-a"},
		{"tables[3]", "tables"},
		{"cache.public.accounts[0]", "cache.public.accounts"},
		{`nodes.b1."<<"`, "nodes.b1"},
		{`"a b"`, ""},
		{"cluster", ""},
	} {
		if got := parentPath(tc.path); got != tc.parent {
			t.Errorf("parentPath(%q) = %q, want %q", tc.path, got, tc.parent)
		}
	}
	if got := joinPath("sites", "dc a"); got != `sites."dc a"` {
		t.Errorf("joinPath = %q", got)
	}
}
