package replicator

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"strconv"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/xdcr/xdcr/replicator/change"
)

// Sending a target transaction. The statements queued for it are first
// arranged (supersede, gather), then sent in as few round trips as the
// protocol allows: runs of statements as one pipelined batch, and runs of
// inserts into one table as one COPY.

// copyMin is the shortest run of inserts into one table that goes as a
// COPY rather than as single inserts. A COPY costs a round trip of its
// own and makes the group an explicit transaction (BEGIN, batch, COPY,
// COMMIT: three round trips more than one batch). That pays for itself
// on the backend only for longer runs. Under load every extra round trip
// is also a wake-up of the agent and the backend: at 1,500 txn/s, small
// groups of ~8 pgbench transactions that went by COPY (copyMin 8) took
// 1.9–3.2 ms from dc-b's mirror to applied at the median, against
// 0.94–0.96 ms as one batch (docs/performance.md).
const copyMin = 64

// exec sends the queued statements and checks each result, after the
// group in flight, if any. Within a large transaction (w.chunk), a COPY
// that ends the statements stays open for the next chunk's rows.
func (w *applier) exec(ctx context.Context) error {
	if len(w.queued) == 0 {
		return nil
	}
	if err := w.settle(); err != nil {
		return err
	}
	defer func() {
		// let the deliveries go; what lies beyond len is already clear
		// (commitPrefix clears what it cuts off). Clearing up to cap
		// instead cost the agent a quarter of its CPU in steady state,
		// once a catch-up had grown the slice to thousands of statements
		clear(w.queued)
		w.queued, w.mark = w.queued[:0], 0
	}()
	return w.send(ctx, plan(w.queued, w.chunk != nil), w.chunk != nil)
}

// plan arranges queued statements (supersede, gather), cuts them into
// the parts sent in turn and encodes the batches among them, so that
// sending them is only writing. A group of whole transactions that takes
// more than one part is wrapped in BEGIN and COMMIT (as one batch it is
// one implicit transaction; with COPY in it, it needs an explicit one),
// which join the batch next to them, if any, rather than cost a round
// trip of their own. The statements of a large transaction (inChunk)
// bring their own.
func plan(queued []stmt, inChunk bool) []part {
	queued = gather(supersede(queued))
	parts := split(queued)
	if !inChunk && (len(parts) > 1 || parts[0].copy) {
		seq, txn := queued[0].seq, queued[len(queued)-1].txn
		begin := stmt{sql: "BEGIN", rows: -1, seq: seq, txn: txn}
		commit := stmt{sql: "COMMIT", rows: -1, seq: seq, txn: txn}
		if first := &parts[0]; !first.copy {
			first.stmts = append(append(make([]stmt, 0, len(first.stmts)+1), begin), first.stmts...)
		} else {
			parts = append([]part{{stmts: []stmt{begin}}}, parts...)
		}
		if last := &parts[len(parts)-1]; !last.copy {
			last.stmts = append(last.stmts[:len(last.stmts):len(last.stmts)], commit)
		} else {
			parts = append(parts, part{stmts: []stmt{commit}})
		}
	}
	for i := range parts {
		if !parts[i].copy {
			parts[i].batch = encodeBatch(parts[i].stmts)
		}
	}
	return parts
}

