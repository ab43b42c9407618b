package cache

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
)

// scanBatch is how many keys a scan hands over at a time.
const scanBatch = 1000

// quotedTable is t's SQL name.
func (t *table) quotedTable() string { return pgx.Identifier{t.Schema, t.Rel}.Sanitize() }

// rowKeys appends the keys of one row to keys: vals holds the row's
// values of t.columns in text form, nil for NULL. A template with a NULL
// column gives no key.
func (t *table) rowKeys(keys []string, vals [][]byte) []string {
	for _, tpl := range t.templates {
		cols := tpl.Columns()
		if len(cols) == 0 {
			continue // a fixed key: see fixedKeys
		}
		parts := make([]string, len(cols))
		ok := true
		for j, c := range cols {
			v := vals[t.columnIndex(c)]
			if v == nil {
				ok = false
				break
			}
			parts[j] = string(v)
		}
		if ok {
			keys = append(keys, tpl.Render(parts))
		}
	}
	return keys
}

// fixedKeys are the keys of templates without placeholders: every change
// of the table makes them stale.
func (t *table) fixedKeys() []string {
	var keys []string
	for _, tpl := range t.templates {
		if len(tpl.Columns()) == 0 {
			keys = append(keys, tpl.String())
		}
	}
	return keys
}

func (t *table) columnIndex(col string) int {
	for i, c := range t.columns {
		if c == col {
			return i
		}
	}
	panic("cache: template column " + col + " not in the table's column list")
}

// scanKeys reads every row of t in the database behind conn (one
// snapshot) and calls fn with the keys the rows produce, in batches, and
// the rows read since the previous call. Values are read as col::text on a
// connection made by connect, so they match the change stream's text form.
func scanKeys(ctx context.Context, conn *pgx.Conn, t *table, fn func(keys []string, rows int64) error) error {
	if fixed := t.fixedKeys(); len(fixed) > 0 {
		if err := fn(fixed, 0); err != nil {
			return err
		}
	}
	if len(t.columns) == 0 {
		return nil
	}
	exprs := make([]string, len(t.columns))
	for i, c := range t.columns {
		exprs[i] = pgx.Identifier{c}.Sanitize() + "::text"
	}
	rows, err := conn.Query(ctx, "SELECT "+strings.Join(exprs, ", ")+" FROM "+t.quotedTable(), pgx.QueryExecModeSimpleProtocol)
	if err != nil {
		return fmt.Errorf("read the keys of %s: %w", t.Name, err)
	}
	defer rows.Close()
	var (
		keys []string
		n    int64
	)
	for rows.Next() {
		keys = t.rowKeys(keys, rows.RawValues())
		n++
		if len(keys) >= scanBatch {
			if err := fn(keys, n); err != nil {
				return err
			}
			keys, n = keys[:0], 0
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("read the keys of %s: %w", t.Name, err)
	}
	if len(keys) > 0 || n > 0 {
		return fn(keys, n)
	}
	return nil
}
