package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// WitnessSite is the site of a Raft member that has no database: it only
// votes, so two data sites plus a witness survive the loss of either site.
// It is not a valid name under sites.
const WitnessSite = "witness"

// Unlimited as [Stream].MaxAge keeps the change stream for ever. It is
// written "unlimited" (or -1) in the file.
const Unlimited time.Duration = -1

// NoWALLimit as [Capture].MaxRetainedWAL turns the retained-WAL warning
// off. It is written 0 (or "off") in the file.
const NoWALLimit int64 = -1

// NoCatchUp as [Capture].CatchUpRange reads every backlog through the
// replication protocol. It is written "off" (or -1) in the file.
const NoCatchUp int64 = -1

// Config is the cluster description every agent shares. [Parse] and [Load]
// return it normalized (table names as "schema.table"), with defaults
// applied and validated. A Config built in code may leave the tuning blocks
// zero: zero means the default, see [Config.ApplyDefaults].
type Config struct {
	// Cluster names the replication slot (xdcr_<cluster>), the streams and
	// the subjects. Lower-case letters, digits and '-'.
	Cluster string
	// Primary is the authoritative site at the first bootstrap only; after
	// that Raft holds the current primary.
	Primary string
	// Tables are the replicated tables, normalized by [NormalizeTable].
	Tables []string
	// Sites are the data sites by name: each has a PostgreSQL database and a
	// NATS server. The witness is not a site.
	Sites map[string]Site
	// Nodes are the Raft members by node id.
	Nodes map[string]Node
	// Cache maps a table (normalized, one of Tables) to what its rows put in
	// the sites' caches: the templates of their keys, e.g. "account:{id}",
	// and an optional warm query.
	Cache map[string]CacheTable

	Capture      Capture
	Apply        Apply
	Stream       Stream
	Invalidation Invalidation
	Schema       Schema
	HTTP         HTTP
	// TLS secures the Raft links between the nodes with mutual TLS.
	TLS TLS
}

// NodePlaceholder in a [TLS] path stands for the id of the node that reads
// the file, so one shared config names every node's own certificate.
const NodePlaceholder = "{node}"

// TLS names the PEM files of mutual TLS between the nodes' Raft
// transports: all three, or none (plain TCP). Every node's certificate
// must carry its node id as a DNS name (e.g. "a1"); a node accepts only
// certificates of CAFile's CA that name a node of the config.
type TLS struct {
	CAFile   string // the CA bundle that verifies the other nodes
	CertFile string // this node's certificate; may contain {node}
	KeyFile  string // its key; may contain {node}
}

// Enabled reports whether TLS is configured.
func (t TLS) Enabled() bool { return t != (TLS{}) }

// ForNode returns the paths with {node} replaced by id.
func (t TLS) ForNode(id string) TLS {
	r := strings.NewReplacer(NodePlaceholder, id)
	return TLS{CAFile: r.Replace(t.CAFile), CertFile: r.Replace(t.CertFile), KeyFile: r.Replace(t.KeyFile)}
}

// Schema says what apply may change in a replica's schema by itself.
type Schema struct {
	// AutoAddColumns lets apply add a column that the primary's table has
	// and the replica's lacks (nullable, no default, the source's type)
	// instead of pausing with the difference. Written auto_add_columns
	// (or auto-add-columns). Default false.
	AutoAddColumns bool
}

// HTTP secures the nodes' HTTP APIs.
type HTTP struct {
	// AdminToken, when set, must come as "Authorization: Bearer <token>"
	// with every request that changes state (promote, abort, the nodes'
	// internal proposals). Write it as ${VAR}, or use AdminTokenFile.
	AdminToken string
	// AdminTokenFile names a file holding the admin token (surrounding
	// white space ignored); read by [HTTP.Token].
	AdminTokenFile string
	// ProtectReads requires the token on the read endpoints too
	// (/v1/status, /metrics); /healthz and /readyz stay open for probes.
	ProtectReads bool
	// TLS serves the API over HTTPS with the node's certificate of the
	// tls: block; clients verify it with tls.ca_file. Needs tls:.
	TLS bool
}

// minTokenLen is the shortest admin token accepted: a token is a random
// secret, not a password a person types.
const minTokenLen = 16

// Token returns the admin token: AdminToken, or the content of
// AdminTokenFile. Empty means no token is configured and the API is open.
func (h HTTP) Token() (string, error) {
	if h.AdminTokenFile == "" {
		return h.AdminToken, nil
	}
	data, err := os.ReadFile(h.AdminTokenFile)
	if err != nil {
		return "", fmt.Errorf("http.admin_token_file: %w (create it with: openssl rand -hex 32 > %s; chmod 600 %[2]s)", err, h.AdminTokenFile)
	}
	t := strings.TrimSpace(string(data))
	if len(t) < minTokenLen {
		return "", fmt.Errorf("http.admin_token_file %s: the token is shorter than %d characters; write a random one: openssl rand -hex 32 > %[1]s", h.AdminTokenFile, minTokenLen)
	}
	return t, nil
}

