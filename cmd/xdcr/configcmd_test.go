package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The example config that deploy/ ships passes `xdcr config check` once
// the secrets it names are in the environment, and fails, naming the
// variable, when one is not.
func TestExampleConfigPassesCheck(t *testing.T) {
	path := filepath.Join("..", "..", "deploy", "config", "xdcr.example.yaml")
	t.Setenv("PGPASSWORD", "pg-secret")
	t.Setenv("REDIS_PASSWORD", "redis-secret")
	t.Setenv("NATS_PASSWORD", "nats-secret")
	var out, errb bytes.Buffer
	if code := run([]string{"config", "check", "--config", path}, &out, &errb); code != exitOK {
		t.Fatalf("config check of the example exited %d:\n%s%s", code, out.String(), errb.String())
	}
	if !strings.Contains(out.String(), "is valid") {
		t.Errorf("config check said:\n%s", out.String())
	}

	os.Unsetenv("PGPASSWORD") // t.Setenv above restores it
	out.Reset()
	errb.Reset()
	code := run([]string{"config", "check", "--config", path}, &out, &errb)
	if code == exitOK || !strings.Contains(out.String()+errb.String(), "PGPASSWORD") {
		t.Errorf("config check without PGPASSWORD exited %d:\n%s%s", code, out.String(), errb.String())
	}
}
