// Package faults injects faults into a local xdcr deployment (deploy/local,
// deploy/topology): TCP proxies on the links between sites that can cut,
// black-hole, delay and throttle a link ([Proxy], [WAN]), and pausing a
// process with SIGSTOP ([Pause]). Everything runs in the calling process
// and touches only loopback addresses.
//
// The proxy is this package's own, not github.com/Shopify/toxiproxy/v2:
// toxiproxy as a library brings gorilla/mux, zerolog, urfave/cli and
// tomb.v1 into the module for tests only, and its "disabled" proxy closes
// its listener, so another process may take the port before it is enabled
// again. Here a cut proxy keeps its port and refuses connections itself.
package faults

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"
)

// Mode is what a proxy does with traffic.
type Mode int

const (
	// Pass forwards traffic (with the delay and rate limit, if set).
	Pass Mode = iota
	// Refuse closes every open connection and closes new ones at once: the
	// peers see "connection reset" or EOF, as when a firewall rejects them.
	Refuse
	// Blackhole forwards nothing and closes nothing: open connections
	// stall, new ones are accepted and then stall, as when a link drops
	// every packet. Only the peers' own timeouts notice. Restoring the
	// link lets the stalled connections go on where they were.
	Blackhole
)

func (m Mode) String() string {
	switch m {
	case Pass:
		return "pass"
	case Refuse:
		return "refuse"
	case Blackhole:
		return "blackhole"
	}
	return fmt.Sprintf("mode(%d)", int(m))
}

// Proxy is a TCP proxy from a loopback port to a target address. Its
// methods are safe for concurrent use.
type Proxy struct {
	name   string
	target string
	ln     net.Listener
	log    *slog.Logger

	mu      sync.Mutex
	mode    Mode
	delay   time.Duration
	rate    int // bytes per second per direction and connection; 0: no limit
	conns   map[*proxyConn]struct{}
	changed chan struct{} // closed and replaced whenever mode, delay or rate change
	closed  bool

	accepted, refused int
	wg                sync.WaitGroup
}

// NewProxy listens on listen ("127.0.0.1:0" picks a free port) and forwards
// every connection to target. name appears in the log lines.
func NewProxy(name, listen, target string, log *slog.Logger) (*Proxy, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, fmt.Errorf("proxy %s: %w", name, err)
	}
	p := &Proxy{
		name: name, target: target, ln: ln,
		log:     log.With("proxy", name, "addr", ln.Addr().String(), "target", target),
		conns:   map[*proxyConn]struct{}{},
		changed: make(chan struct{}),
	}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Name returns the proxy's name.
func (p *Proxy) Name() string { return p.name }

// Addr returns the host:port the proxy listens on.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Target returns the address the proxy forwards to.
func (p *Proxy) Target() string { return p.target }

// Mode returns the proxy's mode.
func (p *Proxy) Mode() Mode {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.mode
}

// Stats returns how many connections the proxy forwarded and how many it
// refused.
func (p *Proxy) Stats() (accepted, refused int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.accepted, p.refused
}

// Cut closes every open connection and refuses new ones until Restore.
func (p *Proxy) Cut() { p.setMode(Refuse) }

// Blackhole stalls every open and new connection until Restore.
func (p *Proxy) Blackhole() { p.setMode(Blackhole) }

// Restore forwards traffic again. Delay and rate limit stay as set.
func (p *Proxy) Restore() { p.setMode(Pass) }

func (p *Proxy) setMode(m Mode) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.mode == m {
		return
	}
	p.mode = m
	if m == Refuse {
		for c := range p.conns {
			c.close()
		}
	}
	p.notify()
	p.log.Info("link mode", "mode", m.String())
}

// SetDelay delays every chunk of data by d in each direction (0: none).
// Data stays in order; a connection's throughput is unchanged.
func (p *Proxy) SetDelay(d time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.delay = max(d, 0)
	p.notify()
	p.log.Info("link delay", "delay", p.delay)
}

// SetRate limits each direction of each connection to bytesPerSecond
// (0: no limit).
func (p *Proxy) SetRate(bytesPerSecond int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.rate = max(bytesPerSecond, 0)
	p.notify()
	p.log.Info("link rate", "bytes_per_second", p.rate)
}

// notify wakes every forwarder waiting on a setting; p.mu is held.
func (p *Proxy) notify() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// settings returns the current mode, delay and rate, and a channel closed
// on the next change.
func (p *Proxy) settings() (Mode, time.Duration, int, <-chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.mode, p.delay, p.rate, p.changed
}

