package replicator

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/xdcr/xdcr/replicator/change"
)

// SyncConfig describes one copy of tables from the primary into a replica
// site (`xdcr sync`).
type SyncConfig struct {
	Cluster   string
	Site      string // the site copied into
	SourceDSN string // the primary's database
	TargetDSN string // the site's database
	// Origin and Epoch name the primary's history the site continues with.
	Origin string
	Epoch  uint64
	// Stream is the site's local stream of the primary's changes.
	Stream string
	// StreamPosition returns the last sequence of Stream in the site. It is
	// called before the copy's snapshot is taken, so every message up to it
	// holds only transactions the copy includes; apply starts after it.
	StreamPosition func(ctx context.Context) (uint64, error)
	// Tables are the tables to copy.
	Tables []Table
	// Partial copies only Tables into a site that streams the others (a
	// table added to a running cluster): the site's position is kept, and
	// apply skips the copied tables' changes that the copy holds.
	Partial bool
	// Parallel is the number of copy workers; 0 means one per CPU (at
	// least 2).
	Parallel int
	// ChunkRows caps the rows of one range of heap blocks; 0 means no cap
	// (tables are split only as far as it takes to keep every worker
	// busy).
	ChunkRows int64
}

// SyncProgress receives a sync's progress. Its methods may be called from
// several goroutines at once.
type SyncProgress interface {
	// Start announces a table and its estimated size (0 when unknown).
	Start(table string, rows, bytes int64)
	// Copied adds rows and bytes copied into a table.
	Copied(table string, rows, bytes int64)
	// Finish says a table is complete, with its exact row count.
	Finish(table string, rows int64)
}

// SyncResult is what a sync did.
type SyncResult struct {
	// LSN is where the copy ends: the site applies the primary's
	// transactions committed at or after it.
	LSN       change.LSN
	StreamSeq uint64 // apply starts after this stream sequence
	Tables    []TableCopy
}

// TableCopy is one table's share of a sync.
type TableCopy struct {
	Table    string
	Created  bool
	Rows     int64
	Bytes    int64
	Duration time.Duration
}

// SchemaMismatchError lists how tables that exist in the site differ from
// the primary's; a sync refuses to touch them.
type SchemaMismatchError struct {
	Site   string
	Tables map[string][]SchemaDiff
}

func (e *SchemaMismatchError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d table(s) on site %s differ from the primary's; fix them first:", len(e.Tables), e.Site)
	for _, t := range sortedKeys(e.Tables) {
		for _, d := range e.Tables[t] {
			col := ""
			if d.Column != "" {
				col = " column " + d.Column
			}
			fmt.Fprintf(&b, "\n  %s%s %s\n    fix: %s", t, col, d.Problem, d.Fix)
		}
	}
	return b.String()
}

// Sync copies tables from the primary into a site so that the site's apply
// continues from exactly the copied state:
//
//  1. The tables are checked (created when missing, refused when they
//     differ), marked as being copied — apply stops touching them — and
//     emptied.
//  2. A temporary logical slot is created with an exported snapshot: the
//     snapshot holds exactly the transactions that commit before the slot's
//     consistent point C, and the change stream holds all of them (it is
//     fed by the capture's own slot) with their commit LSNs.
//  3. Workers import that snapshot and copy the tables with binary COPY,
//     large ones in ranges of heap blocks, in parallel.
//  4. One transaction marks the tables ready at C and, for a full sync,
//     sets the site's position to C-1 in the primary's epoch: apply then
//     skips the transactions the copy holds and applies every later one.
//
// An interrupted sync leaves the tables marked as being copied (apply waits)
// and is simply run again: it starts over.
func Sync(ctx context.Context, cfg SyncConfig, progress SyncProgress, log *slog.Logger) (SyncResult, error) {
	if cfg.Parallel <= 0 {
		cfg.Parallel = max(2, runtime.NumCPU())
	}
	s := &syncRun{cfg: cfg, progress: progress, log: log.With("component", "sync", "site", cfg.Site)}
	defer s.close(ctx)
	return s.run(ctx)
}

type syncRun struct {
	cfg      SyncConfig
	progress SyncProgress
	log      *slog.Logger

	srcMeta, tgt, tgtMeta *pgx.Conn
	plans                 []*tablePlan
}

