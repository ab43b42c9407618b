package artefacts

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

const unitFile = "systemd/xdcr-agent@.service"

// unit is a systemd unit file: for each section, each key's values in
// order (a key may repeat; an empty assignment resets the list, as
// systemd reads it, but is kept here so the test can see it).
type unit map[string]map[string][]string

func parseUnit(t *testing.T, data []byte) unit {
	t.Helper()
	u := unit{}
	section := ""
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			if u[section] == nil {
				u[section] = map[string][]string{}
			}
		case strings.HasSuffix(line, `\`):
			t.Fatalf("%s:%d: continued lines are not expected", unitFile, n)
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s:%d: not KEY=VALUE inside a section: %q", unitFile, n, line)
			}
			k, v = strings.TrimSpace(k), strings.TrimSpace(v)
			u[section][k] = append(u[section][k], v)
		}
	}
	return u
}

// last is the value systemd uses for a single-valued key.
func (u unit) last(section, key string) (string, bool) {
	vs := u[section][key]
	if len(vs) == 0 {
		return "", false
	}
	return vs[len(vs)-1], true
}

// TestSystemdUnit checks that the agent's unit keeps its hardening and
// keeps secrets off the command line, and that its data directory is the
// one the agent is told to use.
func TestSystemdUnit(t *testing.T) {
	u := parseUnit(t, readDeploy(t, unitFile))
	for key, want := range map[string]string{
		"User":                    "xdcr",
		"Group":                   "xdcr",
		"NoNewPrivileges":         "yes",
		"ProtectSystem":           "strict",
		"ProtectHome":             "yes",
		"PrivateTmp":              "yes",
		"PrivateDevices":          "yes",
		"CapabilityBoundingSet":   "",
		"AmbientCapabilities":     "",
		"MemoryDenyWriteExecute":  "yes",
		"RestrictSUIDSGID":        "yes",
		"RestrictNamespaces":      "yes",
		"LockPersonality":         "yes",
		"SystemCallArchitectures": "native",
		"Restart":                 "on-failure",
		"KillSignal":              "SIGTERM",
	} {
		got, ok := u.last("Service", key)
		if !ok || got != want {
			t.Errorf("[Service] %s: got %q (set: %v), want %q", key, got, ok, want)
		}
	}
	if got := u["Service"]["SystemCallFilter"]; len(got) == 0 || got[0] != "@system-service" {
		t.Errorf("SystemCallFilter: got %q, want @system-service first", got)
	}
	families, _ := u.last("Service", "RestrictAddressFamilies")
	fams := strings.Fields(families)
	for _, f := range []string{"AF_INET", "AF_INET6"} {
		if !slices.Contains(fams, f) {
			t.Errorf("RestrictAddressFamilies %q lacks %s", families, f)
		}
	}
	for _, f := range fams {
		if !slices.Contains([]string{"AF_INET", "AF_INET6", "AF_UNIX"}, f) {
			t.Errorf("RestrictAddressFamilies allows %s, which the agent does not use", f)
		}
	}
	if _, ok := u.last("Service", "ProcSubset"); ok {
		t.Error("ProcSubset hides /proc/stat, which the agent's process metrics read: /metrics would fail")
	}

	// The command line: the node from the instance name, the data directory
	// writable, no secrets.
	execStart, _ := u.last("Service", "ExecStart")
	args := strings.Fields(execStart)
	flag := func(name string) string {
		i := slices.Index(args, name)
		if i < 0 || i+1 >= len(args) {
			t.Errorf("ExecStart %q lacks %s", execStart, name)
			return ""
		}
		return args[i+1]
	}
	if len(args) < 2 || args[1] != "agent" {
		t.Errorf("ExecStart %q: want xdcr agent", execStart)
	}
	if got := flag("--node"); got != "%i" {
		t.Errorf("--node %q: want %%i, the instance name", got)
	}
	flag("--config")
	dataDir := flag("--data-dir")
	if rw := strings.Fields(strings.Join(u["Service"]["ReadWritePaths"], " ")); !slices.Contains(rw, dataDir) {
		t.Errorf("ReadWritePaths %q does not contain the data directory %q", rw, dataDir)
	}
	secretRE := regexp.MustCompile(`(?i)password|passwd|secret|token|\$\{?[A-Z]`)
	if secretRE.MatchString(execStart) {
		t.Errorf("ExecStart %q may carry a secret: ps shows the command line to every user", execStart)
	}
	for _, e := range u["Service"]["Environment"] {
		if regexp.MustCompile(`(?i)password|secret|token=`).MatchString(e) && !strings.Contains(e, "%d/") {
			t.Errorf("Environment=%s: a secret belongs in EnvironmentFile= or LoadCredential=", e)
		}
	}
	envFile, hasEnv := u.last("Service", "EnvironmentFile")
	_, hasCred := u.last("Service", "LoadCredential")
	if !hasEnv && !hasCred {
		t.Error("no EnvironmentFile= or LoadCredential=: where do the secrets come from?")
	}
	if hasEnv && !strings.HasPrefix(strings.TrimPrefix(envFile, "-"), "/etc/xdcr/") {
		t.Errorf("EnvironmentFile=%s: want a file under /etc/xdcr", envFile)
	}
	if _, ok := u.last("Install", "WantedBy"); !ok {
		t.Error("[Install] WantedBy is missing: systemctl enable would do nothing")
	}
}

// TestSystemdAnalyzeVerify has systemd check the unit's syntax when
// systemd-analyze is installed: unknown keys and bad values are reported,
// not fatal, so any output about the unit fails the test.
func TestSystemdAnalyzeVerify(t *testing.T) {
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze is not installed")
	}
	// verify wants the ExecStart binary to exist; the unit names
	// /usr/local/bin/xdcr, which a test machine need not have.
	dir := t.TempDir()
	text := strings.ReplaceAll(string(readDeploy(t, unitFile)), "/usr/local/bin/xdcr", "/bin/true")
	if err := os.WriteFile(filepath.Join(dir, "xdcr-agent@.service"), []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(sa, "verify", "--man=no", "./xdcr-agent@a1.service")
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	var problems []string
	for _, line := range strings.Split(string(out), "\n") {
		if strings.Contains(line, "xdcr-agent@") {
			problems = append(problems, line)
		}
	}
	if len(problems) > 0 || err != nil {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}