// Close stops listening, closes every connection and waits for the
// proxy's goroutines. It is idempotent.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	p.mode = Refuse // wakes and ends every forwarder
	err := p.ln.Close()
	for c := range p.conns {
		c.close()
	}
	p.notify()
	p.mu.Unlock()
	p.wg.Wait()
	return err
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			p.log.Warn("accept", "err", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		p.mu.Lock()
		if p.mode == Refuse || p.closed {
			p.refused++
			p.mu.Unlock()
			resetClose(client)
			continue
		}
		p.accepted++
		c := &proxyConn{client: client}
		p.conns[c] = struct{}{}
		p.wg.Add(1)
		p.mu.Unlock()
		go p.serve(c)
	}
}

// resetClose closes c with a TCP reset rather than a FIN where it can.
func resetClose(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

// proxyConn is one forwarded connection.
type proxyConn struct {
	client   net.Conn
	mu       sync.Mutex
	upstream net.Conn
	closed   bool
}

func (c *proxyConn) setUpstream(u net.Conn) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.upstream = u
	return true
}

func (c *proxyConn) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.closed = true
	resetClose(c.client)
	if c.upstream != nil {
		resetClose(c.upstream)
	}
}

func (p *Proxy) serve(c *proxyConn) {
	defer p.wg.Done()
	defer func() {
		c.close()
		p.mu.Lock()
		delete(p.conns, c)
		p.mu.Unlock()
	}()
	// a black-holed link does not even complete the connection upstream
	if !p.waitPass(c) {
		return
	}
	up, err := net.DialTimeout("tcp", p.target, 5*time.Second)
	if err != nil {
		p.log.Debug("dial target", "err", err)
		return
	}
	if !c.setUpstream(up) {
		_ = up.Close()
		return
	}
	done := make(chan struct{}, 2)
	go func() { p.pipe(c, up, c.client); done <- struct{}{} }()
	go func() { p.pipe(c, c.client, up); done <- struct{}{} }()
	<-done // one direction ended: end both
	c.close()
	<-done
}

// waitPass blocks while the proxy black-holes; it reports false once the
// connection should end (cut, or the proxy closed).
func (p *Proxy) waitPass(c *proxyConn) bool {
	for {
		mode, _, _, changed := p.settings()
		c.mu.Lock()
		closed := c.closed
		c.mu.Unlock()
		switch {
		case closed:
			return false
		case mode == Pass:
			return true
		case mode == Refuse:
			return false
		}
		<-changed
	}
}

// chunk is data read from one side, with when it was read.
type chunk struct {
	data []byte
	at   time.Time
}

// pipe copies src to dst, holding data back while black-holed and
// applying the delay and the rate limit. A reader goroutine keeps reading
// so that the delay does not lower throughput; the queue between them is
// bounded, so a stalled writer stalls the reader, as TCP would.
func (p *Proxy) pipe(c *proxyConn, dst, src net.Conn) {
	queue := make(chan chunk, 64)
	go func() {
		defer close(queue)
		for {
			buf := make([]byte, 32<<10)
			n, err := src.Read(buf)
			if n > 0 {
				queue <- chunk{data: buf[:n], at: time.Now()}
			}
			if err != nil {
				return
			}
		}
	}()
	defer func() {
		for range queue { // let the reader finish once src is closed
		}
	}()
	for ch := range queue {
		for {
			mode, delay, rate, changed := p.settings()
			if mode == Refuse {
				c.close()
				return
			}
			if mode == Blackhole {
				<-changed
				continue
			}
			if wait := time.Until(ch.at.Add(delay)); wait > 0 {
				select {
				case <-time.After(wait):
				case <-changed:
					continue // settings changed: look again
				}
			}
			if err := writeLimited(dst, ch.data, rate); err != nil {
				if !errors.Is(err, net.ErrClosed) && !errors.Is(err, io.EOF) {
					p.log.Debug("forward", "err", err)
				}
				c.close()
				return
			}
			break
		}
	}
}

// writeLimited writes data, at most rate bytes per second when rate > 0.
func writeLimited(dst net.Conn, data []byte, rate int) error {
	if rate <= 0 {
		_, err := dst.Write(data)
		return err
	}
	// slices of at most 1/20 s worth of data, each followed by its share
	// of time
	step := max(rate/20, 1)
	for len(data) > 0 {
		n := min(step, len(data))
		start := time.Now()
		if _, err := dst.Write(data[:n]); err != nil {
			return err
		}
		data = data[n:]
		if want := time.Duration(float64(n) / float64(rate) * float64(time.Second)); time.Since(start) < want {
			time.Sleep(want - time.Since(start))
		}
	}
	return nil
}
