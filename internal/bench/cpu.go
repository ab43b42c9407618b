package bench

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/PID/stat
// (100 on every Linux this runs on).
const clockTicks = 100

// cpuWatch measures the CPU time every process of the benchmark spends in
// a window: the PostgreSQL processes of both clusters (walsenders, the
// native apply worker, xdcr's sessions), the agents, and this process
// (which runs the NATS servers). It says where a catch-up's time goes.
type cpuWatch struct {
	e     *env
	start map[int]int64
	t0    time.Time
	ended bool // count backends that end inside the window
}

// watchCPU starts a window. With ended, the report counts the CPU of
// backends that ended inside it too: in a catch-up those are xdcr's peek
// sessions; in a steady run they would be pgbench's clients.
func (e *env) watchCPU(ended bool) *cpuWatch {
	return &cpuWatch{e: e, start: e.cpuTicks(), t0: time.Now(), ended: ended}
}

// pids returns the processes to watch with a fallback label.
func (e *env) watchedPIDs() map[int]string {
	out := map[int]string{os.Getpid(): "bench process (nats-servers)"}
	for _, n := range e.c.Nodes() {
		if pid := e.c.AgentPID(n); pid != 0 {
			out[pid] = "agent " + n
		}
	}
	for pm, site := range e.postmasters() {
		out[pm] = site + " postmaster"
		for _, c := range children(pm) {
			out[c] = site + " " + processTitle(c)
		}
	}
	return out
}

func (e *env) cpuTicks() map[int]int64 {
	out := map[int]int64{}
	for pid := range e.watchedPIDs() {
		if t, ok := procTicks(pid); ok {
			out[pid] = t
		}
	}
	for pm := range e.postmasters() {
		if t, ok := reapedTicks(pm); ok {
			out[-pm] = t
		}
	}
	return out
}

// postmasters maps the PID of each site's postmaster to the site's name.
func (e *env) postmasters() map[int]string {
	out := map[int]string{}
	for _, s := range e.sites.List {
		if pm := s.Postgres.PID(); pm != 0 {
			out[pm] = s.Name
		}
	}
	return out
}

// report returns the busiest processes of the window, e.g.
// "dc-a walsender 2.10s, agent a1 0.70s, …", labelled with what
// pg_stat_activity says about PostgreSQL backends.
func (w *cpuWatch) report(ctx context.Context) string {
	wall := time.Since(w.t0)
	labels := w.e.watchedPIDs()
	for _, s := range w.e.sites.List {
		for pid, l := range backendLabels(ctx, s.Postgres.DSN("postgres")) {
			if _, ok := labels[pid]; ok {
				labels[pid] = s.Name + " " + l
			}
		}
	}
	type use struct {
		label string
		secs  float64
	}
	var uses []use
	var total float64
	for pid, label := range labels {
		end, ok := procTicks(pid)
		if !ok {
			continue
		}
		d := float64(end-w.start[pid]) / clockTicks
		if d < 0.05 {
			continue
		}
		total += d
		uses = append(uses, use{label, d})
	}
	// Backends that ended inside the window (a catch-up's peek session)
	// are gone from /proc; their CPU is in their postmaster's count of
	// reaped children.
	for pm, site := range w.e.postmasters() {
		end, ok := reapedTicks(pm)
		if !ok || !w.ended {
			continue
		}
		if d := float64(end-w.start[-pm]) / clockTicks; d >= 0.05 {
			total += d
			uses = append(uses, use{site + " backends that ended", d})
		}
	}
	slices.SortFunc(uses, func(a, b use) int {
		switch {
		case a.secs > b.secs:
			return -1
		case a.secs < b.secs:
			return 1
		}
		return strings.Compare(a.label, b.label)
	})
	parts := make([]string, 0, len(uses))
	for _, u := range uses {
		parts = append(parts, fmt.Sprintf("%s %.2fs", u.label, u.secs))
	}
	return fmt.Sprintf("CPU over %.2fs wall: %.2fs in all (%s)", wall.Seconds(), total, strings.Join(parts, ", "))
}

// backendLabels names PostgreSQL processes by backend type and
// application name.
func backendLabels(ctx context.Context, dsn string) map[int]string {
	out := map[int]string{}
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return out
	}
	defer conn.Close(context.WithoutCancel(ctx))
	rows, err := conn.Query(ctx, `SELECT pid, coalesce(backend_type, ''), coalesce(application_name, ''), coalesce(datname, '') FROM pg_stat_activity`)
	if err != nil {
		return out
	}
	defer rows.Close()
	for rows.Next() {
		var (
			pid          int
			typ, app, db string
		)
		if rows.Scan(&pid, &typ, &app, &db) != nil {
			continue
		}
		l := typ
		if app != "" {
			l += " " + app
		}
		if db != "" && typ != "walsender" {
			l += " (" + db + ")"
		}
		out[pid] = l
	}
	return out
}

// procTicks returns utime+stime of pid, in clock ticks.
func procTicks(pid int) (int64, bool) {
	return statTicks(pid, 11)
}

// reapedTicks returns cutime+cstime of pid: the CPU of its children that
// ended and were waited for, in clock ticks.
func reapedTicks(pid int) (int64, bool) {
	return statTicks(pid, 13)
}

// statTicks returns the sum of two adjacent fields of /proc/PID/stat, at
// index i and i+1 of the fields after the command.
func statTicks(pid, i int) (int64, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, false
	}
	// the command may hold spaces and parentheses: fields start after the last ')'
	s := string(b)
	cmdEnd := strings.LastIndexByte(s, ')')
	if cmdEnd < 0 {
		return 0, false
	}
	f := strings.Fields(s[cmdEnd+1:])
	// f[0] is field 3 (state); utime and stime are fields 14 and 15,
	// cutime and cstime 16 and 17
	if len(f) < i+2 {
		return 0, false
	}
	u, err1 := strconv.ParseInt(f[i], 10, 64)
	st, err2 := strconv.ParseInt(f[i+1], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, false
	}
	return u + st, true
}

// children lists the processes whose parent is pid.
func children(pid int) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) > 1 && f[1] == strconv.Itoa(pid) {
			out = append(out, p)
		}
	}
	return out
}

// processTitle is a PostgreSQL process's title without the "postgres: ".
func processTitle(pid int) string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return "pid " + strconv.Itoa(pid)
	}
	s := strings.TrimSpace(strings.ReplaceAll(string(b), "\x00", " "))
	s = strings.TrimPrefix(s, "postgres: ")
	if f := strings.Fields(s); len(f) > 0 {
		return f[0]
	}
	return s
}
