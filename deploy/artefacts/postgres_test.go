package artefacts

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/xdcr/xdcr/deploy/local"
	"github.com/xdcr/xdcr/internal/config"
	"github.com/xdcr/xdcr/replicator"
)

// pgSettings reads deploy/postgres/postgresql.conf: name = value lines,
// quotes taken off.
func pgSettings(t *testing.T) map[string]string {
	t.Helper()
	nameRE := regexp.MustCompile(`^[a-z_][a-z0-9_.]*$`)
	out := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(readDeploy(t, "postgres/postgresql.conf")))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if !ok || !nameRE.MatchString(k) {
			t.Fatalf("postgresql.conf:%d: not name = value: %q", n, line)
		}
		if i := strings.Index(v, "#"); i >= 0 && !strings.HasPrefix(v, "'") {
			v = strings.TrimSpace(v[:i])
		}
		v = strings.Trim(v, "'")
		if _, dup := out[k]; dup {
			t.Errorf("postgresql.conf:%d: %s is set twice", n, k)
		}
		out[k] = v
	}
	return out
}

// pgDuration reads a PostgreSQL time setting such as 60s or 1min.
func pgDuration(t *testing.T, s string) time.Duration {
	t.Helper()
	m := regexp.MustCompile(`^(\d+)\s*(ms|s|min|h|d)?$`).FindStringSubmatch(s)
	if m == nil {
		t.Fatalf("%q is not a PostgreSQL duration", s)
	}
	n, _ := strconv.Atoi(m[1])
	unit := map[string]time.Duration{"ms": time.Millisecond, "": time.Millisecond, "s": time.Second, "min": time.Minute, "h": time.Hour, "d": 24 * time.Hour}[m[2]]
	return time.Duration(n) * unit
}

// TestPostgresConf checks the settings snippet without a server: the ones
// README.md requires are there, and wal_sender_timeout leaves capture
// room to confirm its position.
func TestPostgresConf(t *testing.T) {
	s := pgSettings(t)
	if s["wal_level"] != "logical" {
		t.Errorf("wal_level %q, want logical", s["wal_level"])
	}
	for _, k := range []string{"max_replication_slots", "max_wal_senders"} {
		if n, err := strconv.Atoi(s[k]); err != nil || n < 2 {
			t.Errorf("%s %q: want at least 2 (capture and a running xdcr sync)", k, s[k])
		}
	}
	if s["max_slot_wal_keep_size"] == "" || s["max_slot_wal_keep_size"] == "-1" {
		t.Errorf("max_slot_wal_keep_size %q: want a limit, so a stopped capture cannot fill the primary's disk", s["max_slot_wal_keep_size"])
	}
	if got, min := pgDuration(t, s["wal_sender_timeout"]), 10*config.DefaultCapture().StatusInterval; got < min {
		t.Errorf("wal_sender_timeout %s: want at least %s (10 x capture.status_interval)", got, min)
	}
	if s["password_encryption"] != "scram-sha-256" {
		t.Errorf("password_encryption %q, want scram-sha-256", s["password_encryption"])
	}
}

// TestPgHba checks the pg_hba.conf example line by line: known types and
// methods, TLS and SCRAM for the xdcr role, and no trust, password or md5
// over the network.
func TestPgHba(t *testing.T) {
	sc := bufio.NewScanner(bytes.NewReader(readDeploy(t, "postgres/pg_hba.conf")))
	xdcr := 0
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		typ := f[0]
		want := 5 // type database user address method
		if typ == "local" {
			want = 4
		}
		if len(f) < want {
			t.Errorf("pg_hba.conf:%d: %d fields, want %d: %q", n, len(f), want, line)
			continue
		}
		method := f[want-1]
		switch typ {
		case "local", "host", "hostssl", "hostnossl":
		default:
			t.Errorf("pg_hba.conf:%d: connection type %q", n, typ)
		}
		switch method {
		case "scram-sha-256", "reject", "cert", "peer":
		default:
			t.Errorf("pg_hba.conf:%d: method %q: want scram-sha-256, cert or reject", n, method)
		}
		if f[2] == "xdcr" {
			xdcr++
			if typ != "hostssl" || method != "scram-sha-256" {
				t.Errorf("pg_hba.conf:%d: the xdcr role must come over hostssl with scram-sha-256: %q", n, line)
			}
		}
	}
	if xdcr == 0 {
		t.Error("pg_hba.conf has no line for the xdcr role")
	}
}

