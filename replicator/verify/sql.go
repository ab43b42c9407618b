package verify

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/xdcr/xdcr/replicator"
)

// table is a replicated table as the primary defines it: the columns that
// are compared and the key rows are ordered and found by.
type table struct {
	name     replicator.Table
	columns  []string // every stored column, in attnum order
	keys     []string // primary key or replica identity index columns; none for a keyless table
	keyTypes []string // format_type of each key column, schema-qualified
	identity string   // where the key comes from, for messages: "primary key", "replica identity index …"
}

// keyless reports whether rows can only be compared as a whole table.
func (t *table) keyless() bool { return len(t.keys) == 0 }

// describeTable reads t's definition from the primary. conn's search_path
// is pg_catalog only, so format_type qualifies every type outside it.
func describeTable(ctx context.Context, conn *pgx.Conn, name replicator.Table) (*table, error) {
	t := &table{name: name}
	var (
		oid       *uint32
		replident string
	)
	err := conn.QueryRow(ctx, `SELECT c.oid, c.relreplident::text FROM pg_class c WHERE c.oid = to_regclass($1)`,
		name.Quoted()).Scan(&oid, &replident)
	if errors.Is(err, pgx.ErrNoRows) || (err == nil && oid == nil) {
		return nil, fmt.Errorf("table %s does not exist on the primary", name)
	}
	if err != nil {
		return nil, fmt.Errorf("read the definition of %s on the primary: %w", name, err)
	}
	rows, err := conn.Query(ctx, `SELECT attname FROM pg_attribute
		WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
		ORDER BY attnum`, *oid)
	if err != nil {
		return nil, fmt.Errorf("read the columns of %s on the primary: %w", name, err)
	}
	if t.columns, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
		return nil, fmt.Errorf("read the columns of %s on the primary: %w", name, err)
	}
	// The primary key, or else the replica identity index: the columns
	// apply finds rows by.
	for _, which := range []struct{ cond, what string }{
		{"i.indisprimary", "primary key"},
		{"i.indisreplident", "replica identity index"},
	} {
		rows, err := conn.Query(ctx, `SELECT a.attname, format_type(a.atttypid, a.atttypmod)
			FROM pg_index i
			CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
			JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
			WHERE i.indrelid = $1 AND `+which.cond+` ORDER BY k.n`, *oid)
		if err != nil {
			return nil, fmt.Errorf("read the key of %s on the primary: %w", name, err)
		}
		for rows.Next() {
			var col, typ string
			if err := rows.Scan(&col, &typ); err != nil {
				return nil, fmt.Errorf("read the key of %s on the primary: %w", name, err)
			}
			t.keys, t.keyTypes = append(t.keys, col), append(t.keyTypes, typ)
		}
		if err := rows.Err(); err != nil {
			return nil, fmt.Errorf("read the key of %s on the primary: %w", name, err)
		}
		if len(t.keys) > 0 {
			t.identity = which.what
			break
		}
	}
	if t.keyless() {
		t.identity = "no key (replica identity " + map[string]string{"f": "full", "n": "nothing", "d": "default"}[replident] + ")"
	}
	return t, nil
}

// missingColumns returns the columns of t the replica's table lacks, and
// whether the replica has the table at all.
func missingColumns(ctx context.Context, conn *pgx.Conn, t *table) (missing []string, exists bool, err error) {
	rows, err := conn.Query(ctx, `SELECT attname FROM pg_attribute
		WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped`, t.name.Quoted())
	if err != nil {
		return nil, false, err
	}
	have, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, false, err
	}
	if len(have) == 0 {
		return nil, false, nil
	}
	set := make(map[string]bool, len(have))
	for _, c := range have {
		set[c] = true
	}
	for _, c := range t.columns {
		if !set[c] {
			missing = append(missing, c)
		}
	}
	return missing, true, nil
}

// The SQL below reads the table under the alias t. Values are compared in
// their text forms under the same session settings on both sides; keys
// travel as text and are cast back to the primary's key types, so ranges
// and lookups use the key's btree index on either side.

