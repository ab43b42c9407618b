package config

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5/pgconn"
)

// nameRE is the shape of cluster, site and node names: they end up in slot,
// stream and subject names.
var nameRE = regexp.MustCompile(`^[a-z0-9-]+$`)

// maxClusterLen keeps the slot name "xdcr_<cluster>" within PostgreSQL's
// 63-byte limit.
const maxClusterLen = 63 - len("xdcr_")

// Limits of the tuning values.
const (
	minCaptureBatchBytes = 4 << 10
	maxCaptureBatchBytes = 8 << 20
	maxFlushInterval     = time.Second
	maxInFlight          = 65536
	maxStatusInterval    = 60 * time.Second // PostgreSQL's default wal_sender_timeout
	minApplyBatchBytes   = 4 << 10
	maxApplyBatchBytes   = 1 << 30
	minOutboxRows        = 100
	maxOutboxRows        = 100_000_000
)

// Validate checks the whole configuration and returns every problem at once,
// as errors.Join of *[FieldError] values, or nil. Zero tuning values count
// as their defaults. It does no I/O beyond what pgconn.ParseConfig does
// (which reads PG* environment variables); files named in a connection
// string (sslrootcert, …) are checked when the agent connects, not here, so
// the file validates on a machine that lacks them.
func (c *Config) Validate() error {
	return joinFieldErrors(c.validate(nil, nil))
}

// validator collects problems. raw maps paths whose value came through
// ${VAR} to their text in the file, so messages never echo the environment.
type validator struct {
	c    *Config
	raw  map[string]string
	errs []*FieldError
	// cacheLong holds the cache tables written in the long form in the
	// file; nil for a Config built in code.
	cacheLong map[string]bool
}

func (c *Config) validate(raw map[string]string, cacheLong map[string]bool) []*FieldError {
	v := &validator{c: c, raw: raw, cacheLong: cacheLong}
	v.cluster()
	v.primary()
	tables := v.tables()
	v.sites()
	v.nodes()
	v.cache(tables)
	v.tuning()
	v.tls()
	return v.errs
}

func (v *validator) add(path, problem, fix string) {
	v.errs = append(v.errs, &FieldError{Path: path, Problem: problem, Fix: fix})
}

func (v *validator) show(path, value string) string {
	return showValue(v.raw, path, value)
}

func (v *validator) tainted(path string) bool {
	_, ok := v.raw[path]
	return ok
}

// utf8 reports whether s is valid UTF-8 and adds a problem if not: such a
// value cannot come from a YAML file, nor be written to one.
func (v *validator) utf8(path, s string) bool {
	if utf8.ValidString(s) {
		return true
	}
	v.add(path, "is not valid UTF-8", "write the value as UTF-8 text; percent-encode binary bytes in URLs")
	return false
}

func (v *validator) cluster() {
	c := v.c.Cluster
	switch {
	case c == "":
		v.add("cluster", "is required",
			"set it to a short name for this cluster, e.g. cluster: shop (it names the replication slot, the streams and the subjects)")
	case !nameRE.MatchString(c):
		v.add("cluster", v.show("cluster", c)+" is not a valid name: only lower-case letters a-z, digits and '-' are allowed",
			"rename it using a-z, 0-9 and '-' only, e.g. shop-eu")
	case len(c) > maxClusterLen:
		v.add("cluster", fmt.Sprintf("is %d characters long, but the replication slot name xdcr_<cluster> must fit in 63 bytes", len(c)),
			fmt.Sprintf("shorten it to at most %d characters", maxClusterLen))
	}
}

func (v *validator) primary() {
	p := v.c.Primary
	sites := v.c.SiteNames()
	switch {
	case p == "":
		v.add("primary", "is required",
			"set it to the site whose database is authoritative at the first bootstrap: "+oneOf(sites))
	case p == WitnessSite:
		v.add("primary", "the witness holds no database and cannot be the primary",
			"choose a data site: "+oneOf(sites))
	default:
		if _, ok := v.c.Sites[p]; ok {
			return
		}
		fix := "use one of the sites: " + oneOf(sites)
		if s := suggest(p, sites); s != "" && !v.tainted("primary") {
			fix = fmt.Sprintf("did you mean %q? The sites are %s", s, oneOf(sites))
		}
		v.add("primary", "site "+v.show("primary", p)+" is not defined under sites", fix)
	}
}

