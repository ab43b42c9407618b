// Package progress shows the progress of long operations (`xdcr sync`,
// `xdcr cache rebuild`): live bars per item and overall on a terminal
// (github.com/vbauerster/mpb), periodic structured log lines otherwise.
package progress

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
)

// Display tracks items (tables) with a count of rows and bytes each. Its
// methods are safe for concurrent use.
type Display struct {
	mu    sync.Mutex
	items map[string]*Item
	order []string

	bars    *mpb.Progress // nil without a terminal
	overall *mpb.Bar
	total   int64 // the overall bar's total
	log     *slog.Logger
	stop    context.CancelFunc
	done    chan struct{}
	start   time.Time
	rows    bool // bars count rows, not bytes (NewRows)
}

// Item is one tracked thing.
type Item struct {
	name        string
	rows, bytes int64
	totalRows   int64
	totalBytes  int64
	finished    bool
	bar         *mpb.Bar
}

// New returns a display that draws bars on w when terminal is set, and
// otherwise logs a line per item every interval.
func New(w io.Writer, terminal bool, log *slog.Logger, interval time.Duration) *Display {
	return newDisplay(w, terminal, log, interval, false)
}

// NewRows returns a display like New whose bars count rows instead of
// bytes, for work that knows no sizes (`xdcr cache rebuild`): Start's and
// Add's bytes are ignored.
func NewRows(w io.Writer, terminal bool, log *slog.Logger, interval time.Duration) *Display {
	return newDisplay(w, terminal, log, interval, true)
}

func newDisplay(w io.Writer, terminal bool, log *slog.Logger, interval time.Duration, rows bool) *Display {
	d := &Display{items: map[string]*Item{}, log: log, start: time.Now(), done: make(chan struct{}), rows: rows}
	ctx, cancel := context.WithCancel(context.Background())
	d.stop = cancel
	if terminal {
		d.bars = mpb.NewWithContext(ctx, mpb.WithOutput(w), mpb.WithWidth(40), mpb.WithRefreshRate(200*time.Millisecond))
		counters := []decor.Decorator{
			decor.CountersKibiByte("% .1f / % .1f", decor.WC{W: 22}),
			decor.AverageSpeed(decor.SizeB1024(0), " % .1f", decor.WC{W: 14}),
		}
		if rows {
			counters = []decor.Decorator{
				decor.CountersNoUnit("%d / %d rows", decor.WC{W: 22}),
				decor.AverageSpeed(0, " %.0f rows/s", decor.WC{W: 16}),
			}
		}
		d.overall = d.bars.AddBar(0,
			mpb.BarPriority(1<<30),
			mpb.PrependDecorators(decor.Name("overall", decor.WC{W: 24, C: decor.DindentRight})),
			mpb.AppendDecorators(append(counters, decor.AverageETA(decor.ET_STYLE_GO, decor.WC{W: 8}))...))
		close(d.done)
		return d
	}
	go func() {
		defer close(d.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				d.logAll("progress")
			}
		}
	}()
	return d
}

// Start adds an item with its expected rows and bytes (0 when unknown).
func (d *Display) Start(name string, rows, bytes int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	it := &Item{name: name, totalRows: rows, totalBytes: bytes}
	d.items[name] = it
	d.order = append(d.order, name)
	if d.bars == nil {
		return
	}
	size := []decor.Decorator{
		decor.CountersKibiByte("% .1f", decor.WC{W: 12}),
		decor.AverageSpeed(decor.SizeB1024(0), " % .1f", decor.WC{W: 14}),
	}
	if d.rows {
		bytes = rows // the bar's unit
		it.totalBytes = rows
		size = []decor.Decorator{decor.AverageSpeed(0, " %.0f rows/s", decor.WC{W: 16})}
	}
	decorators := append([]decor.Decorator{decor.Any(func(decor.Statistics) string { return d.rowsText(it) }, decor.WC{W: 22})}, size...)
	it.bar = d.bars.AddBar(max(bytes, 1),
		mpb.PrependDecorators(decor.Name(name, decor.WC{W: 24, C: decor.DindentRight})),
		mpb.AppendDecorators(append(decorators, decor.OnComplete(decor.AverageETA(decor.ET_STYLE_GO, decor.WC{W: 8}), "done"))...))
	d.total += max(bytes, 1)
	d.overall.SetTotal(d.total, false)
}

func (d *Display) rowsText(it *Item) string {
	d.mu.Lock()
	defer d.mu.Unlock()
	if it.totalRows > 0 && !it.finished {
		return fmt.Sprintf("%s / ~%s rows", humanize.Comma(it.rows), humanize.Comma(it.totalRows))
	}
	return humanize.Comma(it.rows) + " rows"
}

// Add counts rows and bytes done for an item.
func (d *Display) Add(name string, rows, bytes int64) {
	d.mu.Lock()
	it := d.items[name]
	if it == nil {
		d.mu.Unlock()
		return
	}
	if d.rows {
		bytes = rows // the bar's unit
	}
	it.rows += rows
	it.bytes += bytes
	if it.bar != nil && it.bytes > it.totalBytes {
		// the estimate was low: grow the bars rather than overflow them
		grown := it.bytes + it.bytes/10
		d.total += grown - max(it.totalBytes, 1)
		it.totalBytes = grown
		it.bar.SetTotal(grown, false)
		d.overall.SetTotal(d.total, false)
	}
	d.mu.Unlock()
	if it.bar != nil && bytes > 0 {
		it.bar.IncrInt64(bytes)
		d.overall.IncrInt64(bytes)
	}
}

// Finish marks an item complete with its exact row count.
func (d *Display) Finish(name string, rows int64) {
	d.mu.Lock()
	it := d.items[name]
	if it == nil {
		d.mu.Unlock()
		return
	}
	it.rows, it.finished = rows, true
	d.mu.Unlock()
	if it.bar != nil {
		it.bar.SetTotal(-1, true)
	} else {
		if d.rows {
			d.log.Info("done", "table", name, "rows", rows)
		} else {
			d.log.Info("done", "table", name, "rows", rows, "bytes", it.bytes)
		}
	}
}

// Close stops drawing (or logging) and waits for the last frame.
func (d *Display) Close() {
	d.stop()
	if d.bars != nil {
		d.overall.SetTotal(-1, true)
		d.bars.Wait()
	}
	<-d.done
}

func (d *Display) logAll(msg string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	names := append([]string(nil), d.order...)
	sort.Strings(names)
	elapsed := time.Since(d.start).Seconds()
	for _, n := range names {
		it := d.items[n]
		if it.finished {
			continue
		}
		attrs := []any{"table", n, "rows", it.rows}
		if !d.rows {
			attrs = append(attrs, "bytes", it.bytes)
		}
		if it.totalRows > 0 {
			attrs = append(attrs, "total_rows", it.totalRows)
		}
		switch {
		case d.rows && it.totalRows > 0:
			attrs = append(attrs, "pct", min(100, 100*it.rows/it.totalRows))
		case !d.rows && it.totalBytes > 0:
			attrs = append(attrs, "pct", 100*it.bytes/it.totalBytes)
		}
		if elapsed > 0 && d.rows {
			attrs = append(attrs, "rows_per_sec", int64(float64(it.rows)/elapsed))
		} else if elapsed > 0 {
			attrs = append(attrs, "bytes_per_sec", int64(float64(it.bytes)/elapsed))
		}
		d.log.Info(msg, attrs...)
	}
}
