package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/xdcr/xdcr/deploy/local"
	"github.com/xdcr/xdcr/deploy/topology"
	"github.com/xdcr/xdcr/internal/config"
	"github.com/xdcr/xdcr/replicator/change"
)

// Names of what the benchmark creates.
const (
	clusterName = "bench"
	srcDB       = "bench"  // the source on dc-a, and xdcr's replica on dc-b
	nativeDB    = "native" // native logical replication's target on dc-b
	dumpDB      = "dump"   // pg_dump | psql's target on dc-b
	nativePub   = "native_pub"
	nativeSub   = "native_sub"
)

// replicated are the tables both systems replicate.
var replicated = []string{
	"public.pgbench_accounts", "public.pgbench_branches", "public.pgbench_tellers", "public.pgbench_history",
	"public.bench_bulk", "public.bench_marker",
}

// env is the running topology of one benchmark run.
type env struct {
	o     Options
	sc    Scale
	rep   *Report
	log   *slog.Logger
	sites *local.Sites
	c     *topology.Cluster
	pgbin string

	primary, replica string // nodes: a1 (capture), b1 (apply)
	srcSite, dstSite string
	src, xdst, ndst  string // DSNs: source, xdcr's replica, native target
	pprof            map[string]string
	marker           int
	started          time.Time
	syncSize         int64 // bytes of the sync benchmark's tables
}

func (e *env) progress(format string, args ...any) {
	fmt.Fprintf(e.o.Progress, "[%s %6.1fs] %s\n", time.Now().Format("15:04:05"), time.Since(e.started).Seconds(),
		fmt.Sprintf(format, args...))
}

