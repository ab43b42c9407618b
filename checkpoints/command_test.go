package checkpoints

import (
	"bytes"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

// goldenCommands pin the Raft log format: testdata/commands/NAME.json is
// EncodeCommand of each. Changing a byte of them means old logs no longer
// read the same: that needs a new Version.
func goldenCommands() map[string]Command {
	return map[string]Command{
		"bootstrap": boot(),
		"source": SourceReport{
			Site: "dc-a", Epoch: 2, SentLSN: 0x3000060, WALLSN: 0x30000D8, LastCommitLSN: 0x3000028,
			LastCommitTime: at(-80 * time.Millisecond), State: StateStreaming,
		}.Command(t0),
		"applied": AppliedReport{
			Site: "dc-b", Epoch: 2, Origin: "dc-a", LSN: 0x3000028, CommitTime: at(-80 * time.Millisecond),
			AsOf: at(-time.Millisecond), State: StatePaused, Error: `relation "public.orders" has no column "note"`,
		}.Command(at(123456789 * time.Nanosecond)),
	}
}

func TestCommandGolden(t *testing.T) {
	for name, c := range goldenCommands() {
		t.Run(name, func(t *testing.T) {
			data, err := EncodeCommand(c)
			if err != nil {
				t.Fatalf("EncodeCommand: %v", err)
			}
			golden(t, "commands/"+name+".json", append(data, '\n'))
			got, err := DecodeCommand(data)
			if err != nil {
				t.Fatalf("DecodeCommand: %v", err)
			}
			if !reflect.DeepEqual(got, c) {
				t.Errorf("round trip:\n got %+v\nwant %+v", got, c)
			}
		})
	}
}

// TestCommandRoundTrip uses times as proposers make them: local zones and
// monotonic clock readings. They come back as the same instants in UTC, and
// the encoding is stable.
func TestCommandRoundTrip(t *testing.T) {
	zone := time.FixedZone("CET", 3600)
	now := time.Now().In(zone)
	for _, c := range []Command{
		Bootstrap{Cluster: "shop", Primary: "dc-b", Sites: []string{"dc-b", "dc-a"}}.Command(now),
		SourceReport{Site: "dc-a", Epoch: 7, SentLSN: 1<<63 + 5, WALLSN: 1<<64 - 1, LastCommitLSN: 1,
			LastCommitTime: now.Add(-time.Hour), State: StateCatchingUp, Error: "ünïcödé \"quoted\"\n"}.Command(now),
		AppliedReport{Site: "dc-b", Epoch: 1, Origin: "dc-a", LSN: 0x16B374D848, State: StateStarting}.Command(now),
	} {
		t.Run(c.Op, func(t *testing.T) {
			data, err := EncodeCommand(c)
			if err != nil {
				t.Fatalf("EncodeCommand: %v", err)
			}
			got, err := DecodeCommand(data)
			if err != nil {
				t.Fatalf("DecodeCommand(%s): %v", data, err)
			}
			if want := c.normalized(); !reflect.DeepEqual(got, want) {
				t.Errorf("round trip of %s:\n got %+v\nwant %+v", data, got, want)
			}
			if !got.At.Equal(c.At) || got.At.Location() != time.UTC {
				t.Errorf("At: got %v, want %v in UTC", got.At, c.At)
			}
			again, err := EncodeCommand(got)
			if err != nil {
				t.Fatalf("EncodeCommand again: %v", err)
			}
			if !bytes.Equal(again, data) {
				t.Errorf("encoding not stable:\n got %s\nwant %s", again, data)
			}
		})
	}
}

func TestEncodeCommand(t *testing.T) {
	c := srcReport(1, 0x100, 0x100, 0x80, t0).Command(t0)
	c.Version = 0
	data, err := EncodeCommand(c)
	if err != nil {
		t.Fatalf("EncodeCommand with version 0: %v", err)
	}
	if !bytes.HasPrefix(data, []byte(`{"v":1,`)) {
		t.Errorf("EncodeCommand with version 0: got %s, want version %d written", data, Version)
	}
	c.Source.State = StateDown
	if _, err := EncodeCommand(c); !errors.Is(err, ErrInvalidCommand) {
		t.Errorf("EncodeCommand of a report in state down: got %v, want %v", err, ErrInvalidCommand)
	}
	c = srcReport(1, 0x100, 0x100, 0x80, t0).Command(t0)
	c.Version = Version + 1
	if _, err := EncodeCommand(c); !errors.Is(err, ErrUnsupportedVersion) {
		t.Errorf("EncodeCommand of version %d: got %v, want %v", c.Version, err, ErrUnsupportedVersion)
	}
}

func TestDecodeCommandRefuses(t *testing.T) {
	const at = `"at":"2026-11-27T10:00:00Z"`
	const src = `"source":{"site":"dc-a","epoch":1,"sent_lsn":1,"wal_lsn":1,"last_commit_lsn":1,"last_commit_time":"2026-11-27T10:00:00Z","state":"streaming"}`
	for _, tc := range []struct {
		name string
		data string
		want error
	}{
		{"empty", ``, ErrInvalidCommand},
		{"not JSON", `source dc-a 0/3000060`, ErrInvalidCommand},
		{"null", `null`, ErrInvalidCommand},
		{"array", `[1]`, ErrInvalidCommand},
		{"no version", `{"op":"source",` + at + `,` + src + `}`, ErrInvalidCommand},
		{"version not a number", `{"v":"1","op":"source",` + at + `,` + src + `}`, ErrInvalidCommand},
		{"version 0", `{"v":0,"op":"source",` + at + `,` + src + `}`, ErrUnsupportedVersion},
		{"newer version", `{"v":2,"op":"source",` + at + `,` + src + `}`, ErrUnsupportedVersion},
		{"newer version with new fields", `{"v":2,"op":"promote",` + at + `,"promote":{"site":"dc-b"}}`, ErrUnsupportedVersion},
		{"negative version", `{"v":-1}`, ErrUnsupportedVersion},
		{"unknown op", `{"v":1,"op":"promote",` + at + `,` + src + `}`, ErrInvalidCommand},
		{"no op", `{"v":1,` + at + `,` + src + `}`, ErrInvalidCommand},
		{"missing payload", `{"v":1,"op":"source",` + at + `}`, ErrInvalidCommand},
		{"null payload", `{"v":1,"op":"source",` + at + `,"source":null}`, ErrInvalidCommand},
		{"payload of another op", `{"v":1,"op":"applied",` + at + `,` + src + `}`, ErrInvalidCommand},
		{"unknown field", `{"v":1,"op":"source",` + at + `,` + src + `,"extra":1}`, ErrInvalidCommand},
		{"unknown field in payload", `{"v":1,"op":"source",` + at + `,"source":{"site":"dc-a","epoch":1,"state":"streaming","x":1}}`, ErrInvalidCommand},
		{"trailing data", `{"v":1,"op":"source",` + at + `,` + src + `} {}`, ErrInvalidCommand},
		{"no time", `{"v":1,"op":"source",` + src + `}`, ErrInvalidCommand},
		{"time out of range in UTC", `{"v":1,"op":"source","at":"0000-01-01T00:00:00+01:00",` + src + `}`, ErrInvalidCommand},
		{"negative LSN", `{"v":1,"op":"source",` + at + `,` + strings.Replace(src, `"sent_lsn":1`, `"sent_lsn":-1`, 1) + `}`, ErrInvalidCommand},
		{"LSN in text form", `{"v":1,"op":"source",` + at + `,` + strings.Replace(src, `"sent_lsn":1`, `"sent_lsn":"0/1"`, 1) + `}`, ErrInvalidCommand},
		{"derived state", `{"v":1,"op":"source",` + at + `,` + strings.Replace(src, `streaming`, `down`, 1) + `}`, ErrInvalidCommand},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := DecodeCommand([]byte(tc.data))
			if !errors.Is(err, tc.want) {
				t.Fatalf("DecodeCommand(%s): got %+v, %v; want error %v", tc.data, c, err, tc.want)
			}
		})
	}
}

func TestDecodeCommandAcceptsLocalOffsets(t *testing.T) {
	data := `{"v":1,"op":"applied","at":"2026-11-27T11:00:00+01:00","applied":{"site":"dc-b","epoch":1,"origin":"dc-a","lsn":5,` +
		`"commit_time":"2026-11-27T04:59:59.5-05:00","as_of":"0001-01-01T00:00:00Z","state":"streaming"}}`
	c, err := DecodeCommand([]byte(data))
	if err != nil {
		t.Fatal(err)
	}
	want := AppliedReport{Site: "dc-b", Epoch: 1, Origin: "dc-a", LSN: 5, CommitTime: at(-500 * time.Millisecond), State: StateStreaming}.Command(t0)
	if !reflect.DeepEqual(c, want) {
		t.Errorf("got %+v, want %+v", c, want)
	}
}
