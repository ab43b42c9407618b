package transport

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math"
	"slices"
	"strconv"
	"time"

	"github.com/xdcr/xdcr/replicator/change"
)

// The layout is specified byte by byte in docs/wire-format.md; keep the two in
// step, and bump wireVersion for any change to the bytes (the golden files in
// testdata/wire fail otherwise).
const (
	magic       = "\x89XDC"
	wireVersion = 1

	// flagCompressed marks a compressed body (compress.go). Builds before
	// compression refuse such a message as unsupported.
	flagCompressed = 1 << 0

	kindRun       = 'R'
	kindChunk     = 'C'
	kindHeartbeat = 'H'

	headerLen  = len(magic) + 3 // magic, version, flags, kind
	trailerLen = 4              // CRC-32C, little endian

	// maxNameLen bounds the origin and every schema, relation and column
	// name. PostgreSQL identifiers have at most 63 bytes.
	maxNameLen = 255
	// maxTypeLen bounds a column's type as format_type() prints it.
	maxTypeLen = 1024
	// maxValueLen is PostgreSQL's own limit on a field (1 GiB); a message
	// is far smaller in practice (see MsgID and docs/wire-format.md).
	maxValueLen = 1 << 30

	// Minimum encoded sizes, used to bound declared counts by the bytes
	// that remain, so hostile counts cannot make Decode allocate.
	minTxnLen      = 5 // xid, lsn, prev, time, change count
	minChangeLen   = 3 // op, relation, column count
	minValueLen    = 1 // kind
	minRelationLen = 4 // schema, name, identity, column count
	minColumnLen   = 4 // name, type, oid, key

	truncateCascade         = 1 << 0
	truncateRestartIdentity = 1 << 1
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrMalformed is wrapped by every error [Decode] returns: the bytes are not
// a message this build can read. The apply side must pause on it, not skip
// the message.
var ErrMalformed = errors.New("malformed message")

// ErrUnsupportedVersion is wrapped by the error [Decode] returns for a
// message written in a wire format version, or with a flag, that this build
// does not implement: the remedy is to upgrade the reading agent, not to
// repair the stream. It wraps [ErrMalformed] in turn, so a check for
// ErrMalformed catches it too; test for ErrUnsupportedVersion first to tell
// the two apart.
var ErrUnsupportedVersion error = &sentinel{"unsupported wire format version", ErrMalformed}

// ErrInvalidBatch is wrapped by every error [Encode] returns: the batch
// breaks an invariant of [change.Batch] or a bound of the wire format.
var ErrInvalidBatch = errors.New("invalid batch")

type sentinel struct {
	msg    string
	parent error
}

func (s *sentinel) Error() string { return s.msg }
func (s *sentinel) Unwrap() error { return s.parent }

// DecodeError says what is wrong with a message and where.
type DecodeError struct {
	// Offset is the byte offset in the message at which decoding failed.
	Offset int
	// Reason describes the problem for operators.
	Reason string

	err error // ErrMalformed when nil
}

func (e *DecodeError) Error() string {
	return e.Unwrap().Error() + " at byte " + strconv.Itoa(e.Offset) + ": " + e.Reason
}

// Unwrap returns [ErrMalformed], or [ErrUnsupportedVersion] (which wraps
// ErrMalformed) for a version or flag this build does not read.
func (e *DecodeError) Unwrap() error {
	if e.err == nil {
		return ErrMalformed
	}
	return e.err
}

// Encode appends the wire form of b to dst and returns the extended slice.
// It is deterministic: the same batch always gives the same bytes. It
// allocates nothing when dst has room for the message.
//
// Encode checks the invariants of [change.Batch] that the format relies on
// and returns an error wrapping [ErrInvalidBatch], with dst unchanged, when
// b breaks one: a batch must have an origin and be exactly one of a run of
// one or more transactions, a chunk with exactly one transaction, or a
// heartbeat with no transactions; every change's fields must fit its op
// (Rel set and a tuple of len(Rel.Columns) values where the op has one, Rel
// nil and at least one relation for a truncate); Null and Unchanged values
// carry no Data; names, types and values stay within the format's bounds.
//
// Commit and heartbeat times travel as whole microseconds since the Unix
// epoch; finer precision and the time zone are dropped.
func Encode(dst []byte, b *change.Batch) ([]byte, error) {
	if b == nil {
		return dst, fmt.Errorf("%w: nil batch", ErrInvalidBatch)
	}
	var e encoder
	if err := e.plan(b); err != nil {
		return dst, err
	}
	start := len(dst)
	out := slices.Grow(dst, e.size)
	out = append(out, magic...)
	out = append(out, wireVersion, 0, e.kind)
	out = binary.AppendUvarint(out, b.Epoch)
	out = e.appendDict(out, b.Origin)
	switch e.kind {
	case kindHeartbeat:
		h := b.Heartbeat
		out = binary.AppendUvarint(out, uint64(h.WALEnd))
		out = binary.AppendUvarint(out, uint64(h.LastLSN))
		out = binary.AppendVarint(out, h.Time.UnixMicro())
	case kindChunk:
		out = binary.AppendUvarint(out, uint64(b.Chunk.Index))
		out = appendBool(out, b.Chunk.Final)
		out = binary.AppendUvarint(out, uint64(e.nChanges))
		out = binary.AppendUvarint(out, uint64(e.nValues))
		out = e.appendTxns(out, b.Txns)
	case kindRun:
		out = binary.AppendUvarint(out, uint64(len(b.Txns)))
		out = binary.AppendUvarint(out, uint64(e.nChanges))
		out = binary.AppendUvarint(out, uint64(e.nValues))
		out = e.appendTxns(out, b.Txns)
	}
	return binary.LittleEndian.AppendUint32(out, crc32.Checksum(out[start:], castagnoli)), nil
}

// encoder holds what Encode learns about a batch in its first pass, which
// validates; the second pass only writes.
type encoder struct {
	kind     byte
	rels     relTable
	nCols    int
	nChanges int
	nValues  int
	size     int // an upper bound of the encoded size, to grow dst once
}

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrInvalidBatch}, args...)...)
}