const tableFix = `write table or schema.table; double-quote an identifier to keep upper case or a dot, e.g. '"Sales"."Orders"'`

// tables checks the table list and returns the set of normalized names.
func (v *validator) tables() map[string]bool {
	set := map[string]bool{}
	if len(v.c.Tables) == 0 {
		v.add("tables", "at least one table is required",
			"list the tables to replicate, e.g. tables: [public.accounts, public.orders]")
		return set
	}
	first := map[string]int{}
	for i, t := range v.c.Tables {
		p := indexPath("tables", i)
		norm, err := NormalizeTable(t)
		if err != nil {
			v.add(p, v.show(p, t)+" is not a valid table name: it "+err.Error(), tableFix)
			continue
		}
		if j, dup := first[norm]; dup {
			v.add(p, fmt.Sprintf("names the same table as tables[%d]", j), "remove one of them")
			continue
		}
		first[norm] = i
		set[norm] = true
	}
	return set
}

func (v *validator) sites() {
	names := v.c.SiteNames()
	if len(names) < 2 {
		v.add("sites", fmt.Sprintf("%d site(s) defined, but xdcr replicates between at least 2", len(names)),
			"add another site with its postgres and nats addresses under sites")
	}
	type dbKey struct {
		host     string
		port     uint16
		database string
	}
	dbs := map[dbKey]string{}
	for _, name := range names {
		s := v.c.Sites[name]
		p := joinPath("sites", name)
		switch {
		case name == WitnessSite:
			v.add(p, "witness is reserved for the voting-only Raft member, which has no database",
				"rename this site, and give witness nodes site: witness under nodes")
		case !nameRE.MatchString(name):
			v.add(p, "site name is not valid: only lower-case letters a-z, digits and '-' are allowed",
				"rename the site using a-z, 0-9 and '-' only, e.g. dc-a")
		}
		if cfg := v.postgres(p+".postgres", s.Postgres); cfg != nil {
			k := dbKey{cfg.Host, cfg.Port, cfg.Database}
			if other, dup := dbs[k]; dup {
				v.add(p+".postgres", "points at the same database (host, port and dbname) as "+other+", so changes would be applied to their own source",
					"give each site its own database")
			} else {
				dbs[k] = p + ".postgres"
			}
		}
		v.nats(p+".nats", s.NATS)
		v.natsAuth(p, s)
		v.redis(p+".redis", s.Redis)
	}
}

const postgresFix = "write postgres://USER:${PGPASSWORD}@HOST:5432/DBNAME (percent-encode special characters) or key=value pairs such as host=HOST port=5432 dbname=DBNAME user=USER"

func (v *validator) postgres(path, dsn string) *pgconn.Config {
	if dsn == "" {
		v.add(path, "is required", "set the site's PostgreSQL connection string: "+postgresFix)
		return nil
	}
	if !v.utf8(path, dsn) {
		return nil
	}
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			// A file the connection string names (sslrootcert, sslcert,
			// sslkey, servicefile) is missing on this machine. That is for
			// the agent to report when it connects, on its own host.
			return nil
		}
		v.add(path, "cannot parse connection string "+v.show(path, dsn)+": "+v.pgconnReason(err, dsn), postgresFix)
		return nil
	}
	return cfg
}

// pgconnReason extracts pgconn's reason from its error, without its copy of
// the connection string, and with any password still masked.
func (v *validator) pgconnReason(err error, dsn string) string {
	msg := err.Error()
	if strings.HasPrefix(msg, "cannot parse `") {
		if i := strings.LastIndex(msg, "`: "); i >= 0 {
			msg = msg[i+3:]
		}
	}
	_, secrets := redact(dsn)
	return newScrubber(secrets, 1).scrub(msg)
}