type tablePlan struct {
	def      *TableDef
	create   bool
	recreate bool  // an interrupted sync created it: drop it and start over
	rows     int64 // estimated
	bytes    int64
	textCopy bool // a type whose binary form names OIDs: copy as text
	ranges   int  // the copy tasks it is split into
	copied   struct {
		sync.Mutex
		rows, bytes int64
		left        int
	}
	started  time.Time
	finished time.Time
}

func (s *syncRun) close(ctx context.Context) {
	for _, c := range []*pgx.Conn{s.srcMeta, s.tgt, s.tgtMeta} {
		if c != nil {
			c.Close(context.WithoutCancel(ctx))
		}
	}
}

func (s *syncRun) run(ctx context.Context) (SyncResult, error) {
	var err error
	if s.srcMeta, err = ConnectMeta(ctx, s.cfg.SourceDSN); err != nil {
		return SyncResult{}, fmt.Errorf("primary: %w", err)
	}
	if s.tgtMeta, err = ConnectMeta(ctx, s.cfg.TargetDSN); err != nil {
		return SyncResult{}, fmt.Errorf("site %s: %w", s.cfg.Site, err)
	}
	if s.tgt, err = connectApply(ctx, ApplyConfig{Site: s.cfg.Site, DSN: s.cfg.TargetDSN}); err != nil {
		return SyncResult{}, fmt.Errorf("site %s: %w", s.cfg.Site, err)
	}
	if err := s.plan(ctx); err != nil {
		return SyncResult{}, err
	}
	if err := s.ensureCaptured(ctx); err != nil {
		return SyncResult{}, err
	}
	if err := s.markCopying(ctx); err != nil {
		return SyncResult{}, err
	}
	seq, err := s.cfg.StreamPosition(ctx)
	if err != nil {
		return SyncResult{}, fmt.Errorf("read the end of site %s's stream: %w", s.cfg.Site, err)
	}
	lsn, err := s.copyAll(ctx)
	if err != nil {
		return SyncResult{}, err
	}
	if err := s.finish(ctx, lsn, seq); err != nil {
		return SyncResult{}, err
	}
	// the site is a replica: applications must not write to what it copied
	tables := make([]Table, len(s.plans))
	for i, p := range s.plans {
		tables[i] = p.def.Table
	}
	if err := Fence(ctx, s.tgtMeta, s.cfg.Cluster, tables, 5*time.Second, s.log); err != nil {
		return SyncResult{}, fmt.Errorf("site %s: %w", s.cfg.Site, err)
	}
	res := SyncResult{LSN: lsn, StreamSeq: seq}
	for _, p := range s.plans {
		res.Tables = append(res.Tables, TableCopy{Table: p.def.Table.String(), Created: p.create,
			Rows: p.copied.rows, Bytes: p.copied.bytes, Duration: p.finished.Sub(p.started)})
	}
	return res, nil
}

// plan reads every table's definition on both sides and decides what to
// create; it refuses tables that differ.
func (s *syncRun) plan(ctx context.Context) error {
	mismatch := &SchemaMismatchError{Site: s.cfg.Site, Tables: map[string][]SchemaDiff{}}
	var problems []error
	if err := EnsureApplySchema(ctx, s.tgt); err != nil {
		return err
	}
	earlier, err := ReadTableSyncs(ctx, s.tgt, s.cfg.Cluster)
	if err != nil {
		return fmt.Errorf("site %s: %w", s.cfg.Site, err)
	}
	for _, t := range s.cfg.Tables {
		if err := CheckIdentity(ctx, s.srcMeta, t); err != nil {
			problems = append(problems, err)
			continue
		}
		src, ok, err := ReadTableDef(ctx, s.srcMeta, t)
		if err != nil {
			return fmt.Errorf("primary: %w", err)
		}
		if !ok {
			problems = append(problems, fmt.Errorf("table %s does not exist on the primary", t))
			continue
		}
		dst, exists, err := ReadTableDef(ctx, s.tgtMeta, t)
		if err != nil {
			return fmt.Errorf("site %s: %w", s.cfg.Site, err)
		}
		p := &tablePlan{def: src, create: !exists}
		if e, ok := earlier[t.String()]; ok && exists && e.Copying && e.Created {
			p.create, p.recreate = true, true
		} else if exists {
			if diffs := dst.Diff(src, s.cfg.Site); len(diffs) > 0 {
				mismatch.Tables[t.String()] = diffs
			}
		}
		for _, c := range src.Columns {
			if !strings.HasPrefix(c.Type, "pg_catalog.") && strings.Contains(c.Type, ".") {
				p.textCopy = true
			}
		}
		if err := s.srcMeta.QueryRow(ctx, `SELECT greatest(reltuples, 0)::bigint, pg_relation_size(oid)
			FROM pg_class WHERE oid = to_regclass($1)`, t.Quoted()).Scan(&p.rows, &p.bytes); err != nil {
			return fmt.Errorf("primary: size of %s: %w", t, err)
		}
		s.plans = append(s.plans, p)
	}
	if len(problems) > 0 {
		return errors.Join(problems...)
	}
	if len(mismatch.Tables) > 0 {
		return mismatch
	}
	return nil
}

