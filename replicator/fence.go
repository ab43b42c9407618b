package replicator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// The fence keeps applications from writing to the replicated tables of a
// site that is not the primary: a statement trigger on each table that
// raises SQLSTATE 25006 (read_only_sql_transaction) for every INSERT,
// UPDATE, DELETE and TRUNCATE. Ordinary triggers do not fire in sessions
// with session_replication_role = replica, which is how apply and sync
// write, so replication goes on. Unlike default_transaction_read_only, an
// application session cannot switch it off: that takes the table's owner
// (ALTER TABLE … DISABLE TRIGGER) or a superuser (session_replication_role).
// docs/failover.md says what it guarantees and what it does not.

const fenceTrigger = "xdcr_fence"

const fenceFunction = `
CREATE SCHEMA IF NOT EXISTS xdcr;
CREATE OR REPLACE FUNCTION xdcr.refuse_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	RAISE EXCEPTION 'xdcr: %.% is read-only: this site is not the primary of cluster %; write to the primary site',
		TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV[0]
		USING ERRCODE = '25006',
		      HINT = 'xdcr lag --config ... shows which site is the primary';
END
$$;`

// Fence makes tables read-only for applications. It waits up to grace for
// transactions that hold locks on them (writers in flight must finish
// before the fence can be put up), then ends those sessions and tries
// again. It is idempotent.
func Fence(ctx context.Context, conn *pgx.Conn, cluster string, tables []Table, grace time.Duration, log *slog.Logger) error {
	if _, err := ExecSchemaDDL(ctx, conn, fenceFunction); err != nil {
		return fmt.Errorf("create the fence function: %w", err)
	}
	for attempt := 0; ; attempt++ {
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, fmt.Sprintf("SET LOCAL lock_timeout = %d", grace.Milliseconds())); err != nil {
				return err
			}
			for _, t := range tables {
				var present, exists bool
				if err := tx.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL,
						EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = $2)`,
					t.Quoted(), fenceTrigger).Scan(&present, &exists); err != nil {
					return err
				}
				if !present {
					continue // not here yet: xdcr sync fences the tables it creates
				}
				if exists {
					if _, err := tx.Exec(ctx, fmt.Sprintf("ALTER TABLE %s ENABLE TRIGGER %s", t.Quoted(), fenceTrigger)); err != nil {
						return fmt.Errorf("fence %s: %w", t, err)
					}
					continue
				}
				sql := fmt.Sprintf(`CREATE TRIGGER %s BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s
					FOR EACH STATEMENT EXECUTE FUNCTION xdcr.refuse_write(%s)`, fenceTrigger, t.Quoted(), quoteLiteral(cluster))
				if _, err := tx.Exec(ctx, sql); err != nil {
					return fmt.Errorf("fence %s: %w", t, err)
				}
			}
			return nil
		})
		var pgErr *pgconn.PgError
		if err == nil || !errors.As(err, &pgErr) || pgErr.Code != "55P03" || attempt >= 3 {
			if err != nil {
				return fmt.Errorf("fence the replicated tables: %w", err)
			}
			return nil
		}
		// lock_not_available: sessions keep the tables busy; end them
		n, err := endBlockers(ctx, conn, tables)
		if err != nil {
			return err
		}
		log.Warn("ended sessions that kept the fence from going up", "sessions", n, "grace", grace)
	}
}

// endBlockers terminates the other sessions that hold locks on tables.
func endBlockers(ctx context.Context, conn *pgx.Conn, tables []Table) (int, error) {
	names := make([]string, len(tables))
	for i, t := range tables {
		names[i] = t.Quoted()
	}
	var n int
	err := conn.QueryRow(ctx, `SELECT count(pg_terminate_backend(pid)) FROM (
			SELECT DISTINCT l.pid FROM pg_locks l
			WHERE l.relation = ANY (SELECT to_regclass(x) FROM unnest($1::text[]) x)
			  AND l.pid <> pg_backend_pid()) b`, names).Scan(&n)
	if err != nil {
		return 0, fmt.Errorf("end the sessions that block the fence: %w", err)
	}
	return n, nil
}

// Unfence lets applications write to tables again.
func Unfence(ctx context.Context, conn *pgx.Conn, tables []Table) error {
	for _, t := range tables {
		var present bool
		if err := conn.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, t.Quoted()).Scan(&present); err != nil {
			return err
		}
		if !present {
			continue
		}
		if _, err := conn.Exec(ctx, fmt.Sprintf("DROP TRIGGER IF EXISTS %s ON %s", fenceTrigger, t.Quoted())); err != nil {
			return fmt.Errorf("lift the fence on %s: %w", t, err)
		}
	}
	return nil
}

// Fenced lists the tables that carry an enabled fence.
func Fenced(ctx context.Context, conn *pgx.Conn, tables []Table) ([]string, error) {
	var out []string
	for _, t := range tables {
		var on bool
		err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = $2 AND tgenabled <> 'D')`,
			t.Quoted(), fenceTrigger).Scan(&on)
		if err != nil {
			return nil, err
		}
		if on {
			out = append(out, t.String())
		}
	}
	return out, nil
}

