package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/xdcr/xdcr/deploy/local"
	"github.com/xdcr/xdcr/deploy/topology"
	"github.com/xdcr/xdcr/replicator/change"
	"github.com/xdcr/xdcr/transport"
)

const ledgerTable = `CREATE TABLE public.ledger (
	id     bigserial PRIMARY KEY,
	client int NOT NULL,
	seq    int NOT NULL,
	note   text,
	CONSTRAINT ledger_client_seq UNIQUE (client, seq)
);`

// xdcrCmd runs the xdcr binary with args and returns its output and exit code.
func xdcrCmd(t *testing.T, timeout time.Duration, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, env.binary, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return out.String(), 0
	case errors.As(err, &ee):
		return out.String(), ee.ExitCode()
	}
	t.Fatalf("xdcr %v: %v", args, err)
	return "", -1
}

func currentPrimary(t *testing.T, c *topology.Cluster) (string, uint64) {
	t.Helper()
	for _, n := range c.Nodes() {
		if st := statusFrom(t, c.HTTPAddr(n)); st.Primary != "" {
			return st.Primary, st.Epoch
		}
	}
	return "", 0
}

// ledgerWriters insert numbered rows from several clients into whichever
// site is the primary, following it across a promotion. A row whose
// INSERT was acknowledged is recorded; after an error the client asks the
// cluster for the primary and tries the same row again there (a unique
// violation on (client, seq) then means the earlier attempt committed).
type ledgerWriters struct {
	mu    sync.Mutex
	acked map[[2]int]bool
	stop  chan struct{}
	done  sync.WaitGroup
	errs  chan error
}

func startLedgerWriters(t *testing.T, c *topology.Cluster, clients int) *ledgerWriters {
	w := &ledgerWriters{acked: map[[2]int]bool{}, stop: make(chan struct{}), errs: make(chan error, clients)}
	ctx := t.Context()
	for cl := 1; cl <= clients; cl++ {
		w.done.Add(1)
		go func() {
			defer w.done.Done()
			var conn *pgx.Conn
			defer func() {
				if conn != nil {
					conn.Close(context.Background())
				}
			}()
			deadline := time.Time{}
			for seq := 1; ; {
				select {
				case <-w.stop:
					return
				default:
				}
				if conn == nil {
					primary, _ := currentPrimary(t, c)
					var err error
					if primary != "" {
						conn, err = pgx.Connect(ctx, c.DSN(primary))
					}
					if primary == "" || err != nil {
						conn = nil
						time.Sleep(100 * time.Millisecond)
						continue
					}
				}
				_, err := conn.Exec(ctx, `INSERT INTO ledger (client, seq, note) VALUES ($1, $2, 'w')`, cl, seq)
				var pgErr *pgconn.PgError
				if err == nil || (errors.As(err, &pgErr) && pgErr.ConstraintName == "ledger_client_seq") {
					w.mu.Lock()
					w.acked[[2]int{cl, seq}] = true
					w.mu.Unlock()
					seq++
					deadline = time.Time{}
					time.Sleep(2 * time.Millisecond)
					continue
				}
				if errors.As(err, &pgErr) && pgErr.Code == "23505" {
					w.errs <- fmt.Errorf("client %d row %d: %v (a sequence handed out a used id?)", cl, seq, err)
					return
				}
				if deadline.IsZero() {
					deadline = time.Now().Add(2 * time.Minute)
				} else if time.Now().After(deadline) {
					w.errs <- fmt.Errorf("client %d row %d: no primary took it for 2 minutes: %v", cl, seq, err)
					return
				}
				conn.Close(context.Background())
				conn = nil
				time.Sleep(100 * time.Millisecond)
			}
		}()
	}
	return w
}

func (w *ledgerWriters) finish(t *testing.T) map[[2]int]bool {
	t.Helper()
	close(w.stop)
	w.done.Wait()
	close(w.errs)
	for err := range w.errs {
		t.Error(err)
	}
	return w.acked
}

