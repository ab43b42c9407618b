package local

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
)

// queryString runs sql on dsn and returns the first column of the first row.
func queryString(t *testing.T, ctx context.Context, dsn, sql string) string {
	t.Helper()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("connect %s: %v", dsn, err)
	}
	defer conn.Close(ctx)
	var s string
	if err := conn.QueryRow(ctx, sql).Scan(&s); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return s
}

func execSQL(t *testing.T, ctx context.Context, dsn, sql string) {
	t.Helper()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("connect %s: %v", dsn, err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, sql); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

func TestPostgresLifecycle(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a PostgreSQL cluster")
	}
	logger, _ := newTestLogger(t)
	ctx := t.Context()
	dir := filepath.Join(t.TempDir(), "pg")
	pg, err := StartPostgres(ctx, PostgresConfig{
		Dir:      dir,
		Settings: map[string]string{"max_connections": "50"},
		Logger:   logger,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := pg.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	port := pg.Port()
	if port == 0 || pg.PID() == 0 || pg.Dir() != dir {
		t.Fatalf("got port %d pid %d dir %s, want a port, a pid and dir %s", port, pg.PID(), pg.Dir(), dir)
	}
	for setting, want := range map[string]string{
		"wal_level":              "logical",
		"max_connections":        "50", // Settings override the defaults
		"track_commit_timestamp": "on",
		"fsync":                  "on",
		"listen_addresses":       "127.0.0.1",
	} {
		if got := queryString(t, ctx, pg.DSN("postgres"), "SHOW "+setting); got != want {
			t.Errorf("SHOW %s: got %q, want %q", setting, got, want)
		}
	}
	for range 2 { // idempotent
		if err := pg.CreateDatabase(ctx, "app"); err != nil {
			t.Fatal(err)
		}
	}
	dsn := pg.DSN("app")
	execSQL(t, ctx, dsn, "CREATE TABLE t (id int PRIMARY KEY)")

	steps := []struct {
		name string
		stop func() error
	}{
		{"stop fast", func() error { return pg.Stop(ctx, StopFast) }},
		{"stop immediate", func() error { return pg.Stop(ctx, StopImmediate) }},
		{"kill", pg.Kill},
		{"stop smart", func() error { return pg.Stop(ctx, StopSmart) }},
	}
	for i, step := range steps {
		ok := t.Run(step.name, func(t *testing.T) {
			execSQL(t, ctx, dsn, "INSERT INTO t VALUES ("+strconv.Itoa(i+1)+")")
			// An idle client keeps a backend in the group; smart shutdown
			// waits for clients, so it gets none.
			if step.name != "stop smart" {
				conn, err := pgx.Connect(ctx, dsn)
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close(context.WithoutCancel(ctx))
			}
			tree := processTree(pg.PID())
			if len(tree) < 4 { // postmaster, checkpointer, walwriter, the client's backend...
				t.Errorf("got processes %v, want a postmaster and its children", tree)
			}
			if err := step.stop(); err != nil {
				t.Fatal(err)
			}
			if got := pg.PID(); got != 0 {
				t.Errorf("PID after stop: got %d, want 0", got)
			}
			if left := stillRunning(tree); len(left) > 0 {
				t.Errorf("processes %v still run after %s", left, step.name)
			}
			if err := pg.Start(ctx); err != nil {
				t.Fatal(err)
			}
			if pg.Port() != port {
				t.Errorf("port after start: got %d, want %d", pg.Port(), port)
			}
			if got, want := queryString(t, ctx, dsn, "SELECT count(*)::text FROM t"), strconv.Itoa(i+1); got != want {
				t.Errorf("rows after %s and start: got %s, want %s", step.name, got, want)
			}
		})
		if !ok {
			return
		}
	}

	pid := pg.PID()
	if err := pg.Restart(ctx, StopFast); err != nil {
		t.Fatal(err)
	}
	if pg.PID() == pid || pg.PID() == 0 {
		t.Errorf("PID after restart: got %d, want a new one (was %d)", pg.PID(), pid)
	}
	if got := queryString(t, ctx, dsn, "SELECT count(*)::text FROM t"); got != "4" {
		t.Errorf("rows after restart: got %s, want 4", got)
	}

	tree := processTree(pg.PID())
	for range 2 { // idempotent
		if err := pg.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if left := stillRunning(tree); len(left) > 0 {
		t.Errorf("processes %v still run after Close", left)
	}

	// A directory that holds a cluster is reused, on a new port.
	again, err := StartPostgres(ctx, PostgresConfig{Dir: dir, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	if got := queryString(t, ctx, again.DSN("app"), "SELECT count(*)::text FROM t"); got != "4" {
		t.Errorf("rows after reuse: got %s, want 4", got)
	}
	if got := queryString(t, ctx, again.DSN("postgres"), "SHOW max_connections"); got != "100" {
		t.Errorf("max_connections after reuse without Settings: got %s, want the default 100", got)
	}
}

func TestStartPostgresReportsLog(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a PostgreSQL cluster")
	}
	logger, _ := newTestLogger(t)
	_, err := StartPostgres(t.Context(), PostgresConfig{
		Dir:      filepath.Join(t.TempDir(), "pg"),
		Settings: map[string]string{"shared_buffers": "lots"},
		Logger:   logger,
	})
	if err == nil {
		t.Fatal("got no error for shared_buffers=lots")
	}
	if want := `invalid value for parameter "shared_buffers"`; !strings.Contains(err.Error(), want) {
		t.Errorf("got error %q, want it to contain the log line %q", err, want)
	}
}

func TestStartPostgresRefusesForeignDir(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "notes.txt"), []byte("hi"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := StartPostgres(t.Context(), PostgresConfig{Dir: dir})
	if err == nil || !strings.Contains(err.Error(), "not empty") {
		t.Fatalf("got %v, want an error saying the directory is not empty", err)
	}
}

func TestRenderPostgresConf(t *testing.T) {
	long := "/tmp/" + strings.Repeat("x", 100)
	tests := []struct {
		name     string
		dir      string
		settings map[string]string
		want     []string // lines that must appear
		wantErr  bool
	}{
		{
			name: "defaults",
			dir:  "/tmp/a/pg",
			want: []string{
				"wal_level = 'logical'", "max_wal_senders = '20'", "max_replication_slots = '20'",
				"max_connections = '100'", "shared_buffers = '128MB'", "track_commit_timestamp = 'on'",
				"fsync = 'on'", "listen_addresses = '127.0.0.1'", "port = '5555'",
				"unix_socket_directories = '/tmp/a/pg'",
			},
		},
		{
			name:     "settings override defaults",
			dir:      "/tmp/a/pg",
			settings: map[string]string{"shared_buffers": "1GB", "application_name": "it's"},
			want:     []string{"shared_buffers = '1GB'", "application_name = 'it''s'"},
		},
		{
			name: "socket path too long",
			dir:  long,
			want: []string{"unix_socket_directories = ''"},
		},
		{
			name:     "bad setting name",
			dir:      "/tmp/a/pg",
			settings: map[string]string{"x = 1\nfsync": "off"},
			wantErr:  true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := renderPostgresConf(tt.dir, 5555, tt.settings)
			if (err != nil) != tt.wantErr {
				t.Fatalf("got error %v, want error %v", err, tt.wantErr)
			}
			lines := strings.Split(got, "\n")
			for _, w := range tt.want {
				found := false
				for _, l := range lines {
					found = found || l == w
				}
				if !found {
					t.Errorf("got\n%s\nwant a line %q", got, w)
				}
			}
		})
	}
}

func TestOpenAncestors(t *testing.T) {
	ra, err := currentRunAs()
	if err != nil {
		t.Fatal(err)
	}
	if !ra.switched {
		t.Skip("only root switches to the postgres user")
	}
	base := t.TempDir() // /tmp/TestOpenAncestorsNNN/001, both 0700 root

	t.Run("under the temp root gets o+x", func(t *testing.T) {
		deep := filepath.Join(base, "a", "b")
		if err := os.MkdirAll(deep, 0o700); err != nil {
			t.Fatal(err)
		}
		before := map[string]os.FileMode{}
		for p := deep; p != os.TempDir(); p = filepath.Dir(p) {
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			before[p] = fi.Mode().Perm()
		}
		if err := openAncestors(filepath.Join(deep, "pg"), os.TempDir(), ra); err != nil {
			t.Fatal(err)
		}
		for p, was := range before {
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			want := was
			if was&0o001 == 0 && fi.Sys() != nil {
				want = was | 0o001
			}
			if got := fi.Mode().Perm(); got != want || !ra.canTraverse(fi) {
				t.Errorf("%s: got mode %v, want %v (o+x added, nothing else)", p, got, want)
			}
		}
	})
	t.Run("outside the temp root is an error", func(t *testing.T) {
		for _, p := range []string{filepath.Dir(base), base} { // as the first subtest leaves them
			if err := os.Chmod(p, 0o711); err != nil {
				t.Fatal(err)
			}
		}
		closed := filepath.Join(base, "closed")
		if err := os.MkdirAll(filepath.Join(closed, "x"), 0o700); err != nil {
			t.Fatal(err)
		}
		err := openAncestors(filepath.Join(closed, "x", "pg"), filepath.Join(base, "elsewhere"), ra)
		if err == nil || !strings.Contains(err.Error(), "chmod o+x "+closed) {
			t.Fatalf("got %v, want an error naming %s and the fix", err, closed)
		}
		fi, err := os.Stat(closed)
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode().Perm(); got != 0o700 {
			t.Errorf("mode of %s: got %v, want it unchanged (0700)", closed, got)
		}
	})
}