// CacheTable is what one table's rows put in every site's caches.
type CacheTable struct {
	// Keys are the templates of the cache keys a row produces, such as
	// "account:{id}" or "orders:{tenant_id}:{id}": {column} stands for the
	// row's value of that column in PostgreSQL's text form. The columns are
	// checked against the database when the agent starts (see
	// [TemplateColumns]).
	Keys []string
	// Warm is an optional query (SELECT, WITH, VALUES or TABLE) over the
	// site's own database whose rows `xdcr cache rebuild` stores under
	// their keys, as JSON; its columns must include every template column.
	// Empty means rebuild only drops the table's keys.
	Warm string
}

// Site is one datacenter's services.
type Site struct {
	// Postgres is the connection string of the site's database, as a URL
	// (postgres://…) or key=value pairs; see pgconn.ParseConfig.
	Postgres string
	// NATS is the site's NATS server: nats://host:port or tls://host:port,
	// several separated by commas. See [Site.NATSServers].
	NATS string
	// Redis is the site's cache, optional: redis://, rediss:// or
	// memcache://host:port (memcache:// takes a comma-separated host list).
	Redis string

	// NATSAuth says how agents authenticate to and verify the site's NATS.
	// A user and password go in the URL instead:
	// nats://xdcr:${NATS_PASSWORD}@host:4222.
	NATSAuth NATSAuth
}

// NATSAuth is a site's NATS credentials and TLS files; all optional.
type NATSAuth struct {
	CAFile    string // CA bundle that verifies the server (with tls:// URLs)
	CertFile  string // client certificate, when the server verifies clients
	KeyFile   string // its key
	CredsFile string // a .creds file (user JWT and nkey seed)
	NKeyFile  string // an nkey seed file (SU…)
}

// NATSServers splits NATS into its URLs.
func (s Site) NATSServers() []string {
	var out []string
	for _, u := range strings.Split(s.NATS, ",") {
		if u = strings.TrimSpace(u); u != "" {
			out = append(out, u)
		}
	}
	return out
}

// Node is one Raft member.
type Node struct {
	// Site is a key of Config.Sites, or WitnessSite.
	Site string
	// Raft is the host:port of the Raft transport; the other nodes dial it.
	Raft string
	// HTTP is the host:port of /healthz, /metrics and /v1/status.
	HTTP string
}

// IsWitness reports whether the node only votes.
func (n Node) IsWitness() bool { return n.Site == WitnessSite }

// Capture tunes the source agent.
type Capture struct {
	// MaxBatchBytes bounds one published message. Default 1MiB; 4KiB..8MiB.
	MaxBatchBytes int
	// FlushInterval paces the messages of whole transactions: at most one
	// goes out per interval, so a committed transaction waits at most this
	// long (and not at all when the previous message went out longer ago).
	// Default 5ms; (0, 1s].
	FlushInterval time.Duration
	// MaxInFlight is the number of unacknowledged publishes. Default 256;
	// 1..65536.
	MaxInFlight int
	// StatusInterval is the standby status cadence to PostgreSQL. Default
	// 1s; below 60s (the default wal_sender_timeout).
	StatusInterval time.Duration
	// MaxRetainedWAL is how much WAL the replication slot may hold back on
	// the primary before the agent warns (a log line, the metric
	// xdcr_slot_retained_wal_exceeded and the primary's error in
	// /v1/status). The agent never drops the slot itself. Default 10GiB;
	// [NoWALLimit] (0 in the file) turns the warning off.
	MaxRetainedWAL int64
	// CatchUpRange is how much WAL the first range of catch-up through
	// SQL covers, when a capture starts more than 16MiB of WAL behind;
	// each later range twice as much as the one before, up to 4 times
	// this. Default 96MiB; 1MiB..4GiB, or [NoCatchUp] ("off" in the file)
	// to read every backlog through the replication protocol.
	CatchUpRange int64
	// Compression is how published messages are compressed: "zstd" (the
	// default) compresses a message's body when that saves at least an
	// eighth of it, "none" never does. Apply agents read both.
	Compression string
}

