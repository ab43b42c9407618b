package replicator

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"
)

// Pipeline states, as reported through [StatusFunc] and shown by `xdcr lag`.
const (
	StateStarting     = "starting"
	StateStreaming    = "streaming"
	StateReconnecting = "reconnecting"
	StatePaused       = "paused"
	StateSyncing      = "syncing"
)

// ErrSlotLost means the replication slot vanished or was invalidated after
// changes were published from it: the changes since its last confirmed
// position cannot be recovered, and the replicas must be re-seeded.
var ErrSlotLost = errors.New("replication slot lost")

// PermanentError is a problem that retrying cannot fix: the operator has to
// act. Fix says how.
type PermanentError struct {
	Err error
	Fix string
}

func (e *PermanentError) Error() string {
	if e.Fix == "" {
		return e.Err.Error()
	}
	return e.Err.Error() + "; fix: " + e.Fix
}

func (e *PermanentError) Unwrap() error { return e.Err }

func permanent(err error, fix string) error { return &PermanentError{Err: err, Fix: fix} }

// SchemaError says a replica's table does not match the source's: the table
// or a column is missing, or a column has another type. Apply pauses on it
// until the schema is fixed.
type SchemaError struct {
	Table   string // schema.table
	Column  string // empty when the whole table is missing
	Problem string
	Fix     string
}

func (e *SchemaError) Error() string {
	s := "table " + e.Table
	if e.Column != "" {
		s += " column " + e.Column
	}
	return s + ": " + e.Problem + "; fix: " + e.Fix
}

// GapError says the stream skipped a transaction: the batch at Seq names a
// predecessor that the replica never applied.
type GapError struct {
	Stream  string
	Seq     uint64
	Applied string // the replica's position
	Prev    string // the predecessor the batch names
}

func (e *GapError) Error() string {
	return fmt.Sprintf("stream %s seq %d: transaction follows %s but the replica has applied up to %s: "+
		"a transaction is missing from the stream; fix: find out how the stream lost messages (`nats stream info %s`), "+
		"then re-seed this site with `xdcr sync`", e.Stream, e.Seq, e.Prev, e.Applied, e.Stream)
}

// SyncingError says apply waits while `xdcr sync` copies tables of the
// site. It is not a failure: apply resumes once the copy is done.
type SyncingError struct {
	Site   string
	Tables []TableSync // the tables being copied, with their progress
}

func (e *SyncingError) Error() string {
	var parts []string
	var done, total int64
	for _, t := range e.Tables {
		parts = append(parts, t.Table)
		done += t.RowsDone
		total += t.RowsTotal
	}
	s := fmt.Sprintf("waiting for xdcr sync to copy %s into site %s", strings.Join(parts, ", "), e.Site)
	if total > 0 {
		s += fmt.Sprintf(" (%d of about %d rows, %d%%)", done, total, min(100, 100*done/total))
	}
	return s
}

type backoff struct {
	min, max, cur time.Duration
}

func newBackoff(min, max time.Duration) *backoff { return &backoff{min: min, max: max} }

func (b *backoff) next() time.Duration {
	switch {
	case b.cur == 0:
		b.cur = b.min
	case b.cur < b.max:
		b.cur = min(2*b.cur, b.max)
	}
	// ±20% jitter so that agents restarted together do not retry in step
	return time.Duration(float64(b.cur) * (0.8 + 0.4*rand.Float64()))
}

func (b *backoff) reset() { b.cur = 0 }

// isPermanent reports whether err needs an operator rather than a retry.
func isPermanent(err error) bool {
	var (
		perm   *PermanentError
		schema *SchemaError
		gap    *GapError
	)
	return errors.As(err, &perm) || errors.As(err, &schema) || errors.As(err, &gap)
}
