package cache

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// RebuildConfig says which site's cache to rebuild.
type RebuildConfig struct {
	Cluster string
	Site    string
	DSN     string // the site's own PostgreSQL: the keys come from its rows
	// Tables are the tables to rebuild, named as in the config; empty
	// means every cached table.
	Tables []string
	// Parallel is how many tables are rebuilt at once. Default 4.
	Parallel int
}

// Progress receives a rebuild's progress. Its methods are called from
// several goroutines at once and must not block for long.
type Progress interface {
	// Begin says a table starts; rows is an estimate of the rows it will
	// read (its rows, plus the warm query's when it has one).
	Begin(table string, rows int64)
	// Rows reports n more rows read.
	Rows(table string, n int64)
	// End reports the table's outcome.
	End(r TableResult)
}

// TableResult is what a rebuild did to one table's keys.
type TableResult struct {
	Table   string
	Rows    int64 // rows read: the table's, then the warm query's
	Dropped int64 // keys deleted (whether they existed or not)
	Warmed  int64 // entries stored by the warm query
	Skipped int64 // warm rows that give no key (a NULL key column), and entries the store refused (too large)
	Took    time.Duration
	Err     error
}

// Rebuild drops every key the templates produce from the site's rows, and
// stores the rows of each table's warm query under their keys, as JSON
// (row_to_json). It never flushes the whole cache: it deletes exactly the
// keys the site's own rows give, read in one snapshot per table. Keys of
// rows that are gone are not found that way; on Redis the worker's flush
// (a SCAN of the templates' patterns) reaches those.
//
// After a table's keys are dropped, a flush [Event] (op "rebuild") is
// published on the site's subject when pub is not nil, so in-process
// caches drop theirs too.
//
// A transaction applied while a table is warmed may be invalidated before
// the warm query's older row is stored; the entry then stays stale until
// the row changes again or the entry expires. Rebuild is a recovery tool:
// run it on a quiet site, or give warmed entries a TTL in the application.
func Rebuild(ctx context.Context, cfg RebuildConfig, keys *Keys, b Backend, pub Publisher, p Progress) ([]TableResult, error) {
	if b == nil {
		return nil, fmt.Errorf("site %s has no cache store (sites.%s.redis): nothing to rebuild", cfg.Site, cfg.Site)
	}
	var tables []*table
	if len(cfg.Tables) == 0 {
		tables = keys.tables
	}
	for _, name := range cfg.Tables {
		t := keys.table(name)
		if t == nil {
			return nil, fmt.Errorf("table %s has no cache templates in the config (cached: %s)", name, strings.Join(keys.names(), ", "))
		}
		tables = append(tables, t)
	}
	parallel := cfg.Parallel
	if parallel <= 0 {
		parallel = 4
	}
	results := make([]TableResult, len(tables))
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	for i, t := range tables {
		wg.Go(func() {
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				results[i] = TableResult{Table: t.Name, Err: ctx.Err()}
				p.End(results[i])
				return
			}
			defer func() { <-sem }()
			r := rebuildTable(ctx, cfg, t, b, pub, p)
			results[i] = r
			p.End(r)
		})
	}
	wg.Wait()
	var errs []error
	for _, r := range results {
		if r.Err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", r.Table, r.Err))
		}
	}
	return results, errors.Join(errs...)
}

func (k *Keys) names() []string {
	out := make([]string, len(k.tables))
	for i, t := range k.tables {
		out[i] = t.Name
	}
	return out
}