// Apply tunes the apply agents.
type Apply struct {
	// MaxBatchTxns is how many source transactions one target transaction
	// may hold. Default 1000; at least 1.
	MaxBatchTxns int
	// MaxBatchBytes bounds one target transaction. Default 8MiB;
	// 4KiB..1GiB.
	MaxBatchBytes int
	// SynchronousCommit makes apply commit with the replica server's own
	// synchronous_commit (on unless changed there) instead of turning it
	// off for its session. Off, the default and what a PostgreSQL
	// subscription does, loses nothing: the applied position commits with
	// the data, so a crash of the replica's PostgreSQL forgets both and
	// apply writes them again. But readers of the replica may see its data
	// go back for that moment. Written synchronous_commit.
	SynchronousCommit bool
}

// Invalidation tunes the cache invalidation that runs in every site.
type Invalidation struct {
	// MaxOutboxRows bounds the invalidations a site keeps waiting while its
	// cache is unreachable. Beyond it the backlog is collapsed into a flush
	// of every key of the tables it touched. Default 100000; 100..100000000.
	MaxOutboxRows int
}

// Stream sets the retention of each site's change stream.
type Stream struct {
	// MaxAge is how long a site keeps changes. Default 168h; [Unlimited]
	// keeps them for ever.
	MaxAge time.Duration
	// MaxBytes caps the stream size; 0 is unlimited (the default).
	MaxBytes int64
	// DuplicateWindow is JetStream's deduplication window. Default 2m; at
	// most MaxAge.
	DuplicateWindow time.Duration
}

// DefaultCapture returns the capture settings used for zero fields.
func DefaultCapture() Capture {
	return Capture{
		MaxBatchBytes:  1 << 20,
		FlushInterval:  5 * time.Millisecond,
		MaxInFlight:    256,
		StatusInterval: time.Second,
		MaxRetainedWAL: 10 << 30,
		CatchUpRange:   96 << 20,
		Compression:    "zstd",
	}
}

// DefaultApply returns the apply settings used for zero fields.
func DefaultApply() Apply {
	return Apply{MaxBatchTxns: 1000, MaxBatchBytes: 8 << 20}
}

// DefaultInvalidation returns the invalidation settings used for zero
// fields.
func DefaultInvalidation() Invalidation {
	return Invalidation{MaxOutboxRows: 100_000}
}

// DefaultStream returns the stream settings used for zero fields.
func DefaultStream() Stream {
	return Stream{MaxAge: 168 * time.Hour, MaxBytes: 0, DuplicateWindow: 2 * time.Minute}
}

func (c Capture) withDefaults() Capture {
	d := DefaultCapture()
	if c.MaxBatchBytes == 0 {
		c.MaxBatchBytes = d.MaxBatchBytes
	}
	if c.FlushInterval == 0 {
		c.FlushInterval = d.FlushInterval
	}
	if c.MaxInFlight == 0 {
		c.MaxInFlight = d.MaxInFlight
	}
	if c.StatusInterval == 0 {
		c.StatusInterval = d.StatusInterval
	}
	if c.MaxRetainedWAL == 0 {
		c.MaxRetainedWAL = d.MaxRetainedWAL
	}
	if c.CatchUpRange == 0 {
		c.CatchUpRange = d.CatchUpRange
	}
	if c.Compression == "" {
		c.Compression = d.Compression
	}
	return c
}

func (a Apply) withDefaults() Apply {
	d := DefaultApply()
	if a.MaxBatchTxns == 0 {
		a.MaxBatchTxns = d.MaxBatchTxns
	}
	if a.MaxBatchBytes == 0 {
		a.MaxBatchBytes = d.MaxBatchBytes
	}
	return a
}

func (i Invalidation) withDefaults() Invalidation {
	if i.MaxOutboxRows == 0 {
		i.MaxOutboxRows = DefaultInvalidation().MaxOutboxRows
	}
	return i
}

func (s Stream) withDefaults() Stream {
	d := DefaultStream()
	if s.MaxAge == 0 {
		s.MaxAge = d.MaxAge
	}
	if s.DuplicateWindow == 0 {
		s.DuplicateWindow = d.DuplicateWindow
	}
	return s
}

// ApplyDefaults replaces every zero tuning value with its default. Parse
// calls it; call it on a Config built in code before handing its values to
// components.
func (c *Config) ApplyDefaults() {
	c.Capture = c.Capture.withDefaults()
	c.Apply = c.Apply.withDefaults()
	c.Stream = c.Stream.withDefaults()
	c.Invalidation = c.Invalidation.withDefaults()
}

// Load reads the file at path and parses it with [Parse], expanding ${VAR}
// from the process environment.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	c, err := Parse(data, os.LookupEnv)
	if err != nil {
		if n := countErrors(err); n > 1 {
			return nil, fmt.Errorf("config %s has %d problems:\n%w", path, n, err)
		}
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

func countErrors(err error) int {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return len(j.Unwrap())
	}
	return 1
}

