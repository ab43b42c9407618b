package replicator

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/xdcr/xdcr/replicator/change"
)

// pgout builds pgoutput protocol messages (protocol version 1) for tests.
type pgout []byte

func msg(tag byte) pgout { return pgout{tag} }

func (m pgout) u8(v byte) pgout    { return append(m, v) }
func (m pgout) u16(v uint16) pgout { return binary.BigEndian.AppendUint16(m, v) }
func (m pgout) u32(v uint32) pgout { return binary.BigEndian.AppendUint32(m, v) }
func (m pgout) u64(v uint64) pgout { return binary.BigEndian.AppendUint64(m, v) }
func (m pgout) raw(b []byte) pgout { return append(m, b...) }
func (m pgout) str(s string) pgout { return append(append(m, s...), 0) }

// pgTime is PostgreSQL's microseconds since 2000-01-01.
func (m pgout) ts(t time.Time) pgout {
	return m.u64(uint64(t.Sub(time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)).Microseconds()))
}

// tuple encodes values; a nil entry is NULL, "\x00u" is unchanged TOAST.
func (m pgout) tuple(vals ...any) pgout {
	m = m.u16(uint16(len(vals)))
	for _, v := range vals {
		switch v := v.(type) {
		case nil:
			m = m.u8('n')
		case toast:
			m = m.u8('u')
		case string:
			m = m.u8('t').u32(uint32(len(v)))
			m = append(m, v...)
		}
	}
	return m
}

type toast struct{}

func relationMsg(id uint32, schema, name string, ident byte, cols ...string) pgout {
	m := msg('R').u32(id).str(schema).str(name).u8(ident).u16(uint16(len(cols)))
	for i, c := range cols {
		flags := byte(0)
		if i == 0 {
			flags = 1 // first column is the key
		}
		m = m.u8(flags).str(c).u32(23).u32(0xFFFFFFFF)
	}
	return m
}

type fakeTypes struct{ calls int }

func (f *fakeTypes) TypeNames(_ context.Context, oids []uint32, _ []int32) ([]string, error) {
	f.calls++
	out := make([]string, len(oids))
	for i := range out {
		out[i] = "integer"
	}
	return out, nil
}

func TestDecodeTransaction(t *testing.T) {
	ctx := context.Background()
	commitTime := time.Date(2026, 11, 27, 10, 0, 0, 123456000, time.UTC)
	d := newDecoder(&fakeTypes{})
	in := []pgout{
		relationMsg(16384, "public", "accounts", 'd', "id", "v"),
		msg('B').u64(0x3000060).ts(commitTime).u32(742),
		msg('I').u32(16384).u8('N').tuple("1", "10"),
		msg('U').u32(16384).u8('N').tuple("1", toast{}),
		msg('U').u32(16384).u8('K').tuple("1", nil).u8('N').tuple("2", "20"),
		msg('D').u32(16384).u8('K').tuple("2", nil),
		msg('T').u32(1).u8(3).u32(16384),
		msg('C').u8(0).u64(0x3000060).u64(0x3000090).ts(commitTime),
	}
	var evs []event
	for _, m := range in {
		ev, err := d.decode(ctx, m)
		if err != nil {
			t.Fatalf("decode %q: %v", m[0], err)
		}
		if ev.kind != evNone {
			evs = append(evs, ev)
		}
	}
	rel := d.relations[16384]
	wantRel := &change.Relation{Schema: "public", Name: "accounts", Identity: 'd', Columns: []change.Column{
		{Name: "id", Type: "integer", TypeOID: 23, Key: true},
		{Name: "v", Type: "integer", TypeOID: 23},
	}}
	if !reflect.DeepEqual(rel, wantRel) {
		t.Fatalf("relation: got %+v, want %+v", rel, wantRel)
	}
	txt := func(s string) change.Value { return change.Value{Kind: change.Text, Data: []byte(s)} }
	null := change.Value{Kind: change.Null}
	want := []event{
		{kind: evBegin, begin: change.Txn{Xid: 742, LSN: 0x3000060, CommitTime: commitTime}},
		{kind: evChange, change: change.Change{Op: change.Insert, Rel: rel, New: []change.Value{txt("1"), txt("10")}}},
		{kind: evChange, change: change.Change{Op: change.Update, Rel: rel, New: []change.Value{txt("1"), {Kind: change.Unchanged}}}},
		{kind: evChange, change: change.Change{Op: change.Update, Rel: rel, Old: []change.Value{txt("1"), null}, New: []change.Value{txt("2"), txt("20")}}},
		{kind: evChange, change: change.Change{Op: change.Delete, Rel: rel, Old: []change.Value{txt("2"), null}}},
		{kind: evChange, change: change.Change{Op: change.Truncate, Truncated: []*change.Relation{rel}, Cascade: true, RestartIdentity: true}},
		{kind: evCommit, commit: commitInfo{lsn: 0x3000060, endLSN: 0x3000090}},
	}
	if len(evs) != len(want) {
		t.Fatalf("got %d events, want %d", len(evs), len(want))
	}
	for i := range want {
		if !reflect.DeepEqual(evs[i], want[i]) {
			t.Errorf("event %d:\n got %+v\nwant %+v", i, evs[i], want[i])
		}
	}
}

