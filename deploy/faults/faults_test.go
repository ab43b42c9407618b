package faults

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"os/exec"
	"testing"
	"time"
)

// echoServer echoes every connection until the test ends.
func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

func newProxy(t *testing.T, target string) *Proxy {
	t.Helper()
	p, err := NewProxy("test", "127.0.0.1:0", target, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// carries reports whether a new connection to addr carries a line there
// and back. Through a cut link the connection may be reset while it is
// being made, or right after: both are refusals.
func carries(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	_, err = roundTrip(c, "probe", 2*time.Second)
	return err == nil
}

// roundTrip sends a line and reads it back within timeout.
func roundTrip(c net.Conn, line string, timeout time.Duration) (string, error) {
	_ = c.SetDeadline(time.Now().Add(timeout))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		return "", err
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	return string(bytes.TrimSuffix([]byte(got), []byte("\n"))), err
}

func TestProxyCutAndRestore(t *testing.T) {
	p := newProxy(t, echoServer(t))
	c := dial(t, p.Addr())
	if got, err := roundTrip(c, "hello", 2*time.Second); err != nil || got != "hello" {
		t.Fatalf("through the proxy: %q, %v", got, err)
	}
	p.Cut()
	// the open connection is closed...
	if _, err := roundTrip(c, "again", 2*time.Second); err == nil {
		t.Fatal("an open connection survived the cut")
	}
	// ...and new ones are refused (accepted, then closed at once)
	if carries(p.Addr()) {
		t.Fatal("a new connection went through a cut link")
	}
	if _, refused := p.Stats(); refused == 0 {
		t.Error("no refused connection counted")
	}
	p.Restore()
	c3 := dial(t, p.Addr())
	if got, err := roundTrip(c3, "back", 2*time.Second); err != nil || got != "back" {
		t.Fatalf("after restore: %q, %v", got, err)
	}
}

func TestProxyBlackhole(t *testing.T) {
	p := newProxy(t, echoServer(t))
	c := dial(t, p.Addr())
	if got, err := roundTrip(c, "one", 2*time.Second); err != nil || got != "one" {
		t.Fatalf("%q, %v", got, err)
	}
	p.Blackhole()
	_, err := roundTrip(c, "two", 300*time.Millisecond)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("a black-holed link answered or failed fast: %v", err)
	}
	// nothing was lost: once restored, the stalled line arrives
	p.Restore()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || got != "two\n" {
		t.Fatalf("after restore: %q, %v", got, err)
	}
}

func TestProxyDelayAndRate(t *testing.T) {
	p := newProxy(t, echoServer(t))
	c := dial(t, p.Addr())
	p.SetDelay(150 * time.Millisecond)
	start := time.Now()
	if got, err := roundTrip(c, "slow", 3*time.Second); err != nil || got != "slow" {
		t.Fatalf("%q, %v", got, err)
	}
	if took := time.Since(start); took < 300*time.Millisecond { // delayed both ways
		t.Errorf("round trip took %s with 150ms each way", took)
	}
	p.SetDelay(0)
	p.SetRate(100 << 10) // 100 KiB/s
	data := bytes.Repeat([]byte("x"), 50<<10)
	start = time.Now()
	go func() { _, _ = c.Write(data) }()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, len(data))); err != nil {
		t.Fatal(err)
	}
	// 50 KiB each way at 100 KiB/s: about 0.5 s
	if took := time.Since(start); took < 400*time.Millisecond {
		t.Errorf("50KiB through a 100KiB/s link took %s", took)
	}
}

func TestWANPartition(t *testing.T) {
	target := echoServer(t)
	w := NewWAN(nil)
	t.Cleanup(func() { w.Close() })
	ab, _ := w.Add(KindLeaf, "a", "b", target)
	ac, _ := w.Add(KindRaft, "a", "c", target)
	bc, _ := w.Add(KindRaft, "b", "c", target)
	cb, _ := w.Add(KindHTTP, "c", "b", target)
	if _, err := w.Add(KindLeaf, "a", "a", target); err == nil {
		t.Error("a link inside one site was accepted")
	}
	changed := w.Partition(Refuse, "b")
	if len(changed) != 3 {
		t.Errorf("partition of b changed %d links, want 3", len(changed))
	}
	for _, l := range []*Link{ab, bc, cb} {
		if l.Mode() != Refuse {
			t.Errorf("%s: %s, want refuse", l.Name(), l.Mode())
		}
	}
	if ac.Mode() != Pass {
		t.Errorf("%s was cut by a partition of b", ac.Name())
	}
	if got, err := roundTrip(dial(t, ac.Addr()), "ok", 2*time.Second); err != nil || got != "ok" {
		t.Errorf("a->c during the partition of b: %q, %v", got, err)
	}
	if carries(ab.Addr()) {
		t.Error("a->b went through during the partition of b")
	}
	if n := len(w.Of("c")); n != 3 {
		t.Errorf("c has %d links, want 3", n)
	}
	w.Heal()
	for _, l := range w.Links() {
		if l.Mode() != Pass {
			t.Errorf("%s still %s after heal", l.Name(), l.Mode())
		}
	}
}

func TestPauseResume(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Skip("no sleep binary:", err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	pid := cmd.Process.Pid
	if err := Pause(pid); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for {
		stopped, err := Stopped(pid)
		if err != nil {
			t.Fatal(err)
		}
		if stopped {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the process is not stopped after SIGSTOP")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := Resume(pid); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(2 * time.Second)
	for {
		stopped, _ := Stopped(pid)
		if !stopped {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the process is still stopped after SIGCONT")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := Pause(0); err == nil {
		t.Error("Pause(0) would signal the whole process group")
	}
}
