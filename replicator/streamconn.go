package replicator

import (
	"bufio"
	"context"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// streamConn is the replication connection's socket, read the way a
// catch-up wants it read.
//
// The walsender sends every decoded change as soon as it has it; a reader
// that is always waiting gets one small message per read and wakes up once
// per change, and the sender then pays one send per change too. While the
// source is far ahead of what was received (Behind), each read from the
// socket first lets the kernel gather what the sender produces for a moment
// (gulp), so one read brings in many messages and both sides do less work.
// Once caught up, reads are eager again, except while the capture loop
// holds committed transactions back to share a message with later ones
// anyway (Patient): a read waits, up to a gulp, until shortly before that
// message goes out, and what committed meanwhile still joins it.
//
// It also keeps the read deadline the capture loop asks for without
// touching the socket when the deadline does not move earlier, so the loop
// need not wrap every message in a context with a timer.
type streamConn struct {
	net.Conn
	r       *bufio.Reader
	gulp    time.Duration
	behind  atomic.Bool
	patient atomic.Int64 // unix nanoseconds a read may wait until; 0 for none

	mu       sync.Mutex
	deadline time.Time // read deadline in force; zero when unknown
	closed   bool      // the session's context ended: reads fail at once
}

// gulpSize is the read buffer; a gulp larger than it is read in pieces.
const gulpSize = 256 << 10

func newStreamConn(c net.Conn, gulp time.Duration) *streamConn {
	return &streamConn{Conn: c, r: bufio.NewReaderSize(c, gulpSize), gulp: gulp}
}

func (c *streamConn) Read(p []byte) (int, error) {
	if c.r.Buffered() == 0 && c.gulp > 0 {
		var wait time.Duration
		if c.behind.Load() {
			wait = c.gulp
		} else if until := c.patient.Load(); until != 0 {
			wait = min(c.gulp, time.Until(time.Unix(0, until)))
		}
		if wait > 0 {
			time.Sleep(wait)
			c.keepGulp()
		}
	}
	return c.r.Read(p)
}

// Patient lets reads wait until t for more to arrive (the zero time:
// read eagerly).
func (c *streamConn) Patient(t time.Time) {
	var n int64
	if !t.IsZero() {
		n = t.UnixNano()
	}
	c.patient.Store(n)
}

// keepGulp moves a read deadline that passed while waiting for the gulp a
// little beyond now, so that what arrived is still read: a deadline
// shorter than the gulp would otherwise fail every read.
func (c *streamConn) keepGulp() {
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
