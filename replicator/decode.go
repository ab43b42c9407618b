package replicator

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pglogrepl"

	"github.com/xdcr/xdcr/replicator/change"
)

// typeNamer resolves the SQL names of column types, so that relations carry
// names ("integer", "public.mood") rather than OIDs that mean nothing in
// another database.
type typeNamer interface {
	// TypeNames returns format_type(oid, typmod) for every pair, in order.
	TypeNames(ctx context.Context, oids []uint32, typmods []int32) ([]string, error)
}

// event is what the decoder hands to capture for one pgoutput message.
type event struct {
	kind   eventKind
	begin  change.Txn    // evBegin: Xid, LSN (final commit LSN) and CommitTime
	change change.Change // evChange
	commit commitInfo    // evCommit
}

type eventKind uint8

const (
	evNone   eventKind = iota // nothing for capture (relation, type, origin, message)
	evBegin                   // a transaction starts
	evChange                  // a row change or truncate inside the open transaction
	evCommit                  // the open transaction committed
)

type commitInfo struct {
	lsn    change.LSN // commit LSN, equal to the Begin's final LSN
	endLSN change.LSN // end of the commit record: what the slot may be confirmed to
}

// ErrProtocol marks pgoutput input that breaks the protocol: a change for a
// relation that was never described, a change outside a transaction, an
// unknown message. Capture treats it as a reason to reconnect, never to skip.
var ErrProtocol = errors.New("pgoutput protocol violation")

// decoder turns pgoutput messages into change records. It keeps the relation
// cache of one replication session and is not safe for concurrent use.
type decoder struct {
	types     typeNamer
	relations map[uint32]*change.Relation
	inTxn     bool
	beginLSN  change.LSN
}

func newDecoder(types typeNamer) *decoder {
	return &decoder{types: types, relations: make(map[uint32]*change.Relation)}
}

