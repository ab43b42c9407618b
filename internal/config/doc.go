// Package config loads, checks and writes xdcr's cluster file: one YAML file
// that describes the cluster and is shared by every agent (an agent is told
// which node it is). Only this package and cmd/xdcr read files and the
// environment; components get typed values from a [Config].
//
//	cfg, err := config.Load("/etc/xdcr/xdcr.yaml") // read, ${VAR}, defaults, Validate
//	if err != nil {
//		return err // every problem at once, one *FieldError per line
//	}
//
// deploy/config/xdcr.example.yaml documents every key; a test parses it
// with this package so it cannot drift.
//
// # The file
//
//	cluster: shop                 # a-z, 0-9, '-'; at most 58 characters (slot xdcr_<cluster>)
//	primary: dc-a                 # a site; authoritative at the first bootstrap only
//	tables: [public.accounts, orders]
//	sites:                        # at least two data sites; "witness" is reserved
//	  dc-a:
//	    postgres: postgres://xdcr:${PGPASSWORD}@10.1.0.5:5432/shop   # URL or key=value
//	    nats: nats://10.1.0.6:4222                                   # nats:// or tls://, comma list
//	    redis: redis://10.1.0.7:6379/0                               # optional; rediss://, memcache://
//	nodes:                        # Raft members; every site needs one
//	  a1: {site: dc-a, raft: 10.1.0.5:7000, http: 10.1.0.5:7070}
//	  w1: {site: witness, raft: 10.3.0.5:7000, http: 10.3.0.5:7070}
//	cache:                        # table → key templates, or {keys: [...], warm: QUERY}
//	  public.accounts: ["account:{id}"]
//	  public.orders: {keys: ["order:{id}"], warm: "SELECT * FROM public.orders WHERE open"}
//	capture: {max_batch_bytes: 1MiB, flush_interval: 5ms, max_in_flight: 256, status_interval: 1s}
//	apply:   {max_batch_txns: 1000, max_batch_bytes: 8MiB}
//	stream:  {max_age: 168h, max_bytes: unlimited, duplicate_window: 2m}
//	invalidation: {max_outbox_rows: 100000}
//
// Unknown keys are errors (with a "did you mean" for near misses), as are
// duplicate keys, YAML merge keys (<<) and a second YAML document.
// Anchors and aliases work.
//
// # Environment variables
//
// ${NAME} in any string value is replaced by the variable's value, so
// secrets stay out of the file. "$$" stands for a literal "$", and a "$" not
// followed by "{" or "$" is kept as it is. Only values are expanded, not
// keys. An unset variable is an error naming the key and the variable; a
// variable set to "" expands to "". Expansion is one pass: a value that
// itself contains ${X} is not expanded again. Numbers, sizes and durations
// may come from variables too (max_in_flight: ${XDCR_INFLIGHT}). Inside a
// flow collection ({ } or [ ]) YAML reads the braces of ${VAR} as its own,
// so quote such values there: {raft: "${HOST}:7000"}.
//
// Error messages never contain a value that came from the environment: a
// value is shown as written in the file (with its ${NAME}), and passwords
// in connection strings are masked by [RedactDSN].
//
// # Table names
//
// A table is "table" or "schema.table", written as in SQL: unquoted
// identifiers are folded to lower case, double-quoted ones keep their case
// and may contain dots. A missing schema means "public". Names are stored
// normalized (see [NormalizeTable]): "Accounts" and "public.accounts" are the
// same table, listing both is an error, and cache keys name tables the same
// way. In YAML, quote a name that contains double quotes:
// '"Sales"."Orders"'.
//
// # Sizes, durations and defaults
//
// Sizes are a whole number of bytes or a number with a unit: KiB, MiB, GiB,
// TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000), case-insensitive.
// Durations use Go syntax: 5ms, 10s, 2m, 168h; a bare number other than 0 is
// refused as ambiguous.
//
// Every tuning key is optional, and 0 means its default — except
// stream.max_age, where 0 is refused because JetStream reads it as "keep for
// ever": write "unlimited" (or -1) for that, stored as [Unlimited].
// stream.max_bytes is unlimited by default; "unlimited" and -1 mean the same.
// capture.max_retained_wal is a warning threshold: 0 (or "off") turns the
// warning off, stored as [NoWALLimit]. capture.catch_up_range "off" (or -1)
// is stored as [NoCatchUp].
//
//	key                         default  allowed
//	capture.max_batch_bytes     1MiB     4KiB .. 8MiB (also fits NATS max_payload)
//	capture.flush_interval      5ms      (0, 1s]
//	capture.max_in_flight       256      1 .. 65536
//	capture.status_interval     1s       (0, 60s)
//	capture.max_retained_wal    10GiB    > 0, or 0 (off)
//	capture.catch_up_range      96MiB    1MiB .. 4GiB, or off (always stream)
//	capture.compression         zstd     zstd, none
//	apply.max_batch_txns        1000     >= 1
//	apply.max_batch_bytes       8MiB     4KiB .. 1GiB
//	apply.synchronous_commit    false    true: commit with the server's setting
//	stream.max_age              168h     > 0, or unlimited
//	stream.max_bytes            0 (none) 0, or >= capture.max_batch_bytes
//	stream.duplicate_window     2m       > 0, <= stream.max_age
//	invalidation.max_outbox_rows 100000  100 .. 100000000
//
// # Rules
//
// Beyond the shapes above, [Config.Validate] checks that primary names a
// site; every data site has a node (an agent); node sites are data sites or
// "witness"; raft and http addresses are host:port with a port in 1..65535,
// not the unspecified address (other nodes dial them), and no host:port is
// used twice; the loss of any one site leaves a Raft majority (two voters
// never do, two sites plus a witness do, and each witness node counts as its
// own failure domain); no two sites point at the same database; connection
// strings parse with pgconn.ParseConfig; cache entries name listed tables,
// their templates have well-formed {column} placeholders, and a warm query
// is one statement that returns rows (SELECT, WITH, VALUES or TABLE, no
// trailing ';').
//
// Validate is offline: it does not connect anywhere, does not check that
// cache template columns exist (the agent does, at start) nor run warm
// queries, and does not require files named in a
// connection string (sslrootcert, …) to exist on this machine. pgconn does
// read PG* environment variables, as the agent will.
//
// # Errors
//
// Problems are reported all at once as errors.Join of *[FieldError]: the
// key's path ("sites.dc-b.postgres", "tables[1]"), its line when parsed
// from a file, what is wrong and how to fix it. A file that is not YAML
// gives a *[SyntaxError] with its line.
package config