// setup starts the sites, prepares identical data in the source and both
// targets, the native publication and (disabled) subscription, and the
// xdcr cluster with its agents running and caught up.
func setup(ctx context.Context, o Options, sc Scale, rep *Report) (_ *env, err error) {
	e := &env{o: o, sc: sc, rep: rep, log: o.Logger, started: time.Now(), pprof: map[string]string{}}
	defer func() {
		if err != nil {
			e.close()
		}
	}()
	out, err := exec.CommandContext(ctx, "pg_config", "--bindir").Output()
	if err != nil {
		return nil, fmt.Errorf("pg_config --bindir (the PostgreSQL client programs pgbench, pg_dump and psql are needed): %w", err)
	}
	e.pgbin = strings.TrimSpace(string(out))
	for _, p := range []string{"pgbench", "pg_dump", "psql"} {
		if _, err := os.Stat(filepath.Join(e.pgbin, p)); err != nil {
			return nil, fmt.Errorf("%s not found in %s: %w", p, e.pgbin, err)
		}
	}

	e.progress("starting 2 sites (PostgreSQL + NATS with sync_interval always) in %s", o.Dir)
	settings := map[string]string{
		"shared_buffers":                  sc.SharedBuffers,
		"max_wal_size":                    "8GB",
		"min_wal_size":                    "1GB",
		"checkpoint_timeout":              "30min",
		"autovacuum":                      "off", // VACUUM runs between repetitions, not during measurements
		"max_logical_replication_workers": "4",
		"max_worker_processes":            "16",
		"max_connections":                 "200",
		// The logical replication launcher starts a subscription's worker
		// at most once per wal_retrieve_retry_interval (default 5s): an
		// ENABLE soon after the last one would otherwise wait for it.
		"wal_retrieve_retry_interval": "100ms",
	}
	e.sites, err = local.StartSites(ctx, local.SitesConfig{
		Names:            local.SiteNames(2),
		Dir:              filepath.Join(o.Dir, "sites"),
		PostgresSettings: settings,
		NATSSyncInterval: 0, // fsync before every acknowledgement
		Logger:           o.Logger,
	})
	if err != nil {
		return nil, err
	}
	e.srcSite, e.dstSite = e.sites.List[0].Name, e.sites.List[1].Name
	e.primary, e.replica = topology.NodeID(e.srcSite), topology.NodeID(e.dstSite)
	srcPG, dstPG := e.sites.List[0].Postgres, e.sites.List[1].Postgres
	for _, db := range []struct {
		pg   *local.Postgres
		name string
	}{{srcPG, srcDB}, {dstPG, srcDB}, {dstPG, nativeDB}, {dstPG, dumpDB}} {
		if err := db.pg.CreateDatabase(ctx, db.name); err != nil {
			return nil, err
		}
	}
	e.src, e.xdst, e.ndst = srcPG.DSN(srcDB), dstPG.DSN(srcDB), dstPG.DSN(nativeDB)
	if v, err := queryString(ctx, e.src, "SELECT version()"); err == nil {
		rep.Versions = v
	}

	e.progress("pgbench -i -s %d in the source and both targets", sc.PgbenchScale)
	var wg sync.WaitGroup
	errs := make([]error, 3)
	for i, dsn := range []string{e.src, e.xdst, e.ndst} {
		wg.Go(func() { errs[i] = e.initDatabase(ctx, dsn, dsn != e.src) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}

	// native: publication on the source, a disabled subscription (its slot
	// exists from now on) in the native target
	if err := execSQL(ctx, e.src, fmt.Sprintf("CREATE PUBLICATION %s FOR TABLE %s WITH (publish = 'insert, update, delete')",
		nativePub, strings.Join(replicated, ", "))); err != nil {
		return nil, fmt.Errorf("native publication: %w", err)
	}
	conninfo := fmt.Sprintf("host=127.0.0.1 port=%d user=postgres dbname=%s", srcPG.Port(), srcDB)
	if err := execSQL(ctx, e.ndst, fmt.Sprintf(`CREATE SUBSCRIPTION %s CONNECTION '%s' PUBLICATION %s
		WITH (copy_data = false, enabled = false, slot_name = '%s')`, nativeSub, conninfo, nativePub, nativeSub)); err != nil {
		return nil, fmt.Errorf("native subscription: %w", err)
	}

	// xdcr
	ports, err := local.FreePorts(3)
	if err != nil {
		return nil, err
	}
	i := 0
	for _, n := range []string{e.primary, e.replica, "w1"} {
		e.pprof[n] = "127.0.0.1:" + strconv.Itoa(ports[i])
		i++
	}
	e.c, err = topology.New(ctx, e.sites, topology.Options{
		Cluster:  clusterName,
		Database: srcDB,
		Tables:   replicated,
		Binary:   o.Binary,
		Dir:      filepath.Join(o.Dir, "cluster"),
		Tune:     func(*config.Config) {},
		AgentArgs: func(node string) []string {
			if o.ProfileDir == "" {
				return nil
			}
			return []string{"--pprof", e.pprof[node]}
		},
		Logger: o.Logger,
	})
	if err != nil {
		return nil, err
	}
	e.progress("starting the xdcr agents")
	if err := e.c.StartAgents(ctx); err != nil {
		return nil, err
	}
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := e.c.WaitReady(wctx); err != nil {
		return nil, fmt.Errorf("wait for the agents: %w", err)
	}
	m, err := e.writeMarker(ctx)
	if err != nil {
		return nil, err
	}
	if _, err := waitMarker(wctx, e.xdst, m.id); err != nil {
		return nil, fmt.Errorf("xdcr does not replicate: %w (agent logs in %s)", err, filepath.Join(o.Dir, "cluster", "logs"))
	}
	e.progress("ready: source %s, xdcr replica %s, native target %s", e.src, e.xdst, e.ndst)
	return e, nil
}

// initDatabase creates the pgbench tables (deterministic data, the same
// everywhere), the bulk and marker tables, and on a target the column and
// trigger that stamp when a row was applied (disabled until the steady
// workload enables it).
func (e *env) initDatabase(ctx context.Context, dsn string, target bool) error {
	if out, err := e.pgbenchCmd(ctx, dsn, "", "-i", "-q", "-s", strconv.Itoa(e.sc.PgbenchScale)); err != nil {
		return fmt.Errorf("pgbench -i: %w\n%s", err, out)
	}
	sql := `
ALTER TABLE pgbench_history ADD COLUMN hid bigserial PRIMARY KEY;
CREATE TABLE bench_bulk (id bigint PRIMARY KEY, payload text NOT NULL);
CREATE TABLE bench_marker (id int PRIMARY KEY, ts timestamptz NOT NULL DEFAULT clock_timestamp());`
	if target {
		sql += `
ALTER TABLE pgbench_history ADD COLUMN applied_at timestamptz;
CREATE FUNCTION stamp_applied() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.applied_at := clock_timestamp(); RETURN NEW; END $$;
CREATE TRIGGER stamp_applied BEFORE INSERT ON pgbench_history FOR EACH ROW EXECUTE FUNCTION stamp_applied();
ALTER TABLE pgbench_history DISABLE TRIGGER stamp_applied;`
	}
	if err := execSQL(ctx, dsn, sql); err != nil {
		return err
	}
	return execSQL(ctx, dsn, "VACUUM ANALYZE")
}

func (e *env) close() {
	if e.c != nil {
		if err := e.c.Close(); err != nil {
			e.log.Warn("stop agents", "err", err)
		}
	}
	if e.sites != nil {
		if err := e.sites.Close(); err != nil {
			e.log.Warn("stop sites", "err", err)
		}
	}
}

// pgbenchCmd runs pgbench against dsn's database with extra PGOPTIONS.
func (e *env) pgbenchCmd(ctx context.Context, dsn, pgoptions string, args ...string) (string, error) {
	cc, err := pgx.ParseConfig(dsn)
	if err != nil {
		return "", err
	}
	all := append([]string{"-h", cc.Host, "-p", strconv.Itoa(int(cc.Port)), "-U", cc.User}, args...)
	all = append(all, cc.Database)
	cmd := exec.CommandContext(ctx, filepath.Join(e.pgbin, "pgbench"), all...)
	cmd.Env = append(os.Environ(), "PGOPTIONS="+pgoptions)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// stopAgent stops node's agent and waits until its slot (for the capture
// agent) is released.
func (e *env) stopAgent(ctx context.Context, node string) error {
	if err := e.c.StopAgent(node, time.Minute); err != nil {
		return err
	}
	if node == e.primary {
		return waitSlotInactive(ctx, e.src, "xdcr_"+clusterName)
	}
	return nil
}

// startAgent starts node's agent unless it runs.
func (e *env) startAgent(ctx context.Context, node string) error {
	if e.c.AgentPID(node) != 0 {
		return nil
	}
	return e.c.StartAgent(ctx, node)
}

// nativeEnable enables or disables the native subscription; disabling
// waits until its walsender has let go of the slot.
func (e *env) nativeEnable(ctx context.Context, on bool) error {
	verb := "DISABLE"
	if on {
		verb = "ENABLE"
	}
	if err := execSQL(ctx, e.ndst, "ALTER SUBSCRIPTION "+nativeSub+" "+verb); err != nil {
		return err
	}
	if !on {
		return waitSlotInactive(ctx, e.src, nativeSub)
	}
	return nil
}

// checkpoint runs CHECKPOINT on both clusters, so that a measurement does
// not pay for the backlog's dirty pages.
func (e *env) checkpoint(ctx context.Context) error {
	for _, dsn := range []string{e.src, e.xdst} {
		if err := execSQL(ctx, dsn, "CHECKPOINT"); err != nil {
			return err
		}
	}
	return nil
}

// vacuum runs VACUUM on the source and both targets between repetitions.
func (e *env) vacuum(ctx context.Context) error {
	for _, dsn := range []string{e.src, e.xdst, e.ndst} {
		if err := execSQL(ctx, dsn, "VACUUM"); err != nil {
			return err
		}
	}
	return nil
}

// marker is a marker row on the source: its id, and the WAL insert
// position taken inside its transaction (every commit record at or after
// it is the marker's or a later one's).
type marker struct {
	id  int
	lsn uint64
}

// writeMarker commits a new marker row on the source.
func (e *env) writeMarker(ctx context.Context) (marker, error) {
	e.marker++
	m := marker{id: e.marker}
	conn, err := pgx.Connect(ctx, e.src)
	if err != nil {
		return m, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var lsn string
	err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "INSERT INTO bench_marker (id) VALUES ($1)", m.id); err != nil {
			return err
		}
		return tx.QueryRow(ctx, "SELECT pg_current_wal_insert_lsn()::text").Scan(&lsn)
	})
	if err != nil {
		return m, fmt.Errorf("write marker %d: %w", m.id, err)
	}
	m.lsn, err = parseLSN(lsn)
	return m, err
}

// waitMarker polls dsn every 5 ms until marker id is visible and returns
// when it saw it.
func waitMarker(ctx context.Context, dsn string, id int) (time.Time, error) {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return time.Time{}, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	for {
		var ok bool
		if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM bench_marker WHERE id = $1)", id).Scan(&ok); err != nil {
			return time.Time{}, fmt.Errorf("wait for marker %d: %w", id, err)
		}
		if ok {
			return time.Now(), nil
		}
		select {
		case <-ctx.Done():
			return time.Time{}, fmt.Errorf("wait for marker %d: %w", id, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func waitSlotInactive(ctx context.Context, dsn, slot string) error {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	deadline := time.Now().Add(time.Minute)
	for {
		var active bool
		err := conn.QueryRow(ctx, "SELECT coalesce(bool_or(active), false) FROM pg_replication_slots WHERE slot_name = $1", slot).Scan(&active)
		if err != nil {
			return fmt.Errorf("read slot %s: %w", slot, err)
		}
		if !active {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("slot %s is still active after a minute", slot)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func execSQL(ctx context.Context, dsn, sql string, args ...any) error {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, sql, args...); err != nil {
		return fmt.Errorf("%s: %w", firstLine(sql), err)
	}
	return nil
}

func queryString(ctx context.Context, dsn, sql string, args ...any) (string, error) {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return "", err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var s string
	if err := conn.QueryRow(ctx, sql, args...).Scan(&s); err != nil {
		return "", fmt.Errorf("%s: %w", firstLine(sql), err)
	}
	return s, nil
}

func queryInt(ctx context.Context, dsn, sql string, args ...any) (int64, error) {
	s, err := queryString(ctx, dsn, "SELECT ("+sql+")::text", args...)
	if err != nil {
		return 0, err
	}
	return strconv.ParseInt(s, 10, 64)
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i > 0 {
		return s[:i] + " …"
	}
	return s
}

// parseLSN parses PostgreSQL's X/Y form.
func parseLSN(s string) (uint64, error) {
	l, err := change.ParseLSN(s)
	return uint64(l), err
}

// currentLSN returns the source's WAL insert position.
func (e *env) currentLSN(ctx context.Context) (uint64, error) {
	s, err := queryString(ctx, e.src, "SELECT pg_current_wal_lsn()::text")
	if err != nil {
		return 0, err
	}
	return parseLSN(s)
}

// runLogged runs a program with its output appended to a log file in the
// run's directory; on failure the error carries the output's end.
func (e *env) runLogged(ctx context.Context, name string, cmd *exec.Cmd) error {
	path := filepath.Join(e.o.Dir, name+".log")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s: %w; output in %s:\n%s", name, err, path, tailFile(path, 2048))
	}
	return nil
}

func tailFile(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Size() > n {
		_, _ = f.Seek(fi.Size()-n, io.SeekStart)
	}
	b, _ := io.ReadAll(f)
	return string(b)
}
