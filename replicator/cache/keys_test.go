package cache

import (
	"bytes"
	"log/slog"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/xdcr/xdcr/replicator/change"
)

// syncBuffer is a log sink for tests.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func txt(s string) change.Value { return change.Value{Kind: change.Text, Data: []byte(s)} }

var (
	nullv     = change.Value{Kind: change.Null}
	unchanged = change.Value{Kind: change.Unchanged}
)

// accounts is public.accounts as pgoutput describes it: id is the primary
// key (the replica identity).
var accounts = &change.Relation{Schema: "public", Name: "accounts", Identity: change.IdentityDefault, Columns: []change.Column{
	{Name: "id", Key: true}, {Name: "email"}, {Name: "bio"},
}}

// accountsFull is the same table with REPLICA IDENTITY FULL: every column
// is part of the identity, and the old row is sent whole.
var accountsFull = &change.Relation{Schema: "public", Name: "accounts", Identity: change.IdentityFull, Columns: []change.Column{
	{Name: "id", Key: true}, {Name: "email", Key: true}, {Name: "bio", Key: true},
}}

var orders = &change.Relation{Schema: "shop", Name: "Orders", Identity: change.IdentityDefault, Columns: []change.Column{
	{Name: "id", Key: true}, {Name: "account_id"},
}}

var other = &change.Relation{Schema: "public", Name: "other", Columns: []change.Column{{Name: "id", Key: true}}}

func testKeys(t *testing.T, extra ...Table) (*Keys, *syncBuffer) {
	t.Helper()
	var logs syncBuffer
	tables := append([]Table{
		{Name: "public.accounts", Schema: "public", Rel: "accounts", Keys: []string{"account:{id}", "account-email:{email}"}},
		{Name: `shop."Orders"`, Schema: "shop", Rel: "Orders", Keys: []string{"order:{id}", "orders-of:{account_id}", "orders:all"}},
	}, extra...)
	k, err := NewKeys(tables, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	return k, &logs
}

func TestInvalidations(t *testing.T) {
	ins := func(rel *change.Relation, vals ...change.Value) change.Change {
		return change.Change{Op: change.Insert, Rel: rel, New: vals}
	}
	upd := func(rel *change.Relation, old, new []change.Value) change.Change {
		return change.Change{Op: change.Update, Rel: rel, Old: old, New: new}
	}
	del := func(rel *change.Relation, old ...change.Value) change.Change {
		return change.Change{Op: change.Delete, Rel: rel, Old: old}
	}
	row := func(vals ...change.Value) []change.Value { return vals }
	for _, tc := range []struct {
		name    string
		changes []change.Change
		want    []change.Invalidation
		warn    string // in the log
	}{
		{name: "insert: the new row's keys",
			changes: []change.Change{ins(accounts, txt("1"), txt("a@x"), txt("hi"))},
			want:    []change.Invalidation{{Table: "public.accounts", Op: "insert", Keys: []string{"account:1", "account-email:a@x"}}}},
		{name: "a NULL column gives no key",
			changes: []change.Change{ins(accounts, txt("1"), nullv, nullv)},
			want:    []change.Invalidation{{Table: "public.accounts", Op: "insert", Keys: []string{"account:1"}}}},
		{name: "update with full identity: old and new keys",
			changes: []change.Change{upd(accountsFull, row(txt("1"), txt("old@x"), txt("hi")), row(txt("1"), txt("new@x"), txt("hi")))},
			want: []change.Invalidation{{Table: "public.accounts", Op: "update",
				Keys: []string{"account:1", "account-email:old@x", "account-email:new@x"}}}},
		{name: "update of the key: old and new id",
			changes: []change.Change{upd(accounts, row(txt("1"), nullv, nullv), row(txt("2"), txt("a@x"), txt("hi")))},
			want: []change.Invalidation{{Table: "public.accounts", Op: "update",
				Keys: []string{"account:1", "account:2", "account-email:a@x"}}},
			warn: "outside the replica identity"},
		{name: "update without full identity: the non-key column's new key only",
			changes: []change.Change{upd(accounts, nil, row(txt("1"), txt("new@x"), txt("hi")))},
			want: []change.Invalidation{{Table: "public.accounts", Op: "update",
				Keys: []string{"account:1", "account-email:new@x"}}},
			warn: "ALTER TABLE public.accounts REPLICA IDENTITY FULL"},
		{name: "delete: the old row's keys",
			changes: []change.Change{del(accountsFull, txt("1"), txt("a@x"), txt("hi"))},
			want:    []change.Invalidation{{Table: "public.accounts", Op: "delete", Keys: []string{"account:1", "account-email:a@x"}}}},
		{name: "delete without full identity: no key from a column that is not sent",
			changes: []change.Change{del(accounts, txt("1"), nullv, nullv)},
			want:    []change.Invalidation{{Table: "public.accounts", Op: "delete", Keys: []string{"account:1"}}},
			warn:    "deletes cannot invalidate the key"},
		{name: "truncate flushes the cached tables it names",
			changes: []change.Change{{Op: change.Truncate, Truncated: []*change.Relation{other, accounts, orders}}},
			want: []change.Invalidation{
				{Table: "public.accounts", Op: "truncate", Flush: true},
				{Table: `shop."Orders"`, Op: "truncate", Flush: true}}},
		{name: "changes of other tables make nothing stale",
			changes: []change.Change{ins(other, txt("1")), del(other, txt("1"))},
			want:    nil},
		{name: "one entry per table and operation, each key once, in order of appearance",
			changes: []change.Change{
				ins(orders, txt("10"), txt("1")),
				upd(accounts, nil, row(txt("1"), txt("a@x"), unchanged)),
				ins(orders, txt("11"), txt("1")),
				upd(accounts, nil, row(txt("1"), txt("a@x"), txt("bio"))),
				del(orders, txt("10"), nullv),
			},
			want: []change.Invalidation{
				{Table: `shop."Orders"`, Op: "insert", Keys: []string{"order:10", "orders-of:1", "orders:all", "order:11"}},
				{Table: "public.accounts", Op: "update", Keys: []string{"account:1", "account-email:a@x"}},
				{Table: `shop."Orders"`, Op: "delete", Keys: []string{"order:10", "orders:all"}},
			},
			warn: "column=account_id"},
		{name: "an unchanged TOAST value is taken from the full old row",
			changes: []change.Change{upd(accountsFull, row(txt("1"), txt("a@x"), txt("long")), row(txt("1"), unchanged, unchanged))},
			want:    []change.Invalidation{{Table: "public.accounts", Op: "update", Keys: []string{"account:1", "account-email:a@x"}}}},
		{name: "an unchanged TOAST value nobody sent flushes the table",
			changes: []change.Change{upd(accounts, nil, row(txt("1"), unchanged, txt("x")))},
			want:    []change.Invalidation{{Table: "public.accounts", Op: "update", Keys: []string{"account:1"}, Flush: true}},
			warn:    "could not be built"},
		{name: "a binary value flushes the table",
			changes: []change.Change{ins(accounts, txt("1"), change.Value{Kind: change.Binary, Data: []byte{1}}, nullv)},
			want:    []change.Invalidation{{Table: "public.accounts", Op: "insert", Keys: []string{"account:1"}, Flush: true}},
			warn:    "a binary value"},
		{name: "a template column the relation lacks flushes the table",
			changes: []change.Change{ins(&change.Relation{Schema: "public", Name: "accounts", Columns: []change.Column{{Name: "id", Key: true}}}, txt("1"))},
			want:    []change.Invalidation{{Table: "public.accounts", Op: "insert", Keys: []string{"account:1"}, Flush: true}},
			warn:    "lacks"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k, logs := testKeys(t)
			got := k.Invalidations(tc.changes)
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got  %+v\nwant %+v", got, tc.want)
			}
			if tc.warn != "" && !strings.Contains(logs.String(), tc.warn) {
				t.Errorf("log lacks %q:\n%s", tc.warn, logs)
			}
			if tc.warn == "" && logs.String() != "" {
				t.Errorf("unexpected log:\n%s", logs)
			}
		})
	}
}

