package cache

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
)

// TemplateError says which key templates name columns that their table
// does not have in a site's database. It needs an operator: the config or
// the table must change.
type TemplateError struct {
	Site     string
	Problems []TemplateProblem
}

// TemplateProblem is one template that names an unknown column.
type TemplateProblem struct {
	Table    string // as in the config
	Index    int    // of the template in the table's list
	Template string
	Column   string
	Columns  []string // what the table has
}

func (e *TemplateError) Error() string {
	var b strings.Builder
	for i, p := range e.Problems {
		if i > 0 {
			b.WriteString("; ")
		}
		fmt.Fprintf(&b, "cache.%s[%d]: template %q names column %q, which table %s does not have on site %s (its columns: %s)",
			p.Table, p.Index, p.Template, p.Column, p.Table, e.Site, strings.Join(p.Columns, ", "))
	}
	b.WriteString("; fix: correct the template under cache: in the config (placeholders are column names as the database spells them), or add the column on every site")
	return b.String()
}

// IdentityWarning is a template that uses a column outside its table's
// replica identity while the table lacks REPLICA IDENTITY FULL: PostgreSQL
// does not send that column's old value, so an update invalidates only the
// new value's key, and a delete cannot invalidate the key.
type IdentityWarning struct {
	Table    string
	Template string
	Column   string
	Identity string // "default", "index", "nothing"
}

// Check compares the templates with the tables in the database behind
// conn (the site's own): a template column the table lacks gives a
// *[TemplateError] listing all of them. It also returns the templates that
// need REPLICA IDENTITY FULL on this database to invalidate old values.
// A table missing from the database is skipped: apply reports it.
func (k *Keys) Check(ctx context.Context, conn *pgx.Conn, site string) ([]IdentityWarning, error) {
	terr := &TemplateError{Site: site}
	var warnings []IdentityWarning
	for _, t := range k.tables {
		cols, ident, key, found, err := describe(ctx, conn, t)
		if err != nil {
			return nil, err
		}
		if !found {
			continue
		}
		for i, tpl := range t.templates {
			for _, c := range tpl.Columns() {
				switch {
				case !slices.Contains(cols, c):
					terr.Problems = append(terr.Problems, TemplateProblem{
						Table: t.Name, Index: i, Template: tpl.String(), Column: c, Columns: cols})
				case ident != "f" && !slices.Contains(key, c):
					warnings = append(warnings, IdentityWarning{Table: t.Name, Template: tpl.String(), Column: c, Identity: identityName(ident)})
				}
			}
		}
	}
	if len(terr.Problems) > 0 {
		return warnings, terr
	}
	return warnings, nil
}

func identityName(ident string) string {
	switch ident {
	case "d":
		return "default"
	case "i":
		return "index"
	case "n":
		return "nothing"
	case "f":
		return "full"
	}
	return ident
}

// describe reads a table's columns, its replica identity setting and the
// columns of that identity.
func describe(ctx context.Context, conn *pgx.Conn, t *table) (cols []string, ident string, key []string, found bool, err error) {
	name := pgx.Identifier{t.Schema, t.Rel}.Sanitize()
	err = conn.QueryRow(ctx, `SELECT c.relreplident::text,
			ARRAY(SELECT a.attname::text FROM pg_attribute a
			       WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum),
			ARRAY(SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
			       WHERE i.indrelid = c.oid
			         AND CASE c.relreplident WHEN 'd' THEN i.indisprimary WHEN 'i' THEN i.indisreplident ELSE false END)
		FROM pg_class c WHERE c.oid = to_regclass($1)`, name).Scan(&ident, &cols, &key)
	if isNoRows(err) {
		return nil, "", nil, false, nil
	}
	if err != nil {
		return nil, "", nil, false, fmt.Errorf("read the columns of %s: %w", t.Name, err)
	}
	return cols, ident, key, true, nil
}
