package transport

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// Compressed messages (docs/wire-format.md, "Compressed messages") keep
// the header, with flagCompressed set, and the trailer; between them come
// the length of the plain body as a uvarint and one zstd frame holding the
// plain body. The trailer's CRC covers the compressed form, so a damaged
// message is refused before anything is decompressed.

// Compression says how a [Publisher] compresses messages.
type Compression string

const (
	// CompressNone publishes messages as Encode writes them.
	CompressNone Compression = "none"
	// CompressZstd compresses a message's body with zstd at its fastest
	// level when that saves at least an eighth of it.
	CompressZstd Compression = "zstd"
)

const (
	// minCompress is the smallest message worth compressing; heartbeats and
	// single small transactions go plain.
	minCompress = 512
	// maxPlainBody bounds the plain body of a compressed message: NATS's
	// largest max_payload. A larger message is never compressed, and a
	// compressed message that declares more is refused before anything is
	// allocated for it.
	maxPlainBody = 64 << 20
)

// compressor compresses encoded messages; a nil *compressor leaves them
// plain. Safe for concurrent use.
type compressor struct {
	z *zstd.Encoder
}

func newCompressor(c Compression) (*compressor, error) {
	switch c {
	case "", CompressNone:
		return nil, nil
	case CompressZstd:
		z, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest),
			zstd.WithEncoderConcurrency(1), zstd.WithLowerEncoderMem(true))
		if err != nil {
			return nil, fmt.Errorf("zstd encoder: %w", err)
		}
		return &compressor{z: z}, nil
	default:
		return nil, fmt.Errorf("unknown compression %q (want %q or %q)", c, CompressNone, CompressZstd)
	}
}

// compress returns the compressed form of msg, a message Encode wrote, or
// msg itself when it is small, too large, or compresses by less than an
// eighth.
func (c *compressor) compress(msg []byte) []byte {
	if c == nil || len(msg) < minCompress {
		return msg
	}
	body := msg[headerLen : len(msg)-trailerLen]
	if len(body) > maxPlainBody {
		return msg
	}
	limit := len(msg) - len(msg)/8
	out := make([]byte, 0, limit)
	out = append(out, msg[:headerLen]...)
	out[len(magic)+1] |= flagCompressed
	out = binary.AppendUvarint(out, uint64(len(body)))
	out = c.z.EncodeAll(body, out)
	if len(out)+trailerLen > limit {
		return msg
	}
	return binary.LittleEndian.AppendUint32(out, crc32.Checksum(out, castagnoli))
}

// decompressor holds the zstd decoder of a [Decoder], made at its first
// compressed message.
type decompressor struct {
	once sync.Once
	z    *zstd.Decoder
	err  error
}

// plain returns the plain form of compressed message data (checksum
// already verified): its header with the flag cleared, then the plain
// body, without a trailer.
func (dc *decompressor) plain(data []byte) ([]byte, *DecodeError) {
	end := len(data) - trailerLen
	n, k, derr := declaredPlain(data)
	if derr != nil {
		return nil, derr
	}
	dc.once.Do(func() {
		dc.z, dc.err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(maxPlainBody))
	})
	if dc.err != nil {
		return nil, &DecodeError{Offset: headerLen, Reason: "zstd decoder: " + dc.err.Error()}
	}
	out := make([]byte, headerLen, headerLen+n)
	copy(out, data[:headerLen])
	out[len(magic)+1] &^= flagCompressed
	out, err := dc.z.DecodeAll(data[headerLen+k:end], out)
	if err != nil {
		return nil, &DecodeError{Offset: headerLen + k, Reason: "compressed body does not decompress (zstd: " + err.Error() + ")"}
	}
	if got := len(out) - headerLen; got != n {
		return nil, &DecodeError{Offset: headerLen + k,
			Reason: fmt.Sprintf("compressed body holds %d plain bytes, its length says %d", got, n)}
	}
	return out, nil
}

// plainLen is the length of the plain form of message data: what a
// compressed message declares (header included), or len(data). It reads
// no further than the header, so it may be called before Decode; a
// malformed message gives len(data).
func plainLen(data []byte) int {
	if len(data) < headerLen+trailerLen || data[len(magic)+1] != flagCompressed {
		return len(data)
	}
	n, _, derr := declaredPlain(data)
	if derr != nil {
		return len(data)
	}
	return headerLen + n
}

// declaredPlain reads the plain body length a compressed message declares
// and the bytes that length took, refusing one above maxPlainBody.
func declaredPlain(data []byte) (n, k int, derr *DecodeError) {
	v, k := binary.Uvarint(data[headerLen : len(data)-trailerLen])
	if k <= 0 {
		return 0, 0, &DecodeError{Offset: headerLen, Reason: "truncated or overlong varint (plain body length)"}
	}
	if v > maxPlainBody {
		return 0, 0, &DecodeError{Offset: headerLen,
			Reason: fmt.Sprintf("compressed body declares %d plain bytes, the format allows %d", v, maxPlainBody)}
	}
	return int(v), k, nil
}
