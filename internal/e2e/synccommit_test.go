package e2e

import (
	"testing"
	"time"

	"github.com/xdcr/xdcr/deploy/topology"
	"github.com/xdcr/xdcr/internal/config"
)

// TestApplySynchronousCommit: by default apply turns synchronous_commit off
// for its session whatever the replica says; with apply.synchronous_commit
// it keeps the replica's own setting (here the database's, on, over the
// suite's servers' off). Either way every row arrives once.
func TestApplySynchronousCommit(t *testing.T) {
	for _, tc := range []struct {
		name string
		keep bool
		want string
	}{
		{name: "default", keep: false, want: "off"},
		{name: "kept", keep: true, want: "on"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t, clusterOpts{
				schema:   `CREATE TABLE public.items (id int PRIMARY KEY, note text NOT NULL)`,
				tables:   []string{"items"},
				tune:     func(cfg *config.Config) { cfg.Apply.SynchronousCommit = tc.keep },
				noAgents: true,
			})
			for _, site := range replicas(c) {
				execOn(t, c, site, `DO $$ BEGIN
					EXECUTE format('ALTER DATABASE %I SET synchronous_commit = on', current_database());
				END $$`)
			}
			if err := c.StartAgents(t.Context()); err != nil {
				t.Fatal(err)
			}
			if err := c.WaitReady(t.Context()); err != nil {
				t.Fatalf("wait ready: %v", err)
			}
			execOn(t, c, c.Config.Primary, `INSERT INTO items SELECT g, 'row ' || g FROM generate_series(1, 100) g`)
			converge(t, c, time.Minute, "public.items")
			for _, site := range replicas(c) {
				if n, err := queryInt(t, c, site, `SELECT count(DISTINCT id) FROM items WHERE note = 'row ' || id`); err != nil || n != 100 {
					t.Errorf("site %s: %d distinct rows (%v), want 100", site, n, err)
				}
				e := waitLog(t, c, topology.NodeID(site), "apply streaming", 30*time.Second)
				if got := e["synchronous_commit"]; got != tc.want {
					t.Errorf("site %s: apply's session has synchronous_commit %v, want %s", site, got, tc.want)
				}
			}
		})
	}
}