func TestDecodeProtocolViolations(t *testing.T) {
	ctx := context.Background()
	rel := relationMsg(1, "public", "t", 'd', "id")
	begin := msg('B').u64(0x100).ts(time.Now()).u32(1)
	tests := []struct {
		name string
		in   []pgout
	}{
		{"change outside a transaction", []pgout{rel, msg('I').u32(1).u8('N').tuple("1")}},
		{"unknown relation", []pgout{begin, msg('I').u32(9).u8('N').tuple("1")}},
		{"column count differs from relation", []pgout{rel, begin, msg('I').u32(1).u8('N').tuple("1", "2")}},
		{"unchanged TOAST in an insert", []pgout{rel, begin, msg('I').u32(1).u8('N').tuple(toast{})}},
		{"nested begin", []pgout{begin, begin}},
		{"commit without begin", []pgout{msg('C').u8(0).u64(0x100).u64(0x120).ts(time.Now())}},
		{"commit of another transaction", []pgout{begin, msg('C').u8(0).u64(0x200).u64(0x220).ts(time.Now())}},
		{"truncated insert", []pgout{rel, begin, msg('I').u32(1).u8('N').u16(1).u8('t').u32(100)}},
		{"unknown message", []pgout{msg('Z')}},
		{"empty message", []pgout{{}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := newDecoder(&fakeTypes{})
			var err error
			for _, m := range tt.in {
				if _, err = d.decode(ctx, m); err != nil {
					break
				}
			}
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("got %v, want an ErrProtocol error", err)
			}
		})
	}
}