// checkLedger checks that every site holds each acknowledged row exactly
// once and no row twice.
func checkLedgerOnce(t *testing.T, c *topology.Cluster, acked map[[2]int]bool) {
	t.Helper()
	for _, site := range c.Config.SiteNames() {
		rows, err := connect(t, c, site).Query(t.Context(), `SELECT client, seq, count(*) FROM ledger GROUP BY 1, 2`)
		if err != nil {
			t.Fatal(err)
		}
		have := map[[2]int]int{}
		for rows.Next() {
			var cl, seq, n int
			if err := rows.Scan(&cl, &seq, &n); err != nil {
				t.Fatal(err)
			}
			have[[2]int{cl, seq}] = n
		}
		rows.Close()
		missing, doubled := 0, 0
		for k := range acked {
			if have[k] == 0 {
				missing++
			}
		}
		for _, n := range have {
			if n > 1 {
				doubled++
			}
		}
		if missing > 0 || doubled > 0 {
			t.Errorf("site %s: %d acknowledged rows missing, %d rows doubled (of %d acknowledged)", site, missing, doubled, len(acked))
		}
	}
}

func assertReadOnly(t *testing.T, c *topology.Cluster, site string) {
	t.Helper()
	_, err := connect(t, c, site).Exec(t.Context(), `INSERT INTO ledger (client, seq) VALUES (999, 999)`)
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "25006" {
		t.Errorf("site %s took a write from an application (%v); want it fenced (SQLSTATE 25006)", site, err)
	}
}

// TestSwitchover moves the primary while clients keep writing: every
// acknowledged write is on every site exactly once, the old primary is
// read-only and follows the new one, and the new primary's sequences hand
// out ids above every id used before.
func TestSwitchover(t *testing.T) {
	c := newCluster(t, clusterOpts{schema: ledgerTable, tables: []string{"ledger"}})
	old, target := c.Config.Primary, replicas(c)[0]
	w := startLedgerWriters(t, c, 3)
	time.Sleep(1500 * time.Millisecond)
	out, code := xdcrCmd(t, 3*time.Minute, "promote", target, "--config", c.ConfigPath, "--yes")
	if code != 0 {
		t.Fatalf("xdcr promote %s exited %d:\n%s", target, code, out)
	}
	t.Logf("promote:\n%s", out)
	if !strings.Contains(out, "handoff LSN") {
		t.Errorf("promote did not print the handoff LSN")
	}
	time.Sleep(1500 * time.Millisecond) // writes on the new primary
	acked := w.finish(t)
	if primary, epoch := currentPrimary(t, c); primary != target || epoch != 2 {
		t.Fatalf("after the switchover the primary is %s in epoch %d, want %s in epoch 2", primary, epoch, target)
	}
	c.Config.Primary = target // for converge
	cctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	if err := c.WaitConverged(cctx); err != nil {
		diffLedger(t, c, old, target)
		diffLedger(t, c, replicas(c)[1], target)
		t.Fatal(err)
	}
	checkLedgerOnce(t, c, acked)
	assertReadOnly(t, c, old)
	assertReadOnly(t, c, replicas(c)[1])
	// the new primary's sequence is past every id the old one handed out
	var maxID, next int64
	p := connect(t, c, target)
	if err := p.QueryRow(t.Context(), `SELECT max(id) FROM ledger`).Scan(&maxID); err != nil {
		t.Fatal(err)
	}
	if err := p.QueryRow(t.Context(), `INSERT INTO ledger (client, seq) VALUES (0, 1) RETURNING id`).Scan(&next); err != nil {
		t.Fatal(err)
	}
	if next <= maxID {
		t.Errorf("the new primary handed out id %d, not above %d", next, maxID)
	}
	converge(t, c, time.Minute)
	t.Logf("%d acknowledged rows, every site equal", len(acked))
}

var lossWindowRE = regexp.MustCompile(`loss window: transactions (\S+) committed after (\S+) \(what (\S+) applied\) may be lost; it had published up to (\S+),`)

