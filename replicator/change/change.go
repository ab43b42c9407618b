// Package change holds the plain records that flow through xdcr's data path:
// log sequence numbers, relations, row changes, committed transactions and the
// batches they are published in. It imports nothing of xdcr's own, so capture,
// transport, apply and checkpoints can all share it.
package change

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// LSN is a PostgreSQL write-ahead log position.
type LSN uint64

// String formats the LSN the way PostgreSQL does ("16/B374D848").
func (l LSN) String() string {
	return fmt.Sprintf("%X/%X", uint32(l>>32), uint32(l))
}

// ParseLSN parses PostgreSQL's textual LSN form ("16/B374D848").
func ParseLSN(s string) (LSN, error) {
	hi, lo, ok := strings.Cut(s, "/")
	if !ok {
		return 0, fmt.Errorf("parse lsn %q: want the form X/Y", s)
	}
	h, err := strconv.ParseUint(hi, 16, 32)
	if err != nil {
		return 0, fmt.Errorf("parse lsn %q: %w", s, err)
	}
	l, err := strconv.ParseUint(lo, 16, 32)
	if err != nil {
		return 0, fmt.Errorf("parse lsn %q: %w", s, err)
	}
	return LSN(h<<32 | l), nil
}

// Op is the kind of a row change.
type Op uint8

// The row change kinds; the values are pgoutput's message bytes.
const (
	Insert   Op = 'I'
	Update   Op = 'U'
	Delete   Op = 'D'
	Truncate Op = 'T'
)

func (o Op) String() string {
	switch o {
	case Insert:
		return "insert"
	case Update:
		return "update"
	case Delete:
		return "delete"
	case Truncate:
		return "truncate"
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// Kind says what a [Value] holds; the values are pgoutput's tuple bytes.
type Kind uint8

// Value kinds.
const (
	// Null is SQL NULL.
	Null Kind = 'n'
	// Unchanged is a TOASTed value that the source did not send because the
	// update left it alone. Apply must leave the column untouched.
	Unchanged Kind = 'u'
	// Text is the value in the type's text output format.
	Text Kind = 't'
	// Binary is the value in the type's binary send format.
	Binary Kind = 'b'
)

// Value is one column value of a row image.
type Value struct {
	Kind Kind
	Data []byte // nil unless Kind is Text or Binary
}

// Replica identity settings of a relation (pg_class.relreplident).
const (
	IdentityDefault = 'd' // primary key
	IdentityNothing = 'n'
	IdentityFull    = 'f' // every column
	IdentityIndex   = 'i' // a chosen unique index
)

// Column describes one column of a relation as the source saw it.
type Column struct {
	Name string
	// Type is the SQL type as format_type() prints it ("integer",
	// "character varying(20)", "public.mood"), for schema checks and messages.
	Type string
	// TypeOID is the source's type OID; it only means something to builtin
	// types, since user types get different OIDs in every database.
	TypeOID uint32
	// Key marks the columns of the replica identity (all columns when the
	// identity is FULL).
	Key bool
}

// Relation is a table's shape at the time a change was decoded.
type Relation struct {
	Schema   string
	Name     string
	Identity byte // one of the Identity constants
	Columns  []Column
}

// String returns schema.name, unquoted, for messages.
func (r *Relation) String() string { return r.Schema + "." + r.Name }

// Change is one row change, or one TRUNCATE.
type Change struct {
	Op  Op
	Rel *Relation // the changed relation; nil for Truncate
	// Old is the replica identity (or, with REPLICA IDENTITY FULL, the whole
	// old row) of a deleted row, or of an updated row whose key changed. It
	// is nil when an update left the key alone: the key is then in New.
	Old []Value
	// New is the inserted row, or the row after an update.
	New []Value

	// Truncated lists the relations of a Truncate, with its options.
	Truncated       []*Relation
	Cascade         bool
	RestartIdentity bool
}

// Txn is one committed source transaction, or part of one (see [Chunk]).
type Txn struct {
	Xid uint32
	// LSN is the commit LSN: the position that orders transactions and that
	// the replica records as applied.
	LSN LSN
	// PrevLSN is the commit LSN of the transaction published just before this
	// one by the same origin in the same epoch, or 0 when the publisher does
	// not know it. Apply uses it to detect a gap.
	PrevLSN    LSN
	CommitTime time.Time
	Changes    []Change
}

// Chunk places a [Batch] inside a large transaction that was split across
// several messages: chunks carry Index 0, 1, 2, … and the last one has Final
// set. Only the final chunk commits the transaction.
type Chunk struct {
	Index uint32
	Final bool
}

// Heartbeat reports the source's position while no transaction is published,
// so replicas can tell "idle" from "stalled".
type Heartbeat struct {
	// WALEnd is the source's WAL position when the heartbeat was taken.
	WALEnd LSN
	// LastLSN is the commit LSN of the last transaction published before it.
	LastLSN LSN
	Time    time.Time
}

// Batch is the unit of publication, one message on the wire. It holds either
// a run of consecutive whole transactions (Chunk nil), exactly one part of a
// large transaction (Chunk non-nil, len(Txns) == 1), or only a heartbeat.
// Every transaction in a batch comes from the same origin and epoch.
type Batch struct {
	Origin    string
	Epoch     uint64
	Txns      []Txn
	Chunk     *Chunk
	Heartbeat *Heartbeat
}

// FirstLSN is the commit LSN of the first transaction in the batch, or 0.
func (b *Batch) FirstLSN() LSN {
	if len(b.Txns) == 0 {
		return 0
	}
	return b.Txns[0].LSN
}

// LastLSN is the commit LSN of the last transaction in the batch, or 0.
func (b *Batch) LastLSN() LSN {
	if len(b.Txns) == 0 {
		return 0
	}
	return b.Txns[len(b.Txns)-1].LSN
}

// Commits reports whether applying the batch ends with committed
// transactions: true for a run of transactions or a final chunk.
func (b *Batch) Commits() bool {
	return len(b.Txns) > 0 && (b.Chunk == nil || b.Chunk.Final)
}

// Position is a point in the replicated history: a commit LSN of a given
// origin site within a given epoch. Positions of different epochs compare by
// epoch first.
type Position struct {
	Origin string
	Epoch  uint64
	LSN    LSN
}

// Less orders positions by epoch, then LSN.
func (p Position) Less(q Position) bool {
	if p.Epoch != q.Epoch {
		return p.Epoch < q.Epoch
	}
	return p.LSN < q.LSN
}

func (p Position) String() string {
	return fmt.Sprintf("%s@%d:%s", p.Origin, p.Epoch, p.LSN)
}

// Delivery is one message as a consumer received it from a stream.
type Delivery struct {
	Seq   uint64 // the stream sequence
	Batch *Batch // nil when Err is set
	Size  int    // bytes of the message, decompressed
	// Err is set when the message could not be decoded; it names the cause.
	Err error
}

// Invalidation says which cache keys one change (or a truncate) of a
// table makes stale. Keys built from the old and the new row are both
// listed; Flush asks for every key of the table (a truncate, or too many
// keys to list).
type Invalidation struct {
	Table string   `json:"table"` // schema.table
	Op    string   `json:"op"`    // insert, update, delete, truncate
	Keys  []string `json:"keys,omitempty"`
	Flush bool     `json:"flush,omitempty"`
}
