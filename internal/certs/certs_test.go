package certs

import (
	"crypto/tls"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestIssueAndLoad(t *testing.T) {
	dir := t.TempDir()
	ca, err := NewCA("test CA")
	if err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(dir, "ca.pem")
	if err := ca.WriteCA(caFile); err != nil {
		t.Fatal(err)
	}
	cert, key, err := ca.Issue(dir, "a1", []string{"xdcr.example.net"}, []net.IP{net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(key); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("key file mode: %v %v, want 0600", fi.Mode(), err)
	}
	cfg, err := Load(Files{CA: caFile, Cert: cert, Key: key})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.ClientAuth != tls.RequireAndVerifyClientCert || cfg.MinVersion != tls.VersionTLS13 || len(cfg.Certificates) != 1 {
		t.Errorf("config: %+v", cfg)
	}
	leaf := cfg.Certificates[0].Leaf
	if leaf == nil || leaf.DNSNames[0] != "a1" || leaf.DNSNames[1] != "xdcr.example.net" {
		t.Errorf("certificate names: %+v", leaf)
	}

	// errors name the file and say what is wrong
	_, otherKey, err := ca.Issue(dir, "other", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct {
		f    Files
		want string
	}{
		"missing CA":      {Files{CA: filepath.Join(dir, "nope.pem"), Cert: cert, Key: key}, "nope.pem"},
		"CA not PEM":      {Files{CA: key + ".txt", Cert: cert, Key: key}, "read the CA bundle"},
		"key of another":  {Files{CA: caFile, Cert: cert, Key: otherKey}, "must match"},
		"no certificates": {Files{CA: cert + ".empty", Cert: cert, Key: key}, ""},
	} {
		if name == "no certificates" {
			os.WriteFile(tc.f.CA, []byte("not pem"), 0o644)
			tc.want = "holds no PEM certificate"
		}
		if _, err := Load(tc.f); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want %q", name, err, tc.want)
		}
	}
}
