package config

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

// base is the DESIGN.md example without comments; the cases below edit it.
const base = `cluster: shop
primary: dc-a
tables: [public.accounts, public.orders]
sites:
  dc-a:
    postgres: postgres://xdcr:${PGPASSWORD}@10.1.0.5:5432/shop
    nats: nats://10.1.0.6:4222
    redis: redis://10.1.0.7:6379/0
  dc-b:
    postgres: postgres://xdcr:${PGPASSWORD}@10.2.0.5:5432/shop
    nats: nats://10.2.0.6:4222
nodes:
  a1: {site: dc-a, raft: 10.1.0.5:7000, http: 10.1.0.5:7070}
  b1: {site: dc-b, raft: 10.2.0.5:7000, http: 10.2.0.5:7070}
  w1: {site: witness, raft: 10.3.0.5:7000, http: 10.3.0.5:7070}
cache:
  public.accounts: ["account:{id}"]
`

const (
	a1 = "  a1: {site: dc-a, raft: 10.1.0.5:7000, http: 10.1.0.5:7070}\n"
	b1 = "  b1: {site: dc-b, raft: 10.2.0.5:7000, http: 10.2.0.5:7070}\n"
	w1 = "  w1: {site: witness, raft: 10.3.0.5:7000, http: 10.3.0.5:7070}\n"
)

// edited returns base with each pair old → new replaced once.
func edited(t *testing.T, pairs ...string) string {
	t.Helper()
	s := base
	for i := 0; i+1 < len(pairs); i += 2 {
		if !strings.Contains(s, pairs[i]) {
			t.Fatalf("edit: %q is not in the base config", pairs[i])
		}
		s = strings.Replace(s, pairs[i], pairs[i+1], 1)
	}
	return s
}

// caseEnv is testEnv plus variables for the expansion cases.
func caseEnv(name string) (string, bool) {
	switch name {
	case "BAD_NUMBER", "BAD_NAME":
		return testSecret, true
	case "EMPTY":
		return "", true
	}
	return testEnv(name)
}

