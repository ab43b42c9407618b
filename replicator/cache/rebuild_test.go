package cache

import (
	"encoding/json"
	"errors"
	"log/slog"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

// progress records a rebuild's progress.
type progress struct {
	mu    sync.Mutex
	begun map[string]int64
	rows  map[string]int64
	ended []TableResult
}

func (p *progress) Begin(table string, rows int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.begun == nil {
		p.begun, p.rows = map[string]int64{}, map[string]int64{}
	}
	p.begun[table] = rows
}

func (p *progress) Rows(table string, n int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.rows[table] += n
}

func (p *progress) End(r TableResult) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.ended = append(p.ended, r)
}

const warmQuery = `SELECT id, email, 'x' AS extra
	FROM public.accounts WHERE id <= 10`

func rebuildKeys(t *testing.T, warm string) *Keys {
	t.Helper()
	k, err := NewKeys([]Table{
		{Name: "public.accounts", Schema: "public", Rel: "accounts", Keys: []string{"account:{id}", "account-email:{email}"}, Warm: warm},
		{Name: "public.orders", Schema: "public", Rel: "orders", Keys: []string{"order:{id}"}},
	}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestRebuild(t *testing.T) {
	for _, backend := range []string{"redis", "memcached"} {
		t.Run(backend, func(t *testing.T) {
			f := newFixture(t, backend)
			execSQL(t, f.dsn, "CREATE TABLE public.orders (id bigint PRIMARY KEY); INSERT INTO public.orders VALUES (1)")
			keys := rebuildKeys(t, warmQuery)
			for _, k := range []string{"account:1", "account:20", "account-email:user20@example.com", "order:1", "session:1"} {
				f.client.set(k, "stale")
			}
			nc := natsConn(t)
			got := events(t, nc, Subject(f.cluster, "dc-a"))
			p := &progress{}
			res, err := Rebuild(t.Context(), RebuildConfig{Cluster: f.cluster, Site: "dc-a", DSN: f.dsn, Tables: []string{"public.accounts"}},
				keys, f.backend, nc, p)
			if err != nil {
				t.Fatal(err)
			}
			want := []TableResult{{Table: "public.accounts", Rows: 60, Dropped: 100, Warmed: 20}}
			if len(res) == 1 {
				res[0].Took = 0
			}
			if !reflect.DeepEqual(res, want) {
				t.Errorf("results: got %+v, want %+v", res, want)
			}
			// warmed: the row as JSON under every key of the row
			for _, k := range []string{"account:1", "account-email:user1@example.com", "account:10", "account-email:user10@example.com"} {
				v, ok := f.client.get(k)
				if !ok {
					t.Errorf("%s was not warmed", k)
					continue
				}
				var row map[string]any
				if err := json.Unmarshal([]byte(v), &row); err != nil || row["extra"] != "x" || !strings.HasPrefix(row["email"].(string), "user1") {
					t.Errorf("%s = %s (%v), want the row as JSON", k, v, err)
				}
			}
			if v, _ := f.client.get("account:1"); v != `{"id":1,"email":"user1@example.com","extra":"x"}` {
				t.Errorf("account:1 = %s", v)
			}
			// dropped, not warmed
			for _, k := range []string{"account:20", "account-email:user20@example.com"} {
				if f.client.exists(k) {
					t.Errorf("%s survived the rebuild", k)
				}
			}
			// another table's and foreign keys stay
			for _, k := range []string{"order:1", "session:1"} {
				if v, _ := f.client.get(k); v != "stale" {
					t.Errorf("%s = %q, want it untouched", k, v)
				}
			}
			// 50 rows, and about 10 the warm query returns (planner estimates)
			if b := p.begun["public.accounts"]; b < 50 || b > 120 || p.rows["public.accounts"] != 60 || len(p.ended) != 1 {
				t.Errorf("progress: %+v %+v %+v", p.begun, p.rows, p.ended)
			}
			eventually(t, 5*time.Second, "the rebuild event", func() bool { return len(got()) == 1 })
			if e := got()[0]; e.Table != "public.accounts" || e.Op != "rebuild" || !e.Flush {
				t.Errorf("event: %+v", e)
			}
		})
	}
}

// TestRebuildChecksWarmFirst: a warm query that cannot give the keys
// fails before any key is dropped.
func TestRebuildChecksWarmFirst(t *testing.T) {
	f := newFixture(t, "redis")
	f.client.set("account:1", "cached")
	keys := rebuildKeys(t, "SELECT id FROM public.accounts")
	_, err := Rebuild(t.Context(), RebuildConfig{Cluster: f.cluster, Site: "dc-a", DSN: f.dsn, Tables: []string{"public.accounts"}},
		keys, f.backend, nil, &progress{})
	if err == nil || !strings.Contains(err.Error(), `returns no column "email", which template "account-email:{email}" needs`) {
		t.Fatalf("got %v", err)
	}
	if !f.client.exists("account:1") {
		t.Error("a key was dropped although the rebuild could not warm")
	}
}

func TestRebuildArguments(t *testing.T) {
	keys := rebuildKeys(t, "")
	if _, err := Rebuild(t.Context(), RebuildConfig{Site: "dc-b"}, keys, nil, nil, &progress{}); err == nil ||
		!strings.Contains(err.Error(), "site dc-b has no cache store (sites.dc-b.redis)") {
		t.Errorf("no backend: got %v", err)
	}
	b, err := Open("redis://127.0.0.1:1/0")
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	_, err = Rebuild(t.Context(), RebuildConfig{Site: "dc-b", Tables: []string{"public.users"}}, keys, b, nil, &progress{})
	if err == nil || !strings.Contains(err.Error(), "table public.users has no cache templates in the config (cached: public.accounts, public.orders)") {
		t.Errorf("unknown table: got %v", err)
	}
}

func TestCheck(t *testing.T) {
	servers(t)
	dsn := testDB(t, `CREATE TABLE public.accounts (id bigint PRIMARY KEY, email text, "Name" text);
		CREATE TABLE public.orders (id bigint, account_id bigint);
		CREATE UNIQUE INDEX orders_id ON public.orders (id);
		ALTER TABLE public.orders ALTER COLUMN id SET NOT NULL;
		ALTER TABLE public.orders REPLICA IDENTITY USING INDEX orders_id;`)
	k, err := NewKeys([]Table{
		{Name: "public.accounts", Schema: "public", Rel: "accounts", Keys: []string{"account:{id}", "account-email:{email}", "n:{Name}", "x:{emial}"}},
		{Name: "public.orders", Schema: "public", Rel: "orders", Keys: []string{"order:{id}", "of:{account_id}"}},
		{Name: "public.gone", Schema: "public", Rel: "gone", Keys: []string{"g:{id}"}},
	}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	conn, err := connect(t.Context(), dsn, "test")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(t.Context())
	warnings, err := k.Check(t.Context(), conn, "dc-b")
	var te *TemplateError
	if !errors.As(err, &te) {
		t.Fatalf("got %v, want a *TemplateError", err)
	}
	wantErr := `cache.public.accounts[3]: template "x:{emial}" names column "emial", which table public.accounts does not have on site dc-b (its columns: id, email, Name)`
	if !strings.Contains(err.Error(), wantErr) || !strings.Contains(err.Error(), "fix: correct the template") {
		t.Errorf("got %q\nwant it to contain %q", err, wantErr)
	}
	wantWarn := []IdentityWarning{
		{Table: "public.accounts", Template: "account-email:{email}", Column: "email", Identity: "default"},
		{Table: "public.accounts", Template: "n:{Name}", Column: "Name", Identity: "default"},
		{Table: "public.orders", Template: "of:{account_id}", Column: "account_id", Identity: "index"},
	}
	if !reflect.DeepEqual(warnings, wantWarn) {
		t.Errorf("warnings: got %+v\nwant %+v", warnings, wantWarn)
	}

	execSQL(t, dsn, "ALTER TABLE public.accounts REPLICA IDENTITY FULL; ALTER TABLE public.orders REPLICA IDENTITY FULL")
	k2, _ := NewKeys(k.Tables()[:2], slog.New(slog.DiscardHandler))
	k2.tables[0].Keys = k2.tables[0].Keys[:3]
	k2.tables[0].templates = k2.tables[0].templates[:3]
	warnings, err = k2.Check(t.Context(), conn, "dc-b")
	if err != nil || len(warnings) != 0 {
		t.Errorf("with full identity: got %v, %+v", err, warnings)
	}
}
