package replicator

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/xdcr/xdcr/replicator/change"
)

// target is a replica table that changes of one source relation shape are
// applied to, with the statements prepared for it.
type target struct {
	table Table
	rel   *change.Relation // the source shape the statements were built for
	full  bool             // REPLICA IDENTITY FULL: rows are found by all old values
	keys  []int            // indexes of the identity columns
	stmts map[string]*pgconn.StatementDescription
	// supersede: an update that writes every column of a row may be
	// dropped when a later one in the same target transaction writes every
	// column of it again (see supersede). Only the primary key may be
	// unique, and no trigger or rule may see the update.
	supersede bool
}

// relationKey identifies a relation shape: name, column names and types.
func relationKey(r *change.Relation) string {
	var b strings.Builder
	b.WriteString(r.Schema)
	b.WriteByte(0)
	b.WriteString(r.Name)
	b.WriteByte(r.Identity)
	for _, c := range r.Columns {
		b.WriteByte(0)
		b.WriteString(c.Name)
		b.WriteByte(1)
		b.WriteString(c.Type)
		if c.Key {
			b.WriteByte(2)
		}
	}
	return b.String()
}

// addColumnsFunc adds columns the source has and the replica lacks to the
// replica's table t (see ApplyConfig.AutoAddColumns).
type addColumnsFunc func(ctx context.Context, t Table, cols []change.Column) error

// resolveTarget checks that the replica has a table that can take the
// source's rows: every source column must exist with the same type.
// Columns that exist only on the replica are fine (replicas get additive DDL
// first). site names the replica in messages. When add is not nil and the
// only difference is columns missing on the replica, add creates them and
// the table is checked again.
func resolveTarget(ctx context.Context, meta *pgx.Conn, rel *change.Relation, site string, add addColumnsFunc) (*target, error) {
	t := Table{Schema: rel.Schema, Name: rel.Name}
	rows, err := meta.Query(ctx, `SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attgenerated <> ''
		FROM pg_attribute a
		WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped`, t.Quoted())
	if err != nil {
		return nil, fmt.Errorf("read columns of %s: %w", t, err)
	}
	type col struct {
		typ       string
		generated bool
	}
	have := make(map[string]col)
	for rows.Next() {
		var (
			name string
			c    col
		)
		if err := rows.Scan(&name, &c.typ, &c.generated); err != nil {
			return nil, fmt.Errorf("read columns of %s: %w", t, err)
		}
		have[name] = c
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read columns of %s: %w", t, err)
	}
	if len(have) == 0 {
		return nil, &SchemaError{
			Table:   t.String(),
			Problem: fmt.Sprintf("does not exist on replica site %s", site),
			Fix:     fmt.Sprintf("create %s on %s with the primary's definition (or run `xdcr sync %s`); apply resumes by itself", t, site, site),
		}
	}
	var (
		problems []error
		missing  []change.Column
	)
	tg := &target{table: t, rel: rel, full: rel.Identity == change.IdentityFull, stmts: make(map[string]*pgconn.StatementDescription)}
	for i, c := range rel.Columns {
		if c.Key {
			tg.keys = append(tg.keys, i)
		}
		h, ok := have[c.Name]
		switch {
		case !ok:
			missing = append(missing, c)
			problems = append(problems, &SchemaError{
				Table: t.String(), Column: c.Name,
				Problem: fmt.Sprintf("exists on the primary (type %s) but not on replica site %s", c.Type, site),
				Fix:     fmt.Sprintf("ALTER TABLE %s ADD COLUMN %s %s; apply resumes by itself", t.Quoted(), pgx.Identifier{c.Name}.Sanitize(), c.Type),
			})
		case h.typ != c.Type:
			problems = append(problems, &SchemaError{
				Table: t.String(), Column: c.Name,
				Problem: fmt.Sprintf("is %s on the primary but %s on replica site %s", c.Type, h.typ, site),
				Fix:     fmt.Sprintf("ALTER TABLE %s ALTER COLUMN %s TYPE %s on %s, so both sides agree", t.Quoted(), pgx.Identifier{c.Name}.Sanitize(), c.Type, site),
			})
		case h.generated:
			problems = append(problems, &SchemaError{
				Table: t.String(), Column: c.Name,
				Problem: fmt.Sprintf("is a generated column on replica site %s but a plain column on the primary", site),
				Fix:     "make the column a plain column on the replica",
			})
		}
	}
	if len(tg.keys) == 0 {
		problems = append(problems, &SchemaError{
			Table:   t.String(),
			Problem: "the primary sent no replica identity columns for it",
			Fix:     fmt.Sprintf("give %s a primary key on the primary", t),
		})
	}
	if add != nil && len(missing) > 0 && len(missing) == len(problems) {
		if err := add(ctx, t, missing); err != nil {
			return nil, err
		}
		return resolveTarget(ctx, meta, rel, site, nil)
	}
	if len(problems) > 0 {
		return nil, errors.Join(problems...)
	}
	if !tg.full {
		if tg.supersede, err = plainKeyed(ctx, meta, t); err != nil {
			return nil, err
		}
	}
	return tg, nil
}

