package replicator

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/xdcr/xdcr/replicator/change"
)

// applySchema is the replica-side bookkeeping: one row per cluster holding
// the applied position, the function that moves it, the state of tables
// that `xdcr sync` copies, and the outbox of cache invalidations written in
// the same transactions as the data.
//
// generation changes whenever `xdcr sync` changes what apply must do (a
// table starts or finishes copying, the position is replaced): advance
// then fails, and apply re-reads everything. The function fails
// the surrounding transaction when the row is not where the caller thinks,
// so two agents applying to one site can never both commit the same change.
const applySchema = `
CREATE SCHEMA IF NOT EXISTS xdcr;
CREATE TABLE IF NOT EXISTS xdcr.apply_position (
	cluster     text PRIMARY KEY,
	origin      text        NOT NULL,
	epoch       bigint      NOT NULL,
	lsn         pg_lsn      NOT NULL,
	commit_time timestamptz,
	stream      text        NOT NULL,
	stream_seq  bigint      NOT NULL,
	generation  bigint      NOT NULL DEFAULT 0,
	applied_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS xdcr.table_sync (
	cluster    text        NOT NULL,
	tbl        text        NOT NULL,
	state      text        NOT NULL CHECK (state IN ('copying', 'ready')),
	lsn        pg_lsn,
	rows_done  bigint      NOT NULL DEFAULT 0,
	rows_total bigint      NOT NULL DEFAULT 0,
	bytes_done bigint      NOT NULL DEFAULT 0,
	created    boolean     NOT NULL DEFAULT false,
	updated_at timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (cluster, tbl)
);
CREATE TABLE IF NOT EXISTS xdcr.cache_outbox (
	id          bigserial PRIMARY KEY,
	cluster     text        NOT NULL,
	lsn         pg_lsn      NOT NULL,
	commit_time timestamptz,
	entries     jsonb       NOT NULL,
	created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE OR REPLACE FUNCTION xdcr.advance(
	p_cluster text, p_old_epoch bigint, p_old_lsn pg_lsn, p_old_seq bigint, p_gen bigint,
	p_origin text, p_epoch bigint, p_lsn pg_lsn, p_commit_time timestamptz,
	p_stream text, p_seq bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	UPDATE xdcr.apply_position
	   SET origin = p_origin, epoch = p_epoch, lsn = p_lsn, commit_time = p_commit_time,
	       stream = p_stream, stream_seq = p_seq, applied_at = clock_timestamp()
	 WHERE cluster = p_cluster AND epoch = p_old_epoch AND lsn = p_old_lsn AND stream_seq = p_old_seq
	   AND generation = p_gen;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'xdcr: applied position of cluster % is no longer epoch % lsn % seq % generation %',
			p_cluster, p_old_epoch, p_old_lsn, p_old_seq, p_gen USING ERRCODE = 'XD001';
	END IF;
END
$$;`

// EnsureApplySchema creates the bookkeeping objects if they are missing. It
// takes an advisory lock so that agents starting together do not race on
// CREATE.
func EnsureApplySchema(ctx context.Context, conn *pgx.Conn) error {
	ddl, err := ExecSchemaDDL(ctx, conn, applySchema)
	if ddl {
		return permanent(fmt.Errorf("create the xdcr schema: %w", err),
			"the agent's role needs CREATE on the database (or create schema xdcr and its objects as the owner)")
	}
	if err != nil {
		return fmt.Errorf("create the xdcr schema: %w", err)
	}
	return nil
}

// SchemaLock names the advisory lock (hashtext of it) under which xdcr's
// own objects are created; whoever holds it keeps agents from starting
// their apply.
const SchemaLock = "xdcr.apply_schema"

// ExecSchemaDDL runs sql, DDL of xdcr's own objects, in a transaction that
// first takes an advisory lock. The agents, `xdcr sync` and the cache tail
// create these objects, sometimes at the same moment, and two sessions
// running CREATE OR REPLACE FUNCTION on one function at once make one fail
// ("tuple concurrently updated"). ddl says whether an error came from sql
// itself, not from the transaction around it.
func ExecSchemaDDL(ctx context.Context, conn *pgx.Conn, sql string) (ddl bool, err error) {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return false, err
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtext($1))", SchemaLock); err != nil {
		return false, err
	}
	if _, err := tx.Exec(ctx, sql); err != nil {
		return true, err
	}
	return false, tx.Commit(ctx)
}

// loadPosition reads the applied position, creating the row of a cluster
// that never applied anything.
func loadPosition(ctx context.Context, conn *pgx.Conn, cluster string) (AppliedPosition, error) {
	if _, err := conn.Exec(ctx, `INSERT INTO xdcr.apply_position (cluster, origin, epoch, lsn, stream, stream_seq)
		VALUES ($1, '', 0, '0/0', '', 0) ON CONFLICT (cluster) DO NOTHING`, cluster); err != nil {
		return AppliedPosition{}, fmt.Errorf("read the applied position: %w", err)
	}
	return ReadPosition(ctx, conn, cluster)
}