// ensureCaptured makes sure that every change committed after the copy's
// snapshot reaches the stream: the tables are in the publication and the
// capture's slot exists before the snapshot is taken. On a cluster whose
// primary agent never ran, sync creates both (the agent then streams from
// the slot); a table newly added to tables: is added to the publication
// (the agent's next start lists exactly the config's tables).
func (s *syncRun) ensureCaptured(ctx context.Context) error {
	name := PublicationName(s.cfg.Cluster)
	var exists bool
	if err := s.srcMeta.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)`, name).Scan(&exists); err != nil {
		return fmt.Errorf("primary: read publication %s: %w", name, err)
	}
	if !exists {
		quoted := make([]string, len(s.plans))
		for i, p := range s.plans {
			quoted[i] = p.def.Table.Quoted()
		}
		sql := fmt.Sprintf("CREATE PUBLICATION %s FOR TABLE %s WITH (publish_via_partition_root = true)",
			pgx.Identifier{name}.Sanitize(), strings.Join(quoted, ", "))
		if _, err := s.srcMeta.Exec(ctx, sql); err != nil {
			return fmt.Errorf("primary: create publication %s: %w", name, err)
		}
		s.log.Info("created the publication", "publication", name)
	} else {
		have, err := queryStrings(ctx, s.srcMeta, `SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1`, name)
		if err != nil {
			return fmt.Errorf("primary: read publication %s: %w", name, err)
		}
		for _, p := range s.plans {
			if slices.Contains(have, p.def.Table.String()) {
				continue
			}
			sql := fmt.Sprintf("ALTER PUBLICATION %s ADD TABLE %s", pgx.Identifier{name}.Sanitize(), p.def.Table.Quoted())
			if _, err := s.srcMeta.Exec(ctx, sql); err != nil {
				return fmt.Errorf("primary: add %s to publication %s: %w", p.def.Table, name, err)
			}
			s.log.Info("added the table to the publication", "table", p.def.Table.String(), "publication", name)
		}
	}
	slot := SlotName(s.cfg.Cluster)
	var lost bool
	if err := s.srcMeta.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1),
			EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND wal_status = 'lost')`, slot).Scan(&exists, &lost); err != nil {
		return fmt.Errorf("primary: read replication slot %s: %w", slot, err)
	}
	if lost {
		// PostgreSQL invalidated it (max_slot_wal_keep_size): it can never
		// stream again, and this copy is what re-seeds the site, so a new
		// slot replaces it; the changes after the copy reach the stream
		// through the new one
		if _, err := s.srcMeta.Exec(ctx, `SELECT pg_drop_replication_slot($1)`, slot); err != nil {
			return fmt.Errorf("primary: drop the invalidated replication slot %s: %w", slot, err)
		}
		s.log.Warn("dropped the capture's invalidated replication slot; a new one replaces it", "slot", slot)
		exists = false
	}
	if !exists {
		if _, err := s.srcMeta.Exec(ctx, `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, slot); err != nil {
			return fmt.Errorf("primary: create replication slot %s: %w", slot, err)
		}
		s.log.Info("created the capture's replication slot", "slot", slot)
	}
	return nil
}

// markCopying makes apply stop touching the tables, creates the missing
// ones and empties the others, in one transaction.
func (s *syncRun) markCopying(ctx context.Context) error {
	return pgx.BeginFunc(ctx, s.tgt, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO xdcr.apply_position (cluster, origin, epoch, lsn, stream, stream_seq)
			VALUES ($1, '', 0, '0/0', '', 0) ON CONFLICT (cluster) DO NOTHING`, s.cfg.Cluster); err != nil {
			return fmt.Errorf("site %s: %w", s.cfg.Site, err)
		}
		var truncate []string
		for _, p := range s.plans {
			t := p.def.Table
			if _, err := tx.Exec(ctx, `INSERT INTO xdcr.table_sync (cluster, tbl, state, rows_total, created)
				VALUES ($1, $2, 'copying', $3, $4)
				ON CONFLICT (cluster, tbl) DO UPDATE SET state = 'copying', lsn = NULL, rows_done = 0,
					bytes_done = 0, rows_total = $3, created = $4, updated_at = now()`, s.cfg.Cluster, t.String(), p.rows, p.create); err != nil {
				return fmt.Errorf("site %s: mark %s as being copied: %w", s.cfg.Site, t, err)
			}
			if !p.create {
				truncate = append(truncate, t.Quoted())
				continue
			}
			if p.recreate {
				if _, err := tx.Exec(ctx, "DROP TABLE "+t.Quoted()); err != nil {
					return fmt.Errorf("site %s: drop %s, left half-copied by an interrupted sync: %w", s.cfg.Site, t, err)
				}
			}
			before, _ := p.def.CreateStatements()
			for _, ddl := range before {
				if _, err := tx.Exec(ctx, ddl); err != nil {
					return fmt.Errorf("site %s: create %s: %s: %w", s.cfg.Site, t, firstLine(ddl), err)
				}
			}
			s.log.Info("created table", "table", t.String())
		}
		if len(truncate) > 0 {
			if _, err := tx.Exec(ctx, "TRUNCATE ONLY "+strings.Join(truncate, ", ")); err != nil {
				return fmt.Errorf("site %s: empty the tables before the copy: %w", s.cfg.Site, err)
			}
		}
		_, err := tx.Exec(ctx, `UPDATE xdcr.apply_position SET generation = generation + 1 WHERE cluster = $1`, s.cfg.Cluster)
		return err
	})
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i] + " …"
	}
	return s
}

