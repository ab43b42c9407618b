package transport

import (
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"hash/crc32"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/xdcr/xdcr/replicator/change"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/wire")

const wireDir = "testdata/wire"

// Fixtures. Each test builds its own batches from these functions, so no
// test can change another's relations.

func accounts() *change.Relation {
	return &change.Relation{
		Schema: "public", Name: "accounts", Identity: change.IdentityDefault,
		Columns: []change.Column{
			{Name: "id", Type: "bigint", TypeOID: 20, Key: true},
			{Name: "name", Type: "text", TypeOID: 25},
			{Name: "email", Type: "character varying(200)", TypeOID: 1043},
			{Name: "balance", Type: "numeric(12,2)", TypeOID: 1700},
			{Name: "updated_at", Type: "timestamp with time zone", TypeOID: 1184},
		},
	}
}

func orders() *change.Relation {
	return &change.Relation{
		Schema: "shop", Name: "orders", Identity: change.IdentityFull,
		Columns: []change.Column{
			{Name: "id", Type: "uuid", TypeOID: 2950, Key: true},
			{Name: "account_id", Type: "bigint", TypeOID: 20, Key: true},
			{Name: "doc", Type: "jsonb", TypeOID: 3802, Key: true},
		},
	}
}

func text(s string) change.Value { return change.Value{Kind: change.Text, Data: []byte(s)} }
func binval(b ...byte) change.Value {
	return change.Value{Kind: change.Binary, Data: append([]byte{}, b...)}
}

var (
	null      = change.Value{Kind: change.Null}
	unchanged = change.Value{Kind: change.Unchanged}
)

func tuple(v ...change.Value) []change.Value { return v }

// at is a commit time in UTC with whole microseconds, which round-trips.
func at(sec int64, micro int64) time.Time { return time.Unix(sec, micro*1000).UTC() }

type codecCase struct {
	name  string
	batch func() *change.Batch
}

