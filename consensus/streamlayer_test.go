package consensus

import (
	"crypto/tls"
	"net"
	"testing"
	"time"

	"github.com/xdcr/xdcr/internal/certs"
)

// testCA is a throwaway certificate authority.
type testCA struct{ ca *certs.CA }

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	ca, err := certs.NewCA("xdcr test CA")
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{ca}
}

// nodeTLS returns a node's TLS config: a certificate naming id, for
// 127.0.0.1, usable as server and client, the CA as the only root both
// ways, client certificates required (mutual TLS).
func (ca *testCA) nodeTLS(t *testing.T, id string) *tls.Config {
	t.Helper()
	c, err := ca.ca.TLS(id, []net.IP{net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// Two TLS nodes form a majority of three and replicate; the third speaks
// plain TCP and never joins: it neither hears a leader nor gets the state.
func TestTLSStreamLayer(t *testing.T) {
	if testing.Short() {
		t.Skip("waits several heartbeats")
	}
	ca := newTestCA(t)
	c := newCluster(t, 3, func(i int, cfg *Config) {
		if i < 2 {
			cfg.TLS = ca.nodeTLS(t, cfg.ID)
		}
	})
	l := c.leader2(0, 1)
	c.apply(l, bootstrapCmd(t))
	c.apply(l, sourceCmd(t, 0x100))
	want := c.consistent(l)
	w := stateJSON(t, want)
	eventually(t, "both TLS nodes converge", func() bool {
		return stateJSON(t, c.nodes[0].LocalState()) == w && stateJSON(t, c.nodes[1].LocalState()) == w
	})

	time.Sleep(3 * testHeartbeat) // time for the plain node to have joined, were it able to
	plain := c.nodes[2]
	if id, _ := plain.Leader(); id != "" {
		t.Errorf("the plain-TCP node knows leader %q", id)
	}
	if plain.LocalState().Bootstrapped() {
		t.Error("the plain-TCP node got the state")
	}
	if s := plain.Stats(); s.LastContact != -1 || s.CommitIndex != 0 {
		t.Errorf("the plain-TCP node's stats: %+v, want no contact and nothing committed", s)
	}
	if !c.nodes[l].IsLeader() {
		t.Error("the plain-TCP node's elections unseated the leader")
	}
}

// A TLS node with a certificate from another CA is refused too.
func TestTLSRefusesForeignCA(t *testing.T) {
	if testing.Short() {
		t.Skip("waits several heartbeats")
	}
	ca, other := newTestCA(t), newTestCA(t)
	c := newCluster(t, 3, func(i int, cfg *Config) {
		if i < 2 {
			cfg.TLS = ca.nodeTLS(t, cfg.ID)
		} else {
			cfg.TLS = other.nodeTLS(t, cfg.ID)
		}
	})
	l := c.leader2(0, 1)
	c.apply(l, bootstrapCmd(t))
	time.Sleep(3 * testHeartbeat)
	if id, _ := c.nodes[2].Leader(); id != "" || c.nodes[2].LocalState().Bootstrapped() {
		t.Errorf("the node of another CA joined: leader %q, bootstrapped %v", id, c.nodes[2].LocalState().Bootstrapped())
	}
}

// leader2 waits until node a or b is leader and the other knows it, and
// returns its index (the third node may not know).
func (c *cluster) leader2(a, b int) int {
	c.t.Helper()
	found := -1
	eventually(c.t, "a leader among the TLS nodes", func() bool {
		found = -1
		for _, i := range []int{a, b} {
			if c.nodes[i].IsLeader() {
				found = i
			}
		}
		if found < 0 {
			return false
		}
		for _, i := range []int{a, b} {
			if id, _ := c.nodes[i].Leader(); id != c.cfgs[found].ID {
				return false
			}
		}
		return true
	})
	return found
}

// A node whose certificate, from the right CA, names no member of the group
// is refused; so is one that presents another member's certificate at its
// own address (dialing it, the others expect its own name).
func TestTLSChecksNodeNames(t *testing.T) {
	if testing.Short() {
		t.Skip("waits several heartbeats")
	}
	for _, name := range []string{"intruder", "n1"} {
		t.Run(name, func(t *testing.T) {
			ca := newTestCA(t)
			c := newCluster(t, 3, func(i int, cfg *Config) {
				id := cfg.ID
				if i == 2 {
					id = name
				}
				cfg.TLS = ca.nodeTLS(t, id)
			})
			l := c.leader2(0, 1)
			c.apply(l, bootstrapCmd(t))
			c.apply(l, sourceCmd(t, 0x100))
			time.Sleep(3 * testHeartbeat)
			if c.nodes[2].LocalState().Bootstrapped() {
				t.Errorf("the node with a certificate for %q got the state", name)
			}
			if !c.nodes[l].IsLeader() {
				t.Error("the impostor unseated the leader")
			}
		})
	}
}
