package consensus

import (
	"crypto/tls"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"

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
// never joins it: the members refuse its connections both ways, so it
// neither wins a vote nor gets the state.
func TestTLSRefusesIntruder(t *testing.T) {
	if testing.Short() {
		t.Skip("waits several heartbeats")
	}
	ca := newTestCA(t)
	c := newCluster(t, 3, func(i int, cfg *Config) {
		id := cfg.ID
		if i == 2 {
			id = "intruder"
		}
		cfg.TLS = ca.nodeTLS(t, id)
	})
	l := c.leader2(0, 1)
	c.apply(l, bootstrapCmd(t))
	c.apply(l, sourceCmd(t, 0x100))
	time.Sleep(3 * testHeartbeat)
	if c.nodes[2].LocalState().Bootstrapped() {
		t.Error("the node with a certificate for \"intruder\" got the state")
	}
	if !c.nodes[l].IsLeader() {
		t.Error("the intruder unseated the leader")
	}
}

// The stream layer's own checks, without raft: a listener refuses a client
// whose certificate names no member whatever name the client asks for; a
// dialer refuses a server that answers at a member's address with another
// member's certificate.
func TestStreamLayerChecksNames(t *testing.T) {
	ca := newTestCA(t)
	listen := func(id string, peers []Peer) *streamLayer {
		s, err := newStreamLayer("127.0.0.1:0", "", ca.nodeTLS(t, id), peers, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		go func() {
			for {
				conn, err := s.Accept()
				if err != nil {
					return
				}
				go func() {
					defer conn.Close()
					// The handshake runs on first use; its error is the
					// refusal. A member's byte comes back.
					b := make([]byte, 1)
					if _, err := conn.Read(b); err == nil {
						_, _ = conn.Write(b)
					}
				}()
			}
		}()
		return s
	}
	// n1 listens; n2 is a member; "intruder" is not.
	n1 := listen("n1", []Peer{{ID: "n1"}, {ID: "n2"}})
	n1Addr := n1.Listener.Addr().String()
	dial := func(as string, peers []Peer, to string) error {
		d, err := newStreamLayer("127.0.0.1:0", "", ca.nodeTLS(t, as), peers, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		conn, err := d.Dial(raft.ServerAddress(to), 5*time.Second)
		if err != nil {
			return err
		}
		defer conn.Close()
		// TLS 1.3: the server's verdict on our certificate arrives with the
		// first read.
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := conn.Write([]byte{0}); err != nil {
			return err
		}
		_, err = conn.Read(make([]byte, 1))
		return err
	}
	members := []Peer{{ID: "n1", Address: n1Addr}, {ID: "n2"}}
	if err := dial("n2", members, n1Addr); err != nil {
		t.Errorf("member n2 dialing n1: %v", err)
	}
	err := dial("intruder", members, n1Addr)
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("intruder dialing n1 (asking for n1 by name) was not refused: %v", err)
	}
	// Dialing n2's address, the answer comes with n1's certificate.
	wrong := []Peer{{ID: "n2", Address: n1Addr}}
	if err := dial("n2", wrong, n1Addr); err == nil || !strings.Contains(err.Error(), "n2") {
		t.Errorf("dialing n2 at an address that answers as n1: %v", err)
	}
}
