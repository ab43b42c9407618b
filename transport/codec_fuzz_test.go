package transport

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"testing"
)

// FuzzDecode feeds Decode arbitrary bytes, starting from the golden messages
// in testdata/wire. Decode must never panic; whatever it accepts must encode,
// and decode again to an equal batch with the same message id, and the
// encoding must be stable.
//
// Almost every mutation breaks the CRC, which would keep the fuzzer at the
// checksum; so each input is also tried with its last four bytes replaced by
// the right CRC, which lets mutations reach the parser.
func FuzzDecode(f *testing.F) {
	files, err := filepath.Glob(filepath.Join(wireDir, "*.bin"))
	if err != nil {
		f.Fatal(err)
	}
	if len(files) == 0 {
		f.Fatalf("no seeds in %s (run go test -run TestGolden -update)", wireDir)
	}
	for _, name := range files {
		msg, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(msg)
	}
	f.Add([]byte{})
	f.Add([]byte(magic))
	f.Fuzz(func(t *testing.T, data []byte) {
		checkDecode(t, data)
		if len(data) >= trailerLen {
			fixed := slices.Clone(data)
			end := len(fixed) - trailerLen
			binary.LittleEndian.PutUint32(fixed[end:], crc32.Checksum(fixed[:end], crc32.MakeTable(crc32.Castagnoli)))
			checkDecode(t, fixed)
		}
	})
}

func checkDecode(t *testing.T, data []byte) {
	t.Helper()
	b, err := Decode(data)
	if err != nil {
		checkDecodeError(t, err, data)
		return // rejecting is fine; panicking is not
	}
	enc, err := Encode(nil, b)
	if err != nil {
		t.Fatalf("Encode of a decoded batch: %v\n%s", err, dump(b))
	}
	again, err := Decode(enc)
	if err != nil {
		t.Fatalf("Decode of the re-encoded batch: %v", err)
	}
	if !reflect.DeepEqual(again, b) {
		t.Fatalf("round trip:\n got %s\nwant %s", dump(again), dump(b))
	}
	if MsgID("c", again) != MsgID("c", b) {
		t.Fatalf("MsgID changed in a round trip: %q, then %q", MsgID("c", b), MsgID("c", again))
	}
	enc2, err := Encode(nil, again)
	if err != nil || !bytes.Equal(enc2, enc) {
		t.Fatalf("encoding not stable: err=%v\n% x\n% x", err, enc, enc2)
	}
}
