package e2e

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/xdcr/xdcr/deploy/local"
	"github.com/xdcr/xdcr/deploy/topology"
)

// env is shared by the tests of this package: three sites, started once.
// Every test runs its own cluster (own name, database, slot and streams) on
// them, so tests do not see each other's data.
var env struct {
	binary string
	sites  *local.Sites
}

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	flag.Parse()
	if testing.Short() || os.Getenv("XDCR_E2E") == "off" {
		fmt.Println("e2e: skipped (-short)")
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "xdcr-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)

	// The agents run as processes of the real binary, built with the race
	// detector unless XDCR_E2E_RACE=off.
	start := time.Now()
	env.binary, err = topology.Build(context.Background(), dir, os.Getenv("XDCR_E2E_RACE") != "off", os.Stderr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	fmt.Printf("e2e: built %s in %s\n", env.binary, time.Since(start).Round(time.Millisecond))

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	logf, err := os.Create(filepath.Join(dir, "sites.log"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer logf.Close()
	env.sites, err = local.StartSites(ctx, local.SitesConfig{
		Names:  local.SiteNames(3),
		Dir:    filepath.Join(dir, "sites"),
		Logger: slog.New(slog.NewTextHandler(logf, &slog.HandlerOptions{Level: slog.LevelWarn})),
		PostgresSettings: map[string]string{
			// the tests exercise crashes of processes, not of the machine
			"fsync":              "off",
			"synchronous_commit": "off",
			"max_connections":    "200",
		},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: start sites:", err)
		return 1
	}
	defer env.sites.Close()
	fmt.Printf("e2e: sites up in %s\n", time.Since(start).Round(time.Millisecond))
	return m.Run()
}