// copyAll takes the snapshot and copies every table; it returns the LSN
// where the copy ends.
func (s *syncRun) copyAll(ctx context.Context) (change.LSN, error) {
	repl, _, err := connectReplication(ctx, s.cfg.SourceDSN, 0)
	if err != nil {
		return 0, fmt.Errorf("primary: %w", err)
	}
	slot := fmt.Sprintf("xdcr_sync_%s_%08x", strings.ReplaceAll(s.cfg.Site, "-", "_"), rand.Uint32())
	res, err := pglogrepl.CreateReplicationSlot(ctx, repl, slot, "pgoutput",
		pglogrepl.CreateReplicationSlotOptions{Temporary: true, SnapshotAction: "EXPORT_SNAPSHOT", Mode: pglogrepl.LogicalReplication})
	if err != nil {
		repl.Close(context.WithoutCancel(ctx))
		return 0, fmt.Errorf("primary: create a temporary slot with an exported snapshot: %w", err)
	}
	lsn, err := change.ParseLSN(res.ConsistentPoint)
	if err != nil {
		repl.Close(context.WithoutCancel(ctx))
		return 0, err
	}
	s.log.Info("copy snapshot taken", "lsn", lsn, "snapshot", res.SnapshotName)

	// every worker imports the snapshot while the slot's connection holds it
	workers := make([]*copyWorker, s.cfg.Parallel)
	defer func() {
		for _, w := range workers {
			if w != nil {
				w.close(ctx)
			}
		}
	}()
	for i := range workers {
		w, err := s.newWorker(ctx, res.SnapshotName)
		if err != nil {
			repl.Close(context.WithoutCancel(ctx))
			return 0, err
		}
		workers[i] = w
	}
	// the snapshot lives on in the workers' transactions; the slot can go
	repl.Close(context.WithoutCancel(ctx))

	tasks, err := s.tasks(ctx, workers[0])
	if err != nil {
		return 0, err
	}
	ch := make(chan copyTask)
	errc := make(chan error, len(workers))
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	for _, w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for t := range ch {
				if err := s.copyTask(wctx, w, t); err != nil {
					errc <- err
					cancel()
					return
				}
			}
		}()
	}
