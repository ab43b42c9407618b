package consensus

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"maps"
	"net"
	"slices"
	"time"

	"github.com/hashicorp/raft"
)

// streamLayer is the [raft.StreamLayer] under raft's NetworkTransport: a TCP
// listener for the RPCs other nodes send us, and a dialer for the ones we
// send. With a *tls.Config both sides speak mutual TLS, and every handshake
// checks that the other end is a member of the group by name:
//
//   - listening, the client must present a certificate that the config's
//     ClientCAs verify and that names a member (a DNS SAN, or the common
//     name, equal to a peer's node id);
//   - dialing, the server must present a certificate that RootCAs verify
//     and that names exactly the node whose address we dial: ServerName is
//     set to that node's id, so crypto/tls's host name check does it.
//
// Node certificates therefore carry their node id as a DNS SAN ("a1"),
// besides whatever names and addresses they are reached by.
//
// What the listening side cannot check is which member an inbound
// connection speaks for: a stolen certificate of member a1 can send RPCs
// as another node. Keep the keys as secret as the CA's.
//
// A TLS handshake happens on the first read or write of a connection, in
// raft's goroutine for that connection; a peer speaking plain TCP to a TLS
// listener (or the reverse) fails there and the connection is closed.
type streamLayer struct {
	net.Listener
	advertise net.Addr
	tls       *tls.Config       // nil: plain TCP
	ids       map[string]string // peer address -> node id
	via       map[string]string // peer address -> address to dial instead
}

var _ raft.StreamLayer = (*streamLayer)(nil)

// newStreamLayer listens on bind. advertise is the host:port other nodes dial
// to reach us; it is what raft records as this node's address. peers are the
// members a TLS handshake accepts.
func newStreamLayer(bind, advertise string, tlsConfig *tls.Config, peers []Peer, via map[string]string) (*streamLayer, error) {
	s := &streamLayer{advertise: addr(advertise), ids: map[string]string{}, via: via}
	members := map[string]bool{}
	for _, p := range peers {
		s.ids[p.Address] = p.ID
		members[p.ID] = true
	}
	var server *tls.Config
	if tlsConfig != nil {
		// Dialing, crypto/tls checks the other end's certificate against the
		// ServerName Dial sets: the node we mean to reach.
		s.tls = tlsConfig.Clone()
		// Accepting, the client's certificate must name a member. The SNI a
		// client sends proves nothing, so this check never looks at it.
		server = tlsConfig.Clone()
		if server.ClientCAs == nil {
			server.ClientCAs = server.RootCAs
		}
		server.ClientAuth = tls.RequireAndVerifyClientCert
		server.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("raft: the peer sent no certificate")
			}
			names := certNames(cs.PeerCertificates[0])
			for _, n := range names {
				if members[n] {
					return nil
				}
			}
			return fmt.Errorf("raft: refused a connection with a certificate for %v: it names no node of the group (%v)", names, slices.Sorted(maps.Keys(members)))
		}
	}
	ln, err := net.Listen("tcp", bind)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", bind, err)
	}
	if server != nil {
		ln = tls.NewListener(ln, server)
	}
	s.Listener = ln
	return s, nil
}

// certNames are the names a certificate is for: its DNS SANs and common
// name.
func certNames(c *x509.Certificate) []string {
	names := slices.Clone(c.DNSNames)
	if c.Subject.CommonName != "" && !slices.Contains(names, c.Subject.CommonName) {
		names = append(names, c.Subject.CommonName)
	}
	return names
}

// Addr is the advertised address, not the bound one: raft's NetworkTransport
// uses it as this node's [raft.ServerAddress].
func (s *streamLayer) Addr() net.Addr { return s.advertise }

// Dial opens a connection to another node, TLS handshake included, within
// timeout (raft passes its transport timeout). With TLS the other end must
// prove it is the node we mean to reach.
func (s *streamLayer) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	d := &net.Dialer{Timeout: timeout}
	target := string(address)
	if v, ok := s.via[target]; ok {
		target = v
	}
	if s.tls == nil {
		return d.Dial("tcp", target)
	}
	id, ok := s.ids[string(address)]
	if !ok {
		return nil, fmt.Errorf("raft: %s is no node's address in the group; not dialing it", address)
	}
	c := s.tls.Clone()
	c.ServerName = id
	conn, err := tls.DialWithDialer(d, "tcp", target, c)
	if err != nil {
		return nil, fmt.Errorf("raft: TLS to node %s at %s: %w", id, address, err)
	}
	return conn, nil
}

// addr is a host:port that may name a host rather than an IP (net.TCPAddr
// cannot), e.g. a Kubernetes headless-service name.
type addr string

func (a addr) Network() string { return "tcp" }
func (a addr) String() string  { return string(a) }