func TestValidationRules(t *testing.T) {
	for _, tc := range []struct {
		name    string
		edits   []string // old, new, old, new, …
		yaml    string   // instead of edits
		path    string
		problem string // in Problem
		fix     string // in Fix
		secret  string // must not appear in the error (besides testSecret)
		more    bool   // other errors are expected too
	}{
		// cluster
		{name: "cluster required", edits: []string{"cluster: shop\n", ""},
			path: "cluster", problem: "is required", fix: "cluster: shop"},
		{name: "cluster charset", edits: []string{"cluster: shop", "cluster: Shop_EU"},
			path: "cluster", problem: `"Shop_EU" is not a valid name`, fix: "a-z, 0-9 and '-'"},
		{name: "cluster too long", edits: []string{"cluster: shop", "cluster: " + strings.Repeat("a", 59)},
			path: "cluster", problem: "63 bytes", fix: "at most 58 characters"},
		{name: "cluster from env not echoed", edits: []string{"cluster: shop", "cluster: ${BAD_NAME}"},
			path: "cluster", problem: `"${BAD_NAME}" is not a valid name`, fix: "a-z"},

		// primary
		{name: "primary required", edits: []string{"primary: dc-a\n", ""},
			path: "primary", problem: "is required", fix: "dc-a or dc-b"},
		{name: "primary unknown", edits: []string{"primary: dc-a", "primary: dc-c"},
			path: "primary", problem: `site "dc-c" is not defined under sites`, fix: "use one of the sites: dc-a or dc-b"},
		{name: "primary typo", edits: []string{"primary: dc-a", "primary: dca"},
			path: "primary", problem: "not defined", fix: `did you mean "dc-a"?`},
		{name: "primary witness", edits: []string{"primary: dc-a", "primary: witness"},
			path: "primary", problem: "witness holds no database", fix: "dc-a or dc-b"},

		// tables
		{name: "tables empty", edits: []string{"tables: [public.accounts, public.orders]", "tables: []"},
			path: "tables", problem: "at least one table", fix: "tables: [public.accounts"},
		{name: "tables missing", edits: []string{"tables: [public.accounts, public.orders]\n", ""},
			path: "tables", problem: "at least one table", fix: "tables: [public.accounts"},
		{name: "tables not a list", edits: []string{"tables: [public.accounts, public.orders]", "tables: public.accounts"},
			path: "tables", problem: "must be a list", fix: "tables: [public.accounts, public.orders]"},
		{name: "table three parts", edits: []string{"public.orders]", "shop.public.orders]"},
			path: "tables[1]", problem: "more than two dot-separated parts", fix: "schema.table"},
		{name: "table unterminated quote", edits: []string{"public.orders]", `'"Orders']`},
			path: "tables[1]", problem: "without its closing quote", fix: "double-quote"},
		{name: "table bad character", edits: []string{"public.orders]", "public.or-ders]"},
			path: "tables[1]", problem: "unexpected character", fix: "schema.table"},
		{name: "table identifier too long", edits: []string{"public.orders]", strings.Repeat("o", 64) + "]"},
			path: "tables[1]", problem: "longer than 63 bytes", fix: "schema.table"},
		{name: "table listed twice", edits: []string{"public.orders]", "Accounts]"},
			path: "tables[1]", problem: "names the same table as tables[0]", fix: "remove one"},

		// sites
		{name: "one site", edits: []string{"  dc-b:\n    postgres: postgres://xdcr:${PGPASSWORD}@10.2.0.5:5432/shop\n    nats: nats://10.2.0.6:4222\n", ""},
			path: "sites", problem: "1 site(s) defined", fix: "add another site", more: true},
		{name: "site name", edits: []string{"  dc-b:", "  DC_B:", "site: dc-b", "site: DC_B"},
			path: "sites.DC_B", problem: "site name is not valid", fix: "e.g. dc-a"},
		{name: "site named witness", edits: []string{"  dc-b:", "  witness:", "site: dc-b", "site: witness"},
			path: "sites.witness", problem: "reserved", fix: "rename this site", more: true},
		{name: "postgres required", edits: []string{"    postgres: postgres://xdcr:${PGPASSWORD}@10.2.0.5:5432/shop\n", ""},
			path: "sites.dc-b.postgres", problem: "is required", fix: "postgres://USER:${PGPASSWORD}@HOST:5432/DBNAME"},
		{name: "postgres bad port, inline password", edits: []string{"${PGPASSWORD}@10.2.0.5:5432", "inl1ne-Pa55@10.2.0.5:port"},
			path: "sites.dc-b.postgres", problem: `cannot parse connection string "postgres://xdcr:xxxxx@10.2.0.5:port/shop": invalid port`, fix: "key=value", secret: "inl1ne-Pa55"},
		{name: "postgres bad port, password from env", edits: []string{"10.2.0.5:5432", "10.2.0.5:99999"},
			path: "sites.dc-b.postgres", problem: "invalid port", fix: "postgres://USER"},
		{name: "postgres key=value malformed", edits: []string{"postgres://xdcr:${PGPASSWORD}@10.2.0.5:5432/shop", "host=10.2.0.5 password=kvSecret-99 dbname"},
			path: "sites.dc-b.postgres", problem: "cannot parse connection string", fix: "key=value", secret: "kvSecret-99"},
		{name: "postgres quoted password malformed", edits: []string{"postgres://xdcr:${PGPASSWORD}@10.2.0.5:5432/shop", "\"host=10.2.0.5 password='kv Secret-98' sslmode=bogus\""},
			path: "sites.dc-b.postgres", problem: "cannot parse connection string", fix: "key=value", secret: "Secret-98"},
		{name: "postgres same database twice", edits: []string{"@10.2.0.5:5432/shop", "@10.1.0.5:5432/shop"},
			path: "sites.dc-b.postgres", problem: "same database (host, port and dbname) as sites.dc-a.postgres", fix: "its own database"},
		{name: "nats required", edits: []string{"    nats: nats://10.2.0.6:4222\n", ""},
			path: "sites.dc-b.nats", problem: "is required", fix: "nats://HOST:4222"},
		{name: "nats scheme", edits: []string{"nats://10.2.0.6:4222", "http://10.2.0.6:4222"},
			path: "sites.dc-b.nats", problem: "unsupported scheme", fix: "nats://HOST:4222 or tls://HOST:4222"},
		{name: "nats without scheme", edits: []string{"nats://10.2.0.6:4222", "10.2.0.6:4222"},
			path: "sites.dc-b.nats", problem: "is not a URL", fix: "nats://HOST:4222"},
		{name: "nats no port", edits: []string{"nats://10.2.0.6:4222", "nats://10.2.0.6"},
			path: "sites.dc-b.nats", problem: `URL "nats://10.2.0.6" has no port`, fix: "nats://HOST:4222"},
		{name: "nats empty list entry", edits: []string{"nats://10.2.0.6:4222", "nats://10.2.0.6:4222,,tls://10.2.0.7:4222"},
			path: "sites.dc-b.nats", problem: "URL 2 of", fix: "commas"},
		{name: "nats token not echoed", edits: []string{"nats://10.2.0.6:4222", "nats://t0kenSecret@10.2.0.6"},
			path: "sites.dc-b.nats", problem: "has no port", fix: "nats://HOST:4222", secret: "t0kenSecret"},
		{name: "nats bad host", edits: []string{"nats://10.2.0.6:4222", "nats://bad_host-:4222"},
			path: "sites.dc-b.nats", problem: "host name that is not valid", fix: "nats://HOST:4222"},
		{name: "redis scheme", edits: []string{"redis://10.1.0.7:6379/0", "http://10.1.0.7:6379"},
			path: "sites.dc-a.redis", problem: "unsupported scheme", fix: "redis://HOST:6379/0"},
		{name: "redis database", edits: []string{"redis://10.1.0.7:6379/0", "redis://:r3disSecret@10.1.0.7:6379/x"},
			path: "sites.dc-a.redis", problem: "database number", fix: "redis://HOST:6379/0", secret: "r3disSecret"},
		{name: "redis two hosts", edits: []string{"redis://10.1.0.7:6379/0", "redis://10.1.0.7:6379,10.1.0.8:6379"},
			path: "sites.dc-a.redis", problem: "several hosts", fix: "memcache://"},
		{name: "memcache path", edits: []string{"redis://10.1.0.7:6379/0", "memcache://10.1.0.7:11211/0"},
			path: "sites.dc-a.redis", problem: "has a path", fix: "memcache://HOST:11211"},

		// nodes
		{name: "site without node", edits: []string{b1, ""},
			path: "nodes", problem: "site dc-b has no node", fix: "site: dc-b"},
		{name: "no nodes", edits: []string{a1 + b1 + w1, ""},
			path: "nodes", problem: "no Raft members", fix: "one node per site"},
		{name: "node id", edits: []string{"  b1:", "  B_1:"},
			path: "nodes.B_1", problem: "node id is not valid", fix: "e.g. a1"},
		{name: "node site unknown", edits: []string{"site: dc-b", "site: dc-c"},
			path: "nodes.b1.site", problem: `site "dc-c" is not defined under sites`, fix: "dc-a, dc-b or witness", more: true},
		{name: "node site typo", edits: []string{"site: witness", "site: witnes"},
			path: "nodes.w1.site", problem: "not defined", fix: `did you mean "witness"?`},
		{name: "node site required", edits: []string{"b1: {site: dc-b, ", "b1: {"},
			path: "nodes.b1.site", problem: "is required", fix: "dc-a, dc-b or witness", more: true},
		{name: "raft required", edits: []string{"b1: {site: dc-b, raft: 10.2.0.5:7000, ", "b1: {site: dc-b, "},
			path: "nodes.b1.raft", problem: "is required", fix: "HOST:PORT"},
		{name: "raft no port", edits: []string{"raft: 10.2.0.5:7000", "raft: 10.2.0.5"},
			path: "nodes.b1.raft", problem: "has no port", fix: "HOST:PORT"},
		{name: "port out of range", edits: []string{"raft: 10.2.0.5:7000", "raft: 10.2.0.5:70000"},
			path: "nodes.b1.raft", problem: "outside 1..65535", fix: "HOST:PORT"},
		{name: "port zero", edits: []string{"http: 10.2.0.5:7070", "http: 10.2.0.5:0"},
			path: "nodes.b1.http", problem: "outside 1..65535", fix: "HOST:PORT"},
		{name: "port not a number", edits: []string{"raft: 10.2.0.5:7000", "raft: 10.2.0.5:raft"},
			path: "nodes.b1.raft", problem: "not a number", fix: "HOST:PORT"},
		{name: "host missing", edits: []string{"raft: 10.2.0.5:7000", "raft: ':7000'"},
			path: "nodes.b1.raft", problem: "has no host", fix: "HOST:PORT"},
		{name: "unspecified address", edits: []string{"raft: 10.2.0.5:7000", "raft: 0.0.0.0:7000"},
			path: "nodes.b1.raft", problem: "unspecified address", fix: "reach"},
		{name: "address is a URL", edits: []string{"http: 10.2.0.5:7070", "http: http://10.2.0.5:7070"},
			path: "nodes.b1.http", problem: "is a URL", fix: "HOST:PORT"},
		{name: "IPv6 without brackets", edits: []string{"raft: 10.2.0.5:7000", "raft: '2001:db8::5:7000'"},
			path: "nodes.b1.raft", problem: "without brackets", fix: "HOST:PORT"},
		{name: "duplicate address across nodes", edits: []string{"raft: 10.2.0.5:7000", "raft: 10.1.0.5:7000"},
			path: "nodes.b1.raft", problem: "uses the same address as nodes.a1.raft", fix: "its own host:port"},
		{name: "duplicate address in one node", edits: []string{"http: 10.2.0.5:7070", "http: 10.2.0.5:7000"},
			path: "nodes.b1.http", problem: "uses the same address as nodes.b1.raft", fix: "its own host:port"},
		{name: "duplicate address, other spelling", edits: []string{"raft: 10.1.0.5:7000", "raft: Node-A.example.net:7000", "raft: 10.2.0.5:7000", "raft: node-a.example.net.:7000"},
			path: "nodes.b1.raft", problem: "same address as nodes.a1.raft", fix: "its own host:port"},
		{name: "two voters", edits: []string{w1, ""},
			path: "nodes", problem: "two voters cannot survive the loss of either", fix: "add a third site or a witness node"},
		{name: "site with half the voters", edits: []string{w1, w1 + "  a2: {site: dc-a, raft: 10.1.0.6:7000, http: 10.1.0.6:7070}\n"},
			path: "nodes", problem: "losing site dc-a (2 of 4 voters) would leave no Raft majority", fix: "no site holds half"},

		// cache
		{name: "cache table not listed", edits: []string{"  public.accounts: [", "  users: ["},
			path: "cache.public.users", problem: "table public.users is not listed under tables", fix: "add it to tables"},
		{name: "cache invalid table", edits: []string{"  public.accounts: [", "  a.b.c: ["},
			path: "cache.a.b.c", problem: "not a valid table name", fix: "schema.table"},
		{name: "cache no templates", edits: []string{`["account:{id}"]`, "[]"},
			path: "cache.public.accounts", problem: "no key templates", fix: `"account:{id}"`},
		{name: "cache not a list", edits: []string{`["account:{id}"]`, `"account:{id}"`},
			path: "cache.public.accounts", problem: "must be a list", fix: `["account:{id}"]`},
		{name: "template unclosed", edits: []string{`"account:{id}"`, `"account:{id"`},
			path: "cache.public.accounts[0]", problem: "without its closing '}'", fix: "{column}"},
		{name: "template unopened", edits: []string{`"account:{id}"`, `"account:id}"`},
			path: "cache.public.accounts[0]", problem: "without an opening '{'", fix: "{column}"},
		{name: "template empty placeholder", edits: []string{`"account:{id}"`, `"account:{}"`},
			path: "cache.public.accounts[0]", problem: "empty placeholder", fix: "{column}"},
		{name: "template nested", edits: []string{`"account:{id}"`, `"account:{{id}}"`},
			path: "cache.public.accounts[0]", problem: "do not nest", fix: "{column}"},
		{name: "template empty", edits: []string{`"account:{id}"`, `"account:{id}", ""`},
			path: "cache.public.accounts[1]", problem: "is empty", fix: "{column}"},
		{name: "template repeated", edits: []string{`"account:{id}"`, `"account:{id}", "account:{id}"`},
			path: "cache.public.accounts[1]", problem: "repeats template 0", fix: "remove one"},
		{name: "cache long form unknown key", edits: []string{`["account:{id}"]`, `{keys: ["account:{id}"], warmup: "SELECT 1"}`},
			path: "cache.public.accounts.warmup", problem: "unknown key", fix: `did you mean "warm"?`},
		{name: "cache long form without keys", edits: []string{`["account:{id}"]`, `{warm: "SELECT * FROM public.accounts"}`},
			path: "cache.public.accounts.keys", problem: "no key templates", fix: `"account:{id}"`},
		{name: "cache long form keys not a list", edits: []string{`["account:{id}"]`, `{keys: "account:{id}"}`},
			path: "cache.public.accounts.keys", problem: "must be a list", fix: `["account:{id}"]`},
		{name: "cache long form template", edits: []string{`["account:{id}"]`, `{keys: ["account:{id}", "a:{"], warm: "SELECT * FROM public.accounts"}`},
			path: "cache.public.accounts.keys[1]", problem: "without its closing '}'", fix: "{column}"},
		{name: "cache long form template of unqualified table", edits: []string{`  public.accounts: ["account:{id}"]`, `  Accounts: {keys: ["a:{"]}`},
			path: "cache.public.accounts.keys[0]", problem: "without its closing '}'", fix: "{column}"},
		{name: "warm empty", edits: []string{`["account:{id}"]`, `{keys: ["account:{id}"], warm: ""}`},
			path: "cache.public.accounts.warm", problem: "is empty", fix: "remove the key"},
		{name: "warm not a query", edits: []string{`["account:{id}"]`, `{keys: ["account:{id}"], warm: "DELETE FROM public.accounts"}`},
			path: "cache.public.accounts.warm", problem: "does not start with SELECT, WITH, VALUES or TABLE", fix: "SELECT * FROM"},
		{name: "warm semicolon", edits: []string{`["account:{id}"]`, `{keys: ["account:{id}"], warm: "select * from public.accounts; "}`},
			path: "cache.public.accounts.warm", problem: "ends with ';'", fix: "subquery"},
		{name: "warm not a string", edits: []string{`["account:{id}"]`, `{keys: ["account:{id}"], warm: [a]}`},
			path: "cache.public.accounts.warm", problem: "must be a single value", fix: "one value"},
		{name: "warm from env not echoed", edits: []string{`["account:{id}"]`, `{keys: ["account:{id}"], warm: "${BAD_NAME}"}`},
			path: "cache.public.accounts.warm", problem: `"${BAD_NAME}" does not start with SELECT`, fix: "SELECT"},
		{name: "max outbox rows too small", yaml: base + "invalidation: {max_outbox_rows: 10}\n",
			path: "invalidation.max_outbox_rows", problem: `"10" is outside 100..100000000`, fix: "e.g. 100000"},
		{name: "max outbox rows not a number", yaml: base + "invalidation: {max_outbox_rows: many}\n",
			path: "invalidation.max_outbox_rows", problem: "not a whole number", fix: "256"},
		{name: "apply synchronous commit not a bool", yaml: base + "apply: {synchronous_commit: remote_apply}\n",
			path: "apply.synchronous_commit", problem: `"remote_apply" is not true or false`, fix: "true or false"},
		// schema
		{name: "auto add columns not a bool", yaml: base + "schema: {auto_add_columns: maybe}\n",
			path: "schema.auto_add_columns", problem: `"maybe" is not true or false`, fix: "true or false"},
		{name: "auto add columns in both spellings", yaml: base + "schema: {auto_add_columns: true, auto-add-columns: true}\n",
			path: "schema.auto-add-columns", problem: "another spelling", fix: "keep one"},
		// tls and NATS credentials
		{name: "tls incomplete", yaml: base + "tls: {ca_file: /etc/xdcr/ca.pem}\n",
			path: "tls.cert_file", problem: "is required when tls is set", fix: "{node}", more: true},
		{name: "tls ca per node", yaml: base + "tls: {ca_file: \"/etc/xdcr/{node}-ca.pem\", cert_file: \"/c/{node}.pem\", key_file: \"/c/{node}-key.pem\"}\n",
			path: "tls.ca_file", problem: "contains {node}", fix: "same CA bundle"},
		{name: "nats creds and nkey", edits: []string{"    nats: nats://10.2.0.6:4222\n", "    nats: nats://10.2.0.6:4222\n    nats_creds_file: /etc/xdcr/b.creds\n    nats_nkey_file: /etc/xdcr/b.nk\n"},
			path: "sites.dc-b.nats_nkey_file", problem: "together with nats_creds_file", fix: "keep one"},
		{name: "nats cert without key", edits: []string{"    nats: nats://10.2.0.6:4222\n", "    nats: tls://10.2.0.6:4222\n    nats_cert_file: /etc/xdcr/b.pem\n"},
			path: "sites.dc-b.nats_cert_file", problem: "go together", fix: "set both"},
		{name: "nats tls files with nats scheme", edits: []string{"    nats: nats://10.2.0.6:4222\n", "    nats: nats://10.2.0.6:4222\n    nats_ca_file: /etc/xdcr/ca.pem\n"},
			path: "sites.dc-b.nats", problem: "uses nats:// while TLS files are set", fix: "tls://"},
		// http
		{name: "admin token too short", yaml: base + "http: {admin_token: hunter2}\n",
			path: "http.admin_token", problem: "shorter than 16", fix: "openssl rand -hex 32", secret: "hunter2"},
		{name: "admin token and file", yaml: base + "http: {admin_token: \"${PGPASSWORD}-0123456789\", admin_token_file: /etc/xdcr/t}\n",
			path: "http.admin_token_file", problem: "together with http.admin_token", fix: "keep one"},
		{name: "protect reads without token", yaml: base + "http: {protect_reads: true}\n",
			path: "http.protect_reads", problem: "no admin token", fix: "http.admin_token"},
		{name: "invalidation unknown key", yaml: base + "invalidation: {max_rows: 1000}\n",
			path: "invalidation.max_rows", problem: "unknown key", fix: "max_outbox_rows"},
		{name: "cache table twice", edits: []string{`  public.accounts: ["account:{id}"]`, "  accounts: [\"a:{id}\"]\n  public.accounts: [\"b:{id}\"]"},
			path: "cache.public.accounts", problem: "same table as the entry at line 17", fix: "merge"},

		// tuning
		{name: "capture batch too small", yaml: base + "capture: {max_batch_bytes: 2KiB}\n",
			path: "capture.max_batch_bytes", problem: `"2KiB" is outside 4KiB..8MiB`, fix: "between 4KiB and 8MiB"},
		{name: "capture batch too large", yaml: base + "capture: {max_batch_bytes: 16MiB}\n",
			path: "capture.max_batch_bytes", problem: "outside 4KiB..8MiB", fix: "between 4KiB and 8MiB"},
		{name: "flush interval too long", yaml: base + "capture: {flush_interval: 2s}\n",
			path: "capture.flush_interval", problem: `"2s" is outside (0, 1s]`, fix: "at most 1s"},
		{name: "flush interval negative", yaml: base + "capture: {flush_interval: -1ms}\n",
			path: "capture.flush_interval", problem: "outside (0, 1s]", fix: "above 0"},
		{name: "in flight too many", yaml: base + "capture: {max_in_flight: 70000}\n",
			path: "capture.max_in_flight", problem: "outside 1..65536", fix: "between 1 and 65536"},
		{name: "in flight negative", yaml: base + "capture: {max_in_flight: -1}\n",
			path: "capture.max_in_flight", problem: "outside 1..65536", fix: "between 1 and 65536"},
		{name: "catch-up range too small", yaml: base + "capture: {catch_up_range: 64KiB}\n",
			path: "capture.catch_up_range", problem: `"64KiB" is outside 1MiB..4GiB`, fix: "off to read every backlog through the replication protocol"},
		{name: "catch-up range too large", yaml: base + "capture: {catch_up_range: 5GiB}\n",
			path: "capture.catch_up_range", problem: "outside 1MiB..4GiB", fix: "e.g. 96MiB"},
		{name: "unknown compression", yaml: base + "capture: {compression: gzip}\n",
			path: "capture.compression", problem: `"gzip" is neither "zstd" nor "none"`, fix: "use zstd"},
		{name: "catch-up range negative", yaml: base + "capture: {catch_up_range: -2MiB}\n",
			path: "capture.catch_up_range", problem: "outside 1MiB..4GiB", fix: "e.g. 96MiB"},
		{name: "catch-up range not a size", yaml: base + "capture: {catch_up_range: lots}\n",
			path: "capture.catch_up_range", problem: "not a byte size", fix: "1MiB"},
		{name: "catch-up round renamed", yaml: base + "capture: {catch_up_round: 500000}\n",
			path: "capture.catch_up_round", problem: "unknown key", fix: "replace it by capture.catch_up_range"},
		{name: "retained wal negative", yaml: base + "capture: {max_retained_wal: -5GiB}\n",
			path: "capture.max_retained_wal", problem: "is negative", fix: "0 to turn the warning off"},
		{name: "retained wal not a size", yaml: base + "capture: {max_retained_wal: lots}\n",
			path: "capture.max_retained_wal", problem: "not a byte size", fix: "1GiB"},
		{name: "status interval", yaml: base + "capture: {status_interval: 60s}\n",
			path: "capture.status_interval", problem: "not below 60s", fix: "wal_sender_timeout"},
		{name: "apply txns", yaml: base + "apply: {max_batch_txns: -1}\n",
			path: "apply.max_batch_txns", problem: "below 1", fix: "1 or more"},
		{name: "apply bytes", yaml: base + "apply: {max_batch_bytes: 2GiB}\n",
			path: "apply.max_batch_bytes", problem: "outside 4KiB..1GiB", fix: "between 4KiB and 1GiB"},
		{name: "max age negative", yaml: base + "stream: {max_age: -5s}\n",
			path: "stream.max_age", problem: "is negative", fix: "unlimited"},
		{name: "max age zero", yaml: base + "stream: {max_age: 0}\n",
			path: "stream.max_age", problem: "0 is ambiguous", fix: `write "unlimited"`},
		{name: "max age zero seconds", yaml: base + "stream: {max_age: 0s}\n",
			path: "stream.max_age", problem: "0 is ambiguous", fix: "default 168h"},
		{name: "max bytes negative", yaml: base + "stream: {max_bytes: -5}\n",
			path: "stream.max_bytes", problem: "is negative", fix: "unlimited"},
		{name: "max bytes below a message", yaml: base + "stream: {max_bytes: 1KiB}\n",
			path: "stream.max_bytes", problem: "smaller than one message", fix: "capture.max_batch_bytes"},
		{name: "duplicate window above max age", yaml: base + "stream: {max_age: 1m}\n",
			path: "stream.duplicate_window", problem: `"2m" is longer than stream.max_age`, fix: "at most stream.max_age"},
		{name: "duplicate window negative", yaml: base + "stream: {duplicate_window: -1s}\n",
			path: "stream.duplicate_window", problem: "is negative", fix: "positive"},

		// decoding
		{name: "unknown key near a known one", edits: []string{"    postgres: postgres://xdcr:${PGPASSWORD}@10.2.0.5", "    postgress: postgres://xdcr:${PGPASSWORD}@10.2.0.5"},
			path: "sites.dc-b.postgress", problem: "unknown key (line 10)", fix: `did you mean "postgres"?`},
		{name: "unknown key", edits: []string{"    nats: nats://10.2.0.6:4222\n", "    nats: nats://10.2.0.6:4222\n    user: xdcr\n"},
			path: "sites.dc-b.user", problem: "unknown key", fix: "postgres, nats, redis, nats_ca_file"},
		{name: "unknown top-level key", edits: []string{"cluster: shop", "clustr: shop"},
			path: "clustr", problem: "unknown key", fix: `did you mean "cluster"?`},
		{name: "unknown tuning key", yaml: base + "capture: {max-in-flight: 5}\n",
			path: "capture.max-in-flight", problem: "unknown key", fix: `did you mean "max_in_flight"?`},
		{name: "merge key", edits: []string{"  a1: {", "  a1: &a1 {", "  b1: {site: dc-b,", "  b1: {<<: *a1, site: dc-b,"},
			path: `nodes.b1."<<"`, problem: "unknown key", fix: "merge keys are not supported"},
		{name: "duplicate key", edits: []string{"primary: dc-a\n", "primary: dc-a\nprimary: dc-b\n"},
			path: "primary", problem: "defined twice (first at line 2)", fix: "keep one"},
		{name: "duplicate site", edits: []string{"  dc-b:\n", "  dc-a:\n"},
			path: "sites.dc-a", problem: "defined twice (first at line 5)", fix: "keep one", more: true},
		{name: "sites as a list", edits: []string{"sites:\n", "sites: [dc-a, dc-b]\nx:\n"},
			path: "sites", problem: "must be a mapping, not a list", fix: "sites: {dc-a:", more: true},
		{name: "node as a value", edits: []string{b1, "  b1: dc-b\n"},
			path: "nodes.b1", problem: "must be a mapping, not a single value", fix: "xdcr.example.yaml", more: true},
		{name: "tuning block as a value", yaml: base + "capture: fast\n",
			path: "capture", problem: "must be a mapping", fix: "xdcr.example.yaml"},
		{name: "value is a list", edits: []string{"cluster: shop", "cluster: [shop]"},
			path: "cluster", problem: "must be a single value, not a list", fix: "one value"},
		{name: "not a whole number", yaml: base + "capture: {max_in_flight: lots}\n",
			path: "capture.max_in_flight", problem: `"lots" is not a whole number`, fix: "256"},
		{name: "not a size", yaml: base + "capture: {max_batch_bytes: 1.5MiB}\n",
			path: "capture.max_batch_bytes", problem: "is not a byte size", fix: "512KiB, 1MiB, 1MB"},
		{name: "bare duration", yaml: base + "capture: {flush_interval: 5}\n",
			path: "capture.flush_interval", problem: `"5" is not a duration`, fix: "add a unit, e.g. 5ms"},
		{name: "root not a mapping", yaml: "- cluster\n- shop\n",
			path: "", problem: "must be a YAML mapping", fix: "xdcr.example.yaml", more: true},

		// ${VAR}
		{name: "variable not set", edits: []string{"10.2.0.5:5432/shop", "${PGHOST}:5432/shop"},
			path: "sites.dc-b.postgres", problem: "environment variable PGHOST is not set", fix: "export it or remove ${PGHOST}"},
		{name: "variable name invalid", edits: []string{"nats://10.2.0.6:4222", "nats://${1HOST}:4222"},
			path: "sites.dc-b.nats", problem: "${1HOST} is not a valid environment variable reference", fix: "$$"},
		{name: "variable with default", edits: []string{"nats://10.2.0.6:4222", "nats://${HOST:-x}:4222"},
			path: "sites.dc-b.nats", problem: "not a valid environment variable reference", fix: "not supported"},
		{name: "variable unterminated", edits: []string{"nats://10.2.0.6:4222", "nats://${HOST:4222"},
			path: "sites.dc-b.nats", problem: "without a closing }", fix: "${NAME}"},
		{name: "number from env not echoed", yaml: base + "capture: {max_in_flight: '${BAD_NUMBER}'}\n",
			path: "capture.max_in_flight", problem: `"${BAD_NUMBER}" is not a whole number`, fix: "256"},
		{name: "duration from env not echoed", yaml: base + "capture: {flush_interval: '${BAD_NUMBER}'}\n",
			path: "capture.flush_interval", problem: `"${BAD_NUMBER}" is not a duration`, fix: "Go duration"},
		{name: "empty variable", edits: []string{"nats://10.2.0.6:4222", "${EMPTY}"},
			path: "sites.dc-b.nats", problem: "is required", fix: "nats://HOST:4222"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := tc.yaml
			if in == "" {
				in = edited(t, tc.edits...)
			}
			_, err := Parse([]byte(in), caseEnv)
			if err == nil {
				t.Fatalf("Parse succeeded, want an error at %q", tc.path)
			}
			msg := err.Error()
			for _, s := range []string{testSecret, tc.secret} {
				if s != "" && strings.Contains(msg, s) {
					t.Errorf("the error reveals the secret %q:\n%s", s, msg)
				}
			}
			var fe *FieldError
			if !errors.As(err, &fe) {
				t.Fatalf("errors.As found no *FieldError in %v", err)
			}
			all := fieldErrors(err)
			var got *FieldError
			for _, e := range all {
				if e.Fix == "" {
					t.Errorf("error without a fix: %v", e)
				}
				if e.Path == tc.path && got == nil {
					got = e
				}
			}
			if got == nil {
				t.Fatalf("no error at %q in:\n%s", tc.path, msg)
			}
			if !strings.Contains(got.Error(), tc.problem) {
				t.Errorf("got %q, want the problem to contain %q", got.Error(), tc.problem)
			}
			if !strings.Contains(got.Fix, tc.fix) {
				t.Errorf("got fix %q, want it to contain %q", got.Fix, tc.fix)
			}
			if !strings.HasPrefix(got.Error(), tc.path+": ") && tc.path != "" {
				t.Errorf("got %q, want it to start with the path", got.Error())
			}
			if !tc.more && len(all) != 1 {
				t.Errorf("got %d errors, want 1:\n%s", len(all), msg)
			}
		})
	}
}