feed:
	for _, t := range tasks {
		select {
		case ch <- t:
		case <-wctx.Done():
			break feed
		}
	}
	close(ch)
	wg.Wait()
	close(errc)
	if err := <-errc; err != nil {
		return 0, err
	}
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	return lsn, nil
}

type copyWorker struct {
	src, dst *pgx.Conn
}

func (w *copyWorker) close(ctx context.Context) {
	w.src.Close(context.WithoutCancel(ctx))
	w.dst.Close(context.WithoutCancel(ctx))
}

func (s *syncRun) newWorker(ctx context.Context, snapshot string) (*copyWorker, error) {
	src, err := ConnectMeta(ctx, s.cfg.SourceDSN)
	if err != nil {
		return nil, fmt.Errorf("primary: %w", err)
	}
	if _, err := src.Exec(ctx, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"); err != nil {
		src.Close(ctx)
		return nil, fmt.Errorf("primary: %w", err)
	}
	if _, err := src.Exec(ctx, "SET TRANSACTION SNAPSHOT "+quoteLiteral(snapshot)); err != nil {
		src.Close(ctx)
		return nil, fmt.Errorf("primary: import the copy snapshot: %w", err)
	}
	dst, err := connectApply(ctx, ApplyConfig{Site: s.cfg.Site, DSN: s.cfg.TargetDSN})
	if err != nil {
		src.Close(ctx)
		return nil, fmt.Errorf("site %s: %w", s.cfg.Site, err)
	}
	return &copyWorker{src: src, dst: dst}, nil
}

type copyTask struct {
	plan *tablePlan
	rng  blockRange
}

// bytes estimates the task's size: an even share of its table.
func (t copyTask) bytes() int64 { return t.plan.bytes / int64(t.plan.ranges) }

// tasks splits the tables into copy tasks. Workers that each fill a table
// of their own run fastest (writers of one table queue on extending it,
// and every range is a scan of its own), so a table is split into ranges
// of heap blocks only as far as it takes to keep every worker busy: into
// as many ranges as it holds even shares of the whole copy (one share per
// worker), and at most ChunkRows rows a range when that is set. A TID
// range scan reads each block once, where ranges of a key would each need
// an index scan or a filtered scan of the whole table. Every task reads the
// same exported snapshot, so the ranges partition exactly the rows it
// sees; the last range is open-ended. The largest tasks go first, so the
// copy does not end waiting on one big table.
func (s *syncRun) tasks(ctx context.Context, w *copyWorker) ([]copyTask, error) {
	var total int64
	for _, p := range s.plans {
		p.started = time.Now()
		if p.rows == 0 && p.bytes > 0 {
			// never analyzed: count in the snapshot, to size the work
			if err := w.src.QueryRow(ctx, "SELECT count(*) FROM "+p.def.Table.Quoted()).Scan(&p.rows); err != nil {
				return nil, fmt.Errorf("primary: count %s: %w", p.def.Table, err)
			}
		}
		s.progress.Start(p.def.Table.String(), p.rows, p.bytes)
		total += p.bytes
	}
	var tasks []copyTask
	for _, p := range s.plans {
		ranges := []blockRange{{}}
		if n := rangesFor(p.rows, p.bytes, total, s.cfg.Parallel, s.cfg.ChunkRows); n > 1 {
			var blocks int64
			if err := w.src.QueryRow(ctx, "SELECT pg_relation_size($1::regclass) / current_setting('block_size')::bigint",
				p.def.Table.Quoted()).Scan(&blocks); err != nil {
				return nil, fmt.Errorf("primary: size of %s: %w", p.def.Table, err)
			}
			ranges = splitBlocks(blocks, n)
		}
		p.ranges, p.copied.left = len(ranges), len(ranges)
		for _, r := range ranges {
			tasks = append(tasks, copyTask{plan: p, rng: r})
		}
	}
	slices.SortStableFunc(tasks, func(a, b copyTask) int { return cmp.Compare(b.bytes(), a.bytes()) })
	return tasks, nil
}

