package config

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// The keys each mapping of the file accepts, in the order of the file.
var (
	rootKeys         = []string{"cluster", "primary", "tables", "sites", "nodes", "cache", "capture", "apply", "stream", "invalidation", "schema", "http", "tls"}
	siteKeys         = []string{"postgres", "nats", "redis", "nats_ca_file", "nats_cert_file", "nats_key_file", "nats_creds_file", "nats_nkey_file"}
	tlsKeys          = []string{"ca_file", "cert_file", "key_file"}
	nodeKeys         = []string{"site", "raft", "http"}
	cacheTableKeys   = []string{"keys", "warm"}
	captureKeys      = []string{"max_batch_bytes", "flush_interval", "max_in_flight", "status_interval", "max_retained_wal", "catch_up_range", "compression"}
	applyKeys        = []string{"max_batch_txns", "max_batch_bytes", "synchronous_commit"}
	streamKeys       = []string{"max_age", "max_bytes", "duplicate_window"}
	invalidationKeys = []string{"max_outbox_rows"}
	schemaKeys       = []string{"auto_add_columns", "auto-add-columns"}
	httpKeys         = []string{"admin_token", "admin_token_file", "protect_reads", "tls"}
)

// decoder walks the YAML node tree into a Config. It expands ${VAR} in
// scalar values, remembers the line of every path, and collects every
// problem instead of stopping at the first.
type decoder struct {
	lookupEnv func(string) (string, bool)
	errs      []*FieldError
	lines     map[string]int    // path → line of its key or item
	raw       map[string]string // path → text as written, for values with ${VAR}
	failed    []string          // paths that could not be decoded
	secrets   []string          // values substituted from the environment
	// cacheLong holds the cache tables (normalized) written in the long
	// form {keys: [...], warm: ...}, whose templates live under .keys.
	cacheLong map[string]bool
}

func newDecoder(lookupEnv func(string) (string, bool)) *decoder {
	return &decoder{
		lookupEnv: lookupEnv,
		lines:     map[string]int{},
		raw:       map[string]string{},
		cacheLong: map[string]bool{},
	}
}

// fail records a problem at path. Validation problems at or below a failed
// path are dropped, since they would repeat it.
func (d *decoder) fail(path string, line int, problem, fix string) {
	d.errs = append(d.errs, &FieldError{Path: path, Line: line, Problem: problem, Fix: fix})
	d.failed = append(d.failed, path)
}

func (d *decoder) failedAt(path string) bool {
	for _, p := range d.failed {
		if underPath(path, p) {
			return true
		}
	}
	return false
}

// lineOf returns the line of path or of its nearest ancestor in the file.
func (d *decoder) lineOf(path string) int {
	for p := path; p != ""; p = parentPath(p) {
		if l, ok := d.lines[p]; ok {
			return l
		}
	}
	return 0
}

func (d *decoder) setLine(path string, line int) {
	if _, ok := d.lines[path]; !ok {
		d.lines[path] = line
	}
}

// deref follows aliases (*anchor) to the node they stand for.
func deref(n *yaml.Node) *yaml.Node {
	for i := 0; n != nil && n.Kind == yaml.AliasNode && i < 100; i++ {
		n = n.Alias
	}
	return n
}

func isNull(n *yaml.Node) bool {
	return n == nil || n.Kind == 0 || n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		return "a single value"
	}
	return "something else"
}