// Parse reads a config file's bytes. It expands ${VAR} in every string
// value through lookupEnv (nil means no variable is set), decodes the YAML
// rejecting unknown keys, normalizes table names, applies defaults and
// validates the result.
//
// A file that is not YAML gives a *[SyntaxError]. Otherwise every problem is
// reported at once, as errors.Join of *[FieldError] values with their line
// numbers, ordered by line. No message contains a password or a value taken
// from the environment.
func Parse(data []byte, lookupEnv func(string) (string, bool)) (*Config, error) {
	if lookupEnv == nil {
		lookupEnv = func(string) (string, bool) { return "", false }
	}
	doc, err := parseYAML(data)
	if err != nil {
		return nil, err
	}
	d := newDecoder(lookupEnv)
	c := d.config(doc)
	c.ApplyDefaults()

	errs := d.errs
	for _, e := range c.validate(d.raw, d.cacheLong) {
		if !d.failedAt(e.Path) {
			errs = append(errs, e)
		}
	}
	if len(errs) == 0 {
		return c, nil
	}
	s := newScrubber(d.secrets, minScrubLen)
	for _, e := range errs {
		if e.Line == 0 {
			e.Line = d.lineOf(e.Path)
		}
		e.Problem = s.scrub(e.Problem)
		e.Fix = s.scrub(e.Fix)
	}
	sortByLine(errs)
	return nil, joinFieldErrors(errs)
}

// parseYAML decodes the single YAML document in data. An empty file gives
// an empty document.
func parseYAML(data []byte) (doc *yaml.Node, err error) {
	defer func() {
		// The YAML library is not ours; a bug in it must not take the
		// process down while it reads a config file.
		if r := recover(); r != nil {
			doc, err = nil, &SyntaxError{Msg: fmt.Sprint("the YAML parser failed: ", r), Fix: "simplify the file", Err: errors.New("yaml parser panic")}
		}
	}()
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var n yaml.Node
	if err := dec.Decode(&n); err != nil {
		if errors.Is(err, io.EOF) {
			return &yaml.Node{Kind: yaml.DocumentNode}, nil
		}
		return nil, newSyntaxError(err, data)
	}
	for {
		// Only empty documents may follow, as after a trailing "---".
		var extra yaml.Node
		err := dec.Decode(&extra)
		switch {
		case errors.Is(err, io.EOF):
			return &n, nil
		case err != nil:
			return nil, newSyntaxError(err, data)
		case len(extra.Content) > 0 && !isNull(extra.Content[0]):
			return nil, &SyntaxError{
				Line: extra.Line,
				Msg:  "the file holds more than one YAML document",
				Fix:  "remove the second --- and what follows it, or merge the documents",
				Err:  errors.New("more than one YAML document"),
			}
		}
	}
}

// SiteNames returns the names of the data sites, sorted.
func (c *Config) SiteNames() []string {
	return slices.Sorted(maps.Keys(c.Sites))
}

// NodeNames returns the node ids, sorted.
func (c *Config) NodeNames() []string {
	return slices.Sorted(maps.Keys(c.Nodes))
}

// Node returns the node with the given id.
func (c *Config) Node(id string) (Node, bool) {
	n, ok := c.Nodes[id]
	return n, ok
}

// NodesIn returns the ids of the nodes in site (a data site or
// WitnessSite), sorted.
func (c *Config) NodesIn(site string) []string {
	var ids []string
	for id, n := range c.Nodes {
		if n.Site == site {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids
}

// SlotName returns the name of the logical replication slot:
// "xdcr_" + Cluster with '-' replaced by '_'.
func (c *Config) SlotName() string {
	return "xdcr_" + strings.ReplaceAll(c.Cluster, "-", "_")
}

// Redacted returns a deep copy of c with the passwords in every connection
// string replaced by "xxxxx" (see [RedactDSN]), for `config show` and logs.
func (c *Config) Redacted() *Config {
	r := c.clone()
	for name, s := range r.Sites {
		s.Postgres = RedactDSN(s.Postgres)
		s.NATS = RedactDSN(s.NATS)
		s.Redis = RedactDSN(s.Redis)
		r.Sites[name] = s
	}
	if r.HTTP.AdminToken != "" {
		r.HTTP.AdminToken = "xxxxx"
	}
	return r
}

func (c *Config) clone() *Config {
	r := *c
	r.Tables = slices.Clone(c.Tables)
	r.Sites = maps.Clone(c.Sites)
	r.Nodes = maps.Clone(c.Nodes)
	// TLS and NATSAuth hold paths, not secrets: they are copied as they are
	if c.Cache != nil {
		r.Cache = make(map[string]CacheTable, len(c.Cache))
		for k, v := range c.Cache {
			v.Keys = slices.Clone(v.Keys)
			r.Cache[k] = v
		}
	}
	return &r
}