// codecCases are the round-trip cases; each is also a golden file
// testdata/wire/<name>.bin and a fuzz seed.
func codecCases() []codecCase {
	return []codecCase{
		{"run-insert", func() *change.Batch {
			acc := accounts()
			return &change.Batch{Origin: "dc-a", Epoch: 1, Txns: []change.Txn{{
				Xid: 750, LSN: 0x3000060, PrevLSN: 0x3000010, CommitTime: at(1795780800, 123456),
				Changes: []change.Change{{Op: change.Insert, Rel: acc,
					New: tuple(text("1"), text("Ada"), text("ada@example.com"), text("10.50"), text("2026-11-27 10:00:00+00"))}},
			}}}
		}},
		{"run-many-txns", func() *change.Batch {
			acc := accounts()
			b := &change.Batch{Origin: "dc-a", Epoch: 7}
			lsn := change.LSN(0x16_B374D848)
			for i := range 5 {
				prev := lsn
				lsn += change.LSN(0x58 + 0x30*i)
				b.Txns = append(b.Txns, change.Txn{
					Xid: uint32(1000 + i), LSN: lsn, PrevLSN: prev, CommitTime: at(1795780800+int64(i), int64(17*i)),
					Changes: []change.Change{
						{Op: change.Insert, Rel: acc, New: tuple(text("2"), text("Bob"), null, text("0"), text("now"))},
						{Op: change.Update, Rel: acc, New: tuple(text("2"), text("Bobby"), null, text("1"), text("later"))},
					},
				})
			}
			return b
		}},
		{"nulls-and-toast", func() *change.Batch {
			acc := accounts()
			return &change.Batch{Origin: "dc-a", Epoch: 1, Txns: []change.Txn{{
				Xid: 9, LSN: 0x100, CommitTime: at(1, 0), // PrevLSN unknown
				Changes: []change.Change{
					{Op: change.Insert, Rel: acc, New: tuple(text("3"), null, null, null, null)},
					{Op: change.Update, Rel: acc, New: tuple(text("3"), unchanged, null, unchanged, text("t"))},
				},
			}}}
		}},
		{"empty-and-binary-values", func() *change.Batch {
			acc := accounts()
			return &change.Batch{Origin: "dc-a", Epoch: 1, Txns: []change.Txn{{
				Xid: 10, LSN: 0x200, PrevLSN: 0x100, CommitTime: at(2, 1),
				Changes: []change.Change{{Op: change.Insert, Rel: acc, New: tuple(
					binval(0, 0, 0, 0, 0, 0, 0, 4), text(""), binval(), binval(0xff, 0x00, 0x80), text("\x00\n\r"))}},
			}}}
		}},
		{"update-old-and-delete", func() *change.Batch {
			acc := accounts()
			return &change.Batch{Origin: "dc-b", Epoch: 2, Txns: []change.Txn{{
				Xid: 11, LSN: 0x300, PrevLSN: 0x200, CommitTime: at(3, 999999),
				Changes: []change.Change{
					// The key changed: pgoutput sends the old key ('K'), the
					// other columns null.
					{Op: change.Update, Rel: acc,
						Old: tuple(text("4"), null, null, null, null),
						New: tuple(text("5"), text("Eve"), null, text("1.00"), text("x"))},
					{Op: change.Update, Rel: acc, New: tuple(text("5"), text("Eve2"), null, unchanged, text("y"))},
					{Op: change.Delete, Rel: acc, Old: tuple(text("5"), null, null, null, null)},
				},
			}}}
		}},
		{"truncate-several", func() *change.Batch {
			acc, ord := accounts(), orders()
			return &change.Batch{Origin: "dc-a", Epoch: 3, Txns: []change.Txn{
				{Xid: 20, LSN: 0x400, PrevLSN: 0x300, CommitTime: at(4, 0), Changes: []change.Change{
					{Op: change.Truncate, Truncated: []*change.Relation{acc, ord}, Cascade: true, RestartIdentity: true},
				}},
				{Xid: 21, LSN: 0x480, PrevLSN: 0x400, CommitTime: at(4, 5), Changes: []change.Change{
					{Op: change.Truncate, Truncated: []*change.Relation{ord}, RestartIdentity: true},
					{Op: change.Truncate, Truncated: []*change.Relation{acc}, Cascade: true},
					{Op: change.Truncate, Truncated: []*change.Relation{acc, ord, acc}},
					{Op: change.Insert, Rel: ord, New: tuple(text("u"), text("1"), text("{}"))},
				}},
			}}
		}},
		{"multiple-relations", func() *change.Batch {
			acc, ord := accounts(), orders()
			// The same table with a new column, as after an ALTER TABLE in
			// the middle of a transaction: a second relation of that name.
			acc2 := accounts()
			acc2.Columns = append(acc2.Columns, change.Column{Name: "tier", Type: "smallint", TypeOID: 21})
			idx := &change.Relation{Schema: "public", Name: "by_index", Identity: change.IdentityIndex,
				Columns: []change.Column{{Name: "k", Type: "integer", TypeOID: 23, Key: true}}}
			none := &change.Relation{Schema: "public", Name: "log", Identity: change.IdentityNothing,
				Columns: []change.Column{{Name: "line", Type: "text", TypeOID: 25}}}
			return &change.Batch{Origin: "dc-a", Epoch: 4, Txns: []change.Txn{
				{Xid: 30, LSN: 0x500, PrevLSN: 0x480, CommitTime: at(5, 0), Changes: []change.Change{
					{Op: change.Insert, Rel: ord, New: tuple(text("a"), text("1"), text(`{"k":1}`))},
					{Op: change.Insert, Rel: acc, New: tuple(text("1"), text("A"), null, null, null)},
					{Op: change.Delete, Rel: ord, Old: tuple(text("a"), text("1"), text(`{"k":1}`))},
					{Op: change.Insert, Rel: acc2, New: tuple(text("2"), text("B"), null, null, null, text("3"))},
				}},
				{Xid: 31, LSN: 0x580, PrevLSN: 0x500, CommitTime: at(5, 1), Changes: []change.Change{
					{Op: change.Insert, Rel: idx, New: tuple(text("7"))},
					{Op: change.Insert, Rel: none, New: tuple(text("hello"))},
					{Op: change.Update, Rel: acc, New: tuple(text("1"), text("A2"), null, null, null)},
				}},
				{Xid: 32, LSN: 0x600, PrevLSN: 0x580, CommitTime: at(5, 2)}, // no changes
			}}
		}},
		{"unicode", func() *change.Batch {
			rel := &change.Relation{Schema: "données", Name: "Ünïcödé 表", Identity: change.IdentityDefault,
				Columns: []change.Column{
					{Name: "clé", Type: "text", TypeOID: 25, Key: true},
					{Name: "名前", Type: `"schéma"."ümood"`, TypeOID: 16385},
				}}
			return &change.Batch{Origin: "site-ü", Epoch: 1, Txns: []change.Txn{{
				Xid: 40, LSN: 0x700, PrevLSN: 0x600, CommitTime: at(6, 0),
				Changes: []change.Change{{Op: change.Insert, Rel: rel, New: tuple(text("ключ"), text("😀 héllo 世界"))}},
			}}}
		}},
		{"zero-column-relation", func() *change.Batch {
			rel := &change.Relation{Schema: "public", Name: "empty", Identity: change.IdentityFull}
			return &change.Batch{Origin: "dc-a", Epoch: 1, Txns: []change.Txn{{
				Xid: 41, LSN: 0x800, PrevLSN: 0x700, CommitTime: at(7, 0),
				Changes: []change.Change{
					{Op: change.Insert, Rel: rel, New: []change.Value{}},
					{Op: change.Update, Rel: rel, Old: []change.Value{}, New: []change.Value{}},
					{Op: change.Delete, Rel: rel, Old: []change.Value{}},
				},
			}}}
		}},
		{"chunk-first", func() *change.Batch {
			acc := accounts()
			return &change.Batch{Origin: "dc-a", Epoch: 5, Chunk: &change.Chunk{Index: 0},
				Txns: []change.Txn{{Xid: 50, LSN: 0x9000, PrevLSN: 0x800, CommitTime: at(8, 0),
					Changes: []change.Change{
						{Op: change.Insert, Rel: acc, New: tuple(text("1"), text("A"), null, null, null)},
						{Op: change.Insert, Rel: acc, New: tuple(text("2"), text("B"), null, null, null)},
					}}}}
		}},
		{"chunk-final-empty", func() *change.Batch {
			return &change.Batch{Origin: "dc-a", Epoch: 5, Chunk: &change.Chunk{Index: 17, Final: true},
				Txns: []change.Txn{{Xid: 50, LSN: 0x9000, PrevLSN: 0x800, CommitTime: at(8, 0)}}}
		}},
		{"heartbeat", func() *change.Batch {
			return &change.Batch{Origin: "dc-a", Epoch: 5,
				Heartbeat: &change.Heartbeat{WALEnd: 0x9100, LastLSN: 0x9000, Time: at(9, 42)}}
		}},
		{"extremes", func() *change.Batch {
			return &change.Batch{Origin: strings.Repeat("o", maxNameLen), Epoch: math.MaxUint64, Txns: []change.Txn{
				{Xid: math.MaxUint32, LSN: math.MaxUint64, PrevLSN: 0, CommitTime: time.Time{}},
				{Xid: 0, LSN: 1, PrevLSN: math.MaxUint64, CommitTime: time.UnixMicro(math.MaxInt64).UTC()},
				{Xid: 1, LSN: 0, PrevLSN: 1, CommitTime: time.UnixMicro(math.MinInt64).UTC()},
			}}
		}},
	}
}

func TestRoundTrip(t *testing.T) {
	for _, tc := range codecCases() {
		t.Run(tc.name, func(t *testing.T) {
			want := tc.batch()
			enc, err := Encode(nil, want)
			if err != nil {
				t.Fatalf("Encode: %v", err)
			}
			got, err := Decode(enc)
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("round trip:\n got %s\nwant %s", dump(got), dump(want))
			}
			checkDecoded(t, got, enc)
			if gotID, wantID := MsgID("shop", got), MsgID("shop", want); gotID != wantID {
				t.Errorf("MsgID after round trip = %q, want %q", gotID, wantID)
			}
			again, err := Encode(nil, got)
			if err != nil || !bytes.Equal(again, enc) {
				t.Errorf("re-encoding the decoded batch: err=%v, bytes equal %v", err, bytes.Equal(again, enc))
			}
		})
	}
}