func (e *encoder) plan(b *change.Batch) error {
	if b.Origin == "" {
		return invalid("no origin")
	}
	if len(b.Origin) > maxNameLen {
		return invalid("origin has %d bytes, the format allows %d", len(b.Origin), maxNameLen)
	}
	e.size = headerLen + 2*binary.MaxVarintLen64 + len(b.Origin) + trailerLen
	switch {
	case b.Heartbeat != nil:
		if len(b.Txns) != 0 || b.Chunk != nil {
			return invalid("a heartbeat batch carries %d transactions and chunk %v", len(b.Txns), b.Chunk != nil)
		}
		e.kind = kindHeartbeat
		e.size += 3 * binary.MaxVarintLen64
		return nil
	case b.Chunk != nil:
		if len(b.Txns) != 1 {
			return invalid("chunk %d carries %d transactions, want 1", b.Chunk.Index, len(b.Txns))
		}
		e.kind = kindChunk
	default:
		if len(b.Txns) == 0 {
			return invalid("no transactions, chunk or heartbeat")
		}
		e.kind = kindRun
	}
	e.size += 6 * binary.MaxVarintLen64
	for i := range b.Txns {
		t := &b.Txns[i]
		e.size += 5 * binary.MaxVarintLen64
		for j := range t.Changes {
			if err := e.planChange(&t.Changes[j]); err != nil {
				return fmt.Errorf("%w: txn %d (xid %d) change %d: %w", ErrInvalidBatch, i, t.Xid, j, err)
			}
		}
	}
	return nil
}

func (e *encoder) planChange(c *change.Change) error {
	e.nChanges++
	e.size += 3 + binary.MaxVarintLen32
	if c.Op == change.Truncate {
		if c.Rel != nil || c.Old != nil || c.New != nil {
			return errors.New("truncate with a relation or row image; truncated relations go in Truncated")
		}
		if len(c.Truncated) == 0 {
			return errors.New("truncate of no relations")
		}
		e.size += binary.MaxVarintLen64 + 1
		for _, r := range c.Truncated {
			if err := e.useRelation(r); err != nil {
				return err
			}
			e.size += binary.MaxVarintLen32
		}
		return nil
	}
	if c.Truncated != nil || c.Cascade || c.RestartIdentity {
		return fmt.Errorf("%v with truncate fields set", c.Op)
	}
	var wantOld, wantNew bool
	switch c.Op {
	case change.Insert:
		wantNew = true
	case change.Update:
		wantOld, wantNew = c.Old != nil, true
	case change.Delete:
		wantOld = true
	default:
		return fmt.Errorf("unknown op %v", c.Op)
	}
	if c.Rel == nil {
		return fmt.Errorf("%v without a relation", c.Op)
	}
	if err := e.useRelation(c.Rel); err != nil {
		return err
	}
	if err := e.planTuple(c, "old", c.Old, wantOld); err != nil {
		return err
	}
	return e.planTuple(c, "new", c.New, wantNew)
}

