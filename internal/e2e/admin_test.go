package e2e

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/xdcr/xdcr/deploy/topology"
	"github.com/xdcr/xdcr/internal/api"
	"github.com/xdcr/xdcr/internal/config"
)

const adminToken = "e2e-admin-token-5f0c1d2e3a4b"

// TestAdminTokenAndAbort: with an admin token configured, a promote
// without it (or with a wrong one) gets 401 from every node and changes
// nothing; a switchover started with it and aborted while the primary is
// fencing leaves the primary where it was, unfenced, and nothing written
// before or after is lost or doubled.
func TestAdminTokenAndAbort(t *testing.T) {
	c := newCluster(t, clusterOpts{
		schema: ledgerTable,
		tables: []string{"ledger"},
		tune:   func(cfg *config.Config) { cfg.HTTP.AdminToken = adminToken },
	})
	ctx := t.Context()
	old, target := c.Config.Primary, replicas(c)[0]
	execOn(t, c, old, `INSERT INTO ledger (client, seq) SELECT 1, g FROM generate_series(1, 50) g`)

	req := api.PromoteRequest{To: target}
	for _, token := range []string{"", "wrong-" + adminToken} {
		client := api.NewClient(5*time.Second, token)
		for _, n := range c.Nodes() {
			_, err := client.Promote(ctx, c.HTTPAddr(n), req, false)
			var re *api.RemoteError
			if !errors.As(err, &re) || re.Status != http.StatusUnauthorized || re.Body.Code != api.CodeUnauthorized {
				t.Fatalf("promote through %s with token %q: got %v, want 401 unauthorized", n, token, err)
			}
			if err := client.Propose(ctx, c.HTTPAddr(n), []byte(`{}`), false); !errors.As(err, &re) || re.Status != http.StatusUnauthorized {
				t.Fatalf("propose through %s with token %q: got %v, want 401", n, token, err)
			}
		}
	}
	admin := api.NewClient(5*time.Second, adminToken)
	st, err := admin.Status(ctx, c.HTTPAddr(topology.NodeID(old)), false)
	if err != nil {
		t.Fatal(err)
	}
	if st.Primary != old || st.Epoch != 1 || st.Promotion != nil {
		t.Fatalf("after refused promotes: primary %s epoch %d promotion %+v, want %s in epoch 1 and none", st.Primary, st.Epoch, st.Promotion, old)
	}
	out, code := xdcrCmd(t, time.Minute, "promote", "--abort", "--config", c.ConfigPath)
	if code == 0 || !strings.Contains(out, "no promotion is in progress") {
		t.Errorf("abort with nothing in progress: exit %d:\n%s", code, out)
	}

	// a session in the middle of a write keeps the fence from going up
	blocker := connect(t, c, old)
	tx, err := blocker.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `INSERT INTO ledger (client, seq) VALUES (2, 1)`); err != nil {
		t.Fatal(err)
	}
	resp, err := admin.Promote(ctx, c.HTTPAddr(topology.NodeID(target)), req, false)
	if err != nil {
		t.Fatalf("promote with the token: %v", err)
	}
	waitLog(t, c, topology.NodeID(old), "switchover: fencing this site's database", 30*time.Second)
	out, code = xdcrCmd(t, time.Minute, "promote", "--abort", "--config", c.ConfigPath)
	if code != 0 || !strings.Contains(out, "promotion "+resp.ID) || !strings.Contains(out, "aborted") {
		t.Fatalf("xdcr promote --abort exited %d:\n%s", code, out)
	}
	t.Logf("abort:\n%s", out)
	_ = tx.Commit(ctx) // the fence may have ended this session meanwhile

	// the old primary lifts its fence and takes writes again
	waitLog(t, c, topology.NodeID(old), "switchover aborted: lifted the fence; this site stays the primary and takes writes", time.Minute)
	deadline := time.Now().Add(30 * time.Second)
	for {
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := connect(t, c, old).Exec(wctx, `INSERT INTO ledger (client, seq) SELECT 3, g FROM generate_series(1, 50) g`)
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the primary still refuses writes after the abort: %v", err)
		}
		time.Sleep(300 * time.Millisecond)
	}
	if primary, epoch := currentPrimary(t, c); primary != old || epoch != 1 {
		t.Fatalf("after the abort the primary is %s in epoch %d, want %s in epoch 1", primary, epoch, old)
	}
	converge(t, c, 2*time.Minute)
	for _, site := range c.Config.SiteNames() {
		var n, dup int
		if err := connect(t, c, site).QueryRow(ctx,
			`SELECT count(*), count(*) - count(DISTINCT (client, seq)) FROM ledger WHERE client IN (1, 3)`).Scan(&n, &dup); err != nil {
			t.Fatal(err)
		}
		if n != 100 || dup != 0 {
			t.Errorf("site %s: %d rows of clients 1 and 3 with %d doubled, want 100 and none", site, n, dup)
		}
	}
}