// plainKeyed reports whether the replica's table t has a primary key and
// nothing else that sees an update's intermediate values: no other unique
// index or exclusion constraint (a dropped update could change which of
// two rows holds a value in between), no trigger that fires on a replica,
// and no rule.
func plainKeyed(ctx context.Context, meta *pgx.Conn, t Table) (bool, error) {
	var ok bool
	err := meta.QueryRow(ctx, `SELECT
		EXISTS (SELECT FROM pg_index WHERE indrelid = $1::regclass AND indisprimary)
		AND NOT EXISTS (SELECT FROM pg_index WHERE indrelid = $1::regclass AND (indisunique OR indisexclusion) AND NOT indisprimary)
		AND NOT EXISTS (SELECT FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal AND tgenabled IN ('A', 'R'))
		AND NOT EXISTS (SELECT FROM pg_rewrite WHERE ev_class = $1::regclass AND rulename <> '_RETURN')`,
		t.Quoted()).Scan(&ok)
	if err != nil {
		return false, fmt.Errorf("read the indexes and triggers of %s: %w", t, err)
	}
	return ok, nil
}

// addColumnsSQL is the statement that adds cols to the replica's table t
// as nullable columns without defaults, which PostgreSQL does without
// rewriting the table.
func addColumnsSQL(t Table, cols []change.Column) string {
	var b strings.Builder
	b.WriteString("ALTER TABLE ")
	b.WriteString(t.Quoted())
	for i, c := range cols {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(" ADD COLUMN IF NOT EXISTS ")
		b.WriteString(pgx.Identifier{c.Name}.Sanitize())
		b.WriteByte(' ')
		b.WriteString(c.Type)
	}
	return b.String()
}

// Statement building. Masks say which columns a statement uses, so that
// rows with unchanged TOAST values or NULL identity values get their own
// prepared statement.

// columns is "table (a, b, …)": the replica's table and the source's
// columns, in the source's order.
func (t *target) columns() string {
	var b strings.Builder
	b.WriteString(t.table.Quoted())
	b.WriteString(" (")
	for i, c := range t.rel.Columns {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(pgx.Identifier{c.Name}.Sanitize())
	}
	b.WriteString(")")
	return b.String()
}

// copySQL copies rows of the source's columns in COPY's text format.
func (t *target) copySQL() string { return "COPY " + t.columns() + " FROM STDIN" }

func (t *target) insertSQL() string {
	var b strings.Builder
	b.WriteString("INSERT INTO ")
	b.WriteString(t.columns())
	b.WriteString(" VALUES (")
	for i := range t.rel.Columns {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString("$" + strconv.Itoa(i+1))
	}
	b.WriteString(")")
	return b.String()
}

// updateSQL sets the columns in set (in order) and finds the row by the
// identity columns in where; parameters are the set values, then the where
// values.
func (t *target) updateSQL(set, where []int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "UPDATE %s SET ", t.table.Quoted())
	n := 0
	for i, col := range set {
		if i > 0 {
			b.WriteString(", ")
		}
		n++
		fmt.Fprintf(&b, "%s = $%d", pgx.Identifier{t.rel.Columns[col].Name}.Sanitize(), n)
	}
	b.WriteString(" WHERE ")
	t.writeWhere(&b, where, n)
	return b.String()
}

func (t *target) deleteSQL(where []int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "DELETE FROM %s WHERE ", t.table.Quoted())
	t.writeWhere(&b, where, 0)
	return b.String()
}

// writeWhere finds the row. With a key identity the key columns are equal
// to the parameters. With REPLICA IDENTITY FULL several rows may be equal,
// and exactly one of them must change, so the row is picked by ctid; values
// are compared with IS NOT DISTINCT FROM (NULLs match), and types without
// an equality operator by their text form.
func (t *target) writeWhere(b *strings.Builder, where []int, n int) {
	if t.full {
		fmt.Fprintf(b, "ctid = (SELECT ctid FROM %s WHERE ", t.table.Quoted())
	}
	for i, col := range where {
		if i > 0 {
			b.WriteString(" AND ")
		}
		n++
		c := t.rel.Columns[col]
		name := pgx.Identifier{c.Name}.Sanitize()
		switch {
		case t.full && noEquality(c.Type):
			fmt.Fprintf(b, "%s::text IS NOT DISTINCT FROM $%d::text", name, n)
		case t.full:
			fmt.Fprintf(b, "%s IS NOT DISTINCT FROM $%d", name, n)
		default:
			fmt.Fprintf(b, "%s = $%d", name, n)
		}
	}
	if t.full {
		b.WriteString(" LIMIT 1)")
	}
}

// noEquality lists the common builtin types that have no equality operator.
func noEquality(typ string) bool {
	base := strings.TrimSuffix(typ, "[]")
	switch base {
	case "json", "xml", "point", "line", "lseg", "box", "path", "polygon", "circle":
		return true
	}
	return false
}

func truncateSQL(c *change.Change) string {
	var b strings.Builder
	b.WriteString("TRUNCATE ONLY ")
	for i, r := range c.Truncated {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(Table{Schema: r.Schema, Name: r.Name}.Quoted())
	}
	if c.RestartIdentity {
		b.WriteString(" RESTART IDENTITY")
	}
	if c.Cascade {
		b.WriteString(" CASCADE")
	}
	return b.String()
}

// describeKey renders a row's identity for messages: (id)=(42).
func describeKey(rel *change.Relation, keys []int, vals []change.Value) string {
	var names, values []string
	for _, k := range keys {
		if k >= len(vals) {
			continue
		}
		names = append(names, rel.Columns[k].Name)
		switch v := vals[k]; v.Kind {
		case change.Null:
			values = append(values, "NULL")
		case change.Unchanged:
			values = append(values, "(unchanged)")
		default:
			s := string(v.Data)
			if len(s) > 64 {
				s = s[:61] + "..."
			}
			values = append(values, s)
		}
	}
	return "(" + strings.Join(names, ", ") + ")=(" + strings.Join(values, ", ") + ")"
}
