package cache

import (
	"fmt"
	"log/slog"
	"slices"
	"sync"

	"github.com/xdcr/xdcr/replicator/change"
)

// Table is one cached table, as the config describes it.
type Table struct {
	// Name is the table as the config writes it (normalized:
	// public.accounts, "Ledger"."Entries"). Invalidations, outbox rows and
	// events name tables this way.
	Name string
	// Schema and Rel are the unquoted schema and table names, as change
	// records carry them.
	Schema, Rel string
	// Keys are the key templates, e.g. "account:{id}".
	Keys []string
	// Warm is the optional query whose rows `xdcr cache rebuild` stores.
	Warm string
}

// table is a Table with its templates compiled.
type table struct {
	Table
	templates []Template
	columns   []string // every template column once, in order of appearance
}

// Keys computes which cache keys row changes make stale. It implements the
// seam apply calls inside every target transaction, so it does no I/O. It
// is safe for concurrent use.
//
// The rules (docs/cache.md):
//   - insert: the keys of the new row;
//   - update: the keys of the old row and of the new row;
//   - delete: the keys of the old row;
//   - truncate: a flush of the table's keys.
//
// A key is built from the values in PostgreSQL's text form; a NULL in any of
// its columns means the row has no such key. PostgreSQL sends the old
// values of the replica identity only (the primary key, or every column
// with REPLICA IDENTITY FULL), so a template over another column gets its
// old value from nowhere: an update then invalidates the new value's key
// only, and a delete cannot build the key at all. Keys warns once per
// template when that happens. When a key's value cannot be known at all (a
// column the relation lacks, a TOASTed value the source did not send, a
// binary value) the whole table is flushed instead.
type Keys struct {
	log    *slog.Logger
	tables []*table
	byRel  map[[2]string]*table // by schema and table name
	byName map[string]*table    // by Table.Name

	mu     sync.Mutex
	warned map[string]bool
}

// resolved is a table's templates resolved against one source relation.
type resolved struct {
	t *table
	// idx holds, per template, the relation's column index of each
	// placeholder; nil when a column is missing from the relation.
	idx [][]int
	rel *change.Relation
}

// NewKeys compiles the templates of tables. log receives the warnings of
// Invalidations.
func NewKeys(tables []Table, log *slog.Logger) (*Keys, error) {
	k := &Keys{
		log:    log,
		byRel:  make(map[[2]string]*table),
		byName: make(map[string]*table),
		warned: make(map[string]bool),
	}
	for _, tb := range tables {
		t := &table{Table: tb}
		t.Keys = slices.Clone(tb.Keys)
		for i, text := range tb.Keys {
			tpl, err := Compile(text)
			if err != nil {
				return nil, fmt.Errorf("cache.%s[%d]: template %q %w", tb.Name, i, text, err)
			}
			t.templates = append(t.templates, tpl)
			for _, c := range tpl.Columns() {
				if !slices.Contains(t.columns, c) {
					t.columns = append(t.columns, c)
				}
			}
		}
		if len(t.templates) == 0 {
			return nil, fmt.Errorf("cache.%s: no key templates", tb.Name)
		}
		rk := [2]string{tb.Schema, tb.Rel}
		if _, dup := k.byRel[rk]; dup {
			return nil, fmt.Errorf("cache.%s: table listed twice", tb.Name)
		}
		k.byRel[rk] = t
		k.byName[tb.Name] = t
		k.tables = append(k.tables, t)
	}
	return k, nil
}

// Tables returns the cached tables, in the order given to NewKeys.
func (k *Keys) Tables() []Table {
	out := make([]Table, len(k.tables))
	for i, t := range k.tables {
		out[i] = t.Table
	}
	return out
}

// Table returns the cached table called name (as in the config).
func (k *Keys) Table(name string) (Table, bool) {
	t, ok := k.byName[name]
	if !ok {
		return Table{}, false
	}
	return t.Table, true
}