// checkDecoded checks what DeepEqual cannot see: shared relation pointers,
// values aliasing the message with clipped capacity, nil-ness of Data.
func checkDecoded(t *testing.T, b *change.Batch, msg []byte) {
	t.Helper()
	byName := map[string]*change.Relation{}
	sameRel := func(r *change.Relation) {
		key := r.String() + "/" + strconv.Itoa(len(r.Columns))
		if p, ok := byName[key]; ok && p != r {
			t.Errorf("relation %v decoded to two pointers", r)
		}
		byName[key] = r
	}
	for _, txn := range b.Txns {
		if txn.CommitTime.Location() != time.UTC {
			t.Errorf("commit time %v not in UTC", txn.CommitTime)
		}
		for _, c := range txn.Changes {
			if c.Rel != nil {
				sameRel(c.Rel)
			}
			for _, r := range c.Truncated {
				sameRel(r)
			}
			for _, tup := range [][]change.Value{c.Old, c.New} {
				if cap(tup) != len(tup) {
					t.Errorf("tuple cap %d, len %d: appending would clobber a neighbour", cap(tup), len(tup))
				}
				for _, v := range tup {
					switch v.Kind {
					case change.Null, change.Unchanged:
						if v.Data != nil {
							t.Errorf("%c value has data %q", v.Kind, v.Data)
						}
					default:
						if v.Data == nil {
							t.Errorf("%c value has nil data", v.Kind)
						}
						if cap(v.Data) != len(v.Data) {
							t.Errorf("value cap %d, len %d", cap(v.Data), len(v.Data))
						}
						if len(v.Data) > 0 && !aliases(v.Data, msg) {
							t.Errorf("value %q does not alias the message", v.Data)
						}
					}
				}
			}
		}
	}
}

func aliases(b, msg []byte) bool {
	p := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	m := uintptr(unsafe.Pointer(unsafe.SliceData(msg)))
	return p >= m && p+uintptr(len(b)) <= m+uintptr(len(msg))
}

func TestGolden(t *testing.T) {
	names := map[string]bool{compressedGolden: true} // TestCompressedGolden
	for _, tc := range codecCases() {
		names[tc.name+".bin"] = true
		t.Run(tc.name, func(t *testing.T) {
			enc, err := Encode(nil, tc.batch())
			if err != nil {
				t.Fatalf("Encode: %v", err)
			}
			path := filepath.Join(wireDir, tc.name+".bin")
			if *update {
				if err := os.MkdirAll(wireDir, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, enc, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			golden, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test -run TestGolden -update to create it)", err)
			}
			if !bytes.Equal(enc, golden) {
				t.Fatalf("the wire bytes changed:\n got % x\nwant % x\n"+
					"A change to the format needs a new wireVersion, docs/wire-format.md, and -update.", enc, golden)
			}
			got, err := Decode(golden)
			if err != nil {
				t.Fatalf("Decode(golden): %v", err)
			}
			if want := tc.batch(); !reflect.DeepEqual(got, want) {
				t.Fatalf("Decode(golden):\n got %s\nwant %s", dump(got), dump(want))
			}
		})
	}
	// A file without a case would be a fuzz seed nobody checks.
	files, err := filepath.Glob(filepath.Join(wireDir, "*.bin"))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if !names[filepath.Base(f)] {
			t.Errorf("%s has no case in codecCases; remove it or add one", f)
		}
	}
}

// raw assembles messages by hand, following docs/wire-format.md rather than
// the encoder.
type raw []byte

func (r raw) u(vs ...uint64) raw {
	for _, v := range vs {
		r = binary.AppendUvarint(r, v)
	}
	return r
}
func (r raw) v(v int64) raw    { return binary.AppendVarint(r, v) }
func (r raw) s(s string) raw   { return append(r.u(uint64(len(s))), s...) }
func (r raw) b(bs ...byte) raw { return append(r, bs...) }
func (r raw) cat(more raw) raw { return append(r, more...) }
func (r raw) dict(d raw) raw   { return r.u(uint64(len(d))).cat(d) }
func header(kind byte, epoch uint64) raw {
	return raw(magic).b(wireVersion, 0, kind).u(epoch)
}

// seal appends the CRC-32C trailer.
func seal(r raw) []byte {
	return binary.LittleEndian.AppendUint32(slices.Clone(r), crc32.Checksum(r, crc32.MakeTable(crc32.Castagnoli)))
}

// tinyRel is the dictionary entry of a relation "s"."t" with identity 'd'
// and one key column "k" of type "int4" (OID 23).
func tinyRel() raw { return raw{}.s("s").s("t").b('d').u(1).s("k").s("int4").u(23).b(1) }

// tinyRun is a run of one transaction with one insert into tinyRel, with
// body replaced by the given change bytes and totals.
func tinyRun(nChanges, nValues uint64, changes raw) []byte {
	dict := raw{}.s("dc-a").u(1, 1).cat(tinyRel())
	return seal(header(kindRun, 1).dict(dict).u(1, nChanges, nValues).
		u(7).v(0x100).v(0xF0).v(1_000_000).u(1).cat(changes))
}

