package e2e

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nkeys"

	"github.com/xdcr/xdcr/deploy/local"
	"github.com/xdcr/xdcr/deploy/topology"
	"github.com/xdcr/xdcr/internal/certs"
	"github.com/xdcr/xdcr/internal/config"
	"github.com/xdcr/xdcr/internal/natsconn"
)

// pki is the TLS material of a secured cluster, in a directory the
// postgres OS user can read.
type pki struct {
	dir                   string
	ca, foreignCA         string // CA bundles
	serverCert, serverKey string // PostgreSQL and NATS, for 127.0.0.1
	clientCert, clientKey string // the agents' NATS client certificate
	foreign               *certs.CA
	nkeySeedB, wrongNKey  string // seed files
	nkeyPublicB           string
	pgKey                 string
}

func newPKI(t *testing.T, nodes []string) *pki {
	t.Helper()
	dir, err := os.MkdirTemp("", "xdcr-pki-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	ca, err := certs.NewCA("xdcr e2e CA")
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := certs.NewCA("someone else's CA")
	if err != nil {
		t.Fatal(err)
	}
	p := &pki{dir: dir, ca: filepath.Join(dir, "ca.pem"), foreignCA: filepath.Join(dir, "foreign-ca.pem"), foreign: foreign}
	if err := ca.WriteCA(p.ca); err != nil {
		t.Fatal(err)
	}
	if err := foreign.WriteCA(p.foreignCA); err != nil {
		t.Fatal(err)
	}
	loopback := []net.IP{net.IPv4(127, 0, 0, 1)}
	if p.serverCert, p.serverKey, err = ca.Issue(dir, "server", []string{"localhost"}, loopback); err != nil {
		t.Fatal(err)
	}
	if p.clientCert, p.clientKey, err = ca.Issue(dir, "xdcr-client", nil, nil); err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		if _, _, err := ca.Issue(dir, n, nil, loopback); err != nil {
			t.Fatal(err)
		}
	}
	// PostgreSQL reads its key as the postgres OS user and wants it 0600
	if u, err := user.Lookup("postgres"); err == nil && os.Geteuid() == 0 {
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		pgKey := filepath.Join(dir, "pg-server-key.pem")
		data, err := os.ReadFile(p.serverKey)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(pgKey, data, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(pgKey, uid, gid); err != nil {
			t.Fatal(err)
		}
		p.pgKey = pgKey
	} else {
		p.pgKey = p.serverKey
	}
	p.nkeySeedB, p.nkeyPublicB = writeNKey(t, dir, "dc-b.nk")
	p.wrongNKey, _ = writeNKey(t, dir, "wrong.nk")
	return p
}

func writeNKey(t *testing.T, dir, name string) (path, public string) {
	t.Helper()
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	seed, err := kp.Seed()
	if err != nil {
		t.Fatal(err)
	}
	if public, err = kp.PublicKey(); err != nil {
		t.Fatal(err)
	}
	path = filepath.Join(dir, name)
	if err := os.WriteFile(path, seed, 0o600); err != nil {
		t.Fatal(err)
	}
	return path, public
}

// TestSecureLinks runs a two-site cluster (plus witness) with every link
// secured: PostgreSQL over TLS (verify-full) with a SCRAM password, NATS
// over mutual TLS with a password on one site and an nkey on the other,
// Raft over mutual TLS with node names checked, the HTTP API over HTTPS
// with an admin token. It
// replicates; the secrets appear in no log, status output or command line;
// a wrong CA, password or nkey is refused with a clear error; and a Raft
// node with a certificate of another CA is kept out of the group.
func TestSecureLinks(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test")
	}
	ctx := t.Context()
	secrets := map[string]string{
		"XDCR_PGPASSWORD":   "pg-" + rand.Text(),
		"XDCR_NATSPASSWORD": "nats-" + rand.Text(),
		"XDCR_ADMIN_TOKEN":  "admin-" + rand.Text(),
	}
	for k, v := range secrets {
		t.Setenv(k, v)
	}
	names := local.SiteNames(2)
	a, b := names[0], names[1]
	nodes := []string{topology.NodeID(a), topology.NodeID(b), "w1"}
	p := newPKI(t, nodes)
	seedB, err := os.ReadFile(p.nkeySeedB)
	if err != nil {
		t.Fatal(err)
	}

	hba := filepath.Join(p.dir, "pg_hba.conf")
	if err := os.WriteFile(hba, []byte(strings.Join([]string{
		"local all all trust",
		"hostssl all xdcr 127.0.0.1/32 scram-sha-256",
		"host all xdcr 127.0.0.1/32 reject",
		"host all all 127.0.0.1/32 trust",
		"host replication all 127.0.0.1/32 trust",
	}, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	sites, err := local.StartSites(sctx, local.SitesConfig{
		Names: names,
		Dir:   t.TempDir(),
		PostgresSettings: map[string]string{
			"ssl": "on", "ssl_cert_file": p.serverCert, "ssl_key_file": p.pgKey, "ssl_ca_file": p.ca,
			"hba_file": hba, "password_encryption": "scram-sha-256",
		},
		NATSSecurity: &local.NATSSecurity{
			CAFile: p.ca, CertFile: p.serverCert, KeyFile: p.serverKey, VerifyClients: true,
			Users: map[string]string{"xdcr-a": secrets["XDCR_NATSPASSWORD"]},
			NKeys: []string{p.nkeyPublicB},
			// what deploy/nats/README.md grants the agents of cluster "secure"
			Permissions: `{
				publish: ["$JS.API.>", "$JS.*.API.>", "$JS.FC.>", "xdcr.secure.>"]
				subscribe: ["_INBOX.>"]
			}`,
		},
	})
	if err != nil {
		t.Fatalf("start secured sites: %v", err)
	}
	t.Cleanup(func() { sites.Close() })
	for _, s := range sites.List {
		conn, err := pgx.Connect(ctx, s.Postgres.DSN("postgres"))
		if err != nil {
			t.Fatal(err)
		}
		_, err = conn.Exec(ctx, fmt.Sprintf("CREATE ROLE xdcr LOGIN SUPERUSER REPLICATION PASSWORD '%s'", secrets["XDCR_PGPASSWORD"]))
		conn.Close(ctx)
		if err != nil {
			t.Fatal(err)
		}
	}

	dsn := func(s *local.Site, password, ca string) string {
		return fmt.Sprintf("postgres://xdcr:%s@127.0.0.1:%d/%s?sslmode=verify-full&sslrootcert=%s",
			password, s.Postgres.Port(), "secure", ca)
	}
	c, err := topology.New(sctx, sites, topology.Options{
		Cluster: "secure", Tables: []string{"items"}, Schema: padSchema,
		Binary: env.binary, Dir: t.TempDir(),
		Tune: func(cfg *config.Config) {
			sa, sb := cfg.Sites[a], cfg.Sites[b]
			sa.Postgres = dsn(sites.List[0], secrets["XDCR_PGPASSWORD"], p.ca)
			sb.Postgres = dsn(sites.List[1], secrets["XDCR_PGPASSWORD"], p.ca)
			sa.NATS = strings.Replace(sa.NATS, "tls://", "tls://xdcr-a:"+secrets["XDCR_NATSPASSWORD"]+"@", 1)
			auth := config.NATSAuth{CAFile: p.ca, CertFile: p.clientCert, KeyFile: p.clientKey}
			sa.NATSAuth = auth
			auth.NKeyFile = p.nkeySeedB
			sb.NATSAuth = auth
			cfg.Sites[a], cfg.Sites[b] = sa, sb
			cfg.TLS = config.TLS{CAFile: p.ca, CertFile: filepath.Join(p.dir, "{node}.pem"), KeyFile: filepath.Join(p.dir, "{node}-key.pem")}
			cfg.HTTP.AdminToken = secrets["XDCR_ADMIN_TOKEN"]
			cfg.HTTP.TLS = true
		},
	})
	if err != nil {
		t.Fatalf("new cluster: %v", err)
	}
	t.Cleanup(func() { stopCluster(t, c) })
	// the file names the secrets by variable only, as an operator writes it
	data, err := os.ReadFile(c.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	text := string(data)
	for k, v := range secrets {
		text = strings.ReplaceAll(text, v, "${"+k+"}")
	}
	if err := os.WriteFile(c.ConfigPath, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := c.StartAgents(sctx); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitReady(sctx); err != nil {
		t.Fatalf("wait ready: %v", err)
	}

	// it replicates over the secured links
	execOn(t, c, a, `INSERT INTO items SELECT g, 'secure' FROM generate_series(1, 200) g`)
	converge(t, c, 2*time.Minute)
	out, code := xdcrCmd(t, time.Minute, "lag", "--config", c.ConfigPath, "-o", "json")
	if code != 0 {
		t.Fatalf("xdcr lag exited %d:\n%s", code, out)
	}

	// refusals, each with its fix
	cfg, err := config.Load(c.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		site string
		edit func(*config.Site)
		want string
	}{
		{"wrong NATS password", a, func(s *config.Site) { s.NATS = strings.Replace(s.NATS, secrets["XDCR_NATSPASSWORD"], "wrong", 1) }, "refused the credentials"},
		{"wrong nkey", b, func(s *config.Site) { s.NATSAuth.NKeyFile = p.wrongNKey }, "refused the credentials"},
		{"NATS server of another CA", b, func(s *config.Site) { s.NATSAuth.CAFile = p.foreignCA }, "nats_ca_file"},
	} {
		bad := *cfg
		bad.Sites = map[string]config.Site{}
		for k, v := range cfg.Sites {
			bad.Sites[k] = v
		}
		s := bad.Sites[tc.site]
		tc.edit(&s)
		bad.Sites[tc.site] = s
		nc, err := natsconn.Connect(&bad, tc.site)
		if err == nil {
			nc.Close()
			t.Errorf("%s: connected", tc.name)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) || !natsconn.Permanent(err) {
			t.Errorf("%s: got %v, want a permanent refusal mentioning %q", tc.name, err, tc.want)
		}
		t.Logf("%s: %v", tc.name, err)
	}
	for _, tc := range []struct{ name, dsn, want string }{
		{"wrong PostgreSQL password", dsn(sites.List[1], "wrong", p.ca), "password authentication failed"},
		{"PostgreSQL server of another CA", dsn(sites.List[1], secrets["XDCR_PGPASSWORD"], p.foreignCA), "certificate signed by unknown authority"},
		{"PostgreSQL without TLS", strings.Replace(dsn(sites.List[1], secrets["XDCR_PGPASSWORD"], p.ca), "sslmode=verify-full", "sslmode=disable", 1), "reject"},
	} {
		conn, err := pgx.Connect(ctx, tc.dsn)
		if err == nil {
			conn.Close(ctx)
			t.Errorf("%s: connected", tc.name)
		} else if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want %q", tc.name, err, tc.want)
		}
	}
	pool, err := certs.LoadPool(p.ca)
	if err != nil {
		t.Fatal(err)
	}
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	if resp, err := http.Get("http://" + c.HTTPAddr(topology.NodeID(a)) + "/healthz"); err == nil && resp.StatusCode == http.StatusOK {
		resp.Body.Close()
		t.Error("the API answers plain HTTP with http.tls on")
	}
	resp, err := hc.Post("https://"+c.HTTPAddr(topology.NodeID(a))+"/v1/promote", "application/json", strings.NewReader(`{"to":"`+b+`"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("promote without the token: HTTP %d, want 401", resp.StatusCode)
	}

	// a Raft node with a certificate of another CA stays out
	nodeB := topology.NodeID(b)
	if err := c.StopAgent(nodeB, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	certB, keyB := filepath.Join(p.dir, nodeB+".pem"), filepath.Join(p.dir, nodeB+"-key.pem")
	goodCert, _ := os.ReadFile(certB)
	goodKey, _ := os.ReadFile(keyB)
	fdir := t.TempDir()
	fc, fk, err := p.foreign.Issue(fdir, nodeB, nil, []net.IP{net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	copyFile(t, fc, certB)
	copyFile(t, fk, keyB)
	if err := c.StartAgent(ctx, nodeB); err != nil {
		t.Fatal(err)
	}
	execOn(t, c, a, `INSERT INTO items VALUES (1000, 'while b1 is out')`)
	time.Sleep(8 * time.Second)
	if ready(hc, c.HTTPAddr(nodeB)) {
		t.Errorf("node %s with a certificate of another CA is ready (in the group)", nodeB)
	}
	if !ready(hc, c.HTTPAddr(topology.NodeID(a))) {
		t.Errorf("node %s lost its group while %s knocked with a foreign certificate", topology.NodeID(a), nodeB)
	}
	if err := c.StopAgent(nodeB, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(certB, goodCert, 0o644)
	os.WriteFile(keyB, goodKey, 0o600)
	if err := c.StartAgent(ctx, nodeB); err != nil {
		t.Fatal(err)
	}
	converge(t, c, 2*time.Minute)

	// no secret in any log, status output or command line
	st, _ := xdcrCmd(t, time.Minute, "lag", "--config", c.ConfigPath)
	outputs := map[string]string{"lag -o json": out, "lag": st}
	for _, n := range c.Nodes() {
		if data, err := os.ReadFile(c.LogPath(n)); err == nil {
			outputs["log of "+n] = string(data)
		}
		if pid := c.AgentPID(n); pid > 0 {
			if cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil {
				outputs["command line of "+n] = string(cmdline)
			}
		}
		if resp, err := hc.Get("https://" + c.HTTPAddr(n) + "/v1/status"); err == nil {
			var sb strings.Builder
			buf := make([]byte, 32<<10)
			for {
				k, err := resp.Body.Read(buf)
				sb.Write(buf[:k])
				if err != nil {
					break
				}
			}
			resp.Body.Close()
			outputs["status of "+n] = sb.String()
		}
	}
	secrets["nkey seed"] = strings.TrimSpace(string(seedB))
	for where, text := range outputs {
		for what, secret := range secrets {
			if strings.Contains(text, secret) {
				t.Errorf("%s holds %s", where, what)
			}
		}
	}
	if len(outputs) < 7 {
		t.Errorf("checked only %d outputs for secrets", len(outputs))
	}
}

func ready(hc *http.Client, addr string) bool {
	resp, err := hc.Get("https://" + addr + "/readyz")
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	data, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, data, 0o600); err != nil {
		t.Fatal(err)
	}
}