func (d *decoder) config(doc *yaml.Node) *Config {
	c := &Config{
		Sites: map[string]Site{},
		Nodes: map[string]Node{},
		Cache: map[string]CacheTable{},
	}
	root := doc
	if root.Kind == yaml.DocumentNode {
		if len(root.Content) == 0 {
			return c
		}
		root = root.Content[0]
	}
	root = deref(root)
	if isNull(root) {
		return c
	}
	if root.Kind != yaml.MappingNode {
		d.fail("", root.Line, "the file must be a YAML mapping of keys such as cluster, sites and nodes, not "+kindName(root),
			"start from deploy/config/xdcr.example.yaml")
		return c
	}
	f := d.fields(root, "", rootKeys)
	c.Cluster = d.str(f["cluster"], "cluster")
	c.Primary = d.str(f["primary"], "primary")
	c.Tables = d.tables(f["tables"])
	d.sites(f["sites"], c)
	d.nodes(f["nodes"], c)
	d.cache(f["cache"], c)
	if n := f["capture"]; n != nil {
		g := d.fields(n, "capture", captureKeys)
		c.Capture.MaxBatchBytes = d.sizeInt(g["max_batch_bytes"], "capture.max_batch_bytes")
		c.Capture.FlushInterval = d.duration(g["flush_interval"], "capture.flush_interval")
		c.Capture.MaxInFlight = d.integer(g["max_in_flight"], "capture.max_in_flight")
		c.Capture.StatusInterval = d.duration(g["status_interval"], "capture.status_interval")
		c.Capture.MaxRetainedWAL = d.walLimit(g["max_retained_wal"], "capture.max_retained_wal")
		c.Capture.CatchUpRange = d.catchUpRange(g["catch_up_range"], "capture.catch_up_range")
		c.Capture.Compression = d.str(g["compression"], "capture.compression")
	}
	if n := f["apply"]; n != nil {
		g := d.fields(n, "apply", applyKeys)
		c.Apply.MaxBatchTxns = d.integer(g["max_batch_txns"], "apply.max_batch_txns")
		c.Apply.MaxBatchBytes = d.sizeInt(g["max_batch_bytes"], "apply.max_batch_bytes")
		c.Apply.SynchronousCommit = d.boolean(g["synchronous_commit"], "apply.synchronous_commit")
	}
	if n := f["stream"]; n != nil {
		g := d.fields(n, "stream", streamKeys)
		c.Stream.MaxAge = d.maxAge(g["max_age"], "stream.max_age")
		c.Stream.MaxBytes = d.maxBytes(g["max_bytes"], "stream.max_bytes")
		c.Stream.DuplicateWindow = d.duration(g["duplicate_window"], "stream.duplicate_window")
	}
	if n := f["invalidation"]; n != nil {
		g := d.fields(n, "invalidation", invalidationKeys)
		c.Invalidation.MaxOutboxRows = d.integer(g["max_outbox_rows"], "invalidation.max_outbox_rows")
	}
	if n := f["schema"]; n != nil {
		g := d.fields(n, "schema", schemaKeys)
		key := "auto_add_columns"
		if g[key] == nil {
			key = "auto-add-columns"
		} else if g["auto-add-columns"] != nil {
			d.fail("schema.auto-add-columns", g["auto-add-columns"].Line, "repeats schema.auto_add_columns in another spelling", "keep one of the two keys")
		}
		c.Schema.AutoAddColumns = d.boolean(g[key], "schema."+key)
	}
	if n := f["tls"]; n != nil {
		g := d.fields(n, "tls", tlsKeys)
		c.TLS = TLS{
			CAFile:   d.str(g["ca_file"], "tls.ca_file"),
			CertFile: d.str(g["cert_file"], "tls.cert_file"),
			KeyFile:  d.str(g["key_file"], "tls.key_file"),
		}
	}
	if n := f["http"]; n != nil {
		g := d.fields(n, "http", httpKeys)
		c.HTTP.AdminToken = d.str(g["admin_token"], "http.admin_token")
		if c.HTTP.AdminToken != "" {
			d.secrets = append(d.secrets, c.HTTP.AdminToken)
		}
		c.HTTP.AdminTokenFile = d.str(g["admin_token_file"], "http.admin_token_file")
		c.HTTP.ProtectReads = d.boolean(g["protect_reads"], "http.protect_reads")
		c.HTTP.TLS = d.boolean(g["tls"], "http.tls")
	}
	return c
}

type entry struct {
	key  string
	line int
	val  *yaml.Node
}

// entries returns the key/value pairs of the mapping n at path, with
// duplicate and non-scalar keys reported. A null n is an empty mapping.
func (d *decoder) entries(n *yaml.Node, path, example string) []entry {
	n = deref(n)
	if isNull(n) {
		return nil
	}
	if n.Kind != yaml.MappingNode {
		d.fail(path, n.Line, "must be a mapping, not "+kindName(n), "write it as in "+example)
		return nil
	}
	var out []entry
	first := map[string]int{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := deref(n.Content[i]), n.Content[i+1]
		if k == nil || k.Kind != yaml.ScalarNode {
			// Not d.fail: that would silence every check below path.
			d.errs = append(d.errs, &FieldError{Path: path, Line: n.Content[i].Line,
				Problem: "has a key that is not a plain string", Fix: "write keys as plain names"})
			continue
		}
		p := joinPath(path, k.Value)
		if l, dup := first[k.Value]; dup {
			d.fail(p, k.Line, fmt.Sprintf("is defined twice (first at line %d)", l), "keep one of them")
			continue
		}
		first[k.Value] = k.Line
		d.setLine(p, k.Line)
		out = append(out, entry{key: k.Value, line: k.Line, val: v})
	}
	return out
}

