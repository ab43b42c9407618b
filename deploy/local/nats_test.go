package local

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden")

// checkNATSOptions checks what every config we ship must say.
func checkNATSOptions(t *testing.T, opts *server.Options, name string, sync time.Duration, remotes []string) {
	t.Helper()
	if opts.ServerName != name {
		t.Errorf("server_name: got %q, want %q", opts.ServerName, name)
	}
	if !opts.JetStream || opts.JetStreamDomain != name {
		t.Errorf("jetstream: got enabled=%v domain=%q, want enabled with domain %q", opts.JetStream, opts.JetStreamDomain, name)
	}
	if sync == 0 {
		if !opts.SyncAlways {
			t.Errorf("sync_interval: got %v (always=false), want always", opts.SyncInterval)
		}
	} else if opts.SyncAlways || opts.SyncInterval != sync {
		t.Errorf("sync_interval: got %v (always=%v), want %v", opts.SyncInterval, opts.SyncAlways, sync)
	}
	if !opts.LeafNode.IsolateLeafnodeInterest {
		t.Error("leafnodes.isolate_leafnode_interest: got false, want true")
	}
	if opts.Cluster.Port != 0 || opts.Cluster.Name != "" || opts.Gateway.Name != "" || opts.Gateway.Port != 0 {
		t.Errorf("got a cluster or gateway block (cluster %q:%d, gateway %q:%d), want none",
			opts.Cluster.Name, opts.Cluster.Port, opts.Gateway.Name, opts.Gateway.Port)
	}
	var got []string
	for _, r := range opts.LeafNode.Remotes {
		for _, u := range r.URLs {
			got = append(got, u.String())
		}
		if len(r.URLs) != 1 {
			t.Errorf("remote with %d urls, want one url per remote (one connection per pair)", len(r.URLs))
		}
	}
	if fmt.Sprint(got) != fmt.Sprint(remotes) {
		t.Errorf("remotes: got %v, want %v", got, remotes)
	}
}

func TestRenderNATSConfig(t *testing.T) {
	tests := []struct {
		name string
		cfg  NATSConfig
	}{
		{"first-of-three", NATSConfig{
			Name: "dc-a", Dir: "/var/lib/xdcr/dc-a/nats", Port: 4222, LeafPort: 7422,
			Remotes: []string{"nats-leaf://127.0.0.1:7423", "nats-leaf://127.0.0.1:7424"},
		}},
		{"last-of-three", NATSConfig{
			Name: "dc-c", Dir: "/var/lib/xdcr/dc-c/nats", Port: 4224, LeafPort: 7424,
		}},
		{"sync-interval", NATSConfig{
			Name: "dc-b", Dir: "/var/lib/xdcr/dc-b/nats", Port: 4223, LeafPort: 7423,
			Remotes:      []string{"nats-leaf://127.0.0.1:7424"},
			SyncInterval: 2 * time.Minute,
		}},
		{"free-ports", NATSConfig{
			Name: "dc_x", Dir: `/tmp/with "quotes" and \ backslash`,
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			text := RenderNATSConfig(tt.cfg)
			golden := filepath.Join("testdata", "nats-"+tt.name+".golden")
			if *update {
				if err := os.WriteFile(golden, []byte(text), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test -update to create it)", err)
			}
			if text != string(want) {
				t.Errorf("got\n%s\nwant (%s)\n%s", text, golden, want)
			}

			path := filepath.Join(t.TempDir(), "nats.conf")
			if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
				t.Fatal(err)
			}
			opts, err := server.ProcessConfigFile(path)
			if err != nil {
				t.Fatalf("parse rendered config: %v\n%s", err, text)
			}
			checkNATSOptions(t, opts, tt.cfg.Name, tt.cfg.SyncInterval, tt.cfg.Remotes)
			// loopback links: no S2 framing on either end of a leaf link
			if m := opts.LeafNode.Compression.Mode; m != server.CompressionOff {
				t.Errorf("leafnodes.compression: got %q, want %q", m, server.CompressionOff)
			}
			for _, r := range opts.LeafNode.Remotes {
				if m := r.Compression.Mode; m != server.CompressionOff {
					t.Errorf("remote %v compression: got %q, want %q", r.URLs, m, server.CompressionOff)
				}
			}
			wantPort, wantLeaf := tt.cfg.Port, tt.cfg.LeafPort
			if wantPort == 0 {
				wantPort = server.RANDOM_PORT
			}
			if wantLeaf == 0 {
				wantLeaf = server.RANDOM_PORT
			}
			if opts.Host != "127.0.0.1" || opts.Port != wantPort || opts.LeafNode.Host != "127.0.0.1" || opts.LeafNode.Port != wantLeaf {
				t.Errorf("listen: got %s:%d leaf %s:%d, want 127.0.0.1:%d leaf 127.0.0.1:%d",
					opts.Host, opts.Port, opts.LeafNode.Host, opts.LeafNode.Port, wantPort, wantLeaf)
			}
			if want := filepath.Join(tt.cfg.Dir, "jetstream"); opts.StoreDir != want {
				t.Errorf("store_dir: got %q, want %q", opts.StoreDir, want)
			}
			if want := filepath.Join(tt.cfg.Dir, "nats.log"); opts.LogFile != want {
				t.Errorf("log_file: got %q, want %q", opts.LogFile, want)
			}
		})
	}
}

