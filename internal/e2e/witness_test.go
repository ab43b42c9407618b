package e2e

import (
	"testing"
	"time"

	"github.com/xdcr/xdcr/deploy/local"
)

// TestTwoSitesAndWitness: two data sites and a witness node form the Raft
// group; losing the witness, or the replica, leaves a majority that keeps
// answering.
func TestTwoSitesAndWitness(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test")
	}
	saved := env.sites
	env.sites = &local.Sites{List: saved.List[:2]}
	c := newCluster(t, clusterOpts{schema: padSchema, tables: []string{"items"}})
	env.sites = saved
	if _, ok := c.Config.Node("w1"); !ok {
		t.Fatal("a two-site cluster has no witness node")
	}
	execOn(t, c, c.Config.Primary, `INSERT INTO items VALUES (1, 'a')`)
	converge(t, c, time.Minute)

	for _, victim := range []string{"w1", "b1"} {
		if err := c.KillAgent(victim); err != nil {
			t.Fatal(err)
		}
		execOn(t, c, c.Config.Primary, `INSERT INTO items VALUES (2, 'b') ON CONFLICT (id) DO UPDATE SET v = items.v || '+'`)
		eventually(t, 30*time.Second, "xdcr lag without "+victim, func() error {
			_, err := tryLagStatus(t, c)
			return err
		})
		if err := c.StartAgent(t.Context(), victim); err != nil {
			t.Fatal(err)
		}
	}
	converge(t, c, time.Minute)
}
