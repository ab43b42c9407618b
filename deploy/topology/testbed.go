package topology

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/xdcr/xdcr/deploy/faults"
	"github.com/xdcr/xdcr/deploy/local"
)

// BedOptions describe a test bed.
type BedOptions struct {
	// Race builds the agents' binary with the race detector.
	Race bool
	// WAN, when set, carries the leaf links between the sites.
	WAN *faults.WAN
	// PostgresSettings override the sites' server settings.
	PostgresSettings map[string]string
	// LogLevel of the sites' log (sites.log in the bed's directory).
	LogLevel slog.Level
	// Out receives the build's output.
	Out io.Writer
}

// Bed is what a suite of multi-site tests shares: the agents' binary and
// three local sites, in a temporary directory of their own.
type Bed struct {
	Dir    string
	Binary string
	Sites  *local.Sites
	Log    *slog.Logger
	logf   *os.File
}

// StartBed builds the binary and starts three sites. Close removes it all.
func StartBed(ctx context.Context, o BedOptions) (_ *Bed, err error) {
	dir, err := os.MkdirTemp("", "xdcr-bed-")
	if err != nil {
		return nil, err
	}
	b := &Bed{Dir: dir}
	defer func() {
		if err != nil {
			b.Close()
		}
	}()
	if o.Out == nil {
		o.Out = os.Stderr
	}
	if b.Binary, err = Build(ctx, dir, o.Race, o.Out); err != nil {
		return nil, err
	}
	if b.logf, err = os.Create(filepath.Join(dir, "sites.log")); err != nil {
		return nil, err
	}
	b.Log = slog.New(slog.NewTextHandler(b.logf, &slog.HandlerOptions{Level: o.LogLevel}))
	sctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	b.Sites, err = local.StartSites(sctx, local.SitesConfig{
		Names:            local.SiteNames(3),
		Dir:              filepath.Join(dir, "sites"),
		Logger:           b.Log,
		WAN:              o.WAN,
		PostgresSettings: o.PostgresSettings,
	})
	if err != nil {
		return nil, fmt.Errorf("start sites: %w", err)
	}
	return b, nil
}

// Close stops the sites and removes the directory.
func (b *Bed) Close() {
	if b.Sites != nil {
		_ = b.Sites.Close()
	}
	if b.logf != nil {
		_ = b.logf.Close()
	}
	_ = os.RemoveAll(b.Dir)
}