// TestLayoutByHand pins the documented layout: messages assembled by hand
// from docs/wire-format.md decode to the expected batch and are exactly what
// Encode writes.
func TestLayoutByHand(t *testing.T) {
	rel := &change.Relation{Schema: "s", Name: "t", Identity: 'd',
		Columns: []change.Column{{Name: "k", Type: "int4", TypeOID: 23, Key: true}}}
	tests := []struct {
		name string
		msg  []byte
		want *change.Batch
	}{
		{"run", tinyRun(1, 1, raw{}.b('I').u(0, 1).b('t').s("42")),
			&change.Batch{Origin: "dc-a", Epoch: 1, Txns: []change.Txn{{
				Xid: 7, LSN: 0x100, PrevLSN: 0xF0, CommitTime: at(1, 0),
				Changes: []change.Change{{Op: change.Insert, Rel: rel, New: tuple(text("42"))}},
			}}}},
		{"run-two-txns-deltas", seal(header(kindRun, 2).dict(raw{}.s("o").u(0, 0)).u(2, 0, 0).
			u(1).v(1000).v(900).v(5).u(0).
			u(2).v(24).v(0).v(-1).u(0)),
			&change.Batch{Origin: "o", Epoch: 2, Txns: []change.Txn{
				{Xid: 1, LSN: 1000, PrevLSN: 900, CommitTime: time.UnixMicro(5).UTC()},
				{Xid: 2, LSN: 1024, PrevLSN: 1000, CommitTime: time.UnixMicro(4).UTC()},
			}}},
		{"chunk", seal(header(kindChunk, 3).dict(raw{}.s("o").u(1, 1).cat(tinyRel())).u(4).b(1).u(2, 2).
			u(9).v(0x200).v(0x100).v(0).u(2).
			b('U').u(0).b(1).u(1).b('n').u(1).b('b').s("\x01").
			b('T').u(1, 0).b(3)),
			&change.Batch{Origin: "o", Epoch: 3, Chunk: &change.Chunk{Index: 4, Final: true}, Txns: []change.Txn{{
				Xid: 9, LSN: 0x200, PrevLSN: 0x100, CommitTime: time.UnixMicro(0).UTC(),
				Changes: []change.Change{
					{Op: change.Update, Rel: rel, Old: tuple(null), New: tuple(binval(1))},
					{Op: change.Truncate, Truncated: []*change.Relation{rel}, Cascade: true, RestartIdentity: true},
				},
			}}}},
		{"heartbeat", seal(header(kindHeartbeat, 4).dict(raw{}.s("o").u(0, 0)).u(0x300, 0x200).v(-3)),
			&change.Batch{Origin: "o", Epoch: 4, Heartbeat: &change.Heartbeat{
				WALEnd: 0x300, LastLSN: 0x200, Time: time.UnixMicro(-3).UTC()}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Decode(tt.msg)
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("Decode:\n got %s\nwant %s", dump(got), dump(tt.want))
			}
			enc, err := Encode(nil, tt.want)
			if err != nil {
				t.Fatalf("Encode: %v", err)
			}
			if !bytes.Equal(enc, tt.msg) {
				t.Fatalf("Encode:\n got % x\nwant % x", enc, tt.msg)
			}
		})
	}
}

func TestEncodeAppends(t *testing.T) {
	b := codecCases()[0].batch()
	alone, err := Encode(nil, b)
	if err != nil {
		t.Fatal(err)
	}
	prefix := []byte("prefix")
	got, err := Encode(prefix, b)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(got, prefix) || !bytes.Equal(got[len(prefix):], alone) {
		t.Fatalf("Encode(prefix) = % x, want prefix then % x", got, alone)
	}
	if _, err := Decode(got[len(prefix):]); err != nil {
		t.Fatalf("Decode of the appended message: %v", err)
	}
}

func TestEncodeTruncatesTime(t *testing.T) {
	b := codecCases()[0].batch()
	loc := time.FixedZone("X", 3600)
	b.Txns[0].CommitTime = time.Date(2026, 11, 27, 10, 0, 0, 123456789, loc)
	enc, err := Encode(nil, b)
	if err != nil {
		t.Fatal(err)
	}
	got, err := Decode(enc)
	if err != nil {
		t.Fatal(err)
	}
	want := time.Date(2026, 11, 27, 9, 0, 0, 123456000, time.UTC)
	if ct := got.Txns[0].CommitTime; !ct.Equal(want) || ct.Location() != time.UTC {
		t.Fatalf("commit time = %v, want %v", ct, want)
	}
}

func TestEncodeInvalid(t *testing.T) {
	base := func() *change.Batch { return codecCases()[0].batch() }
	with := func(f func(b *change.Batch)) *change.Batch { b := base(); f(b); return b }
	ch := func(b *change.Batch) *change.Change { return &b.Txns[0].Changes[0] }
	tests := []struct {
		name  string
		batch *change.Batch
		want  string // a part of the message
	}{
		{"nil batch", nil, "nil batch"},
		{"no origin", with(func(b *change.Batch) { b.Origin = "" }), "no origin"},
		{"long origin", with(func(b *change.Batch) { b.Origin = strings.Repeat("x", maxNameLen+1) }), "origin has 256 bytes"},
		{"empty", &change.Batch{Origin: "o"}, "no transactions"},
		{"empty txns slice", &change.Batch{Origin: "o", Txns: []change.Txn{}}, "no transactions"},
		{"chunk of two", with(func(b *change.Batch) {
			b.Chunk = &change.Chunk{}
			b.Txns = append(b.Txns, b.Txns[0])
		}), "carries 2 transactions, want 1"},
		{"chunk of none", &change.Batch{Origin: "o", Chunk: &change.Chunk{}}, "carries 0 transactions"},
		{"heartbeat and txns", with(func(b *change.Batch) { b.Heartbeat = &change.Heartbeat{} }), "heartbeat batch carries 1"},
		{"heartbeat and chunk", &change.Batch{Origin: "o", Heartbeat: &change.Heartbeat{}, Chunk: &change.Chunk{}}, "heartbeat batch"},
		{"nil rel", with(func(b *change.Batch) { ch(b).Rel = nil }), "insert without a relation"},
		{"unknown op", with(func(b *change.Batch) { ch(b).Op = 'X' }), "unknown op"},
		{"too few values", with(func(b *change.Batch) { ch(b).New = ch(b).New[:4] }), "4 new values for 5 columns"},
		{"too many values", with(func(b *change.Batch) { ch(b).New = append(ch(b).New, null) }), "6 new values for 5 columns"},
		{"insert without new", with(func(b *change.Batch) { ch(b).New = nil }), "missing new row image"},
		{"insert with old", with(func(b *change.Batch) { ch(b).Old = ch(b).New }), "unexpected old row image"},
		{"insert with truncate fields", with(func(b *change.Batch) { ch(b).Cascade = true }), "truncate fields"},
		{"update without new", with(func(b *change.Batch) { ch(b).Op = change.Update; ch(b).Old, ch(b).New = ch(b).New, nil }), "missing new row image"},
		{"update old of wrong width", with(func(b *change.Batch) { ch(b).Op = change.Update; ch(b).Old = ch(b).New[:1] }), "1 old values for 5 columns"},
		{"delete without old", with(func(b *change.Batch) { ch(b).Op = change.Delete }), "missing old row image"},
		{"delete with old and new", with(func(b *change.Batch) { ch(b).Op = change.Delete; ch(b).Old = ch(b).New }), "unexpected new row image"},
		{"unknown value kind", with(func(b *change.Batch) { ch(b).New[1].Kind = 'x' }), "unknown kind"},
		{"zero value kind", with(func(b *change.Batch) { ch(b).New[1] = change.Value{} }), "unknown kind"},
		{"null with data", with(func(b *change.Batch) { ch(b).New[1] = change.Value{Kind: change.Null, Data: []byte{}} }), "has data"},
		{"unchanged with data", with(func(b *change.Batch) { ch(b).New[1] = change.Value{Kind: change.Unchanged, Data: []byte("x")} }), "has data"},
		{"bad identity", with(func(b *change.Batch) { ch(b).Rel.Identity = 0 }), "unknown replica identity"},
		{"long schema", with(func(b *change.Batch) { ch(b).Rel.Schema = strings.Repeat("s", 256) }), "longer than 255"},
		{"long column name", with(func(b *change.Batch) { ch(b).Rel.Columns[2].Name = strings.Repeat("c", 256) }), "name has 256 bytes"},
		{"long type", with(func(b *change.Batch) { ch(b).Rel.Columns[2].Type = strings.Repeat("t", maxTypeLen+1) }), "type has 1025 bytes"},
		{"truncate with rel", with(func(b *change.Batch) { ch(b).Op = change.Truncate; ch(b).New = nil }), "truncate with a relation"},
		{"truncate of nothing", with(func(b *change.Batch) { *ch(b) = change.Change{Op: change.Truncate} }), "truncate of no relations"},
		{"truncate of nil", with(func(b *change.Batch) {
			*ch(b) = change.Change{Op: change.Truncate, Truncated: []*change.Relation{nil}}
		}), "nil relation"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dst := []byte("keep")
			got, err := Encode(dst, tt.batch)
			if err == nil {
				t.Fatalf("Encode succeeded with % x, want an error containing %q", got, tt.want)
			}
			if !errors.Is(err, ErrInvalidBatch) {
				t.Errorf("error %v does not wrap ErrInvalidBatch", err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error = %q, want it to contain %q", err, tt.want)
			}
			if string(got) != "keep" {
				t.Errorf("dst = %q after a failed Encode, want it unchanged", got)
			}
		})
	}
}

