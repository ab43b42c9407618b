package checkpoints

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

// FuzzDecodeCommand feeds DecodeCommand arbitrary bytes, starting from the
// golden commands in testdata/commands. DecodeCommand must never panic;
// whatever it accepts must encode, decode again to an equal command, and
// encode to the same bytes; Apply must take it without panicking and leave
// the state unchanged when it refuses it.
func FuzzDecodeCommand(f *testing.F) {
	files, err := filepath.Glob(filepath.Join("testdata", "commands", "*.json"))
	if err != nil {
		f.Fatal(err)
	}
	if len(files) == 0 {
		f.Fatal("no seeds in testdata/commands (run go test ./checkpoints -run TestCommandGolden -update)")
	}
	for _, name := range files {
		data, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add([]byte(`{"v":1,"op":"applied","at":"2026-11-27T11:00:00+01:00","applied":{"site":"dc-c","epoch":1,"origin":"dc-a","lsn":5,"commit_time":"0001-01-01T00:00:00Z","as_of":"2026-11-27T04:59:59.5-05:00","state":"streaming"}}`))
	f.Add([]byte(`{"v":2,"op":"promote"}`))
	f.Add([]byte(`{"v":1,"OP":"source","At":"2026-11-27T10:00:00Z","source":{"site":"dc-a","epoch":1,"state":"reconnecting","error":"\xff"}}`))
	f.Add([]byte(`null`))
	f.Add([]byte{})

	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := DecodeCommand(data)
		if err != nil {
			if !errors.Is(err, ErrInvalidCommand) && !errors.Is(err, ErrUnsupportedVersion) {
				t.Fatalf("DecodeCommand(%q): error %v wraps neither %v nor %v", data, err, ErrInvalidCommand, ErrUnsupportedVersion)
			}
			return // rejecting is fine; panicking is not
		}
		enc, err := EncodeCommand(c)
		if err != nil {
			t.Fatalf("EncodeCommand of a decoded command: %v\n%+v", err, c)
		}
		again, err := DecodeCommand(enc)
		if err != nil {
			t.Fatalf("DecodeCommand(EncodeCommand(c)): %v\n%s", err, enc)
		}
		if !reflect.DeepEqual(again, c) {
			t.Fatalf("round trip differs:\n got %+v\nwant %+v\nencoded %s", again, c, enc)
		}
		if enc2, err := EncodeCommand(again); err != nil || !bytes.Equal(enc2, enc) {
			t.Fatalf("encoding not stable: got %s, %v; want %s", enc2, err, enc)
		}

		s := newState(t, boot(), srcReport(1, 0x3000100, 0x3000200, 0x3000060, t0).Command(t0))
		before := s.Clone()
		if err := s.Apply(c); err != nil {
			assertUnchanged(t, s, before)
			return
		}
		snapshotRoundTrip(t, s)
	})
}
