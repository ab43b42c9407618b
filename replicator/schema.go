package replicator

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
)

// TableDef is a table's definition as read from a database's catalog:
// what `xdcr sync` needs to create it elsewhere and to compare it.
type TableDef struct {
	Table      Table
	Columns    []ColumnDef
	PrimaryKey []string // column names, in key order; empty without a key
	// Constraints are the primary key and unique constraints
	// (pg_get_constraintdef), by name.
	Constraints []NamedDef
	// Indexes are the other indexes (pg_get_indexdef).
	Indexes []NamedDef
	// Sequences are the sequences the table's columns own (serial and
	// identity columns), with their parameters.
	Sequences []SequenceDef
	// Enums are the enum types its columns use that live outside
	// pg_catalog, with their labels.
	Enums []EnumDef
	// Identity is the replica identity (change.Identity*).
	Identity byte
}

// ColumnDef is one column of a TableDef.
type ColumnDef struct {
	Name      string
	Type      string // format_type, schema-qualified outside pg_catalog
	NotNull   bool
	Default   string // expression, or ""
	Identity  bool   // GENERATED … AS IDENTITY
	Generated string // the expression of a stored generated column, or ""
	Collation string // a non-default collation, or ""
}

// NamedDef is a named piece of DDL.
type NamedDef struct{ Name, Def string }

// SequenceDef is a sequence a column owns.
type SequenceDef struct {
	Name                   string // schema-qualified, quoted
	Type                   string
	Start, Increment       int64
	Min, Max, Cache        int64
	Cycle                  bool
	OwnedByColumn          string
	IdentityColumnSequence bool
}

// EnumDef is an enum type and its labels in order.
type EnumDef struct {
	Name   string // schema-qualified, quoted
	Labels []string
}

// CopyColumns are the columns COPY moves: all but generated ones.
func (d *TableDef) CopyColumns() []string {
	var out []string
	for _, c := range d.Columns {
		if c.Generated == "" {
			out = append(out, c.Name)
		}
	}
	return out
}

// ReadTableDef reads t's definition through conn, whose search_path must be
// pg_catalog (see ConnectMeta) so that type names come out qualified.
// found is false when the table does not exist.
func ReadTableDef(ctx context.Context, conn *pgx.Conn, t Table) (def *TableDef, found bool, err error) {
	var (
		oid   uint32
		ident string
	)
	err = conn.QueryRow(ctx, `SELECT c.oid, c.relreplident::text FROM pg_class c WHERE c.oid = to_regclass($1)`, t.Quoted()).
		Scan(&oid, &ident)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("read %s: %w", t, err)
	}
	def = &TableDef{Table: t, Identity: ident[0]}
	rows, err := conn.Query(ctx, `SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
			coalesce(CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END, ''),
			a.attidentity <> '',
			coalesce(CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END, ''),
			coalesce((SELECT quote_ident(n.nspname) || '.' || quote_ident(co.collname) FROM pg_collation co
				JOIN pg_namespace n ON n.oid = co.collnamespace
				WHERE co.oid = a.attcollation AND a.attcollation <> t.typcollation), '')
		FROM pg_attribute a
		JOIN pg_type t ON t.oid = a.atttypid
		LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
		WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
		ORDER BY a.attnum`, oid)
	if err != nil {
		return nil, false, fmt.Errorf("read columns of %s: %w", t, err)
	}
	for rows.Next() {
		var c ColumnDef
		if err := rows.Scan(&c.Name, &c.Type, &c.NotNull, &c.Default, &c.Identity, &c.Generated, &c.Collation); err != nil {
			return nil, false, fmt.Errorf("read columns of %s: %w", t, err)
		}
		def.Columns = append(def.Columns, c)
	}
	if err := rows.Err(); err != nil {
		return nil, false, fmt.Errorf("read columns of %s: %w", t, err)
	}
	pk, err := queryStrings(ctx, conn, `SELECT a.attname FROM pg_index i
		CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
		JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
		WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord`, oid)
	if err != nil {
		return nil, false, fmt.Errorf("read the primary key of %s: %w", t, err)
	}
	def.PrimaryKey = pk
	if def.Constraints, err = queryNamed(ctx, conn, `SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
		WHERE conrelid = $1 AND contype IN ('p', 'u') ORDER BY contype, conname`, oid); err != nil {
		return nil, false, fmt.Errorf("read the constraints of %s: %w", t, err)
	}
	if def.Indexes, err = queryNamed(ctx, conn, `SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i
		JOIN pg_class c ON c.oid = i.indexrelid
		WHERE i.indrelid = $1 AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid AND k.conrelid = i.indrelid)
		ORDER BY c.relname`, oid); err != nil {
		return nil, false, fmt.Errorf("read the indexes of %s: %w", t, err)
	}
	if err := readSequences(ctx, conn, oid, def); err != nil {
		return nil, false, fmt.Errorf("read the sequences of %s: %w", t, err)
	}
	if err := readEnums(ctx, conn, oid, def); err != nil {
		return nil, false, fmt.Errorf("read the enum types of %s: %w", t, err)
	}
	return def, true, nil
}