func rebuildTable(ctx context.Context, cfg RebuildConfig, t *table, b Backend, pub Publisher, p Progress) (r TableResult) {
	r.Table = t.Name
	start := time.Now()
	defer func() { r.Took = time.Since(start) }()
	conn, err := connect(ctx, cfg.DSN, "xdcr-cache-rebuild")
	if err != nil {
		r.Err = err
		return r
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var warmCols []string
	if t.Warm != "" {
		// fail before anything is dropped if the warm query cannot work
		if warmCols, err = warmColumns(ctx, conn, t); err != nil {
			r.Err = err
			return r
		}
	}
	est, err := estimateRows(ctx, conn, t)
	if err != nil {
		r.Err = err
		return r
	}
	if t.Warm != "" {
		est += estimateWarm(ctx, conn, t, est)
	}
	p.Begin(t.Name, est)

	err = scanKeys(ctx, conn, t, func(keys []string, rows int64) error {
		if err := b.Delete(ctx, keys); err != nil {
			return err
		}
		r.Dropped += int64(len(keys))
		r.Rows += rows
		p.Rows(t.Name, rows)
		return nil
	})
	if err != nil {
		r.Err = fmt.Errorf("drop keys: %w", err)
		return r
	}
	if t.Warm != "" {
		if err := warm(ctx, conn, t, warmCols, b, p, &r); err != nil {
			r.Err = fmt.Errorf("warm: %w", err)
			return r
		}
	}
	if pub != nil {
		ev := []Event{{Table: t.Name, Op: "rebuild", Flush: true}}
		if _, err := publishEvents(ctx, pub, Subject(cfg.Cluster, cfg.Site), ev); err != nil {
			r.Err = err
		}
	}
	return r
}

// estimateRows is the planner's row count of t, or a count when the table
// was never analyzed.
func estimateRows(ctx context.Context, conn *pgx.Conn, t *table) (int64, error) {
	var n float64
	err := conn.QueryRow(ctx, `SELECT reltuples FROM pg_class WHERE oid = to_regclass($1)`, t.quotedTable()).Scan(&n)
	if isNoRows(err) {
		return 0, fmt.Errorf("table %s does not exist on this site", t.Name)
	}
	if err != nil {
		return 0, fmt.Errorf("estimate the rows of %s: %w", t.Name, err)
	}
	if n >= 0 {
		return int64(n), nil
	}
	var c int64
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM "+t.quotedTable()).Scan(&c); err != nil {
		return 0, fmt.Errorf("count the rows of %s: %w", t.Name, err)
	}
	return c, nil
}

// estimateWarm is the planner's row estimate of t's warm query, or
// fallback when it cannot tell.
func estimateWarm(ctx context.Context, conn *pgx.Conn, t *table, fallback int64) int64 {
	var plan string
	err := conn.QueryRow(ctx, "EXPLAIN (FORMAT JSON) SELECT * FROM ("+t.Warm+"\n) AS w", pgx.QueryExecModeSimpleProtocol).Scan(&plan)
	if err != nil {
		return fallback
	}
	var out []struct {
		Plan struct {
			Rows float64 `json:"Plan Rows"`
		} `json:"Plan"`
	}
	if err := json.Unmarshal([]byte(plan), &out); err != nil || len(out) == 0 {
		return fallback
	}
	return int64(out[0].Plan.Rows)
}

// warmColumns checks that the warm query returns every template column.
func warmColumns(ctx context.Context, conn *pgx.Conn, t *table) ([]string, error) {
	rows, err := conn.Query(ctx, "SELECT * FROM ("+t.Warm+"\n) AS w LIMIT 0", pgx.QueryExecModeSimpleProtocol)
	if err != nil {
		return nil, fmt.Errorf("warm query of %s: %w", t.Name, err)
	}
	have := map[string]bool{}
	for _, f := range rows.FieldDescriptions() {
		have[f.Name] = true
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("warm query of %s: %w", t.Name, err)
	}
	for _, tpl := range t.templates {
		for _, c := range tpl.Columns() {
			if !have[c] {
				return nil, fmt.Errorf("the warm query of %s returns no column %q, which template %q needs: select it too", t.Name, c, tpl)
			}
		}
	}
	return t.columns, nil
}

// warmBatch is how many entries one round trip stores.
const warmBatch = 500

// warm stores each row of t's warm query under its keys, as JSON.
func warm(ctx context.Context, conn *pgx.Conn, t *table, cols []string, b Backend, p Progress, r *TableResult) error {
	exprs := []string{"row_to_json(w)::text"}
	for _, c := range cols {
		exprs = append(exprs, "(w."+pgx.Identifier{c}.Sanitize()+")::text")
	}
	rows, err := conn.Query(ctx, "SELECT "+strings.Join(exprs, ", ")+" FROM ("+t.Warm+"\n) AS w", pgx.QueryExecModeSimpleProtocol)
	if err != nil {
		return fmt.Errorf("run the warm query of %s: %w", t.Name, err)
	}
	defer rows.Close()
	var (
		items []Item
		read  int64
		keys  []string
	)
	flush := func() error {
		stored, err := b.Set(ctx, items)
		if err != nil {
			return err
		}
		r.Warmed += int64(stored)
		r.Skipped += int64(len(items) - stored)
		r.Rows += read
		p.Rows(t.Name, read)
		items, read = items[:0], 0
		return nil
	}
	for rows.Next() {
		vals := rows.RawValues()
		value := append([]byte(nil), vals[0]...)
		keys = t.rowKeys(keys[:0], vals[1:]) // fixed keys (no placeholder) are not warmed
		if len(keys) == 0 {
			r.Skipped++
		}
		for _, k := range keys {
			items = append(items, Item{Key: k, Value: value})
		}
		read++
		if len(items) >= warmBatch {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("run the warm query of %s: %w", t.Name, err)
	}
	return flush()
}
