package transport

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/xdcr/xdcr/replicator/change"
)

// compressedGolden is a compressed message kept to prove that what was
// written once stays readable; zstd's output may change between library
// versions, so the test compares the decoded batch, not the bytes.
const compressedGolden = "compressed-rows.bin"

// rowsBatch is a run of n inserts of text rows like the bench's bulk
// workload: compressible, as real rows are.
func rowsBatch(n int) *change.Batch {
	rel := &change.Relation{Schema: "public", Name: "bulk", Identity: change.IdentityDefault,
		Columns: []change.Column{{Name: "id", Type: "bigint", TypeOID: 20, Key: true}, {Name: "note", Type: "text", TypeOID: 25}}}
	b := &change.Batch{Origin: "dc-a", Epoch: 3}
	t := change.Txn{Xid: 77, LSN: 0x1000, CommitTime: time.Unix(1_800_000_000, 0).UTC()}
	for i := range n {
		note := strings.Repeat(strconv.FormatInt(int64(i)*7919%100_003, 16), 8)
		t.Changes = append(t.Changes, change.Change{Op: change.Insert, Rel: rel,
			New: []change.Value{{Kind: change.Text, Data: []byte(strconv.Itoa(i))}, {Kind: change.Text, Data: []byte(note)}}})
	}
	b.Txns = []change.Txn{t}
	return b
}

func zstdCompressor(t testing.TB) *compressor {
	t.Helper()
	c, err := newCompressor(CompressZstd)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestCompressRoundTrip: a message of rows is compressed (flag set, far
// smaller), decodes to the batch it was made of, declares its plain size,
// and reads the same through one Decoder many times.
func TestCompressRoundTrip(t *testing.T) {
	want := rowsBatch(2000)
	plain := mustEncode(t, want)
	msg := zstdCompressor(t).compress(plain)
	if msg[len(magic)+1] != flagCompressed {
		t.Fatalf("a %d-byte message of rows was not compressed", len(plain))
	}
	if len(msg) > len(plain)/2 {
		t.Errorf("compressed %d bytes to %d; want well under half", len(plain), len(msg))
	}
	if got := plainLen(msg); got != len(plain)-trailerLen {
		t.Errorf("plainLen = %d, want %d", got, len(plain)-trailerLen)
	}
	if got := plainLen(plain); got != len(plain) {
		t.Errorf("plainLen of a plain message = %d, want %d", got, len(plain))
	}
	var d Decoder
	for range 3 {
		got, err := d.Decode(msg)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("round trip:\n got %s\nwant %s", dump(got), dump(want))
		}
	}
	// the plain message still decodes through the same Decoder
	if got, err := d.Decode(plain); err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("plain message after compressed ones: %v", err)
	}
	// every codec case survives the compressor, compressed or not
	for _, tc := range codecCases() {
		want := tc.batch()
		got, err := d.Decode(zstdCompressor(t).compress(mustEncode(t, want)))
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Fatalf("%s: err %v\n got %s\nwant %s", tc.name, err, dump(got), dump(want))
		}
	}
}

// TestCompressKeepsPlain: small messages, incompressible ones, and every
// message of a publisher without compression go as Encode wrote them.
func TestCompressKeepsPlain(t *testing.T) {
	z := zstdCompressor(t)
	hb := mustEncode(t, caseBatch(t, "heartbeat"))
	if got := z.compress(hb); !bytes.Equal(got, hb) || &got[0] != &hb[0] {
		t.Error("a heartbeat was compressed")
	}
	noise := rowsBatch(1)
	v := make([]byte, 64<<10)
	r := rand.NewChaCha8([32]byte{1})
	_, _ = r.Read(v)
	noise.Txns[0].Changes[0].New[1] = change.Value{Kind: change.Binary, Data: v}
	msg := mustEncode(t, noise)
	if got := z.compress(msg); !bytes.Equal(got, msg) {
		t.Errorf("64 KiB of random bytes were compressed to %d of %d bytes", len(got), len(msg))
	}
	none, err := newCompressor(CompressNone)
	if err != nil {
		t.Fatal(err)
	}
	rows := mustEncode(t, rowsBatch(2000))
	if got := none.compress(rows); !bytes.Equal(got, rows) {
		t.Error("compression none compressed a message")
	}
	if _, err := newCompressor("gzip"); err == nil || !strings.Contains(err.Error(), `unknown compression "gzip"`) {
		t.Errorf("newCompressor(gzip) = %v", err)
	}
}