func readSequences(ctx context.Context, conn *pgx.Conn, oid uint32, def *TableDef) error {
	rows, err := conn.Query(ctx, `SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), format_type(s.seqtypid, NULL),
			s.seqstart, s.seqincrement, s.seqmin, s.seqmax, s.seqcache, s.seqcycle, a.attname, d.deptype = 'i'
		FROM pg_depend d
		JOIN pg_class c ON c.oid = d.objid AND c.relkind = 'S'
		JOIN pg_namespace n ON n.oid = c.relnamespace
		JOIN pg_sequence s ON s.seqrelid = c.oid
		JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
		WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass AND d.refobjid = $1
			AND d.deptype IN ('a', 'i')
		ORDER BY 1`, oid)
	if err != nil {
		return err
	}
	for rows.Next() {
		var s SequenceDef
		if err := rows.Scan(&s.Name, &s.Type, &s.Start, &s.Increment, &s.Min, &s.Max, &s.Cache, &s.Cycle,
			&s.OwnedByColumn, &s.IdentityColumnSequence); err != nil {
			return err
		}
		def.Sequences = append(def.Sequences, s)
	}
	return rows.Err()
}

func readEnums(ctx context.Context, conn *pgx.Conn, oid uint32, def *TableDef) error {
	rows, err := conn.Query(ctx, `SELECT DISTINCT quote_ident(n.nspname) || '.' || quote_ident(t.typname), t.oid
		FROM pg_attribute a
		JOIN pg_type at ON at.oid = a.atttypid
		JOIN pg_type t ON t.oid = CASE WHEN at.typelem <> 0 AND at.typlen = -1 THEN at.typelem ELSE at.oid END
		JOIN pg_namespace n ON n.oid = t.typnamespace
		WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND t.typtype = 'e'
		ORDER BY 1`, oid)
	if err != nil {
		return err
	}
	type enum struct {
		name string
		oid  uint32
	}
	var enums []enum
	for rows.Next() {
		var e enum
		if err := rows.Scan(&e.name, &e.oid); err != nil {
			return err
		}
		enums = append(enums, e)
	}
	if err := rows.Err(); err != nil {
		return err
	}
	for _, e := range enums {
		labels, err := queryStrings(ctx, conn, `SELECT enumlabel FROM pg_enum WHERE enumtypid = $1 ORDER BY enumsortorder`, e.oid)
		if err != nil {
			return err
		}
		def.Enums = append(def.Enums, EnumDef{Name: e.name, Labels: labels})
	}
	return nil
}

func queryStrings(ctx context.Context, conn *pgx.Conn, sql string, args ...any) ([]string, error) {
	rows, err := conn.Query(ctx, sql, args...)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

func queryNamed(ctx context.Context, conn *pgx.Conn, sql string, args ...any) ([]NamedDef, error) {
	rows, err := conn.Query(ctx, sql, args...)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (NamedDef, error) {
		var d NamedDef
		err := r.Scan(&d.Name, &d.Def)
		return d, err
	})
}