const natsFix = "write nats://HOST:4222 or tls://HOST:4222; separate several servers of the site with commas"

func (v *validator) nats(path, list string) {
	if list == "" {
		v.add(path, "is required", "set the site's NATS server: "+natsFix)
		return
	}
	if !v.utf8(path, list) {
		return
	}
	items := strings.Split(list, ",")
	for i, item := range items {
		item = strings.TrimSpace(item)
		label := "URL " + v.show(path, list)
		if len(items) > 1 {
			label = fmt.Sprintf("URL %d of %s", i+1, v.show(path, list))
		}
		if item == "" {
			v.add(path, label+" is empty", natsFix)
			continue
		}
		u, problem := parseServerURL(item, false)
		switch {
		case problem != "":
		case u.scheme != "nats" && u.scheme != "tls":
			problem = "has an unsupported scheme; NATS URLs use nats:// or tls://"
		case u.hosts[0].port == "":
			problem = "has no port"
		case u.path != "" && u.path != "/":
			problem = "has a path, which NATS URLs do not take"
		}
		if problem != "" {
			v.add(path, label+" "+problem, natsFix)
		}
	}
}

func (v *validator) natsAuth(p string, s Site) {
	a := s.NATSAuth
	if a.CredsFile != "" && a.NKeyFile != "" {
		v.add(p+".nats_nkey_file", "is set together with nats_creds_file", "keep one: a .creds file already holds the nkey seed")
	}
	if (a.CertFile == "") != (a.KeyFile == "") {
		v.add(p+".nats_cert_file", "nats_cert_file and nats_key_file go together", "set both (the client certificate and its key), or neither")
	}
	if a.CAFile != "" || a.CertFile != "" {
		for _, u := range s.NATSServers() {
			if strings.HasPrefix(u, "nats://") {
				v.add(p+".nats", "uses nats:// while TLS files are set", "write tls://HOST:4222, so that the connection is encrypted and verified with nats_ca_file")
				break
			}
		}
	}
}

func (v *validator) tls() {
	t := v.c.TLS
	if !t.Enabled() {
		return
	}
	for _, f := range []struct{ key, val string }{{"ca_file", t.CAFile}, {"cert_file", t.CertFile}, {"key_file", t.KeyFile}} {
		if f.val == "" {
			v.add("tls."+f.key, "is required when tls is set",
				"set ca_file, cert_file and key_file (cert_file and key_file may contain {node}, e.g. /etc/xdcr/tls/{node}.pem), or remove tls")
		}
	}
	if t.CAFile != "" && strings.Contains(t.CAFile, NodePlaceholder) {
		v.add("tls.ca_file", "contains {node}", "every node verifies the others with the same CA bundle; name one file")
	}
}

const redisFix = "write redis://HOST:6379/0, rediss://HOST:6380/0 (TLS) or memcache://HOST:11211[,HOST:11211…], or remove the key if the site has no cache"

func (v *validator) redis(path, s string) {
	if s == "" {
		return
	}
	if !v.utf8(path, s) {
		return
	}
	u, problem := parseServerURL(s, true)
	if problem == "" {
		switch u.scheme {
		case "redis", "rediss":
			if len(u.hosts) > 1 {
				problem = "lists several hosts, but a redis URL takes one"
			} else if db := strings.TrimPrefix(u.path, "/"); db != "" {
				if n, err := strconv.Atoi(db); err != nil || n < 0 || strconv.Itoa(n) != db {
					problem = "has a path that is not a database number such as /0"
				}
			}
		case "memcache":
			if u.path != "" && u.path != "/" {
				problem = "has a path, which memcache URLs do not take"
			}
		default:
			problem = "has an unsupported scheme; the cache must be redis://, rediss:// or memcache://"
		}
	}
	if problem != "" {
		v.add(path, "URL "+v.show(path, s)+" "+problem, redisFix)
	}
}