func (e *encoder) planTuple(c *change.Change, which string, vals []change.Value, want bool) error {
	if !want {
		if vals != nil {
			return fmt.Errorf("%v of %v: unexpected %s row image", c.Op, c.Rel, which)
		}
		return nil
	}
	if vals == nil {
		return fmt.Errorf("%v of %v: missing %s row image", c.Op, c.Rel, which)
	}
	if len(vals) != len(c.Rel.Columns) {
		return fmt.Errorf("%v of %v: %d %s values for %d columns", c.Op, c.Rel, len(vals), which, len(c.Rel.Columns))
	}
	e.nValues += len(vals)
	e.size += binary.MaxVarintLen32
	for i := range vals {
		v := &vals[i]
		switch v.Kind {
		case change.Null, change.Unchanged:
			if v.Data != nil {
				return fmt.Errorf("%v of %v: %s value %d (%s) is %c but has data", c.Op, c.Rel, which, i, c.Rel.Columns[i].Name, v.Kind)
			}
			e.size++
		case change.Text, change.Binary:
			if len(v.Data) > maxValueLen {
				return fmt.Errorf("%v of %v: %s value %d (%s) has %d bytes, the format allows %d", c.Op, c.Rel, which, i, c.Rel.Columns[i].Name, len(v.Data), maxValueLen)
			}
			e.size += 1 + binary.MaxVarintLen32 + len(v.Data)
		default:
			return fmt.Errorf("%v of %v: %s value %d (%s) has unknown kind %d", c.Op, c.Rel, which, i, c.Rel.Columns[i].Name, v.Kind)
		}
	}
	return nil
}

// useRelation adds r to the message's relation table, checking it the first
// time it is seen.
func (e *encoder) useRelation(r *change.Relation) error {
	if r == nil {
		return errors.New("nil relation")
	}
	if _, ok := e.rels.index(r); ok {
		return nil
	}
	if err := checkRelation(r); err != nil {
		return err
	}
	e.rels.add(r)
	e.nCols += len(r.Columns)
	e.size += 2*binary.MaxVarintLen32 + len(r.Schema) + len(r.Name) + 1
	for i := range r.Columns {
		e.size += 2*binary.MaxVarintLen32 + len(r.Columns[i].Name) + len(r.Columns[i].Type) + binary.MaxVarintLen32 + 1
	}
	return nil
}

func checkRelation(r *change.Relation) error {
	if !validIdentity(r.Identity) {
		return fmt.Errorf("relation %v has unknown replica identity %q", r, r.Identity)
	}
	if len(r.Schema) > maxNameLen || len(r.Name) > maxNameLen {
		return fmt.Errorf("relation %v: a name is longer than %d bytes", r, maxNameLen)
	}
	for i := range r.Columns {
		col := &r.Columns[i]
		if len(col.Name) > maxNameLen {
			return fmt.Errorf("relation %v column %d: name has %d bytes, the format allows %d", r, i, len(col.Name), maxNameLen)
		}
		if len(col.Type) > maxTypeLen {
			return fmt.Errorf("relation %v column %s: type has %d bytes, the format allows %d", r, col.Name, len(col.Type), maxTypeLen)
		}
	}
	return nil
}

func validIdentity(b byte) bool {
	switch b {
	case change.IdentityDefault, change.IdentityNothing, change.IdentityFull, change.IdentityIndex:
		return true
	}
	return false
}

// appendDict writes the length-prefixed dictionary: the origin and the
// relation table. It writes the dictionary first and then slides it right to
// make room for its length, which is cheaper than measuring it twice.
func (e *encoder) appendDict(dst []byte, origin string) []byte {
	p := len(dst)
	dst = appendString(dst, origin)
	dst = binary.AppendUvarint(dst, uint64(e.rels.len()))
	dst = binary.AppendUvarint(dst, uint64(e.nCols))
	for i := range e.rels.len() {
		r := e.rels.at(i)
		dst = appendString(dst, r.Schema)
		dst = appendString(dst, r.Name)
		dst = append(dst, r.Identity)
		dst = binary.AppendUvarint(dst, uint64(len(r.Columns)))
		for j := range r.Columns {
			col := &r.Columns[j]
			dst = appendString(dst, col.Name)
			dst = appendString(dst, col.Type)
			dst = binary.AppendUvarint(dst, uint64(col.TypeOID))
			dst = appendBool(dst, col.Key)
		}
	}
	n := len(dst) - p
	var tmp [binary.MaxVarintLen64]byte
	k := binary.PutUvarint(tmp[:], uint64(n))
	dst = append(dst, tmp[:k]...)
	copy(dst[p+k:], dst[p:p+n])
	copy(dst[p:], tmp[:k])
	return dst
}

func (e *encoder) appendTxns(dst []byte, txns []change.Txn) []byte {
	var lsn change.LSN
	var micros int64
	for i := range txns {
		t := &txns[i]
		dst = binary.AppendUvarint(dst, uint64(t.Xid))
		dst = binary.AppendVarint(dst, int64(t.LSN-lsn))
		dst = binary.AppendVarint(dst, int64(t.PrevLSN-lsn))
		m := t.CommitTime.UnixMicro()
		dst = binary.AppendVarint(dst, int64(uint64(m)-uint64(micros)))
		lsn, micros = t.LSN, m
		dst = binary.AppendUvarint(dst, uint64(len(t.Changes)))
		for j := range t.Changes {
			dst = e.appendChange(dst, &t.Changes[j])
		}
	}
	return dst
}