// CreateStatements returns the DDL that creates the table on another
// database, split so that the bulk copy can run between them: before
// creates the enum types and sequences it needs (if missing) and the table
// with its columns; after adds the primary key, unique constraints and
// indexes, and sets the replica identity.
func (d *TableDef) CreateStatements() (before, after []string) {
	for _, e := range d.Enums {
		labels := make([]string, len(e.Labels))
		for i, l := range e.Labels {
			labels[i] = quoteLiteral(l)
		}
		// CREATE TYPE has no IF NOT EXISTS
		before = append(before, fmt.Sprintf(`DO $$ BEGIN CREATE TYPE %s AS ENUM (%s); EXCEPTION WHEN duplicate_object THEN NULL; END $$`,
			e.Name, strings.Join(labels, ", ")))
	}
	for _, s := range d.Sequences {
		if s.IdentityColumnSequence {
			continue // created with the identity column
		}
		cycle := "NO CYCLE"
		if s.Cycle {
			cycle = "CYCLE"
		}
		before = append(before, fmt.Sprintf("CREATE SEQUENCE IF NOT EXISTS %s AS %s INCREMENT %d MINVALUE %d MAXVALUE %d START %d CACHE %d %s",
			s.Name, s.Type, s.Increment, s.Min, s.Max, s.Start, s.Cache, cycle))
	}
	var cols []string
	for _, c := range d.Columns {
		col := pgx.Identifier{c.Name}.Sanitize() + " " + c.Type
		if c.Collation != "" {
			col += " COLLATE " + c.Collation
		}
		switch {
		case c.Generated != "":
			col += " GENERATED ALWAYS AS (" + c.Generated + ") STORED"
		case c.Identity:
			// BY DEFAULT: the replica receives the values from the primary
			col += " GENERATED BY DEFAULT AS IDENTITY"
		case c.Default != "":
			col += " DEFAULT " + c.Default
		}
		if c.NotNull {
			col += " NOT NULL"
		}
		cols = append(cols, col)
	}
	before = append(before, fmt.Sprintf("CREATE TABLE %s (\n\t%s\n)", d.Table.Quoted(), strings.Join(cols, ",\n\t")))
	for _, s := range d.Sequences {
		if !s.IdentityColumnSequence {
			before = append(before, fmt.Sprintf("ALTER SEQUENCE %s OWNED BY %s.%s", s.Name, d.Table.Quoted(), pgx.Identifier{s.OwnedByColumn}.Sanitize()))
		}
	}
	for _, c := range d.Constraints {
		after = append(after, fmt.Sprintf("ALTER TABLE %s ADD CONSTRAINT %s %s", d.Table.Quoted(), pgx.Identifier{c.Name}.Sanitize(), c.Def))
	}
	for _, ix := range d.Indexes {
		after = append(after, ifNotExists(ix.Def))
	}
	switch d.Identity {
	case 'f':
		after = append(after, fmt.Sprintf("ALTER TABLE %s REPLICA IDENTITY FULL", d.Table.Quoted()))
	}
	return before, after
}

func ifNotExists(indexDef string) string {
	for _, p := range []string{"CREATE UNIQUE INDEX ", "CREATE INDEX "} {
		if strings.HasPrefix(indexDef, p) {
			return p + "IF NOT EXISTS " + strings.TrimPrefix(indexDef, p)
		}
	}
	return indexDef
}

func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// SchemaDiff is one way a replica's table differs from the primary's.
type SchemaDiff struct {
	Column  string // empty for table-level differences
	Problem string
	Fix     string
}

// Diff compares a replica's table (d) with the primary's (src): every
// source column must exist with the same type and the primary key must be
// the same. Columns only the replica has are fine when they can be left to
// their defaults.
func (d *TableDef) Diff(src *TableDef, site string) []SchemaDiff {
	var out []SchemaDiff
	have := make(map[string]ColumnDef, len(d.Columns))
	for _, c := range d.Columns {
		have[c.Name] = c
	}
	want := make(map[string]bool, len(src.Columns))
	for _, c := range src.Columns {
		want[c.Name] = true
		h, ok := have[c.Name]
		switch {
		case !ok:
			out = append(out, SchemaDiff{Column: c.Name,
				Problem: fmt.Sprintf("is %s on the primary, missing on %s", c.Type, site),
				Fix:     fmt.Sprintf("ALTER TABLE %s ADD COLUMN %s %s", d.Table.Quoted(), pgx.Identifier{c.Name}.Sanitize(), c.Type)})
		case h.Type != c.Type:
			out = append(out, SchemaDiff{Column: c.Name,
				Problem: fmt.Sprintf("is %s on the primary but %s on %s", c.Type, h.Type, site),
				Fix:     fmt.Sprintf("ALTER TABLE %s ALTER COLUMN %s TYPE %s", d.Table.Quoted(), pgx.Identifier{c.Name}.Sanitize(), c.Type)})
		case (h.Generated == "") != (c.Generated == ""):
			out = append(out, SchemaDiff{Column: c.Name,
				Problem: fmt.Sprintf("is generated on one side only (%s)", site),
				Fix:     "make it a generated column on both sides, or on neither"})
		}
	}
	for _, c := range d.Columns {
		if !want[c.Name] && c.NotNull && c.Default == "" && !c.Identity && c.Generated == "" {
			out = append(out, SchemaDiff{Column: c.Name,
				Problem: fmt.Sprintf("exists only on %s, NOT NULL without a default: rows from the primary cannot fill it", site),
				Fix:     fmt.Sprintf("ALTER TABLE %s ALTER COLUMN %s DROP NOT NULL (or give it a default)", d.Table.Quoted(), pgx.Identifier{c.Name}.Sanitize())})
		}
	}
	if !slices.Equal(d.PrimaryKey, src.PrimaryKey) {
		out = append(out, SchemaDiff{
			Problem: fmt.Sprintf("primary key is (%s) on the primary but (%s) on %s",
				strings.Join(src.PrimaryKey, ", "), strings.Join(d.PrimaryKey, ", "), site),
			Fix: fmt.Sprintf("give %s on %s the primary key (%s)", d.Table, site, strings.Join(src.PrimaryKey, ", "))})
	}
	return out
}