// compressedMsg builds a compressed message by hand: the header of plain
// with the flag set, the declared plain length, frame, CRC.
func compressedMsg(t *testing.T, plain []byte, declared uint64, frame []byte) []byte {
	t.Helper()
	m := slices.Clone(plain[:headerLen])
	m[len(magic)+1] = flagCompressed
	m = binary.AppendUvarint(m, declared)
	m = append(m, frame...)
	return binary.LittleEndian.AppendUint32(m, crc32.Checksum(m, castagnoli))
}

// TestDecodeMalformedCompressed: damage to a compressed message is
// refused with a reason, never decoded into something else.
func TestDecodeMalformedCompressed(t *testing.T) {
	plain := mustEncode(t, rowsBatch(500))
	body := plain[headerLen : len(plain)-trailerLen]
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer enc.Close()
	frame := enc.EncodeAll(body, nil)
	bad := append(slices.Clone(body), 0) // a byte after the last change
	tests := []struct {
		name string
		msg  []byte
		want string
	}{
		{"valid", compressedMsg(t, plain, uint64(len(body)), frame), ""},
		{"declares more", compressedMsg(t, plain, uint64(len(body))+1, frame), "holds " + strconv.Itoa(len(body)) + " plain bytes, its length says"},
		{"declares less", compressedMsg(t, plain, uint64(len(body))-1, frame), "compressed body"},
		{"declares too much", compressedMsg(t, plain, maxPlainBody+1, frame), "the format allows 67108864"},
		{"no length", compressedMsg(t, plain, 0, nil)[:headerLen], "truncated header"},
		{"truncated message", compressedMsg(t, plain, 0, nil)[:headerLen+1], "truncated header"},
		{"overlong length", func() []byte {
			m := append(slices.Clone(plain[:headerLen]), bytes.Repeat([]byte{0x80}, 11)...)
			m[len(magic)+1] = flagCompressed
			return binary.LittleEndian.AppendUint32(m, crc32.Checksum(m, castagnoli))
		}(), "overlong varint (plain body length)"},
		{"truncated frame", compressedMsg(t, plain, uint64(len(body)), frame[:len(frame)/2]), "compressed body"},
		{"not zstd", compressedMsg(t, plain, uint64(len(body)), body), "compressed body"},
		{"bad plain body", compressedMsg(t, plain, uint64(len(bad)), enc.EncodeAll(bad, nil)), "decompressed body, byte " + strconv.Itoa(headerLen+len(body)) + ": 1 bytes of trailing garbage"},
		{"crc", func() []byte {
			m := compressedMsg(t, plain, uint64(len(body)), frame)
			m[len(m)-8] ^= 0x10
			return m
		}(), "checksum mismatch"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var d Decoder
			b, err := d.Decode(tc.msg)
			if tc.want == "" {
				if err != nil || !reflect.DeepEqual(b, rowsBatch(500)) {
					t.Fatalf("valid message: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("decoded: %s", dump(b))
			}
			checkDecodeError(t, err, tc.msg)
			if errors.Is(err, ErrUnsupportedVersion) {
				t.Errorf("%v is reported as unsupported, not malformed", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q, want it to contain %q", err, tc.want)
			}
		})
	}
}

// TestDecodeCompressedBitFlips: every flipped bit of a compressed message
// is caught (by the checksum, before anything is decompressed).
func TestDecodeCompressedBitFlips(t *testing.T) {
	msg := zstdCompressor(t).compress(mustEncode(t, rowsBatch(200)))
	var d Decoder
	for i := range len(msg) * 8 {
		m := slices.Clone(msg)
		m[i/8] ^= 1 << (i % 8)
		if b, err := d.Decode(m); err == nil {
			t.Fatalf("bit %d flipped: decoded %s", i, dump(b))
		} else {
			checkDecodeError(t, err, m)
		}
	}
}

// TestCompressedGolden: a compressed message written by an earlier build
// still decodes to the same batch.
func TestCompressedGolden(t *testing.T) {
	path := filepath.Join(wireDir, compressedGolden)
	want := rowsBatch(300)
	if *update {
		if err := os.WriteFile(path, zstdCompressor(t).compress(mustEncode(t, want)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	golden, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -run TestCompressedGolden -update to create it)", err)
	}
	if golden[len(magic)+1] != flagCompressed {
		t.Fatalf("%s is not compressed", path)
	}
	got, err := Decode(golden)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Decode(golden):\n got %s\nwant %s", dump(got), dump(want))
	}
}