// decode decodes one pgoutput message (the WALData of an XLogData message).
func (d *decoder) decode(ctx context.Context, data []byte) (ev event, err error) {
	if len(data) == 0 {
		return ev, fmt.Errorf("%w: empty message", ErrProtocol)
	}
	msg, err := parsePgoutput(data)
	if err != nil {
		return ev, err
	}
	switch m := msg.(type) {
	case *pglogrepl.RelationMessage:
		return ev, d.relation(ctx, m)
	case *pglogrepl.TypeMessage, *pglogrepl.OriginMessage, *pglogrepl.LogicalDecodingMessage:
		return ev, nil
	case *pglogrepl.BeginMessage:
		if d.inTxn {
			return ev, fmt.Errorf("%w: begin of xid %d inside an open transaction", ErrProtocol, m.Xid)
		}
		d.inTxn, d.beginLSN = true, change.LSN(m.FinalLSN)
		ev.kind = evBegin
		ev.begin = change.Txn{Xid: m.Xid, LSN: change.LSN(m.FinalLSN), CommitTime: m.CommitTime.UTC()}
		return ev, nil
	case *pglogrepl.CommitMessage:
		if !d.inTxn {
			return ev, fmt.Errorf("%w: commit at %s outside a transaction", ErrProtocol, change.LSN(m.CommitLSN))
		}
		if change.LSN(m.CommitLSN) != d.beginLSN {
			return ev, fmt.Errorf("%w: commit at %s for a transaction that began with final LSN %s",
				ErrProtocol, change.LSN(m.CommitLSN), d.beginLSN)
		}
		d.inTxn = false
		ev.kind = evCommit
		ev.commit = commitInfo{lsn: change.LSN(m.CommitLSN), endLSN: change.LSN(m.TransactionEndLSN)}
		return ev, nil
	case *pglogrepl.InsertMessage:
		rel, err := d.rel(m.RelationID, "insert")
		if err != nil {
			return ev, err
		}
		newRow, err := tuple(rel, m.Tuple, "new row")
		if err != nil {
			return ev, err
		}
		for _, v := range newRow {
			if v.Kind == change.Unchanged {
				return ev, fmt.Errorf("%w: insert into %s carries an unchanged-TOAST value", ErrProtocol, rel)
			}
		}
		ev.kind, ev.change = evChange, change.Change{Op: change.Insert, Rel: rel, New: newRow}
		return ev, nil
	case *pglogrepl.UpdateMessage:
		rel, err := d.rel(m.RelationID, "update")
		if err != nil {
			return ev, err
		}
		c := change.Change{Op: change.Update, Rel: rel}
		if m.OldTuple != nil {
			if c.Old, err = tuple(rel, m.OldTuple, "old row"); err != nil {
				return ev, err
			}
		}
		if c.New, err = tuple(rel, m.NewTuple, "new row"); err != nil {
			return ev, err
		}
		ev.kind, ev.change = evChange, c
		return ev, nil
	case *pglogrepl.DeleteMessage:
		rel, err := d.rel(m.RelationID, "delete")
		if err != nil {
			return ev, err
		}
		old, err := tuple(rel, m.OldTuple, "old row")
		if err != nil {
			return ev, err
		}
		ev.kind, ev.change = evChange, change.Change{Op: change.Delete, Rel: rel, Old: old}
		return ev, nil
	case *pglogrepl.TruncateMessage:
		if err := d.checkInTxn("truncate"); err != nil {
			return ev, err
		}
		c := change.Change{
			Op:              change.Truncate,
			Cascade:         m.Option&pglogrepl.TruncateOptionCascade != 0,
			RestartIdentity: m.Option&pglogrepl.TruncateOptionRestartIdentity != 0,
		}
		for _, id := range m.RelationIDs {
			rel, ok := d.relations[id]
			if !ok {
				return ev, fmt.Errorf("%w: truncate of relation %d that was never described", ErrProtocol, id)
			}
			c.Truncated = append(c.Truncated, rel)
		}
		ev.kind, ev.change = evChange, c
		return ev, nil
	default:
		return ev, fmt.Errorf("%w: unexpected message %q", ErrProtocol, data[0])
	}
}

func (d *decoder) checkInTxn(what string) error {
	if !d.inTxn {
		return fmt.Errorf("%w: %s outside a transaction", ErrProtocol, what)
	}
	return nil
}

func (d *decoder) rel(id uint32, what string) (*change.Relation, error) {
	if err := d.checkInTxn(what); err != nil {
		return nil, err
	}
	rel, ok := d.relations[id]
	if !ok {
		return nil, fmt.Errorf("%w: %s for relation %d that was never described", ErrProtocol, what, id)
	}
	return rel, nil
}

// relation records a relation's shape. A new Relation message for a known
// id (after DDL) replaces the old shape; changes decoded before keep theirs.
func (d *decoder) relation(ctx context.Context, m *pglogrepl.RelationMessage) error {
	rel := &change.Relation{
		Schema:   m.Namespace,
		Name:     m.RelationName,
		Identity: m.ReplicaIdentity,
		Columns:  make([]change.Column, len(m.Columns)),
	}
	oids := make([]uint32, len(m.Columns))
	mods := make([]int32, len(m.Columns))
	for i, c := range m.Columns {
		rel.Columns[i] = change.Column{Name: c.Name, TypeOID: c.DataType, Key: c.Flags&1 != 0}
		oids[i], mods[i] = c.DataType, c.TypeModifier
	}
	if len(oids) > 0 {
		names, err := d.types.TypeNames(ctx, oids, mods)
		if err != nil {
			return fmt.Errorf("name column types of %s: %w", rel, err)
		}
		for i := range rel.Columns {
			rel.Columns[i].Type = names[i]
		}
	}
	d.relations[m.RelationID] = rel
	return nil
}

