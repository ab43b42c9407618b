package chaos

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/xdcr/xdcr/internal/wait"
	"github.com/xdcr/xdcr/replicator/change"
	"github.com/xdcr/xdcr/transport"
)

var (
	flagBigTxn    = flag.Int("chaos.bigtxn", 0, "TestBigTransaction: MiB of rows its one transaction writes (0 skips it; make chaos-bigtxn BIGTXN=1024)")
	flagBigTxnRSS = flag.Int("chaos.bigtxn-rss", 256, "TestBigTransaction: the most MiB any agent may hold resident (issue 7: 256)")
)

// bulkSchema is the table of the big transaction. Its rows are about
// 1 KiB: 30 md5s in hex, all different, stored inline (below the TOAST
// threshold) and carried uncompressed by WAL, pgoutput and the stream.
const bulkSchema = `CREATE TABLE public.bulk (id bigint PRIMARY KEY, payload text NOT NULL);`

func bulkInsert() string {
	parts := make([]string, 30)
	for i := range parts {
		parts[i] = fmt.Sprintf("md5((g * 30 + %d)::text)", i)
	}
	return `INSERT INTO public.bulk SELECT g, ` + strings.Join(parts, " || ") + ` FROM generate_series(1, $1::bigint) g`
}

// bulkSum is the table's row count and an order-independent checksum of
// its rows: the sum of the first 60 bits of each row's md5. (Cluster's
// TableChecksum aggregates the rows into one string, which cannot exceed
// 1 GB.)
const bulkSum = `SELECT count(*), coalesce(sum(('x' || substr(md5(id::text || ':' || payload), 1, 15))::bit(60)::bigint::numeric), 0)::text FROM public.bulk`

// TestBigTransaction commits one transaction of -chaos.bigtxn MiB on the
// primary and checks that it reaches every replica whole and once (row
// count and checksum equal to the primary's; no replica ever shows part
// of it), and that no agent's resident memory goes past
// -chaos.bigtxn-rss MiB on the way: capture, JetStream and apply move it
// in chunks, not in one piece. Too slow for make test: make chaos-bigtxn.
func TestBigTransaction(t *testing.T) {
	if *flagBigTxn <= 0 {
		t.Skip("set -chaos.bigtxn (make chaos-bigtxn BIGTXN=1024)")
	}
	e := newEnvOf(t, []string{"public.bulk"}, bulkSchema)
	ctx := t.Context()
	primary := e.Cluster.Config.Primary
	rows := int64(*flagBigTxn) * 1024
	stream := transport.StreamName(e.Cluster.Config.Cluster, primary)
	msgsBefore, err := streamMsgs(ctx, e, primary, stream)
	if err != nil {
		t.Fatal(err)
	}

	// every agent's resident memory, sampled until the end
	rss := &rssWatch{peak: map[string]int64{}}
	wctx, stopWatch := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); rss.run(wctx, e) }()
	defer func() { stopWatch(); wg.Wait() }()

	conn, err := pgx.Connect(ctx, e.Cluster.DSN(primary))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var walBefore, walAfter string
	if err := conn.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text`).Scan(&walBefore); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := conn.Exec(ctx, bulkInsert(), rows); err != nil {
		t.Fatalf("the big transaction: %v", err)
	}
	committed := time.Since(start)
	var size int64
	if err := conn.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text, pg_table_size('public.bulk')`).Scan(&walAfter, &size); err != nil {
		t.Fatal(err)
	}
	lb, err1 := change.ParseLSN(walBefore)
	la, err2 := change.ParseLSN(walAfter)
	if err := errors.Join(err1, err2); err != nil {
		t.Fatal(err)
	}
	t.Logf("committed %d rows (table %d MiB, WAL %d MiB) on %s in %s", rows, size>>20, (la-lb)>>20, primary, committed.Round(time.Second))

	// every replica shows none of it, then all of it
	arrived := map[string]time.Duration{}
	err = poll(ctx, 90*time.Minute, 5*time.Second, "the big transaction to reach every replica", func() (bool, error) {
		for _, s := range e.Cluster.Config.SiteNames() {
			if s == primary || arrived[s] != 0 {
				continue
			}
			n, _, err := bulkCount(ctx, e.Cluster.DSN(s), false)
			switch {
			case err != nil:
				return false, err
			case n == rows:
				arrived[s] = time.Since(start)
				t.Logf("%s holds all %d rows, %s after the transaction began", s, rows, arrived[s].Round(time.Second))
			case n != 0:
				t.Errorf("%s shows %d of the transaction's %d rows", s, n, rows)
				return true, nil
			}
		}
		return len(arrived) == len(e.Cluster.Config.SiteNames())-1, fmt.Errorf("arrived at %v", arrived)
	})
	if err != nil {
		t.Fatal(err)
	}
	if t.Failed() {
		return
	}
	stopWatch()
	wg.Wait()

	_, want, err := bulkCount(ctx, e.Cluster.DSN(primary), true)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range e.Cluster.Config.SiteNames() {
		n, sum, err := bulkCount(ctx, e.Cluster.DSN(s), true)
		if err != nil {
			t.Fatal(err)
		}
		if n != rows || sum != want {
			t.Errorf("%s: %d rows, checksum %s; want %d rows, checksum %s", s, n, sum, rows, want)
		}
	}
	msgs, err := streamMsgs(ctx, e, primary, stream)
	if err != nil {
		t.Fatal(err)
	}
	if msgs-msgsBefore < 2 {
		t.Errorf("the transaction went into %d message(s); want chunks", msgs-msgsBefore)
	}
	for _, n := range e.Cluster.Nodes() {
		peak := rss.peak[n]
		if hwm, err := vmKiB(e.Cluster.AgentPID(n), "VmHWM"); err == nil {
			peak = max(peak, hwm) // the kernel's high-water mark catches what a sample missed
		}
		t.Logf("agent %s: peak resident memory %d MiB", n, peak>>10)
		if peak>>10 > int64(*flagBigTxnRSS) {
			t.Errorf("agent %s held %d MiB resident, more than %d MiB", n, peak>>10, *flagBigTxnRSS)
		}
	}
	fmt.Printf("big transaction: %d MiB of rows (%d rows, WAL %d MiB) committed in %s, published as %d messages; replicas whole after %v; checksums equal\n",
		size>>20, rows, (la-lb)>>20, committed.Round(time.Second), msgs-msgsBefore, arrived)
}