// TestPostgresArtefacts runs deploy/postgres on a real PostgreSQL: the
// server starts with the settings of postgresql.conf; the server accepts
// every line of pg_hba.conf; roles.sql runs (twice: it is idempotent); and
// the role it makes can do what the agent does on a primary and on a
// replica — with the agent's own code where it is exported — while being
// no superuser.
func TestPostgresArtefacts(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a PostgreSQL cluster")
	}
	ctx := t.Context()
	settings := pgSettings(t)
	// The test cluster has no certificate; the TLS lines are checked by
	// TestPgHba and by hand.
	for _, k := range []string{"ssl", "ssl_cert_file", "ssl_key_file"} {
		delete(settings, k)
	}
	pg, err := local.StartPostgres(ctx, local.PostgresConfig{
		Dir:      filepath.Join(t.TempDir(), "pg"),
		Settings: settings,
		Logger:   slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatalf("start PostgreSQL with deploy/postgres/postgresql.conf: %v", err)
	}
	t.Cleanup(func() {
		if err := pg.Close(); err != nil {
			t.Errorf("stop PostgreSQL: %v", err)
		}
	})
	if err := pg.CreateDatabase(ctx, "shop"); err != nil {
		t.Fatal(err)
	}
	super := connect(t, pg.DSN("shop"))
	for name, want := range map[string]string{"wal_level": "logical", "password_encryption": "scram-sha-256"} {
		var got string
		if err := super.QueryRow(ctx, "SELECT current_setting($1)", name).Scan(&got); err != nil || got != want {
			t.Errorf("%s: got %q (%v), want %q", name, got, err, want)
		}
	}

	// The application's schema, as its owner would make it, and its role.
	execSQL(t, super, `
		CREATE ROLE shop_app LOGIN;
		CREATE TABLE public.accounts (id serial PRIMARY KEY, email text NOT NULL, balance int NOT NULL DEFAULT 0);
		CREATE TABLE public.orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, account_id int NOT NULL, total numeric);
		CREATE TABLE public.other (id int PRIMARY KEY);
		GRANT SELECT, INSERT, UPDATE, DELETE ON public.accounts, public.orders TO shop_app;
		GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO shop_app;
		INSERT INTO public.accounts (email) VALUES ('a@example.com'), ('b@example.com');
		INSERT INTO public.orders (account_id, total) VALUES (1, 10);`)

	// roles.sql, without psql's meta-commands, twice.
	var script strings.Builder
	for _, line := range strings.Split(string(readDeploy(t, "postgres/roles.sql")), "\n") {
		if !strings.HasPrefix(strings.TrimSpace(line), `\`) {
			script.WriteString(line + "\n")
		}
	}
	for range 2 {
		execSQL(t, super, script.String())
	}
	var isSuper, canReplicate bool
	if err := super.QueryRow(ctx, "SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = 'xdcr'").Scan(&isSuper, &canReplicate); err != nil {
		t.Fatal(err)
	}
	if isSuper || !canReplicate {
		t.Fatalf("xdcr: superuser %v, replication %v: want a replication role that is no superuser", isSuper, canReplicate)
	}

	u, err := url.Parse(pg.DSN("shop"))
	if err != nil {
		t.Fatal(err)
	}
	u.User = url.User("xdcr")
	dsn := u.String()
	xdcr := connect(t, dsn)
	tables := []replicator.Table{{Schema: "public", Name: "accounts"}, {Schema: "public", Name: "orders"}}

	// The primary: the schema xdcr, the publication, the slot, streaming.
	if err := replicator.EnsureApplySchema(ctx, xdcr); err != nil {
		t.Errorf("create the xdcr schema: %v", err)
	}
	execSQL(t, xdcr, `
		CREATE PUBLICATION xdcr_shop FOR TABLE public.accounts, public.orders WITH (publish_via_partition_root = true);
		ALTER PUBLICATION xdcr_shop SET TABLE public.accounts, public.orders;`)
	execSQL(t, xdcr, `SELECT pg_create_logical_replication_slot('xdcr_shop', 'pgoutput')`)
	repl, err := pgconn.Connect(ctx, dsn+"&replication=database")
	if err != nil {
		t.Fatalf("replication connection: %v", err)
	}
	if _, err := pglogrepl.IdentifySystem(ctx, repl); err != nil {
		t.Errorf("IDENTIFY_SYSTEM: %v", err)
	}
	if err := repl.Close(ctx); err != nil {
		t.Error(err)
	}

	// A replica: write as a replica session, add a column, create a table
	// (xdcr sync).
	execSQL(t, xdcr, `
		SET session_replication_role = replica;
		INSERT INTO public.accounts (id, email) VALUES (100, 'c@example.com');
		UPDATE public.accounts SET balance = 5 WHERE id = 1;
		DELETE FROM public.accounts WHERE id = 2;
		INSERT INTO public.orders (id, account_id) OVERRIDING SYSTEM VALUE VALUES (50, 100);
		RESET session_replication_role;
		ALTER TABLE public.accounts ADD COLUMN note text;
		CREATE TABLE public.synced (id int PRIMARY KEY);`)

	// The fence, with an application transaction in its way that it must
	// end, and what the application sees then.
	app, err := pgx.Connect(ctx, strings.Replace(dsn, "xdcr@", "shop_app@", 1))
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close(context.WithoutCancel(ctx))
	blocker, err := app.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := blocker.Exec(ctx, "UPDATE public.accounts SET balance = balance + 1 WHERE id = 1"); err != nil {
		t.Fatal(err)
	}
	if err := replicator.Fence(ctx, xdcr, "shop", tables, 200*time.Millisecond, slog.New(slog.DiscardHandler)); err != nil {
		t.Errorf("fence: %v", err)
	}
	app2, err := pgx.Connect(ctx, strings.Replace(dsn, "xdcr@", "shop_app@", 1))
	if err != nil {
		t.Fatal(err)
	}
	defer app2.Close(context.WithoutCancel(ctx))
	_, err = app2.Exec(ctx, "INSERT INTO public.accounts (email) VALUES ('d@example.com')")
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "25006" {
		t.Errorf("an application write to a fenced table: got %v, want SQLSTATE 25006", err)
	}
	if err := replicator.Unfence(ctx, xdcr, tables); err != nil {
		t.Errorf("unfence: %v", err)
	}

	// Promotion: the sequences move past what the old primary handed out.
	seqs, err := replicator.Sequences(ctx, xdcr, tables)
	if err != nil || len(seqs) != 2 {
		t.Errorf("read the sequences: %v %v (want both tables' sequences: xdcr must see their values)", seqs, err)
	}
	set, err := replicator.AdvanceSequences(ctx, xdcr, tables, nil)
	if err != nil || len(set) != 2 {
		t.Errorf("advance the sequences: %v %v", set, err)
	}

	execSQL(t, xdcr, `SELECT pg_drop_replication_slot('xdcr_shop')`)

	// Least privilege: nothing beyond the replicated tables and its own.
	for _, sql := range []string{
		"SELECT * FROM public.other",
		"ALTER SYSTEM SET work_mem = '8MB'",
		"CREATE DATABASE other",
		"CREATE ROLE other",
	} {
		if _, err := xdcr.Exec(ctx, sql); err == nil {
			t.Errorf("xdcr may %s", sql)
		}
	}

	// Last: it rewrites the server's pg_hba.conf on disk.
	t.Run("pg_hba.conf", func(t *testing.T) {
		// pg_hba_file_rules parses the server's hba_file as it is on disk
		// (without a reload); hostssl lines are reported as errors while
		// ssl is off, so they are read as host lines here.
		var hbaFile string
		if err := super.QueryRow(ctx, "SHOW hba_file").Scan(&hbaFile); err != nil {
			t.Fatal(err)
		}
		text := strings.ReplaceAll(string(readDeploy(t, "postgres/pg_hba.conf")), "hostssl ", "host    ")
		if err := os.WriteFile(hbaFile, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		rows, err := super.Query(ctx, "SELECT line_number, error FROM pg_hba_file_rules WHERE error IS NOT NULL")
		if err != nil {
			t.Fatal(err)
		}
		for rows.Next() {
			var line int
			var msg string
			if err := rows.Scan(&line, &msg); err != nil {
				t.Fatal(err)
			}
			t.Errorf("pg_hba.conf:%d: %s", line, msg)
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
	})
}

func connect(t *testing.T, dsn string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), dsn)
	if err != nil {
		t.Fatalf("connect %s: %v", dsn, err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// execSQL runs SQL through the simple protocol, several statements at once.
func execSQL(t *testing.T, conn *pgx.Conn, sql string) {
	t.Helper()
	if _, err := conn.PgConn().Exec(t.Context(), sql).ReadAll(); err != nil {
		t.Fatalf("as %s: %v\n%s", conn.Config().User, err, sql)
	}
}