func TestDecodeMalformed(t *testing.T) {
	valid := mustEncode(t, codecCases()[0].batch())
	reseal := func(f func(m []byte) []byte) []byte {
		m := f(slices.Clone(valid[:len(valid)-trailerLen]))
		return seal(m)
	}
	op := func(changes raw) []byte { return tinyRun(1, 1, changes) }
	tests := []struct {
		name        string
		msg         []byte
		want        string // a part of the reason
		unsupported bool
	}{
		{"nil", nil, "bad magic", false},
		{"empty", []byte{}, "bad magic", false},
		{"junk", []byte("hello, world"), "bad magic", false},
		{"json", []byte(`{"op":"insert"}`), "bad magic", false},
		{"magic only", []byte(magic), "truncated", false},
		{"header only", []byte(magic + "\x01\x00R"), "truncated", false},
		{"version 0", reseal(func(m []byte) []byte { m[4] = 0; return m }), "version 0", true},
		{"version 2", reseal(func(m []byte) []byte { m[4] = 2; return m }), "version 2", true},
		{"plain body flagged compressed", reseal(func(m []byte) []byte { m[5] = flagCompressed; return m }), "compressed body", false},
		{"unknown flag", reseal(func(m []byte) []byte { m[5] = 0x80; return m }), "unknown flags", true},
		{"bad crc", func() []byte { m := slices.Clone(valid); m[len(m)-1] ^= 1; return m }(), "checksum mismatch", false},
		{"byte appended", append(slices.Clone(valid), 0), "checksum mismatch", false},
		{"trailing garbage", reseal(func(m []byte) []byte { return append(m, 0) }), "trailing garbage", false},
		{"unknown kind", reseal(func(m []byte) []byte { m[6] = 'Z'; return m }), "unknown message kind", false},
		{"run of none", seal(header(kindRun, 1).dict(raw{}.s("o").u(0, 0)).u(0, 0, 0)), "run of no transactions", false},
		{"empty dictionary", seal(header(kindRun, 1).u(0).u(1, 0, 0)), "empty dictionary", false},
		{"no origin", seal(header(kindRun, 1).dict(raw{}.s("").u(0, 0)).u(1, 0, 0).u(1).v(1).v(0).v(0).u(0)), "no origin", false},
		{"origin overruns dictionary", seal(header(kindRun, 1).u(2).s("abc").u(0, 0)), "overruns the dictionary", false},
		{"dictionary too long", seal(header(kindRun, 1).dict(raw{}.s("o").u(0, 0).b(0)).u(1, 0, 0).u(1).v(1).v(0).v(0).u(0)), "dictionary ends", false},
		{"heartbeat with relations", seal(header(kindHeartbeat, 1).dict(raw{}.s("o").u(1, 1).cat(tinyRel())).u(1, 1).v(1)), "heartbeat with 1 relations", false},
		{"bad identity", seal(header(kindRun, 1).dict(raw{}.s("o").u(1, 0).s("s").s("t").b('x').u(0)).u(1, 0, 0).u(1).v(1).v(0).v(0).u(0)), "unknown replica identity", false},
		{"key flag 2", seal(header(kindRun, 1).dict(raw{}.s("o").u(1, 1).s("s").s("t").b('d').u(1).s("k").s("int4").u(23).b(2)).u(1, 0, 0).u(1).v(1).v(0).v(0).u(0)), "key flag is 2", false},
		{"oid over 32 bits", seal(header(kindRun, 1).dict(raw{}.s("o").u(1, 1).s("s").s("t").b('d').u(1).s("k").s("int4").u(1<<32).b(1)).u(1, 0, 0).u(1).v(1).v(0).v(0).u(0)), "does not fit 32 bits", false},
		{"more columns than declared", seal(header(kindRun, 1).dict(raw{}.s("o").u(1, 0).s("s").s("t").b('d').u(1).s("k").s("int4").u(23).b(1)).u(1, 0, 0).u(1).v(1).v(0).v(0).u(0)), "more than the 0 left", false},
		{"fewer columns than declared", seal(header(kindRun, 1).dict(raw{}.s("o").u(1, 2).s("s").s("t").b('d').u(1).s("k").s("int4").u(23).b(1).s("k").s("int4").u(23).b(1)).u(1, 0, 0).u(1).v(1).v(0).v(0).u(0)), "1 more columns", false},
		{"huge txn count", seal(header(kindRun, 1).dict(raw{}.s("o").u(0, 0)).u(1<<40, 0, 0)), "exceeds what the", false},
		{"huge change total", seal(header(kindRun, 1).dict(raw{}.s("o").u(0, 0)).u(1, 1<<40, 0)), "exceeds what the", false},
		{"huge value total", seal(header(kindRun, 1).dict(raw{}.s("o").u(0, 0)).u(1, 0, 1<<40)), "exceeds what the", false},
		{"totals beyond the bytes", seal(header(kindRun, 1).dict(raw{}.s("o").u(0, 0)).u(1, 2, 3).u(1).v(1).v(0).v(0).u(0)), "need at least 14 bytes, 5 remain", false},
		{"huge dictionary", seal(header(kindRun, 1).u(1 << 40)), "exceeds what the", false},
		{"overlong varint", seal(header(kindRun, 1).b(0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01)), "varint", false},
		{"xid over 32 bits", seal(header(kindRun, 1).dict(raw{}.s("o").u(0, 0)).u(1, 0, 0).u(1 << 32).v(1).v(0).v(0).u(0)), "xid 4294967296 does not fit", false},
		{"final flag 2", seal(header(kindChunk, 1).dict(raw{}.s("o").u(0, 0)).u(0).b(2).u(0, 0).u(1).v(1).v(0).v(0).u(0)), "final flag is 2", false},
		{"chunk index over 32 bits", seal(header(kindChunk, 1).dict(raw{}.s("o").u(0, 0)).u(1<<32).b(0).u(0, 0).u(1).v(1).v(0).v(0).u(0)), "chunk index", false},
		{"fewer changes than declared", tinyRun(2, 1, raw{}.b('I').u(0, 1).b('t').s("42")), "1 more changes", false},
		{"more changes than declared", seal(header(kindRun, 1).dict(raw{}.s("o").u(0, 0)).u(1, 0, 0).u(1).v(1).v(0).v(0).u(1).b('T').u(1, 0).b(0)), "more than the 0 left", false},
		{"fewer values than declared", tinyRun(1, 2, raw{}.b('I').u(0, 1).b('t').s("42").b(0)), "1 more values", false},
		{"more values than declared", tinyRun(1, 0, raw{}.b('I').u(0, 1).b('t').s("42")), "more than the 0 left", false},
		{"unknown op", op(raw{}.b('X').u(0, 1).b('n')), "unknown op", false},
		{"relation out of range", op(raw{}.b('I').u(1, 1).b('n')), "relation 1 out of range", false},
		{"too few values", op(raw{}.b('I').u(0, 0).b('n')), "has 0 values, the relation has 1 columns", false},
		{"too many values", tinyRun(1, 2, raw{}.b('I').u(0, 2).b('n', 'n')), "has 2 values, the relation has 1 columns", false},
		{"unknown value kind", op(raw{}.b('I').u(0, 1).b('x')), "unknown value kind", false},
		{"value overruns", op(raw{}.b('I').u(0, 1).b('t').u(200)), "overruns", false},
		{"old flag 2", op(raw{}.b('U').u(0).b(2).u(1).b('n')), "old tuple flag is 2", false},
		{"truncate of none", op(raw{}.b('T').u(0).b(0)), "truncate of no relations", false},
		{"truncate out of range", op(raw{}.b('T').u(1, 5).b(0)), "truncated relation 5 out of range", false},
		{"truncate options", op(raw{}.b('T').u(1, 0).b(4)), "unknown truncate options", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := Decode(tt.msg)
			if err == nil {
				t.Fatalf("Decode succeeded with %s, want an error containing %q", dump(b), tt.want)
			}
			checkDecodeError(t, err, tt.msg)
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error = %q, want it to contain %q", err, tt.want)
			}
			if got := errors.Is(err, ErrUnsupportedVersion); got != tt.unsupported {
				t.Errorf("errors.Is(err, ErrUnsupportedVersion) = %v, want %v", got, tt.unsupported)
			}
		})
	}
}