func (v *validator) nodes() {
	sites := v.c.SiteNames()
	valid := append(slices.DeleteFunc(slices.Clone(sites), func(s string) bool { return s == WitnessSite }), WitnessSite)
	ids := v.c.NodeNames()
	if len(ids) == 0 {
		v.add("nodes", "no Raft members are defined",
			"add one node per site, e.g. a1: {site: dc-a, raft: 10.1.0.5:7000, http: 10.1.0.5:7070}, plus a witness node when there are only two sites")
		return
	}
	addrs := map[string]string{} // canonical host:port → path that uses it
	perSite := map[string]int{}
	complete := true // every node has a known site
	for _, id := range ids {
		n := v.c.Nodes[id]
		p := joinPath("nodes", id)
		if !nameRE.MatchString(id) {
			v.add(p, "node id is not valid: only lower-case letters a-z, digits and '-' are allowed",
				"rename the node using a-z, 0-9 and '-' only, e.g. a1")
		}
		sp := p + ".site"
		switch _, known := v.c.Sites[n.Site]; {
		case n.Site == "":
			complete = false
			v.add(sp, "is required", "set the node's site: "+oneOf(valid))
		case known || n.Site == WitnessSite:
			perSite[n.Site]++
		default:
			complete = false
			fix := "use one of " + oneOf(valid) + ", or define the site under sites"
			if s := suggest(n.Site, valid); s != "" && !v.tainted(sp) {
				fix = fmt.Sprintf("did you mean %q? Valid sites are %s", s, oneOf(valid))
			}
			v.add(sp, "site "+v.show(sp, n.Site)+" is not defined under sites", fix)
		}
		for _, a := range []struct{ key, addr, eg string }{{"raft", n.Raft, "10.1.0.5:7000"}, {"http", n.HTTP, "10.1.0.5:7070"}} {
			ap := p + "." + a.key
			canon, problem := checkAddr(a.addr)
			if problem != "" {
				v.add(ap, problem, "write HOST:PORT that the other nodes can reach, e.g. "+a.eg)
				continue
			}
			if other, dup := addrs[canon]; dup {
				v.add(ap, "uses the same address as "+other, "give every raft and http address its own host:port")
				continue
			}
			addrs[canon] = ap
		}
	}
	for _, s := range sites {
		if perSite[s] == 0 {
			complete = false
			v.add("nodes", "site "+s+" has no node, so no agent would capture or apply its changes",
				fmt.Sprintf("add a node with site: %s, e.g. %s-1: {site: %s, raft: HOST:7000, http: HOST:7070}", s, s, s))
		}
	}
	if complete {
		// Judge the voters only once every node has a known site and
		// every site a node.
		v.quorum(perSite)
	}
}

// quorum requires that losing any one site leaves a Raft majority, which an
// unplanned failover needs. Each witness node counts as its own failure
// domain.
func (v *validator) quorum(perSite map[string]int) {
	total := 0
	for _, n := range perSite {
		total += n
	}
	if total == 0 {
		return
	}
	if total == 2 {
		v.add("nodes", "two voters cannot survive the loss of either",
			"add a third site or a witness node, e.g. w1: {site: witness, raft: HOST:7000, http: HOST:7070}")
		return
	}
	var weak []string
	for _, s := range v.c.SiteNames() {
		if n := perSite[s]; n > 0 && total-n <= total/2 {
			weak = append(weak, fmt.Sprintf("%s (%d of %d voters)", s, n, total))
		}
	}
	if len(weak) > 0 {
		v.add("nodes", "losing site "+oneOf(weak)+" would leave no Raft majority, so a forced failover could not run",
			"spread the nodes so that no site holds half of them or more: one node per site, plus a witness node when there are only two sites")
	}
}