func (e *encoder) appendChange(dst []byte, c *change.Change) []byte {
	dst = append(dst, byte(c.Op))
	if c.Op == change.Truncate {
		dst = binary.AppendUvarint(dst, uint64(len(c.Truncated)))
		for _, r := range c.Truncated {
			i, _ := e.rels.index(r)
			dst = binary.AppendUvarint(dst, uint64(i))
		}
		var opts byte
		if c.Cascade {
			opts |= truncateCascade
		}
		if c.RestartIdentity {
			opts |= truncateRestartIdentity
		}
		return append(dst, opts)
	}
	i, _ := e.rels.index(c.Rel)
	dst = binary.AppendUvarint(dst, uint64(i))
	switch c.Op {
	case change.Insert:
		return appendTuple(dst, c.New)
	case change.Update:
		dst = appendBool(dst, c.Old != nil)
		if c.Old != nil {
			dst = appendTuple(dst, c.Old)
		}
		return appendTuple(dst, c.New)
	default: // Delete; plan rejected every other op
		return appendTuple(dst, c.Old)
	}
}

func appendTuple(dst []byte, vals []change.Value) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(vals)))
	for i := range vals {
		v := &vals[i]
		dst = append(dst, byte(v.Kind))
		if v.Kind == change.Text || v.Kind == change.Binary {
			dst = binary.AppendUvarint(dst, uint64(len(v.Data)))
			dst = append(dst, v.Data...)
		}
	}
	return dst
}

