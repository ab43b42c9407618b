package consensus

import (
	"crypto/tls"
	"fmt"
	"net"
	"time"

	"github.com/hashicorp/raft"
)

// streamLayer is the [raft.StreamLayer] under raft's NetworkTransport: a TCP
// listener for the RPCs other nodes send us, and a dialer for the ones we
// send. With a *tls.Config both sides speak TLS with that one config:
//
//   - listening, it is the server config: Certificates (or GetCertificate)
//     are required; ClientAuth/ClientCAs turn on mutual TLS;
//   - dialing, it is the client config: RootCAs verify the peer, and
//     Certificates carry our client certificate when the peer asks for one.
//     ServerName may stay empty: crypto/tls then verifies the host of the
//     address we dial (an IP SAN for "10.1.0.5:7000").
//
// Checking that the certificate on the other end belongs to the node we meant
// to talk to (node ID in a SAN) is not done here. It belongs in the config's
// VerifyConnection callback, which crypto/tls runs on both sides of every
// handshake, so the security work only has to build that *tls.Config.
//
// A TLS handshake happens on the first read or write of a connection, in
// raft's goroutine for that connection; a peer speaking plain TCP to a TLS
// listener (or the reverse) fails there and the connection is closed.
type streamLayer struct {
	net.Listener
	advertise net.Addr
	tls       *tls.Config // nil: plain TCP
}

var _ raft.StreamLayer = (*streamLayer)(nil)

// newStreamLayer listens on bind. advertise is the host:port other nodes dial
// to reach us; it is what raft records as this node's address.
func newStreamLayer(bind, advertise string, tlsConfig *tls.Config) (*streamLayer, error) {
	ln, err := net.Listen("tcp", bind)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", bind, err)
	}
	if tlsConfig != nil {
		ln = tls.NewListener(ln, tlsConfig)
	}
	return &streamLayer{Listener: ln, advertise: addr(advertise), tls: tlsConfig}, nil
}

// Addr is the advertised address, not the bound one: raft's NetworkTransport
// uses it as this node's [raft.ServerAddress].
func (s *streamLayer) Addr() net.Addr { return s.advertise }

// Dial opens a connection to another node, TLS handshake included, within
// timeout (raft passes its transport timeout).
func (s *streamLayer) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	d := &net.Dialer{Timeout: timeout}
	if s.tls == nil {
		return d.Dial("tcp", string(address))
	}
	return tls.DialWithDialer(d, "tcp", string(address), s.tls)
}

// addr is a host:port that may name a host rather than an IP (net.TCPAddr
// cannot), e.g. a Kubernetes headless-service name.
type addr string

func (a addr) Network() string { return "tcp" }
func (a addr) String() string  { return string(a) }
