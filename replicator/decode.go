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
	slab      []byte // see keep
}

func newDecoder(types typeNamer) *decoder {
	return &decoder{types: types, relations: make(map[uint32]*change.Relation)}
}

// decode decodes one pgoutput message (the WALData of an XLogData message).
func (d *decoder) decode(ctx context.Context, data []byte) (ev event, err error) {
	if len(data) == 0 {
		return ev, fmt.Errorf("%w: empty message", ErrProtocol)
	}
	switch data[0] {
	case 'I', 'U', 'D':
		return d.rowChange(data)
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

// parsePgoutput wraps pglogrepl.Parse, which indexes its input without bounds
// checks: a truncated message from a misbehaving server must become an error,
// not a crash of the agent.
func parsePgoutput(data []byte) (msg pglogrepl.Message, err error) {
	if err := checkLengths(data); err != nil {
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

// checkLengths verifies that a truncate message holds the relations it
// claims before pglogrepl allocates for them (it trusts the count). Inserts,
// updates and deletes never reach pglogrepl (rowChange).
func checkLengths(data []byte) error {
	if data[0] != 'T' {
		return nil
	}
	if len(data) < 6 {
		return fmt.Errorf("%w: truncated truncate message", ErrProtocol)
	}
	n := uint64(uint32(data[1])<<24 | uint32(data[2])<<16 | uint32(data[3])<<8 | uint32(data[4]))
	if 6+4*n > uint64(len(data)) {
		return fmt.Errorf("%w: truncate message claims %d relations in %d bytes", ErrProtocol, n, len(data))
	}
	return nil
}