// checkAddr checks a host:port that other machines dial and returns its
// canonical form for duplicate detection.
func checkAddr(addr string) (canon, problem string) {
	if addr == "" {
		return "", "is required"
	}
	if strings.Contains(addr, "://") {
		return "", "is a URL, but a host:port is expected here"
	}
	i := strings.LastIndexByte(addr, ':')
	if i < 0 {
		return "", "has no port; write HOST:PORT"
	}
	host, port := addr[:i], addr[i+1:]
	if strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]") {
		host = host[1 : len(host)-1]
	} else if strings.Contains(host, ":") {
		return "", "has an IPv6 address without brackets; write [ADDRESS]:PORT"
	}
	p, problem := checkPort(port)
	if problem != "" {
		return "", problem
	}
	h, problem := checkHost(host)
	if problem != "" {
		return "", problem
	}
	if ip, err := netip.ParseAddr(h); err == nil && ip.IsUnspecified() {
		return "", "uses the unspecified address " + h + ", which other nodes cannot dial"
	}
	return h + ":" + strconv.Itoa(p), ""
}

func checkPort(port string) (int, string) {
	if port == "" {
		return 0, "has no port"
	}
	for i := 0; i < len(port); i++ {
		if port[i] < '0' || port[i] > '9' {
			return 0, "has a port that is not a number"
		}
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 1 || n > 65535 {
		return 0, "has a port outside 1..65535"
	}
	return n, ""
}

// checkHost accepts an IP address or a DNS name and returns it in canonical
// form (lower case, IPs normalized).
func checkHost(host string) (string, string) {
	if host == "" {
		return "", "has no host"
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		return ip.String(), ""
	}
	h := strings.ToLower(strings.TrimSuffix(host, "."))
	if len(h) > 253 || h == "" {
		return "", "has a host name that is not valid"
	}
	for _, label := range strings.Split(h, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return "", "has a host name that is not valid"
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return "", "has a host name that is not valid"
			}
		}
	}
	return h, ""
}

type hostPort struct{ host, port string }

type serverURL struct {
	scheme string
	hosts  []hostPort
	path   string // from the first '/' up to '?' or '#'
}

// parseServerURL reads scheme://[userinfo@]host[:port][,host[:port]…][/path][?query].
// Only multi may list several hosts. The problem never quotes the input.
func parseServerURL(s string, multi bool) (serverURL, string) {
	var u serverURL
	i := strings.Index(s, "://")
	if i <= 0 {
		return u, "is not a URL (scheme://host:port)"
	}
	u.scheme = strings.ToLower(s[:i])
	rest := s[i+3:]
	end := strings.IndexAny(rest, "/?#")
	if end < 0 {
		end = len(rest)
	}
	authority := rest[:end]
	tail := rest[end:]
	if at := strings.LastIndexByte(authority, '@'); at >= 0 {
		authority = authority[at+1:]
	}
	if j := strings.IndexAny(tail, "?#"); j >= 0 {
		u.path = tail[:j]
	} else {
		u.path = tail
	}
	parts := strings.Split(authority, ",")
	if len(parts) > 1 && !multi {
		return u, "lists several hosts; write one URL per server, separated by commas"
	}
	for _, hp := range parts {
		host, port := hp, ""
		if strings.HasPrefix(hp, "[") {
			j := strings.IndexByte(hp, ']')
			if j < 0 {
				return u, "has an IPv6 address without its closing ]"
			}
			host, port = hp[1:j], hp[j+1:]
			if port != "" {
				if port[0] != ':' {
					return u, "has text after the IPv6 address"
				}
				port = port[1:]
				if port == "" {
					return u, "has an empty port"
				}
			}
		} else if j := strings.LastIndexByte(hp, ':'); j >= 0 {
			host, port = hp[:j], hp[j+1:]
			if strings.Contains(host, ":") {
				return u, "has an IPv6 address without brackets"
			}
			if port == "" {
				return u, "has an empty port"
			}
		}
		if _, problem := checkHost(host); problem != "" {
			return u, problem
		}
		if port != "" {
			if _, problem := checkPort(port); problem != "" {
				return u, problem
			}
		}
		u.hosts = append(u.hosts, hostPort{host, port})
	}
	return u, ""
}

