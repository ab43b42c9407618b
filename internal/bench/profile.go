package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"runtime/pprof"
	"sync"
	"time"
)

// profiler collects CPU and allocation profiles of agents over a window.
type profiler struct {
	wg   sync.WaitGroup
	mu   sync.Mutex
	errs []error
}

func (p *profiler) fail(err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.errs = append(p.errs, err)
}

// startProfiles takes, for Scale.ProfileSeconds from now, a CPU and an
// allocation profile of each node's agent (waiting for an agent that is
// being started to serve them) and a CPU profile of this process, which
// runs both NATS servers. Files: ProfileDir/<name>-<node>.cpu.pprof,
// <name>-<node>.allocs.pprof, <name>-nats.cpu.pprof.
func (e *env) startProfiles(ctx context.Context, name string, nodes ...string) *profiler {
	p := &profiler{}
	secs := e.sc.ProfileSeconds
	for _, n := range nodes {
		addr := e.pprof[n]
		for _, kind := range []string{"profile", "allocs"} {
			file := filepath.Join(e.o.ProfileDir, fmt.Sprintf("%s-%s.%s.pprof", name, n, map[string]string{"profile": "cpu", "allocs": "allocs"}[kind]))
			url := fmt.Sprintf("http://%s/debug/pprof/%s?seconds=%d", addr, kind, secs)
			p.wg.Go(func() {
				if err := fetchProfile(ctx, url, file, time.Duration(secs+30)*time.Second); err != nil {
					p.fail(fmt.Errorf("%s of %s: %w", kind, n, err))
				}
			})
		}
	}
	file := filepath.Join(e.o.ProfileDir, name+"-nats.cpu.pprof")
	p.wg.Go(func() {
		f, err := os.Create(file)
		if err != nil {
			p.fail(err)
			return
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			p.fail(fmt.Errorf("profile this process: %w", err))
			return
		}
		select {
		case <-time.After(time.Duration(secs) * time.Second):
		case <-ctx.Done():
		}
		pprof.StopCPUProfile()
	})
	e.progress("  profiling %v for %ds into %s", nodes, secs, e.o.ProfileDir)
	return p
}

func (p *profiler) wait() error {
	p.wg.Wait()
	return errors.Join(p.errs...)
}

// fetchProfile GETs url into file, retrying while the agent is starting.
func fetchProfile(ctx context.Context, url, file string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			select {
			case <-ctx.Done():
				return fmt.Errorf("%s: %w", url, err)
			case <-time.After(5 * time.Millisecond):
				continue
			}
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			b, _ := io.ReadAll(resp.Body)
			return fmt.Errorf("%s: %s: %s", url, resp.Status, b)
		}
		f, err := os.Create(file)
		if err != nil {
			return err
		}
		if _, err := io.Copy(f, resp.Body); err != nil {
			f.Close()
			return err
		}
		return f.Close()
	}
}
