package cache

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/xdcr/xdcr/replicator"
	"github.com/xdcr/xdcr/replicator/change"
)

// positionSchema is where the primary's tail remembers how far it has read
// its own change stream. xdcr.* is never in the publication, so none of
// this is replicated.
const positionSchema = `
CREATE TABLE IF NOT EXISTS xdcr.cache_position (
	cluster    text        NOT NULL,
	stream     text        NOT NULL,
	stream_seq bigint      NOT NULL,
	lsn        pg_lsn,
	updated_at timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (cluster, stream)
);`

// connect opens a connection that renders values like the change stream
// (so keys built from col::text match keys built from changes).
func connect(ctx context.Context, dsn, app string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("parse postgres connection string: %w", err)
	}
	for k, v := range replicator.TextSettings() {
		cfg.RuntimeParams[k] = v
	}
	cfg.RuntimeParams["application_name"] = app
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to postgres %s:%d: %w", cfg.Host, cfg.Port, err)
	}
	return conn, nil
}

// ensureSchema creates the outbox (with the rest of apply's bookkeeping,
// which the replicator owns) and the tail's position table.
func ensureSchema(ctx context.Context, conn *pgx.Conn) error {
	if err := replicator.EnsureApplySchema(ctx, conn); err != nil {
		return err
	}
	if _, err := replicator.ExecSchemaDDL(ctx, conn, positionSchema); err != nil {
		return fmt.Errorf("create xdcr.cache_position: %w", err)
	}
	return nil
}

// outboxRow is one row of xdcr.cache_outbox: what one source transaction
// (or chunk) made stale.
type outboxRow struct {
	id         int64
	lsn        string
	commitTime *time.Time
	entries    []change.Invalidation
	bad        error // entries that could not be decoded
}

// readOutbox returns up to limit rows of cluster's outbox, oldest first.
func readOutbox(ctx context.Context, conn *pgx.Conn, cluster string, limit int) ([]outboxRow, error) {
	rows, err := conn.Query(ctx, `SELECT id, lsn::text, commit_time, entries::text
		FROM xdcr.cache_outbox WHERE cluster = $1 ORDER BY id LIMIT $2`, cluster, limit)
	if err != nil {
		return nil, fmt.Errorf("read xdcr.cache_outbox: %w", err)
	}
	var out []outboxRow
	for rows.Next() {
		var (
			r       outboxRow
			entries string
		)
		if err := rows.Scan(&r.id, &r.lsn, &r.commitTime, &entries); err != nil {
			return nil, fmt.Errorf("read xdcr.cache_outbox: %w", err)
		}
		if err := json.Unmarshal([]byte(entries), &r.entries); err != nil {
			r.bad = err
		}
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read xdcr.cache_outbox: %w", err)
	}
	return out, nil
}

func deleteOutbox(ctx context.Context, conn *pgx.Conn, cluster string, ids []int64) error {
	if _, err := conn.Exec(ctx, `DELETE FROM xdcr.cache_outbox WHERE cluster = $1 AND id = ANY ($2)`, cluster, ids); err != nil {
		return fmt.Errorf("delete handled rows of xdcr.cache_outbox: %w", err)
	}
	return nil
}

func countOutbox(ctx context.Context, conn *pgx.Conn, cluster string) (int64, error) {
	var n int64
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM xdcr.cache_outbox WHERE cluster = $1`, cluster).Scan(&n); err != nil {
		return 0, fmt.Errorf("count xdcr.cache_outbox: %w", err)
	}
	return n, nil
}

// OpOverflow is the operation of the flush that replaces a backlog too
// large to keep (see [Worker]).
const OpOverflow = "overflow"

// collapseOutbox replaces every row of cluster's outbox by one row that
// flushes each table they name, in one statement: a row committed
// meanwhile is either in the statement's snapshot (and collapsed) or not
// (and kept as it is). It returns the tables and how many rows it replaced.
func collapseOutbox(ctx context.Context, conn *pgx.Conn, cluster string) ([]string, int64, error) {
	var (
		tables []string
		n      int64
	)
	err := conn.QueryRow(ctx, `WITH gone AS (
			DELETE FROM xdcr.cache_outbox WHERE cluster = $1 RETURNING lsn, commit_time, entries
		), tables AS (
			SELECT DISTINCT e->>'table' AS tbl FROM gone, jsonb_array_elements(gone.entries) AS e WHERE e ? 'table'
		), added AS (
			INSERT INTO xdcr.cache_outbox (cluster, lsn, commit_time, entries)
			SELECT $1, (SELECT max(lsn) FROM gone), (SELECT max(commit_time) FROM gone),
			       jsonb_agg(jsonb_build_object('table', tbl, 'op', $2::text, 'flush', true) ORDER BY tbl)
			  FROM tables HAVING count(*) > 0
			RETURNING 1
		)
		SELECT ARRAY(SELECT tbl FROM tables ORDER BY tbl), (SELECT count(*) FROM gone)`, cluster, OpOverflow).Scan(&tables, &n)
	if err != nil {
		return nil, 0, fmt.Errorf("collapse xdcr.cache_outbox: %w", err)
	}
	return tables, n, nil
}

// insertFlush queues a flush of tables (op names why) in cluster's outbox.
func insertFlush(ctx context.Context, tx pgx.Tx, cluster, op string, lsn change.LSN, tables []string) error {
	if len(tables) == 0 {
		return nil
	}
	inv := make([]change.Invalidation, len(tables))
	for i, t := range tables {
		inv[i] = change.Invalidation{Table: t, Op: op, Flush: true}
	}
	entries, err := json.Marshal(inv)
	if err != nil {
		return err
	}
	_, err = tx.Exec(ctx, `INSERT INTO xdcr.cache_outbox (cluster, lsn, entries) VALUES ($1, $2::pg_lsn, $3::jsonb)`,
		cluster, lsn.String(), string(entries))
	if err != nil {
		return fmt.Errorf("queue a flush of %s: %w", strings.Join(tables, ", "), err)
	}
	return nil
}

// isNoRows reports whether err is pgx's "no rows".
func isNoRows(err error) bool { return errors.Is(err, pgx.ErrNoRows) }