func (v *validator) cache(tables map[string]bool) {
	for _, key := range slices.Sorted(maps.Keys(v.c.Cache)) {
		p := joinPath("cache", key)
		norm, err := NormalizeTable(key)
		switch {
		case err != nil:
			v.add(p, "is not a valid table name: it "+err.Error(), tableFix)
		case len(v.c.Tables) > 0 && !tables[norm]:
			v.add(p, "table "+norm+" is not listed under tables", "add it to tables, or remove this cache entry")
		}
		ct := v.c.Cache[key]
		kp := p // where the templates are: the entry, or its keys in the long form
		if v.cacheLong[key] || ct.Warm != "" {
			kp = p + ".keys"
		}
		if ct.Warm != "" {
			v.warm(p+".warm", ct.Warm)
		}
		if len(ct.Keys) == 0 {
			v.add(kp, "has no key templates", `list the cache keys a row produces, e.g. ["account:{id}"], or remove the entry`)
			continue
		}
		seen := map[string]int{}
		for i, t := range ct.Keys {
			ip := indexPath(kp, i)
			if !v.utf8(ip, t) {
				continue
			}
			if _, err := TemplateColumns(t); err != nil {
				v.add(ip, "template "+v.show(ip, t)+" "+err.Error(),
					`write the key with {column} placeholders, e.g. "account:{id}" or "orders:{tenant_id}:{id}"`)
				continue
			}
			if j, dup := seen[t]; dup {
				v.add(ip, fmt.Sprintf("repeats template %d", j), "remove one of them")
				continue
			}
			seen[t] = i
		}
	}
}

// warmStarts are the first words of a statement that returns rows and can
// be used as a subquery.
var warmStarts = []string{"select", "with", "values", "table"}

// warm checks a warm query as far as that is possible offline: it is one
// statement that returns rows. The database checks the rest when `xdcr
// cache rebuild` runs it.
func (v *validator) warm(path, q string) {
	if !v.utf8(path, q) {
		return
	}
	const fix = `write one query that returns the rows to cache, e.g. "SELECT * FROM public.accounts WHERE active"`
	body := strings.TrimLeft(q, "( \t\r\n")
	end := strings.IndexFunc(body, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z')
	})
	if end < 0 {
		end = len(body)
	}
	first := strings.ToLower(body[:end])
	switch {
	case strings.TrimSpace(q) == "":
		v.add(path, "is empty", fix)
	case !slices.Contains(warmStarts, first):
		v.add(path, fmt.Sprintf("query %s does not start with SELECT, WITH, VALUES or TABLE", v.show(path, clipLong(q))), fix)
	case strings.HasSuffix(strings.TrimSpace(q), ";"):
		v.add(path, "ends with ';'", "remove the ';': the query is run as a subquery")
	}
}