// send sends parts in turn and checks each result. With keepLast, a COPY
// that ends them stays open.
func (w *applier) send(ctx context.Context, parts []part, keepLast bool) error {
	for i, p := range parts {
		var err error
		if p.copy {
			err = w.copyRows(ctx, p.stmts, keepLast && i == len(parts)-1)
		} else {
			err = w.execBatch(ctx, p.batch, p.stmts)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// part is a run of statements sent together: one pipelined batch, or one
// COPY of inserts into a table.
type part struct {
	stmts []stmt
	copy  bool
	batch *pgconn.Batch // stmts, encoded, unless copy
}

// split cuts queued into runs of at least copyMin inserts into one table
// that can go as a COPY, and the statements between them.
func split(queued []stmt) []part {
	var parts []part
	start := 0
	for i := 0; i < len(queued); {
		t := queued[i].copy
		j := i + 1
		if t != nil {
			for j < len(queued) && queued[j].copy == t {
				j++
			}
		}
		if t == nil || j-i < copyMin {
			i = j
			continue
		}
		if start < i {
			parts = append(parts, part{stmts: queued[start:i]})
		}
		parts = append(parts, part{stmts: queued[i:j], copy: true})
		start, i = j, j
	}
	if start < len(queued) {
		parts = append(parts, part{stmts: queued[start:]})
	}
	return parts
}

// encodeBatch encodes stmts as one batch.
func encodeBatch(stmts []stmt) *pgconn.Batch {
	batch := &pgconn.Batch{}
	for i := range stmts {
		s := &stmts[i]
		if s.sd != nil {
			batch.ExecStatement(s.sd, s.params, s.formats, nil)
		} else {
			batch.ExecParams(s.sql, s.params, nil, nil, nil)
		}
	}
	return batch
}

// execBatch sends batch, the encoded stmts, in one round trip and checks
// each result.
func (w *applier) execBatch(ctx context.Context, batch *pgconn.Batch, stmts []stmt) error {
	conn, err := w.idle()
	if err != nil {
		return err
	}
	mrr := conn.ExecBatch(ctx, batch)
	i := 0
	var first error
	for mrr.NextResult() {
		tag, err := mrr.ResultReader().Close()
		if first == nil && i < len(stmts) {
			s := &stmts[i]
			if err != nil {
				first = w.stmtError(s, err)
			} else if s.rows >= 0 && tag.RowsAffected() != s.rows {
				first = w.rowsError(s, tag.RowsAffected())
			}
		}
		i++
	}
	if err := mrr.Close(); err != nil && first == nil {
		if i < len(stmts) {
			first = w.stmtError(&stmts[i], err)
		} else {
			first = fmt.Errorf("commit on replica site %s: %w", w.cfg.Site, err)
		}
	}
	return first
}

// appendCopyRow writes a row in COPY's text format. Values are in their
// types' text form already, as pgoutput sends them; only COPY's own
// delimiters are escaped.
func appendCopyRow(buf *bytes.Buffer, vals []change.Value) {
	n := len(vals)
	for _, v := range vals {
		n += len(v.Data) + 2
	}
	buf.Grow(n)
	for i, v := range vals {
		if i > 0 {
			buf.WriteByte('\t')
		}
		if v.Kind == change.Null {
			buf.WriteString(`\N`)
			continue
		}
		data := v.Data
		for len(data) > 0 {
			j := 0
			for j < len(data) && data[j] >= 0x20 && data[j] != '\\' {
				j++
			}
			buf.Write(data[:j])
			if j == len(data) {
				break
			}
			switch c := data[j]; c {
			case '\\':
				buf.WriteString(`\\`)
			case '\n':
				buf.WriteString(`\n`)
			case '\r':
				buf.WriteString(`\r`)
			case '\t':
				buf.WriteString(`\t`)
			default:
				buf.WriteByte(c)
			}
			data = data[j+1:]
		}
	}
	buf.WriteByte('\n')
}

// copyable reports whether an inserted row can go through COPY's text
// format: every value is text or NULL.
func copyable(vals []change.Value) bool {
	for _, v := range vals {
		if v.Kind != change.Text && v.Kind != change.Null {
			return false
		}
	}
	return true
}

// gather moves the inserts of rows that nothing else in the target
// transaction touches next to the last insert into the same table, so
// that they go as one COPY. Like supersede, it only moves rows of tables
// where nothing observes the order of rows (target.supersede), and never
// across a TRUNCATE.
func gather(queued []stmt) []stmt {
	if oneCopyRun(queued) {
		return queued
	}
	touched := make(map[string]int)
	movable := 0
	for i := range queued {
		if r := queued[i].row; r != "" {
			touched[r]++
			if queued[i].copy != nil {
				movable++
			}
		}
	}
	if movable < copyMin {
		return queued
	}
	out := make([]stmt, 0, len(queued))
	start := 0
	for i := 0; i <= len(queued); i++ {
		if i < len(queued) && !truncates(&queued[i]) {
			continue
		}
		out = gatherSpan(out, queued[start:i], touched)
		if i < len(queued) {
			out = append(out, queued[i])
		}
		start = i + 1
	}
	return out
}

// oneCopyRun reports whether the inserts of each table that could go by
// COPY are one unbroken run already (a bulk load, a chunk of a large
// transaction): gather would only reorder rows within the runs.
func oneCopyRun(queued []stmt) bool {
	var cur *target
	var seen []*target
	for i := range queued {
		t := queued[i].copy
		if t == cur {
			continue
		}
		if t != nil && slices.Contains(seen, t) {
			return false
		}
		if t != nil {
			seen = append(seen, t)
		}
		cur = t
	}
	return true
}

func gatherSpan(out, span []stmt, touched map[string]int) []stmt {
	moves := func(s *stmt) bool { return s.copy != nil && s.row != "" && touched[s.row] == 1 }
	last := make(map[*target]int)
	for i := range span {
		if moves(&span[i]) {
			last[span[i].copy] = i
		}
	}
	held := make(map[*target][]stmt)
	for i := range span {
		s := &span[i]
		if !moves(s) {
			out = append(out, *s)
			continue
		}
		if last[s.copy] != i {
			held[s.copy] = append(held[s.copy], *s)
			continue
		}
		out = append(append(out, held[s.copy]...), *s)
	}
	return out
}

func truncates(s *stmt) bool { return s.c != nil && s.c.Op == change.Truncate }

// supersede drops the whole-row updates that a later whole-row update of
// the same row in the same target transaction overwrites, when nothing
// else touched that row in between; it keeps the order of the rest. The
// dropped values were never visible outside the target transaction, and
// only tables where nothing could observe them (target.supersede) take
// part: it spares the replica a row version per dropped update, which on
// hot rows (a counter updated by every source transaction) is most of the
// work of a group.
func supersede(queued []stmt) []stmt {
	if !slices.ContainsFunc(queued, func(s stmt) bool { return s.whole }) {
		return queued
	}
	later := make(map[string]struct{})
	dropped := 0
	for i := len(queued) - 1; i >= 0; i-- {
		s := &queued[i]
		switch {
		case s.row == "":
			if truncates(s) {
				clear(later)
			}
		case !s.whole:
			delete(later, s.row)
		default:
			if _, ok := later[s.row]; ok {
				s.rows, dropped = dropRow, dropped+1
				continue
			}
			later[s.row] = struct{}{}
		}
	}
	if dropped == 0 {
		return queued
	}
	kept := queued[:0]
	for _, s := range queued {
		if s.rows != dropRow {
			kept = append(kept, s)
		}
	}
	return kept
}

// dropRow marks a statement supersede dropped.
const dropRow = -2

// rowName names the row whose identity columns hold vals, for supersede.
func rowName(t *target, vals []change.Value) string {
	n := len(t.table.Schema) + 1 + len(t.table.Name)
	for _, k := range t.keys {
		n += 8 + len(vals[k].Data)
	}
	b := make([]byte, 0, n)
	b = append(b, t.table.Schema...)
	b = append(b, 0)
	b = append(b, t.table.Name...)
	for _, k := range t.keys {
		b = append(b, 0, byte(vals[k].Kind))
		b = strconv.AppendInt(b, int64(len(vals[k].Data)), 10)
		b = append(b, ':')
		b = append(b, vals[k].Data...)
	}
	return string(b)
}
