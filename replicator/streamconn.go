package replicator

import (
	"bufio"
	"context"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// streamConn is the replication connection's socket, read the way the
// capture loop wants it read.
//
// The walsender sends every decoded change as soon as it has it; a reader
// that is always waiting gets one small message per read and wakes up once
// per change, and the sender then pays one send per change too. While the
// source is far ahead of what was received (Behind), each read from the
// socket first lets the kernel gather what the sender produces for a moment
// (gulp), so one read brings in many messages and both sides do less work.
//
// Once caught up, the capture loop paces its messages (Pace): nothing goes
// out before the next flush time, so reading sooner gains nothing. A read
// then waits until that time and takes in everything that committed
// meanwhile in one go, and once that has been decoded (the buffer is empty
// again) it returns errDry at once instead of waiting for more, so that
// what was gathered goes out now. Under load that is one wake-up, one read
// and one publish per flush interval; an isolated transaction is read
// eagerly and goes out as soon as it is decoded.
//
// A read that filled the whole buffer never waits: more is already there.
//
// It also keeps the read deadline the capture loop asks for without
// touching the socket when the deadline does not move earlier, so the loop
// need not wrap every message in a context with a timer.
type streamConn struct {
	net.Conn
	r       *bufio.Reader
	gulp    time.Duration
	behind  atomic.Bool
	next    atomic.Int64  // unix nanoseconds of the next flush; 0 for none
	holding atomic.Bool   // the caller holds whole transactions for that flush
	full    atomic.Bool   // the last read from the socket filled the buffer
	pause   *time.Timer   // a read's wait
	stop    chan struct{} // closed by Interrupt: waits end at once

	mu       sync.Mutex
	deadline time.Time // read deadline in force; zero when unknown
	closed   bool      // the session's context ended: reads fail at once
}

// gulpSize is the read buffer; a gulp larger than it is read in pieces.
const gulpSize = 256 << 10

func newStreamConn(c net.Conn, gulp time.Duration) *streamConn {
	sc := &streamConn{Conn: c, gulp: gulp, stop: make(chan struct{})}
	sc.r = bufio.NewReaderSize(socketReader{sc}, gulpSize)
	return sc
}

// socketReader reads the socket for the buffer and notes whether a read
// filled it.
type socketReader struct{ c *streamConn }

func (r socketReader) Read(p []byte) (int, error) {
	n, err := r.c.Conn.Read(p)
	r.c.full.Store(n == len(p))
	return n, err
}

// errDry ends a read when everything received has been decoded and the
// caller holds a message that is due: it is to go out before more is
// read. It is a timeout (pgconn keeps the connection after one).
var errDry error = dryError{}

type dryError struct{}

func (dryError) Error() string   { return "replication stream: read everything received; a flush is due" }
func (dryError) Timeout() bool   { return true }
func (dryError) Temporary() bool { return true }

// Read is never called concurrently: pgconn reads one message at a time.
func (c *streamConn) Read(p []byte) (int, error) {
	if c.r.Buffered() == 0 {
		now := time.Now().UnixNano()
		next := c.next.Load()
		var wait time.Duration
		switch {
		case next != 0 && now >= next && c.holding.Load():
			return 0, errDry
		case c.full.Load():
		case c.behind.Load():
			wait = c.gulp
		case now < next:
			wait = time.Duration(next - now)
		}
		if wait > 0 {
			c.wait(wait)
			c.keepRead()
		}
	}
	return c.r.Read(p)
}

// wait sleeps for d or until Interrupt, whichever comes first.
func (c *streamConn) wait(d time.Duration) {
	if c.pause == nil {
		c.pause = time.NewTimer(d)
	} else {
		c.pause.Reset(d)
	}
	select {
	case <-c.pause.C:
	case <-c.stop:
		c.pause.Stop()
	}
}

// Pace tells reads when the caller's next message may go out (the zero
// time: whenever) and whether it holds whole transactions for it. The
// caller bounds next: the capture loop passes its last publish plus the
// flush interval.
func (c *streamConn) Pace(next time.Time, holding bool) {
	var n int64
	if !next.IsZero() {
		n = next.UnixNano()
	}
	c.next.Store(n)
	c.holding.Store(holding)
}

// keepRead moves a read deadline that passed while the read waited (for a
// gulp, or for the next flush) a little beyond now, so that what arrived
// is still read: a deadline shorter than the wait would otherwise fail
// every read.
func (c *streamConn) keepRead() {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	if c.closed || c.deadline.IsZero() || c.deadline.After(now) {
		return
	}
	c.deadline = now.Add(time.Millisecond)
	_ = c.Conn.SetReadDeadline(c.deadline)
}

// Behind says whether the source has much more WAL to send than was read.
func (c *streamConn) Behind(b bool) { c.behind.Store(b) }

// ReadBy makes a read fail with a timeout at t (or, after a gulp, a
// moment later): a deadline in force that is earlier and not yet passed is
// kept (an early return only makes the caller look around sooner).
func (c *streamConn) ReadBy(now, t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return context.Canceled
	}
	if !c.deadline.IsZero() && c.deadline.After(now) && !c.deadline.After(t) {
		return nil
	}
	c.deadline = t
	return c.Conn.SetReadDeadline(t)
}

// Interrupt fails the read in progress and every later one: the session's
// context ended.
func (c *streamConn) Interrupt() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.closed {
		close(c.stop)
	}
	c.closed = true
	c.deadline = time.Time{}
	_ = c.Conn.SetReadDeadline(time.Unix(1, 0))
}

// SetDeadline and SetReadDeadline are pgconn's own (it moves the deadline
// to cancel a call): the deadline in force is unknown afterwards.
func (c *streamConn) SetDeadline(t time.Time) error {
	c.forget()
	return c.Conn.SetDeadline(t)
}

func (c *streamConn) SetReadDeadline(t time.Time) error {
	c.forget()
	return c.Conn.SetReadDeadline(t)
}

func (c *streamConn) forget() {
	c.mu.Lock()
	c.deadline = time.Time{}
	c.mu.Unlock()
}