func (v *validator) tuning() {
	c := v.c.Capture.withDefaults()
	if n := c.MaxBatchBytes; n < minCaptureBatchBytes || n > maxCaptureBatchBytes {
		v.add("capture.max_batch_bytes", v.show("capture.max_batch_bytes", formatSize(int64(n)))+" is outside 4KiB..8MiB",
			"use a size between 4KiB and 8MiB, e.g. 1MiB; the NATS max_payload must be at least as large")
	}
	if d := c.FlushInterval; d < 0 || d > maxFlushInterval {
		v.add("capture.flush_interval", v.show("capture.flush_interval", formatDuration(d))+" is outside (0, 1s]",
			"use a duration above 0 and at most 1s, e.g. 5ms; it adds to the replication lag")
	}
	if n := c.MaxInFlight; n < 1 || n > maxInFlight {
		v.add("capture.max_in_flight", v.show("capture.max_in_flight", strconv.Itoa(n))+" is outside 1..65536",
			"use a number between 1 and 65536, e.g. 256")
	}
	if n := c.CatchUpRange; n != NoCatchUp && (n < 1<<20 || n > 4<<30) {
		v.add("capture.catch_up_range", v.show("capture.catch_up_range", formatSize(n))+" is outside 1MiB..4GiB",
			"use a size of WAL between 1MiB and 4GiB, e.g. 96MiB, or off to read every backlog through the replication protocol")
	}
	if s := c.Compression; s != "zstd" && s != "none" {
		v.add("capture.compression", v.show("capture.compression", s)+` is neither "zstd" nor "none"`,
			`use zstd (compress messages that shrink by an eighth or more) or none`)
	}
	if n := c.MaxRetainedWAL; n < 0 && n != NoWALLimit {
		v.add("capture.max_retained_wal", v.show("capture.max_retained_wal", formatSize(n))+" is negative",
			`use a size such as 10GiB, or 0 to turn the warning off`)
	}
	if d := c.StatusInterval; d < 0 || d >= maxStatusInterval {
		v.add("capture.status_interval", v.show("capture.status_interval", formatDuration(d))+" is not below 60s",
			"use a duration above 0 and well below PostgreSQL's wal_sender_timeout (60s by default), e.g. 1s")
	}

	a := v.c.Apply.withDefaults()
	if a.MaxBatchTxns < 1 {
		v.add("apply.max_batch_txns", v.show("apply.max_batch_txns", strconv.Itoa(a.MaxBatchTxns))+" is below 1",
			"use 1 or more, e.g. 1000 (1 applies each source transaction on its own)")
	}
	if n := a.MaxBatchBytes; n < minApplyBatchBytes || n > maxApplyBatchBytes {
		v.add("apply.max_batch_bytes", v.show("apply.max_batch_bytes", formatSize(int64(n)))+" is outside 4KiB..1GiB",
			"use a size between 4KiB and 1GiB, e.g. 8MiB")
	}

	if n := v.c.Invalidation.withDefaults().MaxOutboxRows; n < minOutboxRows || n > maxOutboxRows {
		v.add("invalidation.max_outbox_rows", v.show("invalidation.max_outbox_rows", strconv.Itoa(n))+" is outside 100..100000000",
			"use a number between 100 and 100000000, e.g. 100000")
	}

	h := v.c.HTTP
	switch {
	case h.AdminToken != "" && h.AdminTokenFile != "":
		v.add("http.admin_token_file", "is set together with http.admin_token", "keep one of the two")
	case h.AdminToken != "" && len(h.AdminToken) < minTokenLen:
		v.add("http.admin_token", fmt.Sprintf("is shorter than %d characters", minTokenLen),
			"use a random token, e.g. from: openssl rand -hex 32; pass it as ${XDCR_ADMIN_TOKEN} or through admin_token_file")
	case h.ProtectReads && h.AdminToken == "" && h.AdminTokenFile == "":
		v.add("http.protect_reads", "is true but no admin token is configured", "set http.admin_token or http.admin_token_file, or remove protect_reads")
	}

	if h.TLS && !v.c.TLS.Enabled() {
		v.add("http.tls", "is true but there is no tls block with the nodes' certificates", "add tls: {ca_file, cert_file, key_file}, or remove http.tls")
	}

	s := v.c.Stream.withDefaults()
	if s.MaxAge < 0 && s.MaxAge != Unlimited {
		v.add("stream.max_age", v.show("stream.max_age", formatDuration(s.MaxAge))+" is negative",
			`use a duration such as 168h, or "unlimited" to keep the stream for ever`)
	}
	if s.MaxBytes < 0 {
		v.add("stream.max_bytes", v.show("stream.max_bytes", formatSize(s.MaxBytes))+" is negative",
			`use a size such as 100GiB, or 0 ("unlimited") for no limit`)
	} else if s.MaxBytes > 0 && s.MaxBytes < int64(c.MaxBatchBytes) {
		v.add("stream.max_bytes", v.show("stream.max_bytes", formatSize(s.MaxBytes))+" is smaller than one message (capture.max_batch_bytes)",
			`raise it well above capture.max_batch_bytes, or use 0 ("unlimited")`)
	}
	switch d := s.DuplicateWindow; {
	case d < 0:
		v.add("stream.duplicate_window", v.show("stream.duplicate_window", formatDuration(d))+" is negative",
			"use a positive duration, e.g. 2m")
	case s.MaxAge > 0 && d > s.MaxAge:
		v.add("stream.duplicate_window", v.show("stream.duplicate_window", formatDuration(d))+" is longer than stream.max_age",
			"make it at most stream.max_age (JetStream requires this): lower it, or raise max_age")
	}
}
