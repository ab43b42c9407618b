package bench

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/jackc/pgx/v5"
)

var syncTables = []string{"sync_a", "sync_b"}

// syncSetup creates the two tables of the sync benchmark on the source
// only, about SyncBytes together, stops every agent and adds the tables to
// the cluster's config (a table newly added to tables:, which
// `xdcr sync --table` copies into a site).
func (e *env) syncSetup(ctx context.Context) (int64, error) {
	e.progress("sync: creating 2 tables of about %s together on the source", humanize.IBytes(uint64(e.sc.SyncBytes)))
	for _, t := range syncTables {
		if err := execSQL(ctx, e.src, fmt.Sprintf(`CREATE TABLE %s (id bigint PRIMARY KEY, k int NOT NULL, v text NOT NULL,
			t timestamptz NOT NULL)`, t)); err != nil {
			return 0, err
		}
	}
	t0 := time.Now()
	batch := max(int64(1000), e.sc.SyncBytes/2/220/8)
	next := [2]int64{1, 1}
	var total int64
	for i := 0; total < e.sc.SyncBytes; i++ {
		t := i % 2
		if err := execSQL(ctx, e.src, fmt.Sprintf(`INSERT INTO %s SELECT g, (g * 7919) %% 100000, repeat(md5(g::text), 4),
			timestamptz '2026-01-01' + g * interval '1 second' FROM generate_series($1::bigint, $2::bigint) g`, syncTables[t]),
			next[t], next[t]+batch-1); err != nil {
			return 0, err
		}
		next[t] += batch
		var err error
		if total, err = queryInt(ctx, e.src, "SELECT pg_total_relation_size('sync_a') + pg_total_relation_size('sync_b')"); err != nil {
			return 0, err
		}
	}
	if err := execSQL(ctx, e.src, "VACUUM ANALYZE sync_a, sync_b"); err != nil {
		return 0, err
	}
	e.progress("  %s rows, %s in %.1fs", humanize.Comma(next[0]+next[1]-2), humanize.IBytes(uint64(total)), time.Since(t0).Seconds())
	for _, n := range e.c.Nodes() {
		if err := e.c.StopAgent(n, time.Minute); err != nil {
			return 0, err
		}
	}
	for _, t := range syncTables {
		e.c.Config.Tables = append(e.c.Config.Tables, "public."+t)
	}
	if err := e.c.WriteConfig(); err != nil {
		return 0, err
	}
	return total, nil
}

// syncBench is issue 5's benchmark: `xdcr sync` of two tables into the
// replica site against `pg_dump -t … | psql` of the same tables into
// another database of the same cluster.
func (e *env) syncBench(ctx context.Context, r int, nativeFirst bool) error {
	if r == 0 {
		size, err := e.syncSetup(ctx)
		if err != nil {
			return err
		}
		e.syncSize = size
	}
	e.progress("sync %d/%d: %s over 2 tables, pg_dump | psql %s", r+1, e.o.Reps, humanize.IBytes(uint64(e.syncSize)),
		map[bool]string{true: "first", false: "second"}[nativeFirst])
	dump := e.sites.List[1].Postgres.DSN(dumpDB)
	for _, dsn := range []string{e.xdst, dump} {
		if err := execSQL(ctx, dsn, "DROP TABLE IF EXISTS sync_a, sync_b"); err != nil {
			return err
		}
	}
	if err := e.checkpoint(ctx); err != nil {
		return err
	}
	var dNative, dXDCR time.Duration
	for _, native := range order(nativeFirst) {
		t0 := time.Now()
		var err error
		if native {
			err = e.pgDumpRestore(ctx, dump)
			dNative = time.Since(t0)
		} else {
			args := []string{"sync", e.dstSite, "--config", e.c.ConfigPath, "--log-format", "json", "--log-level", "warn"}
			for _, t := range syncTables {
				args = append(args, "--table", "public."+t)
			}
			err = e.runLogged(ctx, "xdcr-sync", exec.CommandContext(ctx, e.o.Binary, args...))
			dXDCR = time.Since(t0)
		}
		if err != nil {
			return err
		}
		if err := e.checkpoint(ctx); err != nil {
			return err
		}
	}
	mb := float64(e.syncSize) / (1 << 20)
	nr, xr := mb/dNative.Seconds(), mb/dXDCR.Seconds()
	e.progress("  pg_dump | psql %.2fs (%.1f MiB/s), xdcr sync %.2fs (%.1f MiB/s), xdcr/native %.2f",
		dNative.Seconds(), nr, dXDCR.Seconds(), xr, xr/nr)
	e.rep.row("sync", fmt.Sprintf("copy of 2 tables, %s (native: pg_dump | psql)", humanize.IBytes(uint64(e.syncSize))), "MiB/s", true).add(nr, xr)
	return e.verifySync(ctx, e.xdst, dump)
}

// pgDumpRestore pipes pg_dump of the sync tables into psql.
func (e *env) pgDumpRestore(ctx context.Context, target string) error {
	src, err := pgx.ParseConfig(e.src)
	if err != nil {
		return err
	}
	dst, err := pgx.ParseConfig(target)
	if err != nil {
		return err
	}
	dumpArgs := []string{"-h", src.Host, "-p", strconv.Itoa(int(src.Port)), "-U", src.User, "--no-owner", "--no-privileges"}
	for _, t := range syncTables {
		dumpArgs = append(dumpArgs, "-t", "public."+t)
	}
	dumpArgs = append(dumpArgs, src.Database)
	dumpCmd := exec.CommandContext(ctx, filepath.Join(e.pgbin, "pg_dump"), dumpArgs...)
	psql := exec.CommandContext(ctx, filepath.Join(e.pgbin, "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
		"-h", dst.Host, "-p", strconv.Itoa(int(dst.Port)), "-U", dst.User, "-d", dst.Database)
	pipe, err := dumpCmd.StdoutPipe()
	if err != nil {
		return err
	}
	psql.Stdin = pipe
	if err := dumpCmd.Start(); err != nil {
		return fmt.Errorf("pg_dump: %w", err)
	}
	restoreErr := e.runLogged(ctx, "pg_dump-psql", psql)
	dumpErr := dumpCmd.Wait()
	if dumpErr != nil {
		dumpErr = fmt.Errorf("pg_dump: %w", dumpErr)
	}
	return errors.Join(restoreErr, dumpErr)
}

func (e *env) verifySync(ctx context.Context, targets ...string) error {
	sql := func(t string) string {
		return fmt.Sprintf(`SELECT count(*)||'/'||coalesce(sum(id),0)||'/'||coalesce(sum(hashtext((id, k, v, t)::text)::bigint),0) FROM %s`, t)
	}
	for _, t := range syncTables {
		want, err := queryString(ctx, e.src, sql(t))
		if err != nil {
			return err
		}
		for _, dsn := range targets {
			got, err := queryString(ctx, dsn, sql(t))
			if err != nil {
				return err
			}
			if got != want {
				return fmt.Errorf("after the copy, %s differs: %s has %s, the source has %s", t, dsn, got, want)
			}
		}
	}
	return nil
}