// TestInvalidationsWarnOnce: a warning about a template is logged once,
// not once per change.
func TestInvalidationsWarnOnce(t *testing.T) {
	k, logs := testKeys(t)
	for i := 0; i < 5; i++ {
		k.Invalidations([]change.Change{{Op: change.Update, Rel: accounts, New: []change.Value{txt("1"), txt("a"), nullv}}})
	}
	if n := strings.Count(logs.String(), "level=WARN"); n != 1 {
		t.Errorf("got %d warnings, want 1:\n%s", n, logs)
	}
}

func TestNewKeysErrors(t *testing.T) {
	for _, tc := range []struct {
		name   string
		tables []Table
		want   string
	}{
		{name: "bad template", tables: []Table{{Name: "public.a", Schema: "public", Rel: "a", Keys: []string{"a:{"}}},
			want: `cache.public.a[0]: template "a:{" has a '{' without its closing '}'`},
		{name: "no templates", tables: []Table{{Name: "public.a", Schema: "public", Rel: "a"}},
			want: "cache.public.a: no key templates"},
		{name: "twice", tables: []Table{{Name: "public.a", Schema: "public", Rel: "a", Keys: []string{"a"}}, {Name: "a", Schema: "public", Rel: "a", Keys: []string{"b"}}},
			want: "cache.a: table listed twice"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := NewKeys(tc.tables, slog.New(slog.DiscardHandler))
			if err == nil || err.Error() != tc.want {
				t.Errorf("got %v, want %q", err, tc.want)
			}
		})
	}
}