// Sequences returns the current values of the sequences the tables' columns
// own (serial and identity columns), by qualified name.
func Sequences(ctx context.Context, conn *pgx.Conn, tables []Table) (map[string]int64, error) {
	names := make([]string, len(tables))
	for i, t := range tables {
		names[i] = t.Quoted()
	}
	rows, err := conn.Query(ctx, `SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), s.last_value
		FROM pg_depend d
		JOIN pg_class c ON c.oid = d.objid AND c.relkind = 'S'
		JOIN pg_namespace n ON n.oid = c.relnamespace
		JOIN pg_sequences s ON s.schemaname = n.nspname AND s.sequencename = c.relname
		WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
		  AND d.refobjid = ANY (SELECT to_regclass(x) FROM unnest($1::text[]) x)
		  AND s.last_value IS NOT NULL`, names)
	if err != nil {
		return nil, fmt.Errorf("read sequence values: %w", err)
	}
	out := map[string]int64{}
	for rows.Next() {
		var (
			name string
			v    int64
		)
		if err := rows.Scan(&name, &v); err != nil {
			return nil, err
		}
		out[name] = v
	}
	return out, rows.Err()
}

// AdvanceSequences makes every sequence the tables own hand out values
// above what the old primary used: above values[seq] when the old primary
// told them (a switchover), and above the largest value in the owning
// column in any case (a failover knows no more). It never moves a sequence
// back. Logical replication carries column values, not sequences.
func AdvanceSequences(ctx context.Context, conn *pgx.Conn, tables []Table, values map[string]int64) (map[string]int64, error) {
	names := make([]string, len(tables))
	for i, t := range tables {
		names[i] = t.Quoted()
	}
	rows, err := conn.Query(ctx, `SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname),
			quote_ident(tn.nspname) || '.' || quote_ident(t.relname), quote_ident(a.attname),
			coalesce(s.last_value, 0), s.increment_by > 0
		FROM pg_depend d
		JOIN pg_class c ON c.oid = d.objid AND c.relkind = 'S'
		JOIN pg_namespace n ON n.oid = c.relnamespace
		JOIN pg_class t ON t.oid = d.refobjid
		JOIN pg_namespace tn ON tn.oid = t.relnamespace
		JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
		JOIN pg_sequences s ON s.schemaname = n.nspname AND s.sequencename = c.relname
		WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
		  AND d.refobjid = ANY (SELECT to_regclass(x) FROM unnest($1::text[]) x)`, names)
	if err != nil {
		return nil, fmt.Errorf("read the sequences to advance: %w", err)
	}
	type seq struct {
		name, table, column string
		last                int64
		ascending           bool
	}
	var seqs []seq
	for rows.Next() {
		var s seq
		if err := rows.Scan(&s.name, &s.table, &s.column, &s.last, &s.ascending); err != nil {
			return nil, err
		}
		seqs = append(seqs, s)
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	set := map[string]int64{}
	for _, s := range seqs {
		if !s.ascending {
			continue // descending sequences: left alone, documented
		}
		var top *int64
		if err := conn.QueryRow(ctx, fmt.Sprintf("SELECT max(%s)::bigint FROM %s", s.column, s.table)).Scan(&top); err != nil {
			return nil, fmt.Errorf("read the largest %s.%s: %w", s.table, s.column, err)
		}
		want := s.last
		if top != nil && *top > want {
			want = *top
		}
		if v, ok := values[s.name]; ok && v > want {
			want = v
		}
		if want <= s.last || want <= 0 {
			continue
		}
		if _, err := conn.Exec(ctx, "SELECT setval($1::regclass, $2, true)", s.name, want); err != nil {
			return nil, fmt.Errorf("advance sequence %s to %d: %w", s.name, want, err)
		}
		set[s.name] = want
	}
	return set, nil
}

// DescribeTables is a short list of table names for messages.
func DescribeTables(tables []Table) string {
	names := make([]string, len(tables))
	for i, t := range tables {
		names[i] = t.String()
	}
	return strings.Join(names, ", ")
}
