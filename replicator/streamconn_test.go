package replicator

import (
	"errors"
	"net"
	"os"
	"testing"
	"time"
)

func TestStreamConn(t *testing.T) {
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
	peer := <-accepted
	defer peer.Close()
	c := newStreamConn(raw, 5*time.Millisecond)
	defer c.Close()
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

	// caught up, a patient read waits (a gulp at most) before it reads,
	// so that more arrives; an eager one returns what is there
	c.Behind(false)
	c.Patient(time.Now().Add(time.Hour))
	if _, err := peer.Write([]byte("abc")); err != nil {
		t.Fatal(err)
	}
	now = time.Now()
	if err := c.ReadBy(now, now.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Read(buf); err != nil || string(buf[:n]) != "abc" {
		t.Fatalf("patient read %q, %v; want abc", buf[:n], err)
	}
	if d := time.Since(now); d < 4*time.Millisecond {
		t.Fatalf("a patient read returned after %v, before its gulp of 5ms", d)
	}
	c.Patient(time.Time{})
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