// FuzzDecode feeds arbitrary pgoutput messages after a valid relation and
// begin: the decoder must never panic, only fail with ErrProtocol.
func FuzzDecode(f *testing.F) {
	f.Add([]byte(msg('I').u32(1).u8('N').tuple("1", "x")))
	f.Add([]byte(msg('U').u32(1).u8('K').tuple("1", nil).u8('N').tuple("2", toast{})))
	f.Add([]byte(msg('D').u32(1).u8('O').tuple("1", "x")))
	f.Add([]byte(msg('T').u32(1).u8(1).u32(1)))
	f.Add([]byte(relationMsg(2, "s", "n", 'f', "a", "b")))
	f.Add([]byte(msg('C').u8(0).u64(0x100).u64(0x120).ts(time.Now())))
	f.Fuzz(func(t *testing.T, data []byte) {
		d := newDecoder(&fakeTypes{})
		for _, m := range []pgout{relationMsg(1, "public", "t", 'd', "id", "v"), msg('B').u64(0x100).ts(time.Now()).u32(1)} {
			if _, err := d.decode(context.Background(), m); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := d.decode(context.Background(), data); err != nil && !errors.Is(err, ErrProtocol) {
			t.Fatalf("error %v is not an ErrProtocol", err)
		}
	})
}

// TestRowChangeMatchesPglogrepl decodes inserts, updates and deletes with
// rowChange and with pglogrepl's parser: the values must be the same, byte
// for byte and kind for kind, and must not share memory with the message
// (the replication connection reuses its buffer).
func TestRowChangeMatchesPglogrepl(t *testing.T) {
	ctx := context.Background()
	bin := func(b ...byte) pgout { return pgout{'b', 0, 0, 0, byte(len(b))}.raw(b) }
	cases := []pgout{
		msg('I').u32(1).u8('N').tuple("1", "x"),
		msg('I').u32(1).u8('N').tuple("", nil),
		msg('I').u32(1).u8('N').u16(2).raw(bin(1, 2, 3)).u8('n'),
		msg('U').u32(1).u8('N').tuple("2", toast{}),
		msg('U').u32(1).u8('K').tuple("1", nil).u8('N').tuple("2", "y"),
		msg('U').u32(1).u8('O').tuple("1", "old").u8('N').tuple("1", "new"),
		msg('D').u32(1).u8('K').tuple("1", nil),
		msg('D').u32(1).u8('O').tuple("1", "gone"),
	}
	for _, m := range cases {
		d := newDecoder(&fakeTypes{})
		for _, pre := range []pgout{relationMsg(1, "public", "t", 'd', "id", "v"), msg('B').u64(0x100).ts(time.Now()).u32(1)} {
			if _, err := d.decode(ctx, pre); err != nil {
				t.Fatal(err)
			}
		}
		in := append(pgout(nil), m...)
		ev, err := d.decode(ctx, in)
		if err != nil {
			t.Fatalf("%q: %v", m, err)
		}
		parsed, err := pglogrepl.Parse(m)
		if err != nil {
			t.Fatalf("pglogrepl %q: %v", m, err)
		}
		var oldT, newT *pglogrepl.TupleData
		switch p := parsed.(type) {
		case *pglogrepl.InsertMessage:
			newT = p.Tuple
		case *pglogrepl.UpdateMessage:
			oldT, newT = p.OldTuple, p.NewTuple
		case *pglogrepl.DeleteMessage:
			oldT = p.OldTuple
		}
		for i := range in {
			in[i] = 0xEE // the caller's buffer is reused
		}
		for _, side := range []struct {
			name string
			got  []change.Value
			want *pglogrepl.TupleData
		}{{"old", ev.change.Old, oldT}, {"new", ev.change.New, newT}} {
			if side.want == nil {
				if side.got != nil {
					t.Errorf("%q: %s row %v, pglogrepl has none", m, side.name, side.got)
				}
				continue
			}
			if len(side.got) != len(side.want.Columns) {
				t.Fatalf("%q: %s row has %d values, pglogrepl %d", m, side.name, len(side.got), len(side.want.Columns))
			}
			for i, c := range side.want.Columns {
				g := side.got[i]
				if byte(g.Kind) != c.DataType || !bytes.Equal(g.Data, c.Data) ||
					(c.DataType == 't' || c.DataType == 'b') && g.Data == nil {
					t.Errorf("%q: %s value %d is %c %q, pglogrepl %c %q", m, side.name, i, g.Kind, g.Data, c.DataType, c.Data)
				}
			}
		}
	}
}

// TestDecodeKeepsRows checks the copies rowChange keeps: the connection
// reuses its read buffer for the next message, so a decoded row must not
// change when that buffer does; rows share slabs, so appending to one
// value must not write into the next row; and a row too large for a slab
// is copied on its own.
func TestDecodeKeepsRows(t *testing.T) {
	ctx := context.Background()
	d := newDecoder(&fakeTypes{})
	for _, m := range []pgout{relationMsg(16384, "public", "t", 'd', "id", "v"), msg('B').u64(0x3000060).ts(time.Now()).u32(742)} {
		if _, err := d.decode(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	big := strings.Repeat("x", slabSize)
	buf := make([]byte, 0, 2*slabSize)
	var rows [][]change.Value
	want := func(i int) (string, string) {
		if i%500 == 499 {
			return strconv.Itoa(i), big
		}
		return strconv.Itoa(i), "value " + strconv.Itoa(i)
	}
	for i := range 3000 { // several slabs
		id, v := want(i)
		buf = append(buf[:0], msg('I').u32(16384).u8('N').tuple(id, v)...)
		ev, err := d.decode(ctx, buf)
		if err != nil {
			t.Fatalf("row %d: %v", i, err)
		}
		clear(buf) // as the connection reads the next message over it
		rows = append(rows, ev.change.New)
	}
	for _, r := range rows {
		_ = append(r[1].Data, strings.Repeat("!", 64)...) // must not reach the next row
	}
	for i, r := range rows {
		id, v := want(i)
		if string(r[0].Data) != id || string(r[1].Data) != v {
			t.Fatalf("row %d reads (%.20q, %.20q), want (%.20q, %.20q)", i, r[0].Data, r[1].Data, id, v)
		}
	}
}
