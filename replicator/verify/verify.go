package verify

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/xdcr/xdcr/replicator"
	"github.com/xdcr/xdcr/replicator/change"
)

// Site is a site's name and its PostgreSQL connection string.
type Site struct {
	Name string
	DSN  string
}

// Config says what to compare and how. Zero tuning fields mean the
// defaults of [DefaultConfig].
type Config struct {
	Cluster  string // names the replica's row in xdcr.apply_position
	Primary  Site   // the current primary
	Replicas []Site // compared with the primary, in this order
	Tables   []replicator.Table
	// Epoch is the current epoch; 0 when unknown, and then a replica's
	// stored position counts if it follows Primary in any epoch.
	Epoch uint64
	// ReportedLSN, if set, returns the position the cluster status reports
	// site has applied everything before, or 0 when it reports none for
	// the current primary and epoch. After an idle period it is the only
	// way to see a replica reach the primary's position.
	ReportedLSN func(ctx context.Context, site string) (change.LSN, error)
	// Samples is how many differing keys a table lists at most; 0 lists
	// none (and compares differing chunks as ranges only).
	Samples int
	// Wait bounds each wait for a replica to reach the primary's position;
	// a replica that does not is reported as lagging.
	Wait time.Duration
	// ChunkRows is the size of the key-range chunks of a table whose
	// whole-table hash differs.
	ChunkRows int64
	// Attempts is how many times a difference is checked before it is
	// left unsettled.
	Attempts int
}

// DefaultConfig returns the tuning that zero fields get.
func DefaultConfig() Config {
	return Config{Wait: 30 * time.Second, ChunkRows: 10000, Attempts: 5}
}

func (c Config) withDefaults() Config {
	d := DefaultConfig()
	if c.Wait <= 0 {
		c.Wait = d.Wait
	}
	if c.ChunkRows <= 0 {
		c.ChunkRows = d.ChunkRows
	}
	if c.Attempts <= 0 {
		c.Attempts = d.Attempts
	}
	c.Samples = max(c.Samples, 0)
	return c
}

func (c Config) tuning() tuning {
	const leafRows, fanout = 100, 8
	return tuning{
		chunkRows:     c.ChunkRows,
		leafRows:      leafRows,
		fanout:        fanout,
		maxDepth:      splitDepth(c.ChunkRows, leafRows, fanout) + 1,
		maxFetch:      20000,
		samples:       c.Samples,
		attempts:      c.Attempts,
		confirmations: 2,
		pause:         200 * time.Millisecond,
		drill:         32,
		maxRounds:     200,
	}
}

// splitDepth is how many splits by fanout take a chunk of chunkRows rows
// down to leafRows.
func splitDepth(chunkRows, leafRows, fanout int64) int {
	d := 0
	for n := chunkRows; n > leafRows; n = (n + fanout - 1) / fanout {
		d++
	}
	return d
}

// The results of a table, and of a site (the worst of its tables).
const (
	ResultEqual     = "equal"     // the replica's rows equal the primary's
	ResultDiffers   = "differs"   // confirmed differences
	ResultLagging   = "lagging"   // the replica did not reach the primary's position in time: not compared
	ResultUnsettled = "unsettled" // rows kept changing on the primary during every check: neither equal nor different
	ResultError     = "error"     // could not be compared
)

// severity orders results from best to worst.
var severity = map[string]int{ResultEqual: 0, ResultUnsettled: 1, ResultLagging: 2, ResultDiffers: 3, ResultError: 4}

// Report is what `xdcr verify -o json` prints.
type Report struct {
	Cluster string       `json:"cluster"`
	Primary string       `json:"primary"`
	Epoch   uint64       `json:"epoch,omitempty"` // 0 (omitted) when the cluster status was not available
	Sites   []SiteReport `json:"sites"`
}

// SiteReport is one replica's result.
type SiteReport struct {
	Site   string        `json:"site"`
	Result string        `json:"result"`
	Error  string        `json:"error,omitempty"`
	Tables []TableReport `json:"tables"`
}

// TableReport is one table of one replica. Keys are written as
// [Key.String] does; ranges are [from, to) in key order.
type TableReport struct {
	Table string `json:"table"`
	// Key names the key columns; empty for a table without a key, which is
	// compared as a whole and reports counts only.
	Key         []string   `json:"key"`
	Result      string     `json:"result"`
	Equal       bool       `json:"equal"`
	RowsPrimary *int64     `json:"rows_primary"` // null when not read
	RowsReplica *int64     `json:"rows_replica"`
	Ranges      []KeyRange `json:"ranges"`
	Missing     []string   `json:"missing"`   // on the primary, not on the replica
	Extra       []string   `json:"extra"`     // on the replica only
	Different   []string   `json:"different"` // on both, with other values
	// Unsettled counts rows (or ranges) that changed on the primary during
	// every attempt to check them.
	Unsettled int    `json:"unsettled,omitempty"`
	Note      string `json:"note,omitempty"`
	Error     string `json:"error,omitempty"`
}

// Differs reports whether any table of any site has confirmed differences.
func (r *Report) Differs() bool { return r.any(ResultDiffers) }