func TestValidConfigs(t *testing.T) {
	for _, tc := range []struct {
		name  string
		edits []string
		yaml  string
		check func(t *testing.T, c *Config)
	}{
		{name: "design example"},
		{name: "unqualified cache key", edits: []string{"  public.accounts: [", "  Accounts: ["},
			check: func(t *testing.T, c *Config) {
				if _, ok := c.Cache["public.accounts"]; !ok {
					t.Errorf("cache key not normalized: %q", c.Cache)
				}
			}},
		{name: "cache long form", edits: []string{`  public.accounts: ["account:{id}"]`,
			"  public.accounts:\n    keys: [\"account:{id}\", \"account-email:{email}\"]\n    warm: |\n      SELECT *\n        FROM public.accounts\n       WHERE balance > 0\n  orders: {keys: [\"order:{id}\"]}"},
			check: func(t *testing.T, c *Config) {
				want := map[string]CacheTable{
					"public.accounts": {Keys: []string{"account:{id}", "account-email:{email}"},
						Warm: "SELECT *\n  FROM public.accounts\n WHERE balance > 0\n"},
					"public.orders": {Keys: []string{"order:{id}"}},
				}
				if !reflect.DeepEqual(c.Cache, want) {
					t.Errorf("got %+v, want %+v", c.Cache, want)
				}
				out, err := c.Marshal()
				if err != nil {
					t.Fatal(err)
				}
				// a table with a warm query is written in the long form, one
				// without in the short form
				for _, s := range []string{"public.accounts:\n    keys: [", "warm: |", "public.orders: ['order:{id}']"} {
					if !strings.Contains(string(out), s) {
						t.Errorf("marshalled config lacks %q:\n%s", s, out)
					}
				}
				again, err := Parse(out, nil)
				if err != nil || !reflect.DeepEqual(again.Cache, c.Cache) {
					t.Errorf("round trip: %v, got %+v", err, again)
				}
			}},
		{name: "max outbox rows", yaml: base + "invalidation: {max_outbox_rows: 5000}\n",
			check: func(t *testing.T, c *Config) {
				if c.Invalidation.MaxOutboxRows != 5000 {
					t.Errorf("got %+v", c.Invalidation)
				}
			}},
		{name: "quoted tables", edits: []string{"tables: [public.accounts, public.orders]", `tables: [public.accounts, '"Sales"."Orders"', '"odd.name"']`},
			check: func(t *testing.T, c *Config) {
				if want := `"Sales"."Orders"`; c.Tables[1] != want {
					t.Errorf("got %q, want %q", c.Tables[1], want)
				}
				if want := `public."odd.name"`; c.Tables[2] != want {
					t.Errorf("got %q, want %q", c.Tables[2], want)
				}
			}},
		{name: "dollar escape", edits: []string{"cluster: shop", "cluster: shop$$"},
			check: func(t *testing.T, c *Config) {
				// "shop$" is no valid name, but this case is about expansion:
				// see TestExpand. Here the point is only that it parsed.
			}},
		{name: "three sites without witness", edits: []string{w1, "  c1: {site: dc-c, raft: 10.3.0.5:7000, http: 10.3.0.5:7070}\n",
			"nodes:", "  dc-c:\n    postgres: postgres://xdcr@10.3.0.5:5432/shop\n    nats: tls://10.3.0.6:4222\nnodes:"}},
		{name: "two nodes per site plus witness", edits: []string{w1, w1 +
			"  a2: {site: dc-a, raft: 10.1.0.6:7000, http: 10.1.0.6:7070}\n" +
			"  b2: {site: dc-b, raft: 10.2.0.6:7000, http: 10.2.0.6:7070}\n"}},
		{name: "two witnesses", edits: []string{w1, w1 + "  w2: {site: witness, raft: 10.4.0.5:7000, http: 10.4.0.5:7070}\n"}},
		{name: "host names and IPv6", edits: []string{a1, "  a1: {site: dc-a, raft: 'xdcr-a.dc-a.example.net:7000', http: '[2001:db8::5]:7070'}\n"}},
		{name: "missing CA file is the agent's problem", edits: []string{"@10.2.0.5:5432/shop", "@10.2.0.5:5432/shop?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"}},
		{name: "key=value DSN", edits: []string{"postgres://xdcr:${PGPASSWORD}@10.2.0.5:5432/shop", "host=10.2.0.5 port=5432 dbname=shop user=xdcr password=${PGPASSWORD}"}},
		{name: "empty variable drops redis", edits: []string{"redis://10.1.0.7:6379/0", "${EMPTY}"},
			check: func(t *testing.T, c *Config) {
				if c.Sites["dc-a"].Redis != "" {
					t.Errorf("got redis %q", c.Sites["dc-a"].Redis)
				}
			}},
		{name: "longest cluster", edits: []string{"cluster: shop", "cluster: " + strings.Repeat("a", 58)}},
		{name: "unlimited stream", yaml: base + "stream: {max_age: unlimited, max_bytes: -1, duplicate_window: 48h}\n",
			check: func(t *testing.T, c *Config) {
				if c.Stream != (Stream{MaxAge: Unlimited, MaxBytes: 0, DuplicateWindow: 48 * time.Hour}) {
					t.Errorf("got %+v", c.Stream)
				}
			}},
		{name: "tuning from env", yaml: base + "capture: {max_in_flight: '${N}', flush_interval: '${D}', max_batch_bytes: '${S}'}\n",
			check: func(t *testing.T, c *Config) {
				if c.Capture.MaxInFlight != 64 || c.Capture.FlushInterval != 20*time.Millisecond || c.Capture.MaxBatchBytes != 2<<20 {
					t.Errorf("got %+v", c.Capture)
				}
			}},
		{name: "anchors", edits: []string{"tables: [public.accounts, public.orders]", "tables: &t [public.accounts, public.orders]",
			`  public.accounts: ["account:{id}"]`, "  public.accounts: &k [\"account:{id}\"]\n  public.orders: *k"}},
		{name: "sizes", yaml: base + "capture: {max_batch_bytes: 4096}\napply: {max_batch_bytes: 1 GiB}\nstream: {max_bytes: 10gb}\n",
			check: func(t *testing.T, c *Config) {
				if c.Capture.MaxBatchBytes != 4096 || c.Apply.MaxBatchBytes != 1<<30 || c.Stream.MaxBytes != 10e9 {
					t.Errorf("got %+v %+v %+v", c.Capture, c.Apply, c.Stream)
				}
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := tc.yaml
			if in == "" {
				in = edited(t, tc.edits...)
			}
			env := func(name string) (string, bool) {
				switch name {
				case "N":
					return "64", true
				case "D":
					return "20ms", true
				case "S":
					return "2MiB", true
				}
				return caseEnv(name)
			}
			c, err := Parse([]byte(in), env)
			if tc.name == "dollar escape" {
				// Not valid, but the value must be the literal "shop$".
				var fe *FieldError
				if !errors.As(err, &fe) || fe.Path != "cluster" || !strings.Contains(fe.Problem, `"shop$"`) {
					t.Fatalf("got %v", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if tc.check != nil {
				tc.check(t, c)
			}
		})
	}
}

// TestValidateBuiltInCode covers Validate on a Config that did not come
// from a file: no lines, and still no passwords.
func TestValidateBuiltInCode(t *testing.T) {
	c := &Config{
		Cluster: "shop",
		Primary: "dc-a",
		Tables:  []string{"accounts"},
		Sites: map[string]Site{
			"dc-a": {Postgres: "postgres://xdcr:c0dePW@127.0.0.1:port/shop", NATS: "nats://127.0.0.1:4222"},
			"dc-b": {Postgres: "postgres://xdcr@127.0.0.1:5433/shop", NATS: "nats://127.0.0.1:4223"},
		},
		Nodes: map[string]Node{
			"a1": {Site: "dc-a", Raft: "127.0.0.1:7000", HTTP: "127.0.0.1:7001"},
			"b1": {Site: "dc-b", Raft: "127.0.0.1:7002", HTTP: "127.0.0.1:7003"},
		},
		Cache: map[string]CacheTable{"accounts": {Keys: []string{"account:{id}"}}},
	}
	err := c.Validate()
	all := fieldErrors(err)
	if len(all) != 2 || all[0].Path != "sites.dc-a.postgres" || all[1].Path != "nodes" {
		t.Fatalf("got %v", err)
	}
	if strings.Contains(err.Error(), "c0dePW") {
		t.Errorf("password in %v", err)
	}
	for _, e := range all {
		if e.Line != 0 {
			t.Errorf("got line %d from Validate", e.Line)
		}
	}
	c.Sites["dc-a"] = Site{Postgres: "postgres://xdcr@127.0.0.1:5432/shop", NATS: "nats://127.0.0.1:4222"}
	c.Nodes["w1"] = Node{Site: WitnessSite, Raft: "127.0.0.1:7004", HTTP: "127.0.0.1:7005"}
	if err := c.Validate(); err != nil {
		t.Fatalf("got %v", err)
	}

	// Text that no YAML file can hold is refused.
	c.Sites["dc-b"] = Site{Postgres: "postgres://xdcr@127.0.0.1:5433/sh\xffop", NATS: "nats://127.0.0.1:4223"}
	c.Cache["accounts"] = CacheTable{Keys: []string{"account:{id}\xff"}}
	all = fieldErrors(c.Validate())
	if len(all) != 2 || all[0].Path != "sites.dc-b.postgres" || all[1].Path != "cache.accounts[0]" || !strings.Contains(all[0].Problem, "UTF-8") {
		t.Errorf("got %v", all)
	}
}
