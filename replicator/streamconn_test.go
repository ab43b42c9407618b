package replicator

import (
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"
)

// pipe connects a streamConn to a peer over loopback TCP.
func pipe(t *testing.T, gulp time.Duration) (c *streamConn, peer net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	peer = <-accepted
	c = newStreamConn(raw, gulp)
	t.Cleanup(func() { c.Close(); peer.Close() })
	return c, peer
}

func TestStreamConn(t *testing.T) {
	c, peer := pipe(t, 5*time.Millisecond)
	c.Behind(true)
	buf := make([]byte, 64)

	// a deadline shorter than the gulp still reads what arrived
	if _, err := peer.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	if err := c.ReadBy(now, now.Add(time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Read(buf); err != nil || string(buf[:n]) != "hello" {
		t.Fatalf("read %q, %v; want hello", buf[:n], err)
	}

	// caught up, a read before the next flush waits for it, so that more
	// arrives; one after it returns what is there
	c.Behind(false)
	c.Pace(time.Now().Add(20*time.Millisecond), false)
	if _, err := peer.Write([]byte("abc")); err != nil {
		t.Fatal(err)
	}
	now = time.Now()
	if err := c.ReadBy(now, now.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Read(buf); err != nil || string(buf[:n]) != "abc" {
		t.Fatalf("paced read %q, %v; want abc", buf[:n], err)
	}
	if d := time.Since(now); d < 19*time.Millisecond {
		t.Fatalf("a paced read returned after %v, before its flush (20ms)", d)
	}
	c.Pace(time.Time{}, false)
	if _, err := peer.Write([]byte("d")); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if n, err := c.Read(buf); err != nil || string(buf[:n]) != "d" {
		t.Fatalf("eager read %q, %v; want d", buf[:n], err)
	}
	if d := time.Since(start); d > 4*time.Millisecond {
		t.Logf("note: an eager read took %v", d)
	}
	c.Behind(true)

	// nothing arrives: the read times out soon after the deadline
	now = time.Now()
	if err := c.ReadBy(now, now.Add(20*time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Read(buf); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read with nothing sent: %v, want a timeout", err)
	}
	if d := time.Since(now); d > time.Second {
		t.Fatalf("the timeout came after %v", d)
	}

	// an interrupt fails a read waiting for a far deadline at once, and
	// every later ReadBy
	now = time.Now()
	if err := c.ReadBy(now, now.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	go func() { time.Sleep(30 * time.Millisecond); c.Interrupt() }()
	if _, err := c.Read(buf); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("interrupted read: %v, want a timeout", err)
	}
	if err := c.ReadBy(time.Now(), time.Now().Add(time.Second)); err == nil {
		t.Fatal("ReadBy after Interrupt succeeded")
	}
}

// An interrupt ends a paced read's wait at once, not when the wait would
// have ended.
func TestStreamConnInterruptWait(t *testing.T) {
	c, _ := pipe(t, 5*time.Millisecond)
	c.Pace(time.Now().Add(time.Hour), false)
	now := time.Now()
	if err := c.ReadBy(now, now.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	go func() { time.Sleep(30 * time.Millisecond); c.Interrupt() }()
	buf := make([]byte, 8)
	if _, err := c.Read(buf); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("interrupted read: %v, want a timeout", err)
	}
	if d := time.Since(now); d > 5*time.Second {
		t.Fatalf("the interrupted read returned after %v", d)
	}
}

// A caller holding a due flush gets what is buffered, then errDry at once
// (a timeout, which pgconn survives) rather than a wait for more.
func TestStreamConnDry(t *testing.T) {
	c, peer := pipe(t, 5*time.Millisecond)
	if _, err := peer.Write([]byte("xy")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1)
	if n, err := c.Read(buf); err != nil || string(buf[:n]) != "x" {
		t.Fatalf("read %q, %v; want x", buf[:n], err)
	}
	c.Pace(time.Now().Add(-time.Millisecond), true)
	if n, err := c.Read(buf); err != nil || string(buf[:n]) != "y" {
		t.Fatalf("buffered read %q, %v; want y", buf[:n], err)
	}
	start := time.Now()
	_, err := c.Read(buf)
	var ne net.Error
	if !errors.Is(err, errDry) || !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("read with a due flush and nothing buffered: %v, want errDry (a timeout)", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("errDry came after %v", d)
	}
	// not yet due: the read waits for the flush time and then reads
	c.Pace(time.Now().Add(20*time.Millisecond), true)
	if _, err := peer.Write([]byte("z")); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	if n, err := c.Read(buf); err != nil || string(buf[:n]) != "z" {
		t.Fatalf("read %q, %v; want z", buf[:n], err)
	}
	if d := time.Since(start); d < 19*time.Millisecond {
		t.Fatalf("a read before a held flush returned after %v, before its time (20ms)", d)
	}
}

// After a read that filled the buffer a read does not wait: the sender
// is ahead.
func TestStreamConnFullReadDoesNotWait(t *testing.T) {
	raw, peer := net.Pipe()
	c := newStreamConn(raw, time.Hour)
	t.Cleanup(func() { c.Close(); peer.Close() })
	data := make([]byte, gulpSize+100)
	go peer.Write(data)
	buf := make([]byte, gulpSize)
	got := 0
	for got < gulpSize {
		n, err := c.Read(buf[:gulpSize-got])
		if err != nil {
			t.Fatal(err)
		}
		got += n
	}
	c.Behind(true) // a gulp of an hour
	c.Pace(time.Now().Add(time.Hour), false)
	done := make(chan error, 1)
	go func() {
		_, err := io.ReadFull(c, buf[:100])
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a read after a full one waited")
	}
}
