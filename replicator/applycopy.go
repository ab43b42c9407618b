package replicator

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/jackc/pgx/v5/pgconn"
)

// A COPY of inserts into one table. The rows go to the replica from a
// goroutine while the applier goes on: a COPY at the end of a chunk of a
// large transaction stays open, and the next chunk's inserts into the same
// table join it, so the replica parses one chunk's rows while the agent
// reads and encodes the next. Rows are handed over in buffers, two at
// most, so an open COPY holds at most two buffers of rows.

// openCopy is a COPY in progress on the apply connection.
type openCopy struct {
	t     *target
	first stmt  // its first insert and, below, how many and until where
	rows  int64 // rows handed over
	last  stmt

	full  chan []byte // buffers of rows, in order; closed at the end
	free  chan []byte // buffers the COPY has sent
	abort error       // why the applier gave up, set before full closes

	ended chan struct{} // closed once CopyFrom returned tag and err
	tag   pgconn.CommandTag
	err   error
}

// copyBuffers is how many buffers of rows an open COPY holds.
const copyBuffers = 2

func (w *applier) startCopy(ctx context.Context, first stmt) *openCopy {
	c := &openCopy{
		t:     first.copy,
		first: first,
		full:  make(chan []byte, copyBuffers),
		free:  make(chan []byte, copyBuffers),
		ended: make(chan struct{}),
	}
	for range copyBuffers {
		var buf []byte
		if n := len(w.spare); n > 0 {
			buf, w.spare = w.spare[n-1], w.spare[:n-1]
		}
		c.free <- buf
	}
	conn := w.conn.PgConn()
	go func() {
		defer close(c.ended)
		c.tag, c.err = conn.CopyFrom(ctx, &copyFeed{c: c}, c.t.copySQL())
	}()
	return c
}

// copyRows sends a run of inserts into one table by COPY: into the open
// COPY when it is the same table's, else into a new one. With keep, the
// COPY stays open for rows that may follow.
func (w *applier) copyRows(ctx context.Context, run []stmt, keep bool) error {
	if w.copying != nil && w.copying.t != run[0].copy {
		if err := w.endCopy(); err != nil {
			return err
		}
	}
	if w.copying == nil {
		w.copying = w.startCopy(ctx, run[0])
	}
	c := w.copying
	var buf []byte
	select {
	case buf = <-c.free:
	case <-c.ended:
		// the replica refused the rows sent so far
		if err := w.endCopy(); err != nil {
			return err
		}
		return fmt.Errorf("COPY into %s on replica site %s ended before all its rows were sent", c.t.table, w.cfg.Site)
	}
	b := bytes.NewBuffer(buf[:0])
	for i := range run {
		appendCopyRow(b, run[i].c.New)
	}
	c.full <- b.Bytes()
	c.rows += int64(len(run))
	c.last = run[len(run)-1]
	if keep {
		return nil
	}
	return w.endCopy()
}

// endCopy ends the open COPY, if any, and checks that the replica took
// every row.
func (w *applier) endCopy() error {
	c := w.closeCopy(nil)
	if c == nil {
		return nil
	}
	if c.err != nil {
		return fmt.Errorf("%d inserts into %s as one COPY (stream seq %d to %d, source transactions %s to %s): %w",
			c.rows, c.t.table, c.first.seq, c.last.seq, c.first.txn, c.last.txn, w.stmtError(&c.first, c.err))
	}
	if c.tag.RowsAffected() != c.rows {
		return fmt.Errorf("COPY of %d inserts into %s on replica site %s wrote %d rows", c.rows, c.t.table, w.cfg.Site, c.tag.RowsAffected())
	}
	return nil
}

// abortCopy gives up the open COPY, if any: the replica discards its rows
// and fails the transaction, which the caller rolls back or abandons.
func (w *applier) abortCopy(why error) { w.closeCopy(why) }

// closeCopy ends the open COPY, failing it with why unless why is nil,
// waits for CopyFrom to return and keeps its buffers for the next COPY.
// It returns the ended COPY, nil if none was open.
func (w *applier) closeCopy(why error) *openCopy {
	c := w.copying
	if c == nil {
		return nil
	}
	w.copying = nil
	c.abort = why
	close(c.full)
	<-c.ended
	for len(c.free) > 0 {
		if buf := <-c.free; buf != nil {
			w.spare = append(w.spare, buf)
		}
	}
	return c
}

// idle returns the apply connection for a statement, ending the open COPY
// first: the connection carries one command at a time.
func (w *applier) idle() (*pgconn.PgConn, error) {
	if err := w.endCopy(); err != nil {
		return nil, err
	}
	return w.conn.PgConn(), nil
}

// copyFeed is what CopyFrom reads the rows from.
type copyFeed struct {
	c     *openCopy
	cur   []byte // unread part of whole
	whole []byte
}

func (f *copyFeed) Read(p []byte) (int, error) {
	for len(f.cur) == 0 {
		if f.whole != nil {
			f.c.free <- f.whole // never blocks: there are copyBuffers buffers
			f.whole = nil
		}
		b, ok := <-f.c.full
		if !ok {
			if f.c.abort != nil {
				return 0, f.c.abort // COPY fails
			}
			return 0, io.EOF // COPY done
		}
		f.cur, f.whole = b, b
	}
	n := copy(p, f.cur)
	f.cur = f.cur[n:]
	return n, nil
}

// errCopyAbandoned is why a COPY open at the end of a session fails.
var errCopyAbandoned = errors.New("apply session ended")

// errRepublished is why the COPY of a large transaction that the
// publisher starts over fails.
var errRepublished = errors.New("the transaction was republished from its first chunk")