// rangesFor is how many ranges a table of rows and bytes is copied in,
// when the whole copy is total bytes over workers: one per even share it
// holds (rounded up), and at least rows/chunkRows when chunkRows is set.
func rangesFor(rows, bytes, total int64, workers int, chunkRows int64) int64 {
	n := int64(1)
	if total > 0 {
		n = max(n, (bytes*int64(max(workers, 1))+total-1)/total)
	}
	if chunkRows > 0 {
		n = max(n, (rows+chunkRows-1)/chunkRows)
	}
	return n
}

// blockRange is the rows in heap blocks [lo, hi); a zero bound is open.
type blockRange struct{ lo, hi int64 }

// splitBlocks cuts a table of blocks heap blocks into n ranges, the last
// one open-ended (the table may have grown since it was measured: rows in
// new blocks are not in the snapshot, but the scan must not rely on that).
func splitBlocks(blocks, n int64) []blockRange {
	if n <= 1 || blocks < n {
		return []blockRange{{}}
	}
	step := blocks / n
	out := make([]blockRange, 0, n)
	for i := range n {
		r := blockRange{lo: i * step, hi: (i + 1) * step}
		if i == n-1 {
			r.hi = 0
		}
		out = append(out, r)
	}
	return out
}

// where is the range's condition on ctid, or "" for the whole table.
func (r blockRange) where() string {
	var conds []string
	if r.lo > 0 {
		conds = append(conds, fmt.Sprintf("ctid >= '(%d,0)'::tid", r.lo))
	}
	if r.hi > 0 {
		conds = append(conds, fmt.Sprintf("ctid < '(%d,0)'::tid", r.hi))
	}
	return strings.Join(conds, " AND ")
}

// copyTask copies one table or key range with COPY … TO STDOUT on the
// primary piped into COPY … FROM STDIN on the site.
func (s *syncRun) copyTask(ctx context.Context, w *copyWorker, t copyTask) error {
	p := t.plan
	tbl := p.def.Table
	cols := make([]string, 0, len(p.def.Columns))
	for _, c := range p.def.CopyColumns() {
		cols = append(cols, pgx.Identifier{c}.Sanitize())
	}
	list := strings.Join(cols, ", ")
	format := "binary"
	if p.textCopy {
		format = "text"
	}
	src := fmt.Sprintf("COPY %s (%s) TO STDOUT (FORMAT %s)", tbl.Quoted(), list, format)
	if where := t.rng.where(); where != "" {
		src = fmt.Sprintf("COPY (SELECT %s FROM %s WHERE %s) TO STDOUT (FORMAT %s)", list, tbl.Quoted(), where, format)
	}
	// A table this sync created and copies in one piece is filled in the
	// transaction that empties it, with FREEZE: its rows are written
	// frozen and all-visible, so reading them later (the key's build,
	// ANALYZE, the first queries, vacuum) does not rewrite every page to
	// set hint bits. Nothing else can reference such a table, so
	// truncating it alone cannot fail on a foreign key.
	freeze := p.create && p.ranges == 1
	opts := "FORMAT " + format
	if freeze {
		opts += ", FREEZE"
		if _, err := w.dst.Exec(ctx, "BEGIN"); err != nil {
			return fmt.Errorf("site %s: %w", s.cfg.Site, err)
		}
		if _, err := w.dst.Exec(ctx, "TRUNCATE ONLY "+tbl.Quoted()); err != nil {
			return fmt.Errorf("site %s: empty %s in the copy's transaction: %w", s.cfg.Site, tbl, err)
		}
	}
	dst := fmt.Sprintf("COPY %s (%s) FROM STDIN (%s)", tbl.Quoted(), list, opts)

	// CopyTo writes one row per call: a pipe handing rows over one by one
	// would make each row a message and a send of its own on the site's
	// connection (CPU in syscalls, not in PostgreSQL). Rows go over in
	// buffers of copyBuffer bytes.
	pr, pw := io.Pipe()
	counter := &countingWriter{w: pw, report: func(n int64) { s.progress.Copied(tbl.String(), 0, n) }}
	buf := bufio.NewWriterSize(counter, copyBuffer)
	done := make(chan error, 1)
	go func() {
		_, err := w.src.PgConn().CopyTo(ctx, buf, src)
		if err == nil {
			err = buf.Flush()
		}
		pw.CloseWithError(err)
		done <- err
	}()
	tag, err := w.dst.PgConn().CopyFrom(ctx, pr, dst)
	pr.CloseWithError(errors.New("copy into the site ended"))
	srcErr := <-done
	switch {
	case srcErr != nil:
		return fmt.Errorf("primary: copy out of %s: %w", tbl, srcErr)
	case err != nil:
		return fmt.Errorf("site %s: copy into %s: %w", s.cfg.Site, tbl, err)
	}
	if freeze {
		if _, err := w.dst.Exec(ctx, "COMMIT"); err != nil {
			return fmt.Errorf("site %s: commit the copy of %s: %w", s.cfg.Site, tbl, err)
		}
	}
	rows := tag.RowsAffected()
	s.progress.Copied(tbl.String(), rows, 0)

	p.copied.Lock()
	p.copied.rows += rows
	p.copied.bytes += counter.n
	p.copied.left--
	last, total, bytes := p.copied.left == 0, p.copied.rows, p.copied.bytes
	p.copied.Unlock()
	if _, err := w.dst.Exec(ctx, `UPDATE xdcr.table_sync SET rows_done = rows_done + $3, bytes_done = bytes_done + $4,
		updated_at = now() WHERE cluster = $1 AND tbl = $2`, s.cfg.Cluster, tbl.String(), rows, counter.n); err != nil {
		return fmt.Errorf("site %s: record progress: %w", s.cfg.Site, err)
	}
	if !last {
		return nil
	}
	// the whole table is in: keys and indexes now, built once
	if p.create {
		_, after := p.def.CreateStatements()
		for _, ddl := range after {
			if _, err := w.dst.Exec(ctx, ddl); err != nil {
				return fmt.Errorf("site %s: %s: %w", s.cfg.Site, firstLine(ddl), err)
			}
		}
	}
	if _, err := w.dst.Exec(ctx, "ANALYZE "+tbl.Quoted()); err != nil {
		return fmt.Errorf("site %s: analyze %s: %w", s.cfg.Site, tbl, err)
	}
	p.finished = time.Now()
	s.progress.Finish(tbl.String(), total)
	s.log.Info("table copied", "table", tbl.String(), "rows", total, "bytes", bytes, "duration", time.Since(p.started).Round(time.Millisecond))
	return nil
}