// bulkCount returns the bulk table's row count on a site and, with sum,
// its checksum.
func bulkCount(ctx context.Context, dsn string, sum bool) (int64, string, error) {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return 0, "", fmt.Errorf("count the bulk rows: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var n int64
	var s string
	if sum {
		err = conn.QueryRow(ctx, bulkSum).Scan(&n, &s)
	} else {
		err = conn.QueryRow(ctx, `SELECT count(*) FROM public.bulk`).Scan(&n)
	}
	if err != nil {
		return 0, "", fmt.Errorf("count the bulk rows: %w", err)
	}
	return n, s, nil
}

// streamMsgs returns how many messages a stream holds on site.
func streamMsgs(ctx context.Context, e *Env, site, stream string) (uint64, error) {
	nc, err := e.site(site).NATS.Connect()
	if err != nil {
		return 0, fmt.Errorf("stream %s: %w", stream, err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return 0, fmt.Errorf("stream %s: %w", stream, err)
	}
	st, err := js.Stream(ctx, stream)
	if err != nil {
		return 0, fmt.Errorf("stream %s: %w", stream, err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		return 0, fmt.Errorf("stream %s: %w", stream, err)
	}
	return info.State.Msgs, nil
}

// rssWatch samples the agents' resident memory.
type rssWatch struct {
	mu   sync.Mutex
	peak map[string]int64 // node -> KiB
}

func (w *rssWatch) run(ctx context.Context, e *Env) {
	for {
		for _, n := range e.Cluster.Nodes() {
			if kib, err := vmKiB(e.Cluster.AgentPID(n), "VmRSS"); err == nil {
				w.mu.Lock()
				w.peak[n] = max(w.peak[n], kib)
				w.mu.Unlock()
			}
		}
		if wait.Sleep(ctx, 500*time.Millisecond) != nil {
			return
		}
	}
}

// vmKiB reads a field of /proc/PID/status in KiB (Linux).
func vmKiB(pid int, field string) (int64, error) {
	if pid == 0 {
		return 0, errors.New("not running")
	}
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok || name != field {
			continue
		}
		v, _, _ := strings.Cut(strings.TrimSpace(rest), " ")
		return strconv.ParseInt(v, 10, 64)
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}
