package replicator

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// sessionParams make every value's text form unambiguous and identical on
// both ends: pgoutput renders values with the walsender's settings and the
// replica parses them with its own.
var sessionParams = map[string]string{
	"DateStyle":          "ISO, MDY",
	"IntervalStyle":      "postgres",
	"extra_float_digits": "3",
	"bytea_output":       "hex",
	"TimeZone":           "UTC",
}

func setSessionParams(rt map[string]string, app string) {
	for k, v := range sessionParams {
		rt[k] = v
	}
	rt["application_name"] = app
}

// ConnectMeta opens a normal connection for catalog queries. Its search_path
// is pg_catalog only, so format_type() schema-qualifies every other type.
func ConnectMeta(ctx context.Context, dsn string) (*pgx.Conn, error) {
	return connectSession(ctx, dsn, "xdcr", map[string]string{"search_path": "pg_catalog"})
}

// connectSession opens a normal connection with the session settings every
// xdcr connection uses, application name app, and extra settings.
func connectSession(ctx context.Context, dsn, app string, extra map[string]string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, permanent(fmt.Errorf("parse postgres connection string: %w", err), "correct the site's postgres setting")
	}
	setSessionParams(cfg.RuntimeParams, app)
	for k, v := range extra {
		cfg.RuntimeParams[k] = v
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to postgres %s:%d: %w", cfg.Host, cfg.Port, err)
	}
	return conn, nil
}

// connectReplication opens a logical replication connection. Its socket is
// a streamConn that gathers the stream in gulps of at least gulp while the
// source is far ahead (0: read eagerly always).
func connectReplication(ctx context.Context, dsn string, gulp time.Duration) (*pgconn.PgConn, *streamConn, error) {
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		return nil, nil, permanent(fmt.Errorf("parse postgres connection string: %w", err), "correct the site's postgres setting")
	}
	setSessionParams(cfg.RuntimeParams, "xdcr-capture")
	cfg.RuntimeParams["replication"] = "database"
	var sc *streamConn
	dial := cfg.DialFunc
	cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		sc = newStreamConn(c, gulp) // the last one dialed is the one kept
		return sc, nil
	}
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, nil, fmt.Errorf("open replication connection to %s:%d: %w", cfg.Host, cfg.Port, err)
	}
	return conn, sc, nil
}

// typeNames resolves type names over a catalog connection.
type typeNames struct{ conn *pgx.Conn }