func TestNATSRestartKeepsStoreAndPorts(t *testing.T) {
	logger, _ := newTestLogger(t)
	ctx := t.Context()
	dir := t.TempDir()
	n, err := StartNATS(ctx, NATSConfig{Name: "dc-a", Dir: dir, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = n.Close() })
	url, leafURL := n.URL(), n.LeafURL()

	publish := func(count int) {
		t.Helper()
		nc, err := nats.Connect(n.URL())
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		js, err := jetstream.New(nc)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{Name: "S", Subjects: []string{"s.>"}, Storage: jetstream.FileStorage}); err != nil {
			t.Fatal(err)
		}
		for i := range count {
			if _, err := js.Publish(ctx, "s.x", []byte{byte(i)}); err != nil {
				t.Fatal(err)
			}
		}
		info, err := js.AccountInfo(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if info.Domain != "dc-a" {
			t.Errorf("jetstream domain: got %q, want dc-a", info.Domain)
		}
	}
	publish(10)
	n.Stop()
	if n.Running() {
		t.Fatal("Running after Stop: got true, want false")
	}
	n.Stop() // idempotent
	if err := n.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if n.URL() != url || n.LeafURL() != leafURL {
		t.Errorf("urls after restart: got %s %s, want %s %s", n.URL(), n.LeafURL(), url, leafURL)
	}
	publish(5) // CreateOrUpdate keeps the stream; 10 old + 5 new

	nc, err := nats.Connect(n.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	s, err := js.Stream(ctx, "S")
	if err != nil {
		t.Fatal(err)
	}
	if got := s.CachedInfo().State.Msgs; got != 15 {
		t.Errorf("messages after restart: got %d, want 15", got)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "nats.log")); err != nil || len(b) == 0 {
		t.Errorf("nats.log: got %d bytes (err %v), want the server's log", len(b), err)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if err := n.Close(); err != nil { // idempotent
		t.Fatal(err)
	}
}

func TestStartNATSPortTaken(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	logger, _ := newTestLogger(t)
	port := l.Addr().(*net.TCPAddr).Port
	start := time.Now()
	n, err := StartNATS(t.Context(), NATSConfig{Name: "dc-a", Dir: t.TempDir(), Port: port, LeafPort: port, Logger: logger})
	if err == nil {
		n.Close()
		t.Fatal("got no error for a taken port")
	}
	if !errors.Is(err, errListen) {
		t.Errorf("got %v, want a listen error", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("took %v to report the taken port", d)
	}
}