func appendString(dst []byte, s string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

func appendBool(dst []byte, b bool) []byte {
	if b {
		return append(dst, 1)
	}
	return append(dst, 0)
}

// relTable numbers the relations of one message in order of first use. A
// message usually names a handful, so it searches a slice and only builds a
// map for the rare message with many.
type relTable struct {
	small [8]*change.Relation
	n     int
	more  []*change.Relation // relations beyond small, once n > len(small)
	byPtr map[*change.Relation]int
	last  int
}

const relTableMapAfter = 32

func (t *relTable) len() int { return t.n }

func (t *relTable) at(i int) *change.Relation {
	if i < len(t.small) {
		return t.small[i]
	}
	return t.more[i-len(t.small)]
}

func (t *relTable) index(r *change.Relation) (int, bool) {
	if t.last < t.n && t.at(t.last) == r {
		return t.last, true
	}
	if t.byPtr != nil {
		i, ok := t.byPtr[r]
		if ok {
			t.last = i
		}
		return i, ok
	}
	for i := range t.n {
		if t.at(i) == r {
			t.last = i
			return i, true
		}
	}
	return 0, false
}

func (t *relTable) add(r *change.Relation) {
	if t.n < len(t.small) {
		t.small[t.n] = r
	} else {
		t.more = append(t.more, r)
	}
	t.n++
	switch {
	case t.byPtr != nil:
		t.byPtr[r] = t.n - 1
	case t.n > relTableMapAfter:
		t.byPtr = make(map[*change.Relation]int, 2*t.n)
		for i := range t.n {
			t.byPtr[t.at(i)] = i
		}
	}
}

// Decode parses one message with a [Decoder] of its own; readers of many
// messages keep one Decoder instead.
func Decode(data []byte) (*change.Batch, error) {
	var d Decoder
	return d.Decode(data)
}

// Decoder parses messages, plain or compressed. Its zero value is ready;
// it makes a zstd decoder at its first compressed message and keeps it.
// Safe for concurrent use.
type Decoder struct {
	dc decompressor
}

// Decode parses one message.
//
// Decode does not copy the values of a plain message: the Data of every
// Text and Binary value of the result aliases data (with its capacity
// clipped, so appending to it cannot overwrite its neighbours). The caller
// must keep data alive and unmodified for as long as it uses the batch.
// The values of a compressed message alias its decompressed body, which
// the batch keeps alive. Everything else (names, relations, the batch
// itself) is copied into a few allocations per message; the changes of
// one relation share one *[change.Relation].
//
// Commit and heartbeat times are returned in UTC. A decoded Text or Binary
// value always has non-nil Data (an empty value is []byte{}), Null and
// Unchanged values have nil Data, and a transaction without changes has nil
// Changes (a relation without columns, nil Columns). Decode allocates at
// most a small multiple of len(data) (about 40 times) for a plain message,
// hostile input included; a compressed one adds its declared plain body,
// at most 64 MiB.
//
// Every error wraps [ErrMalformed] and is a [*DecodeError]; one in the
// plain body of a compressed message points at the compressed body and
// names the offset in the plain body in its reason. A message of a
// version or with a flag this build does not read gives one wrapping
// [ErrUnsupportedVersion]. Decode never panics and bounds every count it
// reads by the bytes that remain.
func (dd *Decoder) Decode(data []byte) (*change.Batch, error) {
	if len(data) < len(magic) || string(data[:len(magic)]) != magic {
		return nil, &DecodeError{Offset: 0, Reason: "not an xdcr message (bad magic)"}
	}
	if len(data) == len(magic) {
		return nil, &DecodeError{Offset: len(data), Reason: "truncated before the version"}
	}
	if v := data[len(magic)]; v != wireVersion {
		return nil, &DecodeError{Offset: len(magic), err: ErrUnsupportedVersion,
			Reason: fmt.Sprintf("message has version %d, this build reads version %d", v, wireVersion)}
	}
	if len(data) < headerLen+trailerLen {
		return nil, &DecodeError{Offset: len(data), Reason: "truncated header"}
	}
	end := len(data) - trailerLen
	if got, want := binary.LittleEndian.Uint32(data[end:]), crc32.Checksum(data[:end], castagnoli); got != want {
		return nil, &DecodeError{Offset: end,
			Reason: fmt.Sprintf("checksum mismatch: message says %08x, bytes give %08x", got, want)}
	}
	f := data[len(magic)+1]
	if f&^flagCompressed != 0 {
		return nil, &DecodeError{Offset: len(magic) + 1, Reason: fmt.Sprintf("unknown flags %#02x", f), err: ErrUnsupportedVersion}
	}
	if f != flagCompressed {
		b, err := parseBody(data[:end])
		if err != nil { // not a nil *DecodeError in a non-nil error
			return nil, err
		}
		return b, nil
	}
	plain, derr := dd.dc.plain(data)
	if derr != nil {
		return nil, derr
	}
	b, err := parseBody(plain)
	if err != nil {
		// the offset is in the plain body; say so, and point at the
		// compressed body in the message itself
		err.Reason = fmt.Sprintf("decompressed body, byte %d: %s", err.Offset, err.Reason)
		err.Offset = headerLen
		return nil, err
	}
	return b, nil
}

// parseBody parses a plain message without its trailer.
func parseBody(body []byte) (*change.Batch, *DecodeError) {
	d := decoder{buf: body, off: headerLen}
	b := d.message(body[headerLen-1])
	if d.err != nil {
		return nil, d.err
	}
	if d.off != len(body) {
		return nil, &DecodeError{Offset: d.off, Reason: fmt.Sprintf("%d bytes of trailing garbage", len(body)-d.off)}
	}
	return b, nil
}

// decoder reads the body of a message. Its methods record the first problem
// in err and return ok == false; callers stop at the first false.
type decoder struct {
	buf []byte // the message without its trailer
	off int
	err *DecodeError

	dict    string // the dictionary, copied once; names are substrings of it
	dictOff int    // offset of dict in buf
	rels    []change.Relation

	changes []change.Change // backing for every txn's Changes
	vals    []change.Value  // backing for every tuple
}

func (d *decoder) fail(at int, format string, args ...any) bool {
	if d.err == nil {
		d.err = &DecodeError{Offset: at, Reason: fmt.Sprintf(format, args...)}
	}
	return false
}

func (d *decoder) remaining() int { return len(d.buf) - d.off }

func (d *decoder) uvarint(what string) (uint64, bool) {
	if d.off < len(d.buf) && d.buf[d.off] < 0x80 {
		v := uint64(d.buf[d.off])
		d.off++
		return v, true
	}
	v, n := binary.Uvarint(d.buf[d.off:])
	if n <= 0 {
		return 0, d.fail(d.off, "truncated or overlong varint (%s)", what)
	}
	d.off += n
	return v, true
}

func (d *decoder) varint(what string) (int64, bool) {
	v, n := binary.Varint(d.buf[d.off:])
	if n <= 0 {
		return 0, d.fail(d.off, "truncated or overlong varint (%s)", what)
	}
	d.off += n
	return v, true
}

func (d *decoder) u32(what string) (uint32, bool) {
	at := d.off
	v, ok := d.uvarint(what)
	if ok && v > math.MaxUint32 {
		return 0, d.fail(at, "%s %d does not fit 32 bits", what, v)
	}
	return uint32(v), ok
}

// count reads a count of items that take at least minLen bytes each.
func (d *decoder) count(what string, minLen int) (int, bool) {
	at := d.off
	v, ok := d.uvarint(what)
	if !ok {
		return 0, false
	}
	if v > uint64(d.remaining()/minLen) {
		return 0, d.fail(at, "%s %d exceeds what the %d remaining bytes can hold", what, v, d.remaining())
	}
	return int(v), true
}

func (d *decoder) readByte(what string) (byte, bool) {
	if d.off >= len(d.buf) {
		return 0, d.fail(d.off, "truncated (%s)", what)
	}
	c := d.buf[d.off]
	d.off++
	return c, true
}

func (d *decoder) flag(what string) (bool, bool) {
	at := d.off
	c, ok := d.readByte(what)
	if !ok {
		return false, false
	}
	if c > 1 {
		return false, d.fail(at, "%s is %d, want 0 or 1", what, c)
	}
	return c == 1, true
}

// str reads a length-prefixed string of the dictionary.
func (d *decoder) str(what string, maxLen int) (string, bool) {
	at := d.off
	n, ok := d.uvarint(what)
	if !ok {
		return "", false
	}
	if n > uint64(maxLen) {
		return "", d.fail(at, "%s has %d bytes, the format allows %d", what, n, maxLen)
	}
	if n > uint64(d.remaining()) {
		return "", d.fail(at, "%s of %d bytes overruns the dictionary", what, n)
	}
	s := d.dict[d.off-d.dictOff : d.off-d.dictOff+int(n)]
	d.off += int(n)
	return s, true
}

func (d *decoder) message(kind byte) *change.Batch {
	epoch, ok := d.uvarint("epoch")
	if !ok {
		return nil
	}
	switch kind {
	case kindRun:
		b := new(change.Batch)
		b.Epoch = epoch
		if !d.dictionary(b, true) {
			return nil
		}
		n, ok := d.count("transaction count", minTxnLen)
		if !ok {
			return nil
		}
		if n == 0 {
			d.fail(d.off-1, "a run of no transactions")
			return nil
		}
		if !d.totals(n) {
			return nil
		}
		b.Txns = make([]change.Txn, n)
		if !d.txns(b.Txns) {
			return nil
		}
		return b
	case kindChunk:
		m := new(struct {
			b change.Batch
			c change.Chunk
			t [1]change.Txn
		})
		m.b.Epoch = epoch
		if !d.dictionary(&m.b, true) {
			return nil
		}
		if m.c.Index, ok = d.u32("chunk index"); !ok {
			return nil
		}
		if m.c.Final, ok = d.flag("final flag"); !ok {
			return nil
		}
		if !d.totals(1) || !d.txns(m.t[:]) {
			return nil
		}
		m.b.Chunk, m.b.Txns = &m.c, m.t[:]
		return &m.b
	case kindHeartbeat:
		m := new(struct {
			b change.Batch
			h change.Heartbeat
		})
		m.b.Epoch = epoch
		if !d.dictionary(&m.b, false) {
			return nil
		}
		walEnd, ok := d.uvarint("WAL end")
		if !ok {
			return nil
		}
		last, ok := d.uvarint("last LSN")
		if !ok {
			return nil
		}
		t, ok := d.varint("heartbeat time")
		if !ok {
			return nil
		}
		m.h = change.Heartbeat{WALEnd: change.LSN(walEnd), LastLSN: change.LSN(last), Time: time.UnixMicro(t).UTC()}
		m.b.Heartbeat = &m.h
		return &m.b
	}
	d.fail(headerLen-1, "unknown message kind %#02x", kind)
	return nil
}

// dictionary reads the origin and the relation table.
func (d *decoder) dictionary(b *change.Batch, relsAllowed bool) bool {
	at := d.off
	n, ok := d.count("dictionary length", 1)
	if !ok {
		return false
	}
	if n == 0 {
		return d.fail(at, "empty dictionary")
	}
	// Parse the dictionary with buf cut at its end, so no read strays into
	// the body.
	body := d.buf
	dictEnd := d.off + n
	d.buf = body[:dictEnd]
	defer func() { d.buf = body }()
	d.dictOff = d.off
	d.dict = string(d.buf[d.off:dictEnd])
	if b.Origin, ok = d.str("origin", maxNameLen); !ok {
		return false
	}
	if b.Origin == "" {
		return d.fail(at, "no origin")
	}
	nRels, ok := d.count("relation count", minRelationLen)
	if !ok {
		return false
	}
	if nRels > 0 && !relsAllowed {
		return d.fail(d.off-1, "a heartbeat with %d relations", nRels)
	}
	nCols, ok := d.count("column count", minColumnLen)
	if !ok {
		return false
	}
	d.rels = make([]change.Relation, nRels)
	cols := make([]change.Column, nCols)
	for i := range d.rels {
		r := &d.rels[i]
		if r.Schema, ok = d.str("schema", maxNameLen); !ok {
			return false
		}
		if r.Name, ok = d.str("relation name", maxNameLen); !ok {
			return false
		}
		at := d.off
		if r.Identity, ok = d.readByte("replica identity"); !ok {
			return false
		}
		if !validIdentity(r.Identity) {
			return d.fail(at, "relation %v has unknown replica identity %#02x", r, r.Identity)
		}
		at = d.off
		nc, ok := d.count("relation column count", minColumnLen)
		if !ok {
			return false
		}
		if nc > len(cols) {
			return d.fail(at, "relation %v has %d columns, more than the %d left of those declared", r, nc, len(cols))
		}
		if nc > 0 { // a relation without columns keeps nil Columns
			r.Columns, cols = cols[:nc:nc], cols[nc:]
		}
		for j := range r.Columns {
			col := &r.Columns[j]
			if col.Name, ok = d.str("column name", maxNameLen); !ok {
				return false
			}
			if col.Type, ok = d.str("column type", maxTypeLen); !ok {
				return false
			}
			if col.TypeOID, ok = d.u32("type OID"); !ok {
				return false
			}
			if col.Key, ok = d.flag("key flag"); !ok {
				return false
			}
		}
	}
	if len(cols) != 0 {
		return d.fail(d.off, "dictionary declares %d more columns than its relations have", len(cols))
	}
	if d.off != dictEnd {
		return d.fail(d.off, "dictionary ends at byte %d, its length says %d", d.off, dictEnd)
	}
	return true
}

// totals reads the declared number of changes and values of a message of
// nTxns transactions and allocates their backing arrays, once it has checked
// that the remaining bytes can hold that much: transactions, changes and
// values each take bytes of their own.
func (d *decoder) totals(nTxns int) bool {
	at := d.off
	nChanges, ok := d.count("change total", minChangeLen)
	if !ok {
		return false
	}
	nVals, ok := d.count("value total", minValueLen)
	if !ok {
		return false
	}
	if need := minTxnLen*nTxns + minChangeLen*nChanges + minValueLen*nVals; need > d.remaining() {
		return d.fail(at, "%d transactions, %d changes and %d values need at least %d bytes, %d remain",
			nTxns, nChanges, nVals, need, d.remaining())
	}
	d.changes = make([]change.Change, nChanges)
	d.vals = make([]change.Value, nVals)
	return true
}

func (d *decoder) txns(txns []change.Txn) bool {
	var lsn, micros uint64
	for i := range txns {
		t := &txns[i]
		var ok bool
		if t.Xid, ok = d.u32("xid"); !ok {
			return false
		}
		dl, ok := d.varint("commit LSN")
		if !ok {
			return false
		}
		dp, ok := d.varint("previous LSN")
		if !ok {
			return false
		}
		dt, ok := d.varint("commit time")
		if !ok {
			return false
		}
		t.PrevLSN = change.LSN(lsn + uint64(dp))
		lsn += uint64(dl)
		micros += uint64(dt)
		t.LSN = change.LSN(lsn)
		t.CommitTime = time.UnixMicro(int64(micros)).UTC()
		at := d.off
		n, ok := d.count("change count", minChangeLen)
		if !ok {
			return false
		}
		if n > len(d.changes) {
			return d.fail(at, "txn %d has %d changes, more than the %d left of those declared", i, n, len(d.changes))
		}
		if n > 0 {
			t.Changes, d.changes = d.changes[:n:n], d.changes[n:]
		}
		for j := range t.Changes {
			if !d.change(&t.Changes[j]) {
				return false
			}
		}
	}
	if len(d.changes) != 0 {
		return d.fail(d.off, "message declares %d more changes than it has", len(d.changes))
	}
	if len(d.vals) != 0 {
		return d.fail(d.off, "message declares %d more values than it has", len(d.vals))
	}
	return true
}

func (d *decoder) relation(what string) (*change.Relation, bool) {
	at := d.off
	i, ok := d.uvarint(what)
	if !ok {
		return nil, false
	}
	if i >= uint64(len(d.rels)) {
		return nil, d.fail(at, "%s %d out of range (the message has %d relations)", what, i, len(d.rels))
	}
	return &d.rels[i], true
}

func (d *decoder) change(c *change.Change) bool {
	at := d.off
	op, ok := d.readByte("op")
	if !ok {
		return false
	}
	c.Op = change.Op(op)
	switch c.Op {
	case change.Insert:
		if c.Rel, ok = d.relation("relation"); !ok {
			return false
		}
		c.New, ok = d.tuple(c.Rel)
		return ok
	case change.Update:
		if c.Rel, ok = d.relation("relation"); !ok {
			return false
		}
		hasOld, ok := d.flag("old tuple flag")
		if !ok {
			return false
		}
		if hasOld {
			if c.Old, ok = d.tuple(c.Rel); !ok {
				return false
			}
		}
		c.New, ok = d.tuple(c.Rel)
		return ok
	case change.Delete:
		if c.Rel, ok = d.relation("relation"); !ok {
			return false
		}
		c.Old, ok = d.tuple(c.Rel)
		return ok
	case change.Truncate:
		n, ok := d.count("truncated relation count", 1)
		if !ok {
			return false
		}
		if n == 0 {
			return d.fail(at, "truncate of no relations")
		}
		c.Truncated = make([]*change.Relation, n)
		for i := range c.Truncated {
			if c.Truncated[i], ok = d.relation("truncated relation"); !ok {
				return false
			}
		}
		at := d.off
		opts, ok := d.readByte("truncate options")
		if !ok {
			return false
		}
		if opts&^(truncateCascade|truncateRestartIdentity) != 0 {
			return d.fail(at, "unknown truncate options %#02x", opts)
		}
		c.Cascade = opts&truncateCascade != 0
		c.RestartIdentity = opts&truncateRestartIdentity != 0
		return true
	}
	return d.fail(at, "unknown op %#02x", op)
}

func (d *decoder) tuple(rel *change.Relation) ([]change.Value, bool) {
	at := d.off
	n, ok := d.uvarint("tuple column count")
	if !ok {
		return nil, false
	}
	if n != uint64(len(rel.Columns)) {
		return nil, d.fail(at, "tuple of %v has %d values, the relation has %d columns", rel, n, len(rel.Columns))
	}
	if n > uint64(len(d.vals)) {
		return nil, d.fail(at, "tuple of %d values, more than the %d left of those declared", n, len(d.vals))
	}
	vals := d.vals[:n:n]
	d.vals = d.vals[n:]
	buf := d.buf
	for i := range vals {
		if d.off >= len(buf) {
			return nil, d.fail(d.off, "truncated tuple of %v", rel)
		}
		k := change.Kind(buf[d.off])
		vals[i].Kind = k
		d.off++
		switch k {
		case change.Null, change.Unchanged:
		case change.Text, change.Binary:
			at := d.off
			l, ok := d.uvarint("value length")
			if !ok {
				return nil, false
			}
			if l > uint64(len(buf)-d.off) || l > maxValueLen {
				return nil, d.fail(at, "value of %d bytes overruns the message", l)
			}
			end := d.off + int(l)
			vals[i].Data = buf[d.off:end:end]
			d.off = end
		default:
			return nil, d.fail(d.off-1, "unknown value kind %#02x in column %s of %v", byte(k), rel.Columns[i].Name, rel)
		}
	}
	return vals, true
}

// MsgID returns the Nats-Msg-Id of a batch published for cluster. It depends
// only on the cluster, the batch's origin and epoch, and its position: the
// first and last commit LSN of a run, the commit LSN and index of a chunk,
// the WAL end and time of a heartbeat. A republished batch therefore gets
// the same id and JetStream drops it within its duplicate window; a batch
// that covers a different LSN range gets a different id. Exactly-once apply
// does not rest on this (see docs/wire-format.md).
//
// The forms are, with LSNs in lower-case hex without the slash and bytes
// outside [A-Za-z0-9_-] of cluster and origin written %XX:
//
//	<cluster>.<origin>.<epoch>.<first LSN>-<last LSN>       run
//	<cluster>.<origin>.<epoch>.<commit LSN>.c<index>        chunk
//	<cluster>.<origin>.<epoch>.hb.<WAL end>.<unix micros>   heartbeat
func MsgID(cluster string, b *change.Batch) string {
	var arr [128]byte // on the stack for the usual short names
	buf := arr[:0]
	buf = appendIDPart(buf, cluster)
	buf = append(buf, '.')
	buf = appendIDPart(buf, b.Origin)
	buf = append(buf, '.')
	buf = strconv.AppendUint(buf, b.Epoch, 10)
	buf = append(buf, '.')
	switch {
	case b.Heartbeat != nil:
		buf = append(buf, "hb."...)
		buf = strconv.AppendUint(buf, uint64(b.Heartbeat.WALEnd), 16)
		buf = append(buf, '.')
		buf = strconv.AppendInt(buf, b.Heartbeat.Time.UnixMicro(), 10)
	case b.Chunk != nil:
		buf = strconv.AppendUint(buf, uint64(b.FirstLSN()), 16)
		buf = append(buf, ".c"...)
		buf = strconv.AppendUint(buf, uint64(b.Chunk.Index), 10)
	default:
		buf = strconv.AppendUint(buf, uint64(b.FirstLSN()), 16)
		buf = append(buf, '-')
		buf = strconv.AppendUint(buf, uint64(b.LastLSN()), 16)
	}
	return string(buf)
}

// appendIDPart escapes everything but [A-Za-z0-9_-], so the dots of the id
// stay unambiguous and the header value stays plain ASCII.
func appendIDPart(dst []byte, s string) []byte {
	const hex = "0123456789ABCDEF"
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '-', c == '_':
			dst = append(dst, c)
		default:
			dst = append(dst, '%', hex[c>>4], hex[c&0xF])
		}
	}
	return dst
}
