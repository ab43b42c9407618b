// Package preflight checks that every site of a config is ready for xdcr:
// its PostgreSQL (settings, tables, privileges) and its NATS (JetStream,
// limits), reporting each check with the fix for a failure. It backs
// `xdcr config check --connect`.
package preflight

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/xdcr/xdcr/internal/config"
	"github.com/xdcr/xdcr/internal/natsconn"
	"github.com/xdcr/xdcr/replicator"
)

// Status of one check.
const (
	OK   = "ok"
	Warn = "warn"
	Fail = "FAIL"
)

// Check is one line of the checklist.
type Check struct {
	Site   string `json:"site"`
	Check  string `json:"check"`
	Status string `json:"status"`
	Detail string `json:"detail,omitempty"`
	Fix    string `json:"fix,omitempty"`
}

// Failed reports whether any check failed.
func Failed(checks []Check) bool {
	for _, c := range checks {
		if c.Status == Fail {
			return true
		}
	}
	return false
}

// Run checks every data site of cfg. primary names the site that
// captures: what only a primary needs fails there and is a warning on the
// others (they need it to be promoted).
func Run(ctx context.Context, cfg *config.Config, tables []replicator.Table, primary string) []Check {
	var out []Check
	for _, site := range cfg.SiteNames() {
		out = append(out, Postgres(ctx, cfg, site, tables, site == primary)...)
		out = append(out, NATS(ctx, cfg, site)...)
	}
	return out
}

type list struct {
	site   string
	checks []Check
}

func (l *list) add(check, status, detail, fix string) {
	l.checks = append(l.checks, Check{Site: l.site, Check: check, Status: status, Detail: detail, Fix: fix})
}

