package local

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
)

// serverProcAttr starts a server in its own process group, so a Ctrl-C at
// the terminal reaches the program that owns it rather than the server, and
// with a parent-death signal: if the process that started it dies without
// stopping it, the postmaster gets SIGQUIT (immediate shutdown) and takes its
// backends with it. Go sets the death signal after switching credentials, so
// the switch to the postgres user does not clear it. The signal fires when
// the starting OS thread exits; the Go runtime only ends threads that a
// goroutine locked, which this package never does.
func serverProcAttr(ra runAs) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{
		Setpgid:    true,
		Pdeathsig:  syscall.SIGQUIT,
		Credential: ra.credential(),
	}
}

// descendants returns the pids of every live descendant of pid. PostgreSQL
// puts each child of the postmaster in a session of its own (setsid), so a
// signal to the postmaster's process group does not reach them; this is how
// Kill finds them.
func descendants(pid int) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	children := map[int][]int{}
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue // gone meanwhile
		}
		state, ppid, ok := parseProcStat(st)
		if !ok || state == 'Z' || state == 'X' {
			continue
		}
		children[ppid] = append(children[ppid], p)
	}
	var out []int
	queue := []int{pid}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		for _, c := range children[p] {
			out = append(out, c)
			queue = append(queue, c)
		}
	}
	return out
}

// processAlive reports whether pid runs (a zombie does not).
func processAlive(pid int) bool {
	st, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	state, _, ok := parseProcStat(st)
	return ok && state != 'Z' && state != 'X'
}

// parseProcStat reads state and ppid from a /proc/PID/stat line:
// "pid (comm) state ppid ...", where comm may hold spaces and parens.
func parseProcStat(b []byte) (state byte, ppid int, ok bool) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return 0, 0, false
	}
	f := bytes.Fields(b[i+2:])
	if len(f) < 2 || len(f[0]) != 1 {
		return 0, 0, false
	}
	ppid, err := strconv.Atoi(string(f[1]))
	if err != nil {
		return 0, 0, false
	}
	return f[0][0], ppid, true
}
