//go:build !linux

package local

import "syscall"

// serverProcAttr starts a server in its own process group, so a Ctrl-C at
// the terminal reaches the program that owns it rather than the server.
// There is no parent-death signal outside Linux.
func serverProcAttr(ra runAs) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Credential: ra.credential()}
}

// descendants cannot be listed without /proc; Kill then kills the
// postmaster only, and its backends exit when they notice it is gone.
func descendants(pid int) []int { return nil }

// processAlive reports whether pid exists.
func processAlive(pid int) bool { return syscall.Kill(pid, 0) == nil }