// TestForcedFailoverAndReturn: the primary's agent is killed and its
// database stopped; a forced failover promotes another site, which takes
// writes that reach the third site, and reports the loss window. When the
// old primary comes back it publishes nothing, stays read-only, reports
// exactly the transactions written to it after it was cut off, and
// follows the new primary once re-synced.
func TestForcedFailoverAndReturn(t *testing.T) {
	c := newCluster(t, clusterOpts{schema: ledgerTable, tables: []string{"ledger"}})
	ctx := t.Context()
	old, target, third := c.Config.Primary, replicas(c)[0], replicas(c)[1]
	execOn(t, c, old, `INSERT INTO ledger (client, seq) SELECT 1, g FROM generate_series(1, 100) g`)
	converge(t, c, time.Minute)
	if err := c.KillAgent(topology.NodeID(old)); err != nil {
		t.Fatal(err)
	}
	// transactions the old primary commits after it was cut off
	for i := 1; i <= 3; i++ {
		// durable before the immediate stop below (the test clusters commit asynchronously)
		execOn(t, c, old, fmt.Sprintf(`BEGIN; SET LOCAL synchronous_commit = on;
			INSERT INTO ledger (client, seq, note) VALUES (7, %d, 'cut off'); COMMIT;`, i))
	}
	oldPG := siteOf(c, old).Postgres
	if err := oldPG.Stop(ctx, local.StopImmediate); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if !oldPG.Running() {
			_ = oldPG.Start(context.Background()) // for the tests that follow
		}
	})
	// a switchover needs the old primary: refused
	time.Sleep(6 * time.Second) // it is reported down
	if out, code := xdcrCmd(t, time.Minute, "promote", target, "--config", c.ConfigPath, "--yes"); code == 0 || !strings.Contains(out, "--force") {
		t.Fatalf("a switchover without the primary exited %d:\n%s", code, out)
	}
	out, code := xdcrCmd(t, 3*time.Minute, "promote", target, "--config", c.ConfigPath, "--yes", "--force")
	if code != 0 {
		t.Fatalf("xdcr promote --force exited %d:\n%s", code, out)
	}
	t.Logf("failover:\n%s", out)
	m := lossWindowRE.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no loss window in the output")
	}
	applied := readPosition(t, c, target)
	if m[1] != old || m[3] != target || m[2] != applied.LSN.String() {
		t.Errorf("loss window %q: want old primary %s, new %s, applied %s", m[0], old, target, applied.LSN)
	}
	// writes on the new primary reach the third site
	c.Config.Primary = target
	execOn(t, c, target, `INSERT INTO ledger (client, seq, note) SELECT 2, g, 'after' FROM generate_series(1, 50) g`)
	eventually(t, time.Minute, "the third site to get the new primary's writes", func() error {
		if n, err := queryInt(t, c, third, `SELECT count(*) FROM ledger WHERE client = 2`); err != nil || n != 50 {
			return fmt.Errorf("%d rows (%v)", n, err)
		}
		return nil
	})

	// the old primary comes back
	if err := oldPG.Start(ctx); err != nil {
		t.Fatal(err)
	}
	streamBefore := streamLastSeq(t, c, old, old)
	if err := c.StartAgent(ctx, topology.NodeID(old)); err != nil {
		t.Fatal(err)
	}
	report := filepath.Join(filepath.Dir(c.ConfigPath), topology.NodeID(old), "divergence-epoch-1.jsonl")
	eventually(t, time.Minute, "the divergence report", func() error {
		_, err := os.Stat(report)
		return err
	})
	lines := readJSONLines(t, report)
	if len(lines) != 3 {
		t.Errorf("the divergence report has %d lines, want the 3 cut-off inserts:\n%v", len(lines), lines)
	}
	for _, l := range lines {
		if l["table"] != "public.ledger" || l["op"] != "insert" {
			t.Errorf("divergence line %v: want an insert into public.ledger", l)
		}
	}
	waitLog(t, c, topology.NodeID(old), "apply paused", time.Minute, "diverged", "xdcr sync "+old)
	assertReadOnly(t, c, old)
	if n := streamLastSeq(t, c, old, old); n != streamBefore {
		t.Errorf("the old primary published after its return: its stream went from seq %d to %d", streamBefore, n)
	}
	// re-seeded, it follows the new primary
	if out, code := xdcrSync(t, c, old); code != 0 {
		t.Fatalf("xdcr sync %s exited %d:\n%s", old, code, out)
	}
	execOn(t, c, target, `INSERT INTO ledger (client, seq, note) SELECT 3, g, 'later' FROM generate_series(1, 20) g`)
	converge(t, c, 2*time.Minute)
	assertReadOnly(t, c, old)
}