func (t *table) from() string { return t.name.Quoted() + " t" }

// rowHash is the md5 of the row's text form over the primary's columns, in
// the primary's order: columns only the replica has are left out.
func (t *table) rowHash() string {
	cols := make([]string, len(t.columns))
	for i, c := range t.columns {
		cols[i] = "t." + pgx.Identifier{c}.Sanitize()
	}
	return "md5(ROW(" + strings.Join(cols, ", ") + ")::text)"
}

// keyOrder is the key columns, for ORDER BY.
func (t *table) keyOrder() string {
	cols := make([]string, len(t.keys))
	for i, c := range t.keys {
		cols[i] = "t." + pgx.Identifier{c}.Sanitize()
	}
	return strings.Join(cols, ", ")
}

// keyText selects the key columns as text.
func (t *table) keyText() string {
	cols := make([]string, len(t.keys))
	for i, c := range t.keys {
		cols[i] = "t." + pgx.Identifier{c}.Sanitize() + "::text AS k" + strconv.Itoa(i)
	}
	return strings.Join(cols, ", ")
}

// keyTuple is the key columns as one comparable value: t."id", or a row
// value (t."a", t."b") for a composite key.
func (t *table) keyTuple() string {
	if len(t.keys) == 1 {
		return t.keyOrder()
	}
	return "(" + t.keyOrder() + ")"
}

// keyValue appends k's parts to args and returns the matching SQL value.
func (t *table) keyValue(k Key, args []any) (string, []any) {
	vals := make([]string, len(k))
	for i, v := range k {
		args = append(args, v)
		vals[i] = "CAST($" + strconv.Itoa(len(args)) + "::text AS " + t.keyTypes[i] + ")"
	}
	if len(vals) == 1 {
		return vals[0], args
	}
	return "(" + strings.Join(vals, ", ") + ")", args
}

// where is the condition for r; composite keys compare as row values,
// which is the key's index order.
func (t *table) where(r Range, args []any) (string, []any) {
	var conds []string
	if r.From != nil {
		v, a := t.keyValue(r.From, args)
		conds, args = append(conds, t.keyTuple()+" >= "+v), a
	}
	if r.To != nil {
		v, a := t.keyValue(r.To, args)
		conds, args = append(conds, t.keyTuple()+" < "+v), a
	}
	if len(conds) == 0 {
		return "true", args
	}
	return strings.Join(conds, " AND "), args
}

// digestSQL counts the rows of r and sums their hashes: two 64-bit halves
// of each md5, summed as numeric so nothing overflows, and xmin. No sort
// and no aggregate string, so a whole large table is one sequential scan.
func (t *table) digestSQL(r Range) (string, []any) {
	cond, args := t.where(r, nil)
	return `SELECT count(*),
	coalesce(sum(('x' || substr(h, 1, 16))::bit(64)::int8), 0)::text,
	coalesce(sum(('x' || substr(h, 17, 16))::bit(64)::int8), 0)::text,
	coalesce(sum(x::text::int8), 0)::text
FROM (SELECT ` + t.rowHash() + ` AS h, t.xmin AS x FROM ` + t.from() + ` WHERE ` + cond + `) s`, args
}

// splitSQL returns the keys at rows every+1, 2·every+1, … of r.
func (t *table) splitSQL(r Range, every int64) (string, []any) {
	cond, args := t.where(r, nil)
	args = append(args, every)
	n := "$" + strconv.Itoa(len(args))
	cols := make([]string, len(t.keys))
	for i := range t.keys {
		cols[i] = "k" + strconv.Itoa(i)
	}
	return `SELECT ` + strings.Join(cols, ", ") + ` FROM (SELECT ` + t.keyText() + `, row_number() OVER (ORDER BY ` + t.keyOrder() + `) AS rn
	FROM ` + t.from() + ` WHERE ` + cond + `) s
WHERE rn % ` + n + ` = 1 AND rn > 1 ORDER BY rn`, args
}

