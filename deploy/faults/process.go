package faults

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"syscall"
)

// Pause stops process pid with SIGSTOP, as a long GC pause, a swapped-out
// VM or a frozen container would: it keeps its sockets and locks but
// answers nothing until Resume.
func Pause(pid int) error {
	if pid <= 0 {
		return fmt.Errorf("pause: no process (pid %d)", pid)
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		return fmt.Errorf("pause pid %d: %w", pid, err)
	}
	return nil
}

// Resume continues a process stopped with Pause (SIGCONT).
func Resume(pid int) error {
	if pid <= 0 {
		return fmt.Errorf("resume: no process (pid %d)", pid)
	}
	if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
		return fmt.Errorf("resume pid %d: %w", pid, err)
	}
	return nil
}

// Stopped reports whether process pid is stopped by a signal (state T in
// /proc/PID/stat; Linux only).
func Stopped(pid int) (bool, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false, fmt.Errorf("process state of pid %d: %w", pid, err)
	}
	// pid (comm) state ...: comm may hold spaces and parentheses
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return false, errors.New("process state: unexpected /proc format")
	}
	return b[i+2] == 'T', nil
}