func (k *Keys) table(name string) *table { return k.byName[name] }

// Invalidations returns what changes (the changes of one source
// transaction, or of one chunk of it) make stale: one entry per table and
// operation, in order of first appearance, each key listed once. It
// returns nil when no cached table changed.
func (k *Keys) Invalidations(changes []change.Change) []change.Invalidation {
	var (
		acc  accumulator
		rels map[*change.Relation]*resolved // the changes of a batch share relations
	)
	for i := range changes {
		c := &changes[i]
		if c.Op == change.Truncate {
			for _, r := range c.Truncated {
				if t := k.byRel[[2]string{r.Schema, r.Name}]; t != nil {
					acc.flush(t.Name, "truncate")
				}
			}
			continue
		}
		if c.Rel == nil {
			continue
		}
		r, ok := rels[c.Rel]
		if !ok {
			r = k.resolve(c.Rel)
			if rels == nil {
				rels = make(map[*change.Relation]*resolved)
			}
			rels[c.Rel] = r
		}
		if r != nil {
			k.change(&acc, r, c)
		}
	}
	return acc.out
}

// resolve finds the cached table of rel and maps its template columns to
// the relation's columns; nil when rel is not cached.
func (k *Keys) resolve(rel *change.Relation) *resolved {
	t := k.byRel[[2]string{rel.Schema, rel.Name}]
	if t == nil {
		return nil
	}
	r := &resolved{t: t, rel: rel, idx: make([][]int, len(t.templates))}
	for i, tpl := range t.templates {
		idx := make([]int, len(tpl.Columns()))
		for j, col := range tpl.Columns() {
			idx[j] = slices.IndexFunc(rel.Columns, func(c change.Column) bool { return c.Name == col })
			if idx[j] < 0 {
				k.warn("missing:"+t.Name+":"+col, "a cache template names a column the replicated table lacks; its changes flush every key of the table",
					"table", t.Name, "template", tpl.String(), "column", col)
				idx = nil
				break
			}
		}
		r.idx[i] = idx
	}
	return r
}

// warn logs msg the first time it is called with once.
func (k *Keys) warn(once, msg string, args ...any) {
	k.mu.Lock()
	first := !k.warned[once]
	k.warned[once] = true
	k.mu.Unlock()
	if first {
		k.log.Warn(msg, args...)
	}
}

// valueState says what is known of one column value.
type valueState uint8

const (
	known   valueState = iota // the value is in the change
	null                      // SQL NULL: the row has no such key
	unknown                   // cannot be known: flush the table
	notSent                   // an old value outside the replica identity
)

// newValue is column col of the row after the change.
func newValue(c *change.Change, rel *change.Relation, col int) (string, valueState) {
	if col >= len(c.New) {
		return "", unknown
	}
	switch v := c.New[col]; v.Kind {
	case change.Text:
		return string(v.Data), known
	case change.Null:
		return "", null
	case change.Unchanged:
		// a TOASTed value the update left alone: old and new are the same,
		// so the old row has it if the identity carries it
		if c.Old != nil && col < len(c.Old) && rel.Columns[col].Key {
			if o := c.Old[col]; o.Kind == change.Text {
				return string(o.Data), known
			}
		}
	}
	return "", unknown
}

// oldValue is column col of the row before the change.
func oldValue(c *change.Change, rel *change.Relation, col int) (string, valueState) {
	key := col < len(rel.Columns) && rel.Columns[col].Key
	switch {
	case c.Old == nil && c.Op == change.Update && key:
		// an update that left the identity alone: the old key columns are
		// the new ones
		return newValue(c, rel, col)
	case c.Old == nil || !key:
		return "", notSent
	case col >= len(c.Old):
		return "", unknown
	}
	switch v := c.Old[col]; v.Kind {
	case change.Text:
		return string(v.Data), known
	case change.Null:
		return "", null
	case change.Unchanged:
		if c.Op == change.Update {
			return newValue(c, rel, col)
		}
	}
	return "", unknown
}