// TestConcurrentPromotes: two promotes race; exactly one wins.
func TestConcurrentPromotes(t *testing.T) {
	c := newCluster(t, clusterOpts{schema: padSchema, tables: []string{"items"}})
	execOn(t, c, c.Config.Primary, `INSERT INTO items VALUES (1, 'x')`)
	converge(t, c, time.Minute)
	type result struct {
		site string
		out  string
		code int
	}
	results := make(chan result, 2)
	for _, site := range replicas(c) {
		go func() {
			out, code := xdcrCmd(t, 3*time.Minute, "promote", site, "--config", c.ConfigPath, "--yes")
			results <- result{site, out, code}
		}()
	}
	var won []string
	for range 2 {
		r := <-results
		if r.code == 0 {
			won = append(won, r.site)
		} else if !strings.Contains(r.out, "refused") {
			t.Errorf("the losing promote of %s did not say it was refused:\n%s", r.site, r.out)
		}
	}
	if len(won) != 1 {
		t.Fatalf("%d promotes won (%v), want exactly one", len(won), won)
	}
	if primary, epoch := currentPrimary(t, c); primary != won[0] || epoch != 2 {
		t.Fatalf("primary %s in epoch %d, want %s in epoch 2", primary, epoch, won[0])
	}
	// refusals: the current primary, an unknown site, a witness
	for _, site := range []string{won[0], "dc-z", "witness"} {
		if out, code := xdcrCmd(t, time.Minute, "promote", site, "--config", c.ConfigPath, "--yes"); code == 0 {
			t.Errorf("promote %s succeeded:\n%s", site, out)
		}
	}
	c.Config.Primary = won[0]
	execOn(t, c, won[0], `INSERT INTO items VALUES (2, 'y')`)
	converge(t, c, time.Minute)
}

// TestStaleEpochDropped: messages injected into the current primary's
// stream that are of an older epoch, or of the current epoch but from
// another site than its primary, are dropped by every replica and counted.
func TestStaleEpochDropped(t *testing.T) {
	c := newCluster(t, clusterOpts{schema: padSchema, tables: []string{"items"}})
	old := c.Config.Primary
	target := replicas(c)[0]
	if out, code := xdcrCmd(t, 3*time.Minute, "promote", target, "--config", c.ConfigPath, "--yes"); code != 0 {
		t.Fatalf("promote exited %d:\n%s", code, out)
	}
	c.Config.Primary = target
	_, epoch := currentPrimary(t, c)
	js := jetStream(t, c, target)
	for _, b := range []*change.Batch{
		itemsBatch(target, 1, 0xFFFFFF00, 666),  // an older epoch
		itemsBatch(old, epoch, 0xFFFFFF00, 667), // the current epoch, the wrong origin
	} {
		data, err := transport.Encode(nil, b)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := js.Publish(t.Context(), transport.Subject(c.Config.Cluster, target), data); err != nil {
			t.Fatal(err)
		}
	}
	execOn(t, c, target, `INSERT INTO items VALUES (1, 'fresh')`)
	converge(t, c, time.Minute)
	for _, site := range replicas(c) {
		assertCount(t, c, site, "items", 1)
		eventually(t, 30*time.Second, "both drops counted on "+site, func() error {
			if v := metricValue(t, c.HTTPAddr(topology.NodeID(site)), "xdcr_dropped_batches_total"); v < 2 {
				return fmt.Errorf("xdcr_dropped_batches_total = %v", v)
			}
			return nil
		})
	}
}