// fields returns the values of the known keys of the mapping n at path and
// rejects unknown ones.
func (d *decoder) fields(n *yaml.Node, path string, known []string) map[string]*yaml.Node {
	where := path
	if where == "" {
		where = "the top level"
	}
	out := map[string]*yaml.Node{}
	for _, e := range d.entries(n, path, "deploy/config/xdcr.example.yaml") {
		if contains(known, e.key) {
			out[e.key] = e.val
			continue
		}
		p := joinPath(path, e.key)
		fix := fmt.Sprintf("remove it; the keys allowed in %s are %s", where, oneOf(known))
		if r, ok := renamedKeys[p]; ok {
			fix = r
		} else if e.key == "<<" {
			fix = "YAML merge keys are not supported; write the keys out"
		} else if s := suggest(e.key, known); s != "" {
			fix = fmt.Sprintf("did you mean %q?", s)
			if out[s] == nil {
				// The key is most likely the misspelled s: don't also
				// report s as missing.
				d.failed = append(d.failed, joinPath(path, s))
			}
		}
		d.fail(p, e.line, "unknown key", fix)
	}
	return out
}

// renamedKeys are keys of earlier versions, with what replaced them.
var renamedKeys = map[string]string{
	"capture.catch_up_round": "catch-up through SQL is now sized in WAL, not messages: replace it by capture.catch_up_range, " +
		"e.g. 96MiB (the default), or off to always stream",
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// scalar returns the expanded text of the scalar n at path, and false if it
// could not be read. A null or absent value is "".
func (d *decoder) scalar(n *yaml.Node, path string) (string, bool) {
	n = deref(n)
	if isNull(n) {
		return "", true
	}
	d.setLine(path, n.Line)
	if n.Kind != yaml.ScalarNode {
		d.fail(path, n.Line, "must be a single value, not "+kindName(n), "write one value here")
		return "", false
	}
	x := expand(n.Value, d.lookupEnv)
	d.secrets = append(d.secrets, x.used...)
	if x.substituted() {
		d.raw[path] = n.Value
	}
	if len(x.problems) > 0 {
		for _, p := range x.problems {
			d.fail(path, n.Line, p[0], p[1])
		}
		return "", false
	}
	return x.value, true
}

func (d *decoder) str(n *yaml.Node, path string) string {
	s, _ := d.scalar(n, path)
	return s
}

// show quotes a value for a message: the text as written when it came
// through ${VAR}, and never a password.
func (d *decoder) show(path, value string) string {
	return showValue(d.raw, path, value)
}

func (d *decoder) integer(n *yaml.Node, path string) int {
	s, ok := d.scalar(n, path)
	if !ok || s == "" {
		return 0
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil || v != int64(int(v)) {
		d.fail(path, n.Line, d.show(path, s)+" is not a whole number", "write a number such as 256")
		return 0
	}
	return int(v)
}

func (d *decoder) boolean(n *yaml.Node, path string) bool {
	s, ok := d.scalar(n, path)
	if !ok || s == "" {
		return false
	}
	switch strings.ToLower(s) {
	case "true", "yes", "on":
		return true
	case "false", "no", "off":
		return false
	}
	d.fail(path, n.Line, d.show(path, s)+" is not true or false", "write true or false")
	return false
}

func (d *decoder) size(n *yaml.Node, path string) (int64, bool) {
	s, ok := d.scalar(n, path)
	if !ok || s == "" {
		return 0, false
	}
	return d.sizeOf(n, path, s)
}

func (d *decoder) sizeOf(n *yaml.Node, path, s string) (int64, bool) {
	v, err := parseSize(s)
	if err != nil {
		d.fail(path, n.Line, d.show(path, s)+" is not a byte size",
			"write a whole number of bytes or a size with a unit: 512KiB, 1MiB, 1MB, 1GiB")
		return 0, false
	}
	return v, true
}

func (d *decoder) sizeInt(n *yaml.Node, path string) int {
	v, ok := d.size(n, path)
	if !ok {
		return 0
	}
	if v != int64(int(v)) {
		d.fail(path, n.Line, d.show(path, formatSize(v))+" is too large", "use a smaller size")
		return 0
	}
	return int(v)
}

func (d *decoder) maxBytes(n *yaml.Node, path string) int64 {
	s, ok := d.scalar(n, path)
	if !ok || s == "" || s == "unlimited" {
		return 0
	}
	v, ok := d.sizeOf(n, path, s)
	if !ok || v == -1 {
		return 0 // -1 is JetStream's spelling of unlimited
	}
	return v
}

func (d *decoder) duration(n *yaml.Node, path string) time.Duration {
	s, ok := d.scalar(n, path)
	if !ok || s == "" {
		return 0
	}
	return d.durationOf(n, path, s)
}

func (d *decoder) durationOf(n *yaml.Node, path, s string) time.Duration {
	if s == "0" {
		return 0
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		fix := `write a Go duration with a unit, such as 5ms, 10s, 2m or 168h`
		if _, err := strconv.ParseInt(s, 10, 64); err == nil {
			fix = fmt.Sprintf("add a unit, e.g. %sms or %ss (a bare number is ambiguous)", s, s)
			if _, tainted := d.raw[path]; tainted {
				fix = "add a unit, e.g. 500ms or 10s (a bare number is ambiguous)"
			}
		}
		d.fail(path, n.Line, d.show(path, s)+" is not a duration", fix)
		return 0
	}
	return v
}

// walLimit reads a size where 0 (or "off") means no limit, stored as
// NoWALLimit; absent is 0, the default.
func (d *decoder) walLimit(n *yaml.Node, path string) int64 {
	v, set := d.sizeOrOff(n, path, NoWALLimit)
	if set && v == 0 {
		return NoWALLimit
	}
	return v
}

// catchUpRange reads a size where "off" (or -1) is NoCatchUp; absent is 0,
// the default.
func (d *decoder) catchUpRange(n *yaml.Node, path string) int64 {
	v, _ := d.sizeOrOff(n, path, NoCatchUp)
	return v
}

// sizeOrOff reads a size, or "off" as off; set says whether the key has
// a value.
func (d *decoder) sizeOrOff(n *yaml.Node, path string, off int64) (v int64, set bool) {
	s, ok := d.scalar(n, path)
	if !ok || s == "" {
		return 0, false
	}
	if strings.EqualFold(s, "off") {
		return off, true
	}
	v, _ = d.sizeOf(n, path, s)
	return v, true
}

func (d *decoder) maxAge(n *yaml.Node, path string) time.Duration {
	s, ok := d.scalar(n, path)
	if !ok || s == "" {
		return 0
	}
	switch s {
	case "unlimited", "-1":
		return Unlimited
	}
	v := d.durationOf(n, path, s)
	if v == 0 && !d.failedAt(path) {
		// JetStream reads 0 as "for ever", everything else here reads it as
		// "the default": refuse to guess which was meant.
		d.fail(path, n.Line, "0 is ambiguous here", `write "unlimited" to keep the stream for ever, or remove the key for the default 168h`)
	}
	return v
}

func (d *decoder) tables(n *yaml.Node) []string {
	items, ok := d.list(n, "tables", "tables: [public.accounts, public.orders]")
	if !ok {
		return nil
	}
	out := make([]string, 0, len(items))
	for i, it := range items {
		p := indexPath("tables", i)
		s, _ := d.scalar(it, p)
		if norm, err := NormalizeTable(s); err == nil {
			s = norm
		}
		out = append(out, s)
	}
	return out
}

// list returns the items of the sequence n at path.
func (d *decoder) list(n *yaml.Node, path, example string) ([]*yaml.Node, bool) {
	n = deref(n)
	if isNull(n) {
		return nil, true
	}
	if n.Kind != yaml.SequenceNode {
		d.fail(path, n.Line, "must be a list, not "+kindName(n), "write it as a list: "+example)
		return nil, false
	}
	for i, it := range n.Content {
		d.setLine(indexPath(path, i), deref(it).Line)
	}
	return n.Content, true
}

func (d *decoder) sites(n *yaml.Node, c *Config) {
	for _, e := range d.entries(n, "sites", "sites: {dc-a: {postgres: ..., nats: ...}}") {
		p := joinPath("sites", e.key)
		f := d.fields(e.val, p, siteKeys)
		c.Sites[e.key] = Site{
			Postgres: d.str(f["postgres"], p+".postgres"),
			NATS:     d.str(f["nats"], p+".nats"),
			Redis:    d.str(f["redis"], p+".redis"),
			NATSAuth: NATSAuth{
				CAFile:    d.str(f["nats_ca_file"], p+".nats_ca_file"),
				CertFile:  d.str(f["nats_cert_file"], p+".nats_cert_file"),
				KeyFile:   d.str(f["nats_key_file"], p+".nats_key_file"),
				CredsFile: d.str(f["nats_creds_file"], p+".nats_creds_file"),
				NKeyFile:  d.str(f["nats_nkey_file"], p+".nats_nkey_file"),
			},
		}
	}
}

func (d *decoder) nodes(n *yaml.Node, c *Config) {
	for _, e := range d.entries(n, "nodes", "nodes: {a1: {site: dc-a, raft: 10.1.0.5:7000, http: 10.1.0.5:7070}}") {
		p := joinPath("nodes", e.key)
		f := d.fields(e.val, p, nodeKeys)
		c.Nodes[e.key] = Node{
			Site: d.str(f["site"], p+".site"),
			Raft: d.str(f["raft"], p+".raft"),
			HTTP: d.str(f["http"], p+".http"),
		}
	}
}

// cacheExample shows both forms of a cache entry in messages.
const cacheExample = `["account:{id}"], or {keys: ["account:{id}"], warm: "SELECT * FROM public.accounts"}`

// cache decodes the cache entries. An entry is a list of key templates
// (the short form) or a mapping {keys: [...], warm: "SELECT ..."}.
func (d *decoder) cache(n *yaml.Node, c *Config) {
	firstLine := map[string]int{}
	for _, e := range d.entries(n, "cache", `cache: {public.accounts: ["account:{id}"]}`) {
		p := joinPath("cache", e.key)
		key := e.key
		if norm, err := NormalizeTable(e.key); err == nil {
			key = norm
			np := joinPath("cache", norm)
			if l, dup := firstLine[norm]; dup {
				d.fail(p, e.line, fmt.Sprintf("names the same table as the entry at line %d", l), "merge the two entries")
				continue
			}
			firstLine[norm] = e.line
			if np != p {
				// Validate reports paths by the normalized name.
				d.setLine(np, e.line)
			}
		}
		np := joinPath("cache", key)
		val := deref(e.val)
		var ct CacheTable
		if val != nil && val.Kind == yaml.MappingNode {
			d.cacheLong[key] = true
			f := d.fields(val, p, cacheTableKeys)
			if f["keys"] == nil {
				// Validate reports the missing templates; keep the line.
				d.setLine(np+".keys", e.line)
			}
			keys, ok := d.cacheKeys(f["keys"], p+".keys", np+".keys")
			if !ok {
				continue
			}
			ct.Keys = keys
			if w := f["warm"]; w != nil {
				wp := p + ".warm"
				s, ok := d.scalar(w, wp)
				if ok && s == "" {
					d.fail(wp, deref(w).Line, "is empty", "write the query that selects the rows to warm, or remove the key")
				}
				d.alias(wp, np+".warm", deref(w).Line)
				ct.Warm = s
			}
		} else {
			if !isNull(val) && val.Kind != yaml.SequenceNode {
				d.fail(p, e.line, "must be a list, not "+kindName(val), "write it as a list: "+cacheExample)
				continue
			}
			keys, ok := d.cacheKeys(e.val, p, np)
			if !ok {
				continue
			}
			ct.Keys = keys
		}
		c.Cache[key] = ct
	}
}

// cacheKeys decodes the list of key templates at path, and false if it is
// not a list; norm is the same path with the table name normalized, which
// Validate reports.
func (d *decoder) cacheKeys(n *yaml.Node, path, norm string) ([]string, bool) {
	items, ok := d.list(n, path, `["account:{id}"]`)
	if !ok {
		return nil, false
	}
	templates := make([]string, 0, len(items))
	for i, it := range items {
		ip := indexPath(path, i)
		s, ok := d.scalar(it, ip)
		if !ok {
			continue
		}
		d.alias(ip, indexPath(norm, i), deref(it).Line)
		templates = append(templates, s)
	}
	return templates, true
}

// alias makes path np (the normalized spelling of p) point at p's line
// and raw text, so Validate's messages about np find both.
func (d *decoder) alias(p, np string, line int) {
	if np == p {
		return
	}
	d.setLine(np, line)
	if r, ok := d.raw[p]; ok {
		d.raw[np] = r
	}
}

// showValue quotes value for an error message. A value that came through
// ${VAR} is shown as written in the file instead, so nothing from the
// environment is echoed; either way passwords are masked.
func showValue(raw map[string]string, path, value string) string {
	if r, ok := raw[path]; ok {
		value = r
	}
	return strconv.Quote(clipLong(RedactDSN(value)))
}

// clipLong keeps messages readable when a value is very long.
func clipLong(s string) string {
	const max = 200
	if len(s) <= max {
		return s
	}
	return strings.ToValidUTF8(s[:max], "") + "…"
}