// ReadPosition reads the applied position of cluster from a replica's
// database; the zero position when it never applied anything.
func ReadPosition(ctx context.Context, conn *pgx.Conn, cluster string) (AppliedPosition, error) {
	var (
		p   AppliedPosition
		lsn string
		ct  *time.Time
	)
	err := conn.QueryRow(ctx, `SELECT origin, epoch, lsn::text, commit_time, stream, stream_seq, generation
		FROM xdcr.apply_position WHERE cluster = $1`, cluster).
		Scan(&p.Origin, &p.Epoch, &lsn, &ct, &p.Stream, &p.Seq, &p.Generation)
	if err == pgx.ErrNoRows {
		return AppliedPosition{}, nil
	}
	if err != nil {
		return AppliedPosition{}, fmt.Errorf("read the applied position: %w", err)
	}
	if p.LSN, err = change.ParseLSN(lsn); err != nil {
		return AppliedPosition{}, err
	}
	if ct != nil {
		p.CommitTime = ct.UTC()
	}
	return p, nil
}

// connectApply opens the connection that applies changes: replica session
// role (triggers and foreign keys of the replica do not fire again for rows
// the primary already checked), and the commit mode of the config.
func connectApply(ctx context.Context, cfg ApplyConfig) (*pgx.Conn, error) {
	pc, err := pgx.ParseConfig(cfg.DSN)
	if err != nil {
		return nil, permanent(fmt.Errorf("parse postgres connection string: %w", err), "correct the site's postgres setting")
	}
	setSessionParams(pc.RuntimeParams, "xdcr-apply")
	if !cfg.SynchronousCommit {
		pc.RuntimeParams["synchronous_commit"] = "off"
	}
	conn, err := pgx.ConnectConfig(ctx, pc)
	if err != nil {
		return nil, fmt.Errorf("connect to postgres %s:%d: %w", pc.Host, pc.Port, err)
	}
	if _, err := conn.Exec(ctx, "SET session_replication_role = replica"); err != nil {
		conn.Close(context.WithoutCancel(ctx))
		return nil, permanent(fmt.Errorf("set session_replication_role on replica site %s: %w", cfg.Site, err),
			"the apply role must be a superuser or have GRANT SET ON PARAMETER session_replication_role")
	}
	return conn, nil
}

// TableSync is the copy state of one table in a replica site.
type TableSync struct {
	Table string // schema.table
	// Copying is set while `xdcr sync` copies the table: apply must not
	// touch it. Once it is ready, LSN says where its copy ends: its changes
	// committed before LSN are in the copy, those at or after it are
	// applied from the stream.
	Copying   bool
	Created   bool // the sync created the table (and may drop it to start over)
	LSN       change.LSN
	RowsDone  int64
	RowsTotal int64
	BytesDone int64
}

// ReadTableSyncs reads the copy state of the tables of cluster.
func ReadTableSyncs(ctx context.Context, conn *pgx.Conn, cluster string) (map[string]TableSync, error) {
	rows, err := conn.Query(ctx, `SELECT tbl, state, coalesce(lsn, '0/0')::text, rows_done, rows_total, bytes_done, created
		FROM xdcr.table_sync WHERE cluster = $1`, cluster)
	if err != nil {
		return nil, fmt.Errorf("read table sync states: %w", err)
	}
	out := make(map[string]TableSync)
	for rows.Next() {
		var (
			ts        TableSync
			state, at string
		)
		if err := rows.Scan(&ts.Table, &state, &at, &ts.RowsDone, &ts.RowsTotal, &ts.BytesDone, &ts.Created); err != nil {
			return nil, fmt.Errorf("read table sync states: %w", err)
		}
		ts.Copying = state == "copying"
		if ts.LSN, err = change.ParseLSN(at); err != nil {
			return nil, err
		}
		out[ts.Table] = ts
	}
	return out, rows.Err()
}

// SetPosition replaces a site's applied position (and bumps its
// generation, so a running apply re-reads it). An old primary that becomes
// a replica records with it where its own history ends.
func SetPosition(ctx context.Context, conn *pgx.Conn, cluster string, p AppliedPosition) error {
	if err := EnsureApplySchema(ctx, conn); err != nil {
		return err
	}
	_, err := conn.Exec(ctx, `INSERT INTO xdcr.apply_position (cluster, origin, epoch, lsn, commit_time, stream, stream_seq)
		VALUES ($1, $2, $3, $4::pg_lsn, $5, $6, $7)
		ON CONFLICT (cluster) DO UPDATE SET origin = $2, epoch = $3, lsn = $4::pg_lsn, commit_time = $5,
			stream = $6, stream_seq = $7, generation = xdcr.apply_position.generation + 1, applied_at = now()`,
		cluster, p.Origin, p.Epoch, p.LSN.String(), nullTime(p.CommitTime), p.Stream, p.Seq)
	if err != nil {
		return fmt.Errorf("set the applied position: %w", err)
	}
	return nil
}

func nullTime(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	return &t
}