// Postgres checks one site's database. What only a capturing site needs
// fails when asPrimary and is a warning otherwise.
func Postgres(ctx context.Context, cfg *config.Config, site string, tables []replicator.Table, asPrimary bool) []Check {
	l := &list{site: site}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(cctx, cfg.Sites[site].Postgres)
	if err != nil {
		l.add("postgres: connect", Fail, config.RedactDSN(err.Error()),
			fmt.Sprintf("check sites.%s.postgres: host, port, user, password (${VAR}), sslmode and sslrootcert", site))
		return l.checks
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var version int
	var walLevel, slots, senders, keep, user string
	var super, repl, create bool
	err = conn.QueryRow(cctx, `SELECT current_setting('server_version_num')::int, current_setting('wal_level'),
			current_setting('max_replication_slots'), current_setting('max_wal_senders'), current_setting('max_slot_wal_keep_size'),
			current_user, r.rolsuper, r.rolreplication, has_database_privilege(current_database(), 'CREATE')
		FROM pg_roles r WHERE r.rolname = current_user`).
		Scan(&version, &walLevel, &slots, &senders, &keep, &user, &super, &repl, &create)
	if err != nil {
		l.add("postgres: settings", Fail, err.Error(), "the agent's role must be able to read pg_settings and pg_roles")
		return l.checks
	}
	l.add("postgres: connect", OK, fmt.Sprintf("as %s, PostgreSQL %d.%d", user, version/10000, version%10000), "")
	switch {
	case version < 140000:
		l.add("postgres: version", Fail, strconv.Itoa(version), "xdcr needs PostgreSQL 14 or later (tested on 15)")
	}
	status := Warn
	if asPrimary {
		status = Fail
	}
	if walLevel != "logical" {
		l.add("postgres: wal_level", status, walLevel, "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL (every site that may become primary needs it)")
	} else {
		l.add("postgres: wal_level", OK, walLevel, "")
	}
	var usedSlots, usedSenders int
	_ = conn.QueryRow(cctx, `SELECT (SELECT count(*) FROM pg_replication_slots), (SELECT count(*) FROM pg_stat_replication)`).Scan(&usedSlots, &usedSenders)
	for _, s := range []struct {
		name, val string
		used      int
	}{{"max_replication_slots", slots, usedSlots}, {"max_wal_senders", senders, usedSenders}} {
		n, _ := strconv.Atoi(s.val)
		fix := fmt.Sprintf("ALTER SYSTEM SET %s = %d; then restart PostgreSQL", s.name, s.used+4)
		if n-s.used < 1 {
			l.add("postgres: "+s.name, status, fmt.Sprintf("%d, %d in use", n, s.used), fix)
		} else if s.name == "max_replication_slots" && asPrimary && n-s.used < 1+replicator.CatchUpSlots {
			l.add("postgres: "+s.name, Warn, fmt.Sprintf("%d, %d in use", n, s.used), fmt.Sprintf("catch-up after downtime decodes on %d connections, "+
				"each with a temporary copy of the slot, and with fewer slots free on one or none (streaming, slower): %s", replicator.CatchUpSlots, fix))
		} else {
			l.add("postgres: "+s.name, OK, fmt.Sprintf("%d, %d in use", n, s.used), "")
		}
	}
	if keep == "-1" {
		l.add("postgres: max_slot_wal_keep_size", Warn, "unlimited",
			"a replication slot that falls behind (a site down for long) keeps WAL until the disk is full: ALTER SYSTEM SET max_slot_wal_keep_size = '50GB' (a size the disk holds); a slot invalidated by it means re-syncing the sites")
	} else {
		l.add("postgres: max_slot_wal_keep_size", OK, keep, "")
	}
	if super || repl {
		l.add("postgres: REPLICATION", OK, user, "")
	} else {
		l.add("postgres: REPLICATION", status, user+" lacks it", fmt.Sprintf("ALTER ROLE %s REPLICATION", pgx.Identifier{user}.Sanitize()))
	}
	if create || super {
		l.add("postgres: CREATE on the database", OK, "", "")
	} else {
		l.add("postgres: CREATE on the database", Fail, user+" lacks it",
			fmt.Sprintf("GRANT CREATE ON DATABASE <db> TO %s (the agent keeps its position in schema xdcr)", pgx.Identifier{user}.Sanitize()))
	}
	if !super {
		var can bool
		err := conn.QueryRow(cctx, `SELECT has_parameter_privilege('session_replication_role', 'SET')`).Scan(&can)
		if err != nil || !can {
			l.add("postgres: SET session_replication_role", Fail, user+" lacks it",
				fmt.Sprintf("GRANT SET ON PARAMETER session_replication_role TO %s (apply writes as a replica, past the fence)", pgx.Identifier{user}.Sanitize()))
		} else {
			l.add("postgres: SET session_replication_role", OK, "", "")
		}
	}
	for _, t := range tables {
		name := "table " + t.String()
		var exists bool
		if err := conn.QueryRow(cctx, `SELECT to_regclass($1) IS NOT NULL`, t.Quoted()).Scan(&exists); err != nil || !exists {
			fix := fmt.Sprintf("create it on %s, or run `xdcr sync %s` to copy it from the primary", site, site)
			if asPrimary {
				fix = "create it, or remove it from tables in the config"
			}
			l.add(name, Fail, "does not exist", fix)
			continue
		}
		warned := false
		if err := replicator.CheckIdentity(cctx, conn, t); err != nil {
			var pe *replicator.PermanentError
			if !errors.As(err, &pe) {
				l.add(name, Fail, err.Error(), "")
				continue
			}
			l.add(name, status, pe.Err.Error(), pe.Fix)
			if status == Fail {
				continue
			}
			warned = true // a replica: its privileges still matter
		}
		var sel, ins, upd, del bool
		if err := conn.QueryRow(cctx, `SELECT has_table_privilege($1, 'SELECT'), has_table_privilege($1, 'INSERT'),
				has_table_privilege($1, 'UPDATE'), has_table_privilege($1, 'DELETE')`, t.Quoted()).Scan(&sel, &ins, &upd, &del); err != nil {
			l.add(name, Fail, err.Error(), "")
			continue
		}
		if !(sel && ins && upd && del) {
			l.add(name, Fail, fmt.Sprintf("%s may not read and write it", user),
				fmt.Sprintf("GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON %s TO %s", t.Quoted(), pgx.Identifier{user}.Sanitize()))
			continue
		}
		if !warned {
			l.add(name, OK, "key and privileges", "")
		}
	}
	return l.checks
}

// NATS checks one site's NATS server: it answers with the config's
// credentials, JetStream is on in the site's domain, and messages of
// capture.max_batch_bytes fit.
func NATS(ctx context.Context, cfg *config.Config, site string) []Check {
	l := &list{site: site}
	nc, err := natsconn.Connect(cfg, site, nats.Name("xdcr-config-check"), nats.Timeout(5*time.Second))
	if err != nil {
		l.add("nats: connect", Fail, err.Error(), fmt.Sprintf("check sites.%s.nats and its nats_* files", site))
		return l.checks
	}
	defer nc.Close()
	l.add("nats: connect", OK, nc.ConnectedUrlRedacted(), "")
	if max := nc.MaxPayload(); max < int64(cfg.Capture.MaxBatchBytes) {
		l.add("nats: max_payload", Fail, fmt.Sprintf("%d bytes, below capture.max_batch_bytes %d", max, cfg.Capture.MaxBatchBytes),
			fmt.Sprintf("raise max_payload in the server config to at least %d, or lower capture.max_batch_bytes", cfg.Capture.MaxBatchBytes))
	} else {
		l.add("nats: max_payload", OK, strconv.FormatInt(max, 10), "")
	}
	js, err := jetstream.New(nc)
	if err != nil {
		l.add("nats: jetstream", Fail, err.Error(), "")
		return l.checks
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	info, err := js.AccountInfo(cctx)
	if err != nil {
		l.add("nats: jetstream", Fail, err.Error(), "enable JetStream in the server config (jetstream { store_dir: ..., domain: "+site+" }) and for the agent's account")
		return l.checks
	}
	if info.Domain != site {
		l.add("nats: jetstream domain", Fail, fmt.Sprintf("%q", info.Domain),
			fmt.Sprintf("set jetstream { domain: %s } on the site's server: every site is its own domain (docs/nats-topology.md)", site))
	} else {
		l.add("nats: jetstream domain", OK, info.Domain, "")
	}
	if lim := info.Limits.MaxStore; lim >= 0 && lim < 1<<30 {
		l.add("nats: account storage", Warn, fmt.Sprintf("limit %d bytes", lim), "give the agent's account at least the stream's stream.max_bytes of file storage")
	} else {
		l.add("nats: account storage", OK, fmt.Sprintf("limit %d, used %d bytes", lim, info.Store), "")
	}
	return l.checks
}