func checkDecodeError(t *testing.T, err error, msg []byte) {
	t.Helper()
	if !errors.Is(err, ErrMalformed) {
		t.Errorf("error %v does not wrap ErrMalformed", err)
	}
	var de *DecodeError
	if !errors.As(err, &de) {
		t.Fatalf("error %T is not a *DecodeError", err)
	}
	if de.Offset < 0 || de.Offset > len(msg) || de.Reason == "" {
		t.Errorf("DecodeError{Offset: %d, Reason: %q} for a message of %d bytes", de.Offset, de.Reason, len(msg))
	}
}

func TestDecodeTruncated(t *testing.T) {
	for _, tc := range codecCases() {
		msg := mustEncode(t, tc.batch())
		for n := range len(msg) {
			if b, err := Decode(msg[:n]); err == nil {
				t.Fatalf("%s: Decode of the first %d of %d bytes succeeded: %s", tc.name, n, len(msg), dump(b))
			} else {
				checkDecodeError(t, err, msg[:n])
			}
		}
	}
}

func TestDecodeBitFlips(t *testing.T) {
	for _, tc := range codecCases() {
		msg := mustEncode(t, tc.batch())
		for i := range len(msg) * 8 {
			m := slices.Clone(msg)
			m[i/8] ^= 1 << (i % 8)
			_, err := Decode(m)
			if err == nil {
				t.Fatalf("%s: Decode succeeded with bit %d flipped", tc.name, i)
			}
			checkDecodeError(t, err, m)
			var want string
			switch {
			case i/8 < len(magic):
				want = "bad magic"
			case i/8 == len(magic):
				want = "version"
			default:
				want = "checksum mismatch"
			}
			if !strings.Contains(err.Error(), want) {
				t.Fatalf("%s: bit %d flipped: error = %q, want %q", tc.name, i, err, want)
			}
		}
	}
}