// rowsSQL returns key and hash of up to limit rows of r.
func (t *table) rowsSQL(r Range, limit int) (string, []any) {
	cond, args := t.where(r, nil)
	args = append(args, limit)
	return `SELECT ` + t.keyText() + `, ` + t.rowHash() + `, '' FROM ` + t.from() + ` WHERE ` + cond +
		` ORDER BY ` + t.keyOrder() + ` LIMIT $` + strconv.Itoa(len(args)), args
}

// lookupSQL returns key, hash and xmin of the rows with the given keys.
func (t *table) lookupSQL(keys []Key) (string, []any) {
	var args []any
	vals := make([]string, len(keys))
	for i, k := range keys {
		vals[i], args = t.keyValue(k, args)
	}
	return `SELECT ` + t.keyText() + `, ` + t.rowHash() + `, t.xmin::text FROM ` + t.from() +
		` WHERE ` + t.keyTuple() + ` IN (` + strings.Join(vals, ", ") + `)`, args
}

// lookupBatch bounds the keys of one lookup statement.
const lookupBatch = 500

// querier is a connection or a transaction.
type querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// pgReader is a [reader] over one snapshot (or, for split points, plain
// reads).
type pgReader struct {
	q    querier
	t    *table
	side string // "primary" or the replica's site, for errors
}

func (s *pgReader) digest(ctx context.Context, r Range) (digest, error) {
	sql, args := s.t.digestSQL(r)
	var d digest
	var lo, hi string
	if err := s.q.QueryRow(ctx, sql, args...).Scan(&d.rows, &lo, &hi, &d.versions); err != nil {
		return digest{}, fmt.Errorf("hash %s on %s: %w", s.t.name, s.side, err)
	}
	d.sum = lo + "/" + hi
	return d, nil
}

func (s *pgReader) rows(ctx context.Context, r Range, limit int) ([]row, error) {
	sql, args := s.t.rowsSQL(r, limit)
	out, err := s.collect(ctx, sql, args)
	if err != nil {
		return nil, fmt.Errorf("read rows of %s on %s: %w", s.t.name, s.side, err)
	}
	return out, nil
}

func (s *pgReader) lookup(ctx context.Context, keys []Key) (map[string]row, error) {
	out := make(map[string]row, len(keys))
	for len(keys) > 0 {
		n := min(len(keys), lookupBatch)
		sql, args := s.t.lookupSQL(keys[:n])
		rows, err := s.collect(ctx, sql, args)
		if err != nil {
			return nil, fmt.Errorf("look up rows of %s on %s: %w", s.t.name, s.side, err)
		}
		for _, r := range rows {
			out[r.key.id()] = r
		}
		keys = keys[n:]
	}
	return out, nil
}

// collect reads rows of (key columns…, hash, version).
func (s *pgReader) collect(ctx context.Context, sql string, args []any) ([]row, error) {
	rows, err := s.q.Query(ctx, sql, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []row
	nk := len(s.t.keys)
	for rows.Next() {
		r := row{key: make(Key, nk)}
		dest := make([]any, nk+2)
		for i := range r.key {
			dest[i] = &r.key[i]
		}
		dest[nk], dest[nk+1] = &r.hash, &r.version
		if err := rows.Scan(dest...); err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

func (s *pgReader) splitPoints(ctx context.Context, r Range, every int64) ([]Key, error) {
	sql, args := s.t.splitSQL(r, every)
	rows, err := s.q.Query(ctx, sql, args...)
	if err != nil {
		return nil, fmt.Errorf("split %s on %s: %w", s.t.name, s.side, err)
	}
	defer rows.Close()
	var out []Key
	for rows.Next() {
		k := make(Key, len(s.t.keys))
		dest := make([]any, len(k))
		for i := range k {
			dest[i] = &k[i]
		}
		if err := rows.Scan(dest...); err != nil {
			return nil, fmt.Errorf("split %s on %s: %w", s.t.name, s.side, err)
		}
		out = append(out, k)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("split %s on %s: %w", s.t.name, s.side, err)
	}
	return out, nil
}