func (t typeNames) TypeNames(ctx context.Context, oids []uint32, mods []int32) ([]string, error) {
	names := make([]string, 0, len(oids))
	rows, err := t.conn.Query(ctx, `SELECT format_type(t.oid, t.mod)
		FROM unnest($1::oid[], $2::int4[]) WITH ORDINALITY AS t(oid, mod, i) ORDER BY t.i`, oids, mods)
	if err != nil {
		return nil, err
	}
	for rows.Next() {
		var n string
		if err := rows.Scan(&n); err != nil {
			return nil, err
		}
		names = append(names, n)
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	if len(names) != len(oids) {
		return nil, fmt.Errorf("format_type returned %d names for %d types", len(names), len(oids))
	}
	return names, nil
}

// preflightSource checks that the primary can be captured and makes the
// publication list exactly the configured tables.
func preflightSource(ctx context.Context, conn *pgx.Conn, cfg CaptureConfig) error {
	var walLevel string
	if err := conn.QueryRow(ctx, "SHOW wal_level").Scan(&walLevel); err != nil {
		return fmt.Errorf("read wal_level: %w", err)
	}
	if walLevel != "logical" {
		return permanent(fmt.Errorf("site %s: wal_level is %q, logical replication needs \"logical\"", cfg.Site, walLevel),
			"ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL")
	}
	var problems []error
	for _, t := range cfg.Tables {
		if err := CheckIdentity(ctx, conn, t); err != nil {
			problems = append(problems, err)
		}
	}
	if len(problems) > 0 {
		return errors.Join(problems...)
	}
	return ensurePublication(ctx, conn, cfg)
}

// CheckIdentity checks that t exists and that its updates and deletes can be
// replicated: a primary key, a replica identity index, or REPLICA IDENTITY
// FULL. A failure is a *PermanentError with the fix.
func CheckIdentity(ctx context.Context, conn *pgx.Conn, t Table) error {
	var (
		kind, ident     string
		hasPK, hasIdent bool
	)
	err := conn.QueryRow(ctx, `SELECT c.relkind::text, c.relreplident::text,
			EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
			EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)
		FROM pg_class c WHERE c.oid = to_regclass($1)`, t.Quoted()).Scan(&kind, &ident, &hasPK, &hasIdent)
	if errors.Is(err, pgx.ErrNoRows) {
		return permanent(fmt.Errorf("table %s is listed in tables but does not exist on the primary", t),
			"create it, or remove it from tables in the config")
	}
	if err != nil {
		return fmt.Errorf("inspect table %s: %w", t, err)
	}
	if kind != "r" && kind != "p" {
		return permanent(fmt.Errorf("%s is not a table (relkind %s)", t, kind), "list only tables in tables")
	}
	switch {
	case ident == "f", ident == "d" && hasPK, ident == "i" && hasIdent:
		return nil
	case ident == "n":
		return permanent(fmt.Errorf("table %s has REPLICA IDENTITY NOTHING: its updates and deletes cannot be replicated", t),
			fmt.Sprintf("ALTER TABLE %s REPLICA IDENTITY DEFAULT (with a primary key) or REPLICA IDENTITY FULL", t.Quoted()))
	case ident == "i":
		return permanent(fmt.Errorf("table %s has REPLICA IDENTITY USING INDEX but that index is gone", t),
			fmt.Sprintf("ALTER TABLE %s REPLICA IDENTITY USING INDEX <unique index>, or add a primary key and use REPLICA IDENTITY DEFAULT", t.Quoted()))
	default:
		return permanent(fmt.Errorf("table %s has no primary key: its updates and deletes cannot be replicated", t),
			fmt.Sprintf("ALTER TABLE %s ADD PRIMARY KEY (<columns>); or, if no column set is unique, ALTER TABLE %s REPLICA IDENTITY FULL", t.Quoted(), t.Quoted()))
	}
}

func ensurePublication(ctx context.Context, conn *pgx.Conn, cfg CaptureConfig) error {
	name := PublicationName(cfg.Cluster)
	quoted := make([]string, len(cfg.Tables))
	want := make([]string, len(cfg.Tables))
	for i, t := range cfg.Tables {
		quoted[i], want[i] = t.Quoted(), t.String()
	}
	slices.Sort(want)
	list := strings.Join(quoted, ", ")

	var exists bool
	if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)`, name).Scan(&exists); err != nil {
		return fmt.Errorf("read publication %s: %w", name, err)
	}
	if !exists {
		sql := fmt.Sprintf("CREATE PUBLICATION %s FOR TABLE %s WITH (publish_via_partition_root = true)",
			pgx.Identifier{name}.Sanitize(), list)
		if _, err := conn.Exec(ctx, sql); err != nil {
			return fmt.Errorf("create publication %s: %w", name, err)
		}
		return nil
	}
	rows, err := conn.Query(ctx, `SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1`, name)
	if err != nil {
		return fmt.Errorf("read publication %s: %w", name, err)
	}
	have, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fmt.Errorf("read publication %s: %w", name, err)
	}
	slices.Sort(have)
	if slices.Equal(have, want) {
		return nil
	}
	sql := fmt.Sprintf("ALTER PUBLICATION %s SET TABLE %s", pgx.Identifier{name}.Sanitize(), list)
	if _, err := conn.Exec(ctx, sql); err != nil {
		return fmt.Errorf("update publication %s to the configured tables: %w", name, err)
	}
	return nil
}