func siteOf(c *topology.Cluster, name string) *local.Site {
	return c.Sites.Site(name)
}

func readPosition(t *testing.T, c *topology.Cluster, site string) change.Position {
	t.Helper()
	var (
		p   change.Position
		lsn string
	)
	err := connect(t, c, site).QueryRow(t.Context(), `SELECT origin, epoch, lsn::text FROM xdcr.apply_position WHERE cluster = $1`,
		c.Config.Cluster).Scan(&p.Origin, &p.Epoch, &lsn)
	if err != nil {
		t.Fatal(err)
	}
	if p.LSN, err = change.ParseLSN(lsn); err != nil {
		t.Fatal(err)
	}
	return p
}

func streamLastSeq(t *testing.T, c *topology.Cluster, site, origin string) uint64 {
	t.Helper()
	st, err := jetStream(t, c, site).Stream(t.Context(), transport.StreamName(c.Config.Cluster, origin))
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return info.State.LastSeq
}

func readJSONLines(t *testing.T, path string) []map[string]any {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []map[string]any
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		out = append(out, m)
	}
	return out
}

// metricValue reads one unlabelled series (or the sum of a family) from a
// node's /metrics.
func metricValue(t *testing.T, addr, name string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.LegacyValidation)
	families, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		return -1
	}
	f, ok := families[name]
	if !ok {
		return -1
	}
	var sum float64
	for _, m := range f.GetMetric() {
		switch {
		case m.Counter != nil:
			sum += m.Counter.GetValue()
		case m.Gauge != nil:
			sum += m.Gauge.GetValue()
		}
	}
	return sum
}

// diffLedger logs the rows one site has and another lacks.
func diffLedger(t *testing.T, c *topology.Cluster, a, b string) {
	t.Helper()
	read := func(site string) map[string]string {
		rows, err := connect(t, c, site).Query(t.Context(), `SELECT id::text, client || '/' || seq || ' xid ' || xmin::text || ' committed ' || coalesce(pg_xact_commit_timestamp(xmin)::text, '?') FROM ledger`)
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]string{}
		for rows.Next() {
			var id, d string
			rows.Scan(&id, &d)
			out[id] = d
		}
		rows.Close()
		return out
	}
	ra, rb := read(a), read(b)
	for id, d := range ra {
		if _, ok := rb[id]; !ok {
			t.Logf("only on %s: id %s %s", a, id, d)
		}
	}
	for id, d := range rb {
		if _, ok := ra[id]; !ok {
			t.Logf("only on %s: id %s %s", b, id, d)
		}
	}
	// what the old primary's stream holds at its end
	js := jetStream(t, c, a)
	stream := transport.StreamName(c.Config.Cluster, a)
	st, err := js.Stream(t.Context(), stream)
	if err != nil {
		return
	}
	info, _ := st.Info(t.Context())
	for seq := info.State.LastSeq; seq > 0 && seq+12 > info.State.LastSeq; seq-- {
		raw, err := st.GetMsg(t.Context(), seq)
		if err != nil {
			continue
		}
		bt, err := transport.Decode(raw.Data)
		if err != nil {
			continue
		}
		var xs []string
		for _, tx := range bt.Txns {
			xs = append(xs, fmt.Sprintf("%d@%s", tx.Xid, tx.LSN))
		}
		hb := ""
		if bt.Heartbeat != nil {
			hb = fmt.Sprintf("heartbeat wal %s last %s", bt.Heartbeat.WALEnd, bt.Heartbeat.LastLSN)
		}
		t.Logf("%s seq %d epoch %d: %v %s", stream, seq, bt.Epoch, xs, hb)
	}
}