// change adds the keys of one row change.
func (k *Keys) change(acc *accumulator, r *resolved, c *change.Change) {
	t, op := r.t, c.Op.String()
	for i, tpl := range t.templates {
		idx := r.idx[i]
		if idx == nil {
			acc.flush(t.Name, op) // a column the relation lacks
			continue
		}
		var sides []func(*change.Change, *change.Relation, int) (string, valueState)
		switch c.Op {
		case change.Insert:
			sides = append(sides, newValue)
		case change.Update:
			sides = append(sides, oldValue, newValue)
		case change.Delete:
			sides = append(sides, oldValue)
		default:
			continue
		}
		for _, side := range sides {
			var notSentCol string
			key, st := render(tpl, idx, func(col int) (string, valueState) {
				v, st := side(c, r.rel, col)
				if st != notSent {
					return v, st
				}
				notSentCol = r.rel.Columns[col].Name
				if c.Op == change.Update {
					// the rule without REPLICA IDENTITY FULL: the old key
					// is taken to be the new one
					k.warnIdentity(t, tpl, notSentCol)
					return newValue(c, r.rel, col)
				}
				return v, st
			})
			switch st {
			case known:
				acc.key(t.Name, op, key)
			case notSent:
				k.warnIdentity(t, tpl, notSentCol)
			case unknown:
				k.warn("unknown:"+t.Name+":"+tpl.String(),
					"a cache key could not be built from a change (an unsent TOAST value or a binary value); its changes flush every key of the table",
					"table", t.Name, "template", tpl.String(), "op", op)
				acc.flush(t.Name, op)
			}
		}
	}
}

func (k *Keys) warnIdentity(t *table, tpl Template, col string) {
	k.warn("identity:"+t.Name+":"+tpl.String(),
		"a cache template uses a column outside the replica identity of its table: without REPLICA IDENTITY FULL on the primary, "+
			"updates invalidate only the key of the new value and deletes cannot invalidate the key",
		"table", t.Name, "template", tpl.String(), "column", col,
		"fix", "ALTER TABLE "+t.Name+" REPLICA IDENTITY FULL on the primary (and on every site that may become primary)")
}

// render builds tpl's key from the values value returns for the columns
// idx; its state is the worst of the values' (unknown over notSent over
// null).
func render(tpl Template, idx []int, value func(col int) (string, valueState)) (string, valueState) {
	vals := make([]string, len(idx))
	worst := known
	for j, col := range idx {
		v, st := value(col)
		vals[j] = v
		if rank(st) > rank(worst) {
			worst = st
		}
	}
	if worst != known {
		return "", worst
	}
	return tpl.Render(vals), known
}

func rank(s valueState) int {
	switch s {
	case null:
		return 1
	case notSent:
		return 2
	case unknown:
		return 3
	}
	return 0
}

// accumulator collects invalidations per table and operation.
type accumulator struct {
	out  []change.Invalidation
	at   map[[2]string]int             // (table, op) → index in out
	seen map[[2]string]map[string]bool // keys per entry
}

func (a *accumulator) entry(table, op string) *change.Invalidation {
	id := [2]string{table, op}
	if i, ok := a.at[id]; ok {
		return &a.out[i]
	}
	if a.at == nil {
		a.at = make(map[[2]string]int)
		a.seen = make(map[[2]string]map[string]bool)
	}
	a.at[id] = len(a.out)
	a.seen[id] = make(map[string]bool)
	a.out = append(a.out, change.Invalidation{Table: table, Op: op})
	return &a.out[len(a.out)-1]
}

func (a *accumulator) key(table, op, key string) {
	e := a.entry(table, op)
	seen := a.seen[[2]string{table, op}]
	if seen[key] {
		return
	}
	seen[key] = true
	e.Keys = append(e.Keys, key)
}

func (a *accumulator) flush(table, op string) {
	a.entry(table, op).Flush = true
}