// copyBuffer is how many bytes of rows go into the site per write.
const copyBuffer = 256 << 10

type countingWriter struct {
	w      io.Writer
	n      int64
	report func(int64)
}

func (c *countingWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n += int64(n)
	c.report(int64(n))
	return n, err
}

// finish hands the tables over to apply in one transaction.
func (s *syncRun) finish(ctx context.Context, lsn change.LSN, seq uint64) error {
	return pgx.BeginFunc(ctx, s.tgt, func(tx pgx.Tx) error {
		for _, p := range s.plans {
			if _, err := tx.Exec(ctx, `UPDATE xdcr.table_sync SET state = 'ready', lsn = $3::pg_lsn, updated_at = now()
				WHERE cluster = $1 AND tbl = $2`, s.cfg.Cluster, p.def.Table.String(), lsn.String()); err != nil {
				return fmt.Errorf("site %s: mark %s ready: %w", s.cfg.Site, p.def.Table, err)
			}
		}
		if s.cfg.Partial {
			_, err := tx.Exec(ctx, `UPDATE xdcr.apply_position SET generation = generation + 1 WHERE cluster = $1`, s.cfg.Cluster)
			return err
		}
		// every transaction committed before lsn is in the copy
		_, err := tx.Exec(ctx, `UPDATE xdcr.apply_position
			SET origin = $2, epoch = $3, lsn = $4::pg_lsn, commit_time = NULL, stream = $5, stream_seq = $6,
			    generation = generation + 1, applied_at = now()
			WHERE cluster = $1`, s.cfg.Cluster, s.cfg.Origin, s.cfg.Epoch, (lsn - 1).String(), s.cfg.Stream, seq)
		if err != nil {
			return fmt.Errorf("site %s: set the position where the copy ends: %w", s.cfg.Site, err)
		}
		return nil
	})
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