func tuple(rel *change.Relation, t *pglogrepl.TupleData, what string) ([]change.Value, error) {
	if t == nil {
		return nil, fmt.Errorf("%w: %s of %s is missing", ErrProtocol, what, rel)
	}
	if len(t.Columns) != len(rel.Columns) {
		return nil, fmt.Errorf("%w: %s of %s has %d columns, relation has %d",
			ErrProtocol, what, rel, len(t.Columns), len(rel.Columns))
	}
	vals := make([]change.Value, len(t.Columns))
	for i, c := range t.Columns {
		switch c.DataType {
		case pglogrepl.TupleDataTypeNull:
			vals[i] = change.Value{Kind: change.Null}
		case pglogrepl.TupleDataTypeToast:
			vals[i] = change.Value{Kind: change.Unchanged}
		case pglogrepl.TupleDataTypeText:
			vals[i] = change.Value{Kind: change.Text, Data: nonNil(c.Data)}
		case pglogrepl.TupleDataTypeBinary:
			vals[i] = change.Value{Kind: change.Binary, Data: nonNil(c.Data)}
		default:
			return nil, fmt.Errorf("%w: %s of %s column %s has value kind %q",
				ErrProtocol, what, rel, rel.Columns[i].Name, c.DataType)
		}
	}
	return vals, nil
}

func nonNil(b []byte) []byte {
	if b == nil {
		return []byte{}
	}
	return b
}

// parsePgoutput wraps pglogrepl.Parse, which indexes its input without bounds
// checks: a truncated message from a misbehaving server must become an error,
// not a crash of the agent.
func parsePgoutput(data []byte) (msg pglogrepl.Message, err error) {
	if err := checkTuples(data); err != nil {
		return nil, err
	}
	defer func() {
		if r := recover(); r != nil {
			msg, err = nil, fmt.Errorf("%w: undecodable %q message of %d bytes: %v", ErrProtocol, data[0], len(data), r)
		}
	}()
	msg, err = pglogrepl.Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrProtocol, err)
	}
	return msg, nil
}

// checkTuples verifies that the row images of an insert, update or delete
// fit in the message before pglogrepl allocates what their length fields
// claim (it trusts them).
func checkTuples(data []byte) error {
	var off int
	switch data[0] {
	case 'T':
		if len(data) < 6 {
			return fmt.Errorf("%w: truncated truncate message", ErrProtocol)
		}
		n := uint64(uint32(data[1])<<24 | uint32(data[2])<<16 | uint32(data[3])<<8 | uint32(data[4]))
		if 6+4*n > uint64(len(data)) {
			return fmt.Errorf("%w: truncate message claims %d relations in %d bytes", ErrProtocol, n, len(data))
		}
		return nil
	case 'I', 'U', 'D':
		off = 1 + 4 // tag, relation id
	default:
		return nil
	}
	for off < len(data) {
		switch data[off] {
		case 'N', 'K', 'O':
			off++
		default:
			return fmt.Errorf("%w: %q message has tuple marker %q", ErrProtocol, data[0], data[off])
		}
		if off+2 > len(data) {
			return fmt.Errorf("%w: truncated %q message", ErrProtocol, data[0])
		}
		n := int(data[off])<<8 | int(data[off+1])
		off += 2
		for range n {
			if off >= len(data) {
				return fmt.Errorf("%w: truncated %q message", ErrProtocol, data[0])
			}
			kind := data[off]
			off++
			if kind != 't' && kind != 'b' {
				continue
			}
			if off+4 > len(data) {
				return fmt.Errorf("%w: truncated %q message", ErrProtocol, data[0])
			}
			l := int(uint32(data[off])<<24 | uint32(data[off+1])<<16 | uint32(data[off+2])<<8 | uint32(data[off+3]))
			off += 4
			if l < 0 || l > len(data)-off {
				return fmt.Errorf("%w: %q message claims a %d-byte value with %d bytes left", ErrProtocol, data[0], l, len(data)-off)
			}
			off += l
		}
	}
	return nil
}
