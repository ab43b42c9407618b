package e2e

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
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
	start := time.Now()
	// The agents run as processes of the real binary, built with the race
	// detector unless XDCR_E2E_RACE=off.
	bed, err := topology.StartBed(context.Background(), topology.BedOptions{
		Race:     os.Getenv("XDCR_E2E_RACE") != "off",
		LogLevel: slog.LevelWarn,
		PostgresSettings: map[string]string{
			// the tests exercise crashes of processes, not of the machine
			"fsync":              "off",
			"synchronous_commit": "off",
			"max_connections":    "200",
		},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	defer bed.Close()
	env.binary, env.sites = bed.Binary, bed.Sites
	fmt.Printf("e2e: binary built and sites up in %s\n", time.Since(start).Round(time.Millisecond))
	return m.Run()
}