func TestDecodeErrorString(t *testing.T) {
	err := error(&DecodeError{Offset: 12, Reason: "unknown op 0x58"})
	if got, want := err.Error(), "malformed message at byte 12: unknown op 0x58"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	_, err = Decode(seal(append(raw(magic), 9, 0, 'R')))
	if got, want := err.Error(), "unsupported wire format version at byte 4: message has version 9, this build reads version 1"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	if !errors.Is(ErrUnsupportedVersion, ErrMalformed) {
		t.Error("ErrUnsupportedVersion does not wrap ErrMalformed")
	}
}

// TestDecodeAliasing documents the zero-copy contract: values alias the
// message, and appending to one leaves the message and the others alone.
func TestDecodeAliasing(t *testing.T) {
	msg := mustEncode(t, codecCases()[0].batch())
	orig := slices.Clone(msg)
	b, err := Decode(msg)
	if err != nil {
		t.Fatal(err)
	}
	name := b.Txns[0].Changes[0].New[1].Data
	_ = append(name, "xxxxxxxx"...)
	if !bytes.Equal(msg, orig) {
		t.Fatal("appending to a decoded value changed the message")
	}
	copy(msg[bytes.Index(msg, []byte("Ada")):], "Eve")
	if got := string(b.Txns[0].Changes[0].New[1].Data); got != "Eve" {
		t.Fatalf("value after changing the message = %q, want the aliased %q", got, "Eve")
	}
	if got := b.Txns[0].Changes[0].Rel.Name; got != "accounts" {
		t.Fatalf("relation name = %q: names must be copies", got)
	}
}

func TestDecodeSharesRelations(t *testing.T) {
	b, err := Decode(mustEncode(t, caseBatch(t, "truncate-several")))
	if err != nil {
		t.Fatal(err)
	}
	tr := b.Txns[1].Changes[2].Truncated
	if tr[0] != tr[2] || tr[0] != b.Txns[0].Changes[0].Truncated[0] || tr[1] != b.Txns[1].Changes[3].Rel {
		t.Fatal("changes of one relation got different *Relation pointers")
	}
}

func TestMsgID(t *testing.T) {
	run := &change.Batch{Origin: "dc-a", Epoch: 3, Txns: []change.Txn{{LSN: 0x3000060}, {LSN: 0x16_B374D848}}}
	tests := []struct {
		name    string
		cluster string
		batch   *change.Batch
		want    string
	}{
		{"run", "shop", run, "shop.dc-a.3.3000060-16b374d848"},
		{"single", "shop", &change.Batch{Origin: "dc-a", Epoch: 1, Txns: []change.Txn{{LSN: 0x10}}}, "shop.dc-a.1.10-10"},
		{"chunk", "shop", &change.Batch{Origin: "dc-a", Epoch: 3, Chunk: &change.Chunk{Index: 12, Final: true},
			Txns: []change.Txn{{LSN: 0xABC}}}, "shop.dc-a.3.abc.c12"},
		{"heartbeat", "shop", &change.Batch{Origin: "dc-a", Epoch: 3,
			Heartbeat: &change.Heartbeat{WALEnd: 0xFF, LastLSN: 0xF0, Time: time.UnixMicro(1795780800123456)}},
			"shop.dc-a.3.hb.ff.1795780800123456"},
		{"escaped", "a.b", &change.Batch{Origin: "dc a:ü%", Epoch: 0, Txns: []change.Txn{{LSN: 1}}}, "a%2Eb.dc%20a%3A%C3%BC%25.0.1-1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := MsgID(tt.cluster, tt.batch); got != tt.want {
				t.Errorf("MsgID = %q, want %q", got, tt.want)
			}
		})
	}
	t.Run("content does not matter", func(t *testing.T) {
		a := caseBatch(t, "run-many-txns")
		b := caseBatch(t, "run-many-txns")
		b.Txns[2].Changes = nil
		b.Txns[0].Xid = 1
		if MsgID("shop", a) != MsgID("shop", b) {
			t.Error("batches of the same LSN range got different ids")
		}
	})
	t.Run("distinct", func(t *testing.T) {
		ids := map[string]string{}
		add := func(what string, b *change.Batch) {
			id := MsgID("shop", b)
			if prev, ok := ids[id]; ok {
				t.Errorf("%s and %s share the id %q", prev, what, id)
			}
			ids[id] = what
		}
		add("run", run)
		add("other epoch", &change.Batch{Origin: "dc-a", Epoch: 4, Txns: run.Txns})
		add("other origin", &change.Batch{Origin: "dc-b", Epoch: 3, Txns: run.Txns})
		add("shorter run", &change.Batch{Origin: "dc-a", Epoch: 3, Txns: run.Txns[:1]})
		add("chunk 0", &change.Batch{Origin: "dc-a", Epoch: 3, Chunk: &change.Chunk{}, Txns: run.Txns[:1]})
		add("chunk 1", &change.Batch{Origin: "dc-a", Epoch: 3, Chunk: &change.Chunk{Index: 1}, Txns: run.Txns[:1]})
		hb := func(t int64) *change.Batch {
			return &change.Batch{Origin: "dc-a", Epoch: 3, Heartbeat: &change.Heartbeat{WALEnd: 0x10, Time: time.UnixMicro(t)}}
		}
		add("heartbeat 1", hb(1))
		add("heartbeat 2", hb(2))
	})
}

func caseBatch(t testing.TB, name string) *change.Batch {
	t.Helper()
	for _, tc := range codecCases() {
		if tc.name == name {
			return tc.batch()
		}
	}
	t.Fatalf("no codec case %q", name)
	return nil
}

func mustEncode(t testing.TB, b *change.Batch) []byte {
	t.Helper()
	enc, err := Encode(nil, b)
	if err != nil {
		t.Fatalf("Encode: %v", err)
	}
	return enc
}

