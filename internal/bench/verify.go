package bench

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// checks are per table: the row count, a sum of the key and a sum of a
// hash of every row's replicated columns (targets have an extra column).
var checks = []struct{ table, sql string }{
	{"pgbench_accounts", `SELECT count(*)||'/'||coalesce(sum(aid),0)||'/'||coalesce(sum(abalance),0)||'/'||
		coalesce(sum(hashtext((aid, bid, abalance, filler)::text)::bigint),0) FROM pgbench_accounts`},
	{"pgbench_branches", `SELECT count(*)||'/'||coalesce(sum(bbalance),0)||'/'||
		coalesce(sum(hashtext((bid, bbalance, filler)::text)::bigint),0) FROM pgbench_branches`},
	{"pgbench_tellers", `SELECT count(*)||'/'||coalesce(sum(tbalance),0)||'/'||
		coalesce(sum(hashtext((tid, bid, tbalance, filler)::text)::bigint),0) FROM pgbench_tellers`},
	{"pgbench_history", `SELECT count(*)||'/'||coalesce(sum(hid),0)||'/'||coalesce(sum(delta),0)||'/'||
		coalesce(sum(hashtext((tid, bid, aid, delta, mtime, filler, hid)::text)::bigint),0) FROM pgbench_history`},
	{"bench_bulk", `SELECT count(*)||'/'||coalesce(sum(id),0)||'/'||coalesce(sum(hashtext(payload)::bigint),0) FROM bench_bulk`},
	{"bench_marker", `SELECT count(*)||'/'||coalesce(sum(id),0) FROM bench_marker`},
}

// verify compares every replicated table of the source with each target
// database, once replication has stopped writing. A difference is an error.
func (e *env) verify(ctx context.Context, what string, targets ...string) error {
	want, err := checksums(ctx, e.src)
	if err != nil {
		return err
	}
	for _, dsn := range targets {
		got, err := checksums(ctx, dsn)
		if err != nil {
			return err
		}
		for i, c := range checks {
			if got[i] != want[i] {
				return fmt.Errorf("after %s, %s differs: target %s has %s, the source has %s (count/sums/row hash): "+
					"replication lost or doubled rows", what, c.table, dsn, got[i], want[i])
			}
		}
	}
	return nil
}

func checksums(ctx context.Context, dsn string) ([]string, error) {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return nil, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	tx, err := conn.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return nil, err
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	out := make([]string, len(checks))
	for i, c := range checks {
		if err := tx.QueryRow(ctx, c.sql).Scan(&out[i]); err != nil {
			return nil, fmt.Errorf("check %s on %s: %w", c.table, dsn, err)
		}
	}
	return out, nil
}
