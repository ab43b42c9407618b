package local

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/nats-io/nats-server/v2/server"
)

// TestExampleNATSConfigs loads the production examples in deploy/nats with
// nats-server's parser and checks that together they form the topology of
// docs/nats-topology.md: a domain per site, fsync always, isolation, and a
// leaf mesh with exactly one connection per pair of sites.
func TestExampleNATSConfigs(t *testing.T) {
	sites := SiteNames(3)
	links := map[string]int{} // "dc-a>dc-b" -> count
	for i, site := range sites {
		t.Run(site, func(t *testing.T) {
			path := filepath.Join("..", "nats", site+".conf")
			opts, err := server.ProcessConfigFile(path)
			if err != nil {
				t.Fatalf("parse %s: %v", path, err)
			}
			var want []string
			for _, later := range sites[i+1:] { // the first of a pair dials
				want = append(want, fmt.Sprintf("nats-leaf://nats.%s.example.net:7422", later))
			}
			checkNATSOptions(t, opts, site, 0, want)
			if opts.Port != 4222 || opts.LeafNode.Port != 7422 {
				t.Errorf("ports: got %d leaf %d, want 4222 leaf 7422", opts.Port, opts.LeafNode.Port)
			}
			if want := "nats." + site + ".example.net:7422"; opts.LeafNode.Advertise != want {
				t.Errorf("leafnodes.advertise: got %q, want %q", opts.LeafNode.Advertise, want)
			}
			if opts.StoreDir != "/var/lib/nats/jetstream" {
				t.Errorf("store_dir: got %q, want /var/lib/nats/jetstream", opts.StoreDir)
			}
			for _, r := range opts.LeafNode.Remotes {
				for _, u := range r.URLs {
					other := strings.TrimSuffix(strings.TrimPrefix(u.Hostname(), "nats."), ".example.net")
					links[site+">"+other]++
				}
			}
		})
	}
	// Every unordered pair exactly once, never a site to itself.
	for i, a := range sites {
		for _, b := range sites[i+1:] {
			if n := links[a+">"+b] + links[b+">"+a]; n != 1 {
				t.Errorf("pair %s-%s: got %d leaf connections, want exactly 1", a, b, n)
			}
		}
		if links[a+">"+a] != 0 {
			t.Errorf("%s solicits itself", a)
		}
	}
	if got := len(links); got != len(sites)*(len(sites)-1)/2 {
		keys := slices.Sorted(func(yield func(string) bool) {
			for k := range links {
				if !yield(k) {
					return
				}
			}
		})
		t.Errorf("links: got %v, want one per pair", keys)
	}
}