// benchBatch is the benchmark workload: 100 transactions of 4 changes each
// (insert, update, update leaving a TOASTed column alone, delete) to a
// 5-column table.
func benchBatch() *change.Batch {
	acc := accounts()
	b := &change.Batch{Origin: "dc-a", Epoch: 3}
	lsn := change.LSN(0x16_B374D848)
	for i := range 100 {
		prev := lsn
		lsn += 0x1F8
		id := []byte("100" + string(rune('0'+i%10)) + string(rune('0'+i/10)))
		b.Txns = append(b.Txns, change.Txn{
			Xid: uint32(5000 + i), LSN: lsn, PrevLSN: prev, CommitTime: at(1795780800, int64(i*250)),
			Changes: []change.Change{
				{Op: change.Insert, Rel: acc, New: tuple(
					change.Value{Kind: change.Text, Data: id}, text("Ada Lovelace"), text("ada@example.com"),
					text("1024.50"), text("2026-11-27 10:00:00.123456+00"))},
				{Op: change.Update, Rel: acc, New: tuple(
					change.Value{Kind: change.Text, Data: id}, text("Ada King"), text("ada@example.com"),
					text("1000.00"), text("2026-11-27 10:00:01.654321+00"))},
				{Op: change.Update, Rel: acc, New: tuple(
					change.Value{Kind: change.Text, Data: id}, unchanged, null,
					text("999.99"), text("2026-11-27 10:00:02.000001+00"))},
				{Op: change.Delete, Rel: acc, Old: tuple(change.Value{Kind: change.Text, Data: id}, null, null, null, null)},
			},
		})
	}
	return b
}

func BenchmarkEncode(b *testing.B) {
	batch := benchBatch()
	buf := mustEncode(b, batch)
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	for b.Loop() {
		var err error
		buf, err = Encode(buf[:0], batch)
		if err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/400, "ns/change")
}

func BenchmarkDecode(b *testing.B) {
	msg := mustEncode(b, benchBatch())
	b.SetBytes(int64(len(msg)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Decode(msg); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/400, "ns/change")
}

func BenchmarkMsgID(b *testing.B) {
	batch := benchBatch()
	b.ReportAllocs()
	for b.Loop() {
		_ = MsgID("shop", batch)
	}
}

// dump renders a batch for failure messages, following its pointers.
func dump(b *change.Batch) string {
	if b == nil {
		return "<nil>"
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "Batch{Origin:%q Epoch:%d", b.Origin, b.Epoch)
	if b.Chunk != nil {
		fmt.Fprintf(&sb, " Chunk:%+v", *b.Chunk)
	}
	if b.Heartbeat != nil {
		fmt.Fprintf(&sb, " Heartbeat:%+v", *b.Heartbeat)
	}
	fmt.Fprintf(&sb, " Txns(nil=%v):", b.Txns == nil)
	for _, t := range b.Txns {
		fmt.Fprintf(&sb, "\n  Txn{Xid:%d LSN:%v PrevLSN:%v CommitTime:%v Changes(nil=%v):",
			t.Xid, t.LSN, t.PrevLSN, t.CommitTime, t.Changes == nil)
		for _, c := range t.Changes {
			fmt.Fprintf(&sb, "\n    %v", c.Op)
			if c.Rel != nil {
				fmt.Fprintf(&sb, " %+v", *c.Rel)
			}
			for _, r := range c.Truncated {
				fmt.Fprintf(&sb, " %+v", *r)
			}
			if c.Op == change.Truncate {
				fmt.Fprintf(&sb, " cascade=%v restart=%v", c.Cascade, c.RestartIdentity)
			}
			fmt.Fprintf(&sb, " old=%s new=%s", dumpTuple(c.Old), dumpTuple(c.New))
		}
	}
	sb.WriteString("}")
	return sb.String()
}

func dumpTuple(vals []change.Value) string {
	if vals == nil {
		return "nil"
	}
	parts := make([]string, len(vals))
	for i, v := range vals {
		switch {
		case v.Data == nil:
			parts[i] = fmt.Sprintf("%c", v.Kind)
		default:
			parts[i] = fmt.Sprintf("%c%q", v.Kind, v.Data)
		}
	}
	return "[" + strings.Join(parts, " ") + "]"
}

// TestDecodeAllocationBound checks the documented bound: decoding n bytes,
// hostile or not, allocates at most about 40·n bytes.
func TestDecodeAllocationBound(t *testing.T) {
	const n = 1 << 16
	oneCol := raw{}.s("o").u(1, 1).cat(tinyRel())
	inserts := raw{}
	for range n / 4 {
		inserts = inserts.b('I').u(0, 1).b('n')
	}
	tests := []struct {
		name string
		msg  []byte
		ok   bool
	}{
		{"declared values, then padding", seal(header(kindRun, 1).dict(raw{}.s("o").u(0, 0)).u(1, 0, n).
			u(1).v(1).v(0).v(0).u(0).cat(make(raw, n))), false},
		{"declared changes, then padding", seal(header(kindRun, 1).dict(raw{}.s("o").u(0, 0)).u(1, n/3, 0).
			u(1).v(1).v(0).v(0).u(0).cat(make(raw, n))), false},
		{"huge truncate", seal(header(kindRun, 1).dict(oneCol).u(1, 1, 0).
			u(1).v(1).v(0).v(0).u(1).b('T').u(n).cat(make(raw, n))), false}, // no options byte
		{"many nulls", seal(header(kindRun, 1).dict(oneCol).u(1, n/4, n/4).
			u(1).v(1).v(0).v(0).u(n / 4).cat(inserts)), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			_, err := Decode(tt.msg)
			runtime.ReadMemStats(&after)
			if (err == nil) != tt.ok {
				t.Fatalf("Decode error = %v, want ok %v", err, tt.ok)
			}
			got := after.TotalAlloc - before.TotalAlloc
			if limit := uint64(40*len(tt.msg) + 4096); got > limit {
				t.Fatalf("Decode of %d bytes allocated %d bytes (%.1f per byte), want at most %d",
					len(tt.msg), got, float64(got)/float64(len(tt.msg)), limit)
			}
			t.Logf("%d bytes allocated %d (%.1f per byte)", len(tt.msg), got, float64(got)/float64(len(tt.msg)))
		})
	}
}
