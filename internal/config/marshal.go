package config

import (
	"bytes"
	"fmt"
	"maps"
	"slices"
	"strconv"

	"go.yaml.in/yaml/v3"
)

// Marshal writes c as a config file that [Parse] reads back to an equal
// Config: for any c returned by Parse, Parse(Marshal(c)) == c.
//
// Tuning values are written as their effective values (zero as the
// default). Every '$' in a string value is written as "$$", so a value is
// taken literally and never expanded again. Passwords are written as they
// are: use [Config.Redacted] first for output that people will read.
func (c *Config) Marshal() ([]byte, error) {
	root := mapping(false)
	add := func(m *yaml.Node, key string, val *yaml.Node) {
		m.Content = append(m.Content, str(key), val)
	}
	addStr := func(m *yaml.Node, key, val string) {
		add(m, key, value(val))
	}

	addStr(root, "cluster", c.Cluster)
	addStr(root, "primary", c.Primary)

	tables := &yaml.Node{Kind: yaml.SequenceNode}
	for _, t := range c.Tables {
		tables.Content = append(tables.Content, value(t))
	}
	add(root, "tables", tables)

	sites := mapping(false)
	for _, name := range c.SiteNames() {
		s := c.Sites[name]
		m := mapping(false)
		addStr(m, "postgres", s.Postgres)
		addStr(m, "nats", s.NATS)
		if s.Redis != "" {
			addStr(m, "redis", s.Redis)
		}
		for _, kv := range []struct{ key, val string }{
			{"nats_ca_file", s.NATSAuth.CAFile}, {"nats_cert_file", s.NATSAuth.CertFile}, {"nats_key_file", s.NATSAuth.KeyFile},
			{"nats_creds_file", s.NATSAuth.CredsFile}, {"nats_nkey_file", s.NATSAuth.NKeyFile},
		} {
			if kv.val != "" {
				addStr(m, kv.key, kv.val)
			}
		}
		add(sites, name, m)
	}
	add(root, "sites", sites)

	nodes := mapping(false)
	for _, id := range c.NodeNames() {
		n := c.Nodes[id]
		m := mapping(true)
		addStr(m, "site", n.Site)
		addStr(m, "raft", n.Raft)
		addStr(m, "http", n.HTTP)
		add(nodes, id, m)
	}
	add(root, "nodes", nodes)

	if len(c.Cache) > 0 {
		cache := mapping(false)
		for _, table := range slices.Sorted(maps.Keys(c.Cache)) {
			ct := c.Cache[table]
			seq := &yaml.Node{Kind: yaml.SequenceNode, Style: yaml.FlowStyle}
			for _, t := range ct.Keys {
				seq.Content = append(seq.Content, value(t))
			}
			if ct.Warm == "" {
				add(cache, table, seq) // the short form
				continue
			}
			m := mapping(false)
			add(m, "keys", seq)
			addStr(m, "warm", ct.Warm)
			add(cache, table, m)
		}
		add(root, "cache", cache)
	}

	cp := c.Capture.withDefaults()
	capture := mapping(false)
	add(capture, "max_batch_bytes", sizeNode(int64(cp.MaxBatchBytes)))
	addStr(capture, "flush_interval", formatDuration(cp.FlushInterval))
	add(capture, "max_in_flight", intNode(int64(cp.MaxInFlight)))
	addStr(capture, "status_interval", formatDuration(cp.StatusInterval))
	if cp.CatchUpRange == NoCatchUp {
		addStr(capture, "catch_up_range", "off")
	} else {
		add(capture, "catch_up_range", sizeNode(cp.CatchUpRange))
	}
	addStr(capture, "compression", cp.Compression)
	if cp.MaxRetainedWAL == NoWALLimit {
		add(capture, "max_retained_wal", intNode(0))
	} else {
		add(capture, "max_retained_wal", sizeNode(cp.MaxRetainedWAL))
	}
	add(root, "capture", capture)

	ap := c.Apply.withDefaults()
	apply := mapping(false)
	add(apply, "max_batch_txns", intNode(int64(ap.MaxBatchTxns)))
	add(apply, "max_batch_bytes", sizeNode(int64(ap.MaxBatchBytes)))
	if ap.SynchronousCommit {
		add(apply, "synchronous_commit", trueNode())
	}
	add(root, "apply", apply)

	st := c.Stream.withDefaults()
	stream := mapping(false)
	if st.MaxAge == Unlimited {
		addStr(stream, "max_age", "unlimited")
	} else {
		addStr(stream, "max_age", formatDuration(st.MaxAge))
	}
	if st.MaxBytes == 0 {
		addStr(stream, "max_bytes", "unlimited")
	} else {
		add(stream, "max_bytes", sizeNode(st.MaxBytes))
	}
	addStr(stream, "duplicate_window", formatDuration(st.DuplicateWindow))
	add(root, "stream", stream)

	inv := c.Invalidation.withDefaults()
	invalidation := mapping(false)
	add(invalidation, "max_outbox_rows", intNode(int64(inv.MaxOutboxRows)))
	add(root, "invalidation", invalidation)

	if c.Schema.AutoAddColumns {
		schema := mapping(false)
		add(schema, "auto_add_columns", trueNode())
		add(root, "schema", schema)
	}
	if c.TLS.Enabled() {
		t := mapping(false)
		addStr(t, "ca_file", c.TLS.CAFile)
		addStr(t, "cert_file", c.TLS.CertFile)
		addStr(t, "key_file", c.TLS.KeyFile)
		add(root, "tls", t)
	}
	if c.HTTP != (HTTP{}) {
		h := mapping(false)
		if c.HTTP.AdminToken != "" {
			addStr(h, "admin_token", c.HTTP.AdminToken)
		}
		if c.HTTP.AdminTokenFile != "" {
			addStr(h, "admin_token_file", c.HTTP.AdminTokenFile)
		}
		if c.HTTP.ProtectReads {
			add(h, "protect_reads", trueNode())
		}
		if c.HTTP.TLS {
			add(h, "tls", trueNode())
		}
		add(root, "http", h)
	}

	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(root); err != nil {
		return nil, fmt.Errorf("marshal config: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("marshal config: %w", err)
	}
	return buf.Bytes(), nil
}

func mapping(flow bool) *yaml.Node {
	n := &yaml.Node{Kind: yaml.MappingNode}
	if flow {
		n.Style = yaml.FlowStyle
	}
	return n
}

// str is a key or a literal string: keys are not expanded.
func str(s string) *yaml.Node {
	return &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: s}
}

// value is a string value, escaped so that Parse does not expand it.
func value(s string) *yaml.Node {
	return str(escapeDollars(s))
}

// trueNode is a YAML true; the marshalled file leaves false keys out.
func trueNode() *yaml.Node {
	return &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!bool", Value: "true"}
}

func intNode(n int64) *yaml.Node {
	return &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!int", Value: strconv.FormatInt(n, 10)}
}

func sizeNode(n int64) *yaml.Node {
	s := formatSize(n)
	if _, err := strconv.ParseInt(s, 10, 64); err == nil {
		return intNode(n)
	}
	return str(s)
}