// Failed reports whether anything could not be compared because of an
// error.
func (r *Report) Failed() bool { return r.any(ResultError) }

// Unverified reports whether a table was left lagging or unsettled.
func (r *Report) Unverified() bool { return r.any(ResultLagging) || r.any(ResultUnsettled) }

func (r *Report) any(result string) bool {
	for _, s := range r.Sites {
		if s.Result == result {
			return true
		}
		for _, t := range s.Tables {
			if t.Result == result {
				return true
			}
		}
	}
	return false
}

// Run compares every table of every replica in cfg with the primary's and
// returns what it found. Problems with one site or table are in the report;
// the error is for failures that leave nothing to report (the primary
// cannot be reached) and for ctx ending, when the report holds what was
// done so far. It logs one line per table at Info; log may be nil.
func Run(ctx context.Context, cfg Config, log *slog.Logger) (*Report, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cfg = cfg.withDefaults()
	rep := &Report{Cluster: cfg.Cluster, Primary: cfg.Primary.Name, Epoch: cfg.Epoch, Sites: []SiteReport{}}
	src, err := openSource(ctx, cfg.Primary.Name, cfg.Primary.DSN)
	if err != nil {
		return nil, err
	}
	defer src.conn.Close(context.WithoutCancel(ctx))

	tables := make([]*table, len(cfg.Tables))
	tableErrs := make([]error, len(cfg.Tables))
	for i, name := range cfg.Tables {
		tables[i], tableErrs[i] = describeTable(ctx, src.conn, name)
		if ctx.Err() != nil {
			return rep, ctx.Err()
		}
	}
	for _, site := range cfg.Replicas {
		sr := verifySite(ctx, &cfg, src, site, tables, tableErrs, log.With("site", site.Name))
		rep.Sites = append(rep.Sites, sr)
		if ctx.Err() != nil {
			return rep, ctx.Err()
		}
	}
	return rep, nil
}

func verifySite(ctx context.Context, cfg *Config, src *source, site Site, tables []*table, tableErrs []error, log *slog.Logger) SiteReport {
	sr := SiteReport{Site: site.Name, Result: ResultEqual, Tables: []TableReport{}}
	conn, err := connect(ctx, site.DSN)
	if err != nil {
		sr.Result, sr.Error = ResultError, fmt.Sprintf("replica %s: %v", site.Name, err)
		return sr
	}
	defer conn.Close(context.WithoutCancel(ctx))
	dst := &target{conn: conn, site: site.Name, cfg: cfg, log: log}
	var lagging *LaggingError
	for i, name := range cfg.Tables {
		tr := TableReport{Table: name.String(), Key: []string{}}
		switch {
		case tableErrs[i] != nil:
			tr.Result, tr.Error = ResultError, tableErrs[i].Error()
		case lagging != nil:
			tr.Key = tables[i].keys
			tr.Result, tr.Note = ResultLagging, "not compared: "+lagging.Error()
		default:
			tr.Key = tables[i].keys
			start := time.Now()
			err := verifyTable(ctx, cfg, src, dst, tables[i], &tr, log.With("table", name.String()))
			if errors.As(err, &lagging) {
				tr.Result, tr.Note = ResultLagging, lagging.Error()
			} else if err != nil {
				tr.Result, tr.Error = ResultError, err.Error()
			}
			log.Info("table verified", "table", name.String(), "result", tr.Result, "duration", time.Since(start).Round(time.Millisecond))
		}
		tr.Equal = tr.Result == ResultEqual
		if tr.Ranges == nil {
			tr.Ranges = []KeyRange{}
		}
		for _, l := range []*[]string{&tr.Missing, &tr.Extra, &tr.Different} {
			if *l == nil {
				*l = []string{}
			}
		}
		if severity[tr.Result] > severity[sr.Result] {
			sr.Result = tr.Result
		}
		sr.Tables = append(sr.Tables, tr)
		if ctx.Err() != nil {
			break
		}
	}
	return sr
}

func verifyTable(ctx context.Context, cfg *Config, src *source, dst *target, t *table, tr *TableReport, log *slog.Logger) error {
	missing, exists, err := missingColumns(ctx, dst.conn, t)
	switch {
	case err != nil:
		return fmt.Errorf("read the columns of %s on %s: %w", t.name, dst.site, err)
	case !exists:
		tr.Result, tr.Note = ResultDiffers, "the table does not exist on the replica"
		return nil
	case len(missing) > 0:
		tr.Result, tr.Note = ResultDiffers, "the replica lacks column(s) "+strings.Join(missing, ", ")
		return nil
	}
	c := &checker{
		p:       &pgPair{src: src, dst: dst, t: t},
		t:       cfg.tuning(),
		keyless: t.keyless(),
		log:     log,
	}
	if err := c.run(ctx); err != nil {
		tr.RowsPrimary, tr.RowsReplica = c.rowsPrimary, c.rowsReplica
		return err
	}
	c.result(tr, cfg.Samples)
	if t.keyless() {
		tr.Note = "the table has " + t.identity + ": compared as a whole, counts only"
	}
	log.Debug("table compared", "passes", c.passes, "result", tr.Result)
	return nil
}
