package bitmap

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math/bits"
	"sync/atomic"
)

// Bitmap is one bit per grain of a volume. The grains are [i*GrainSize, (i+1)*GrainSize) from
// offset 0; the last one is short when the volume size is not a multiple of the grain size.
//
// Set, Clear, Test, Count and the searches are safe for concurrent use: each bit lives in a
// uint64 word updated with atomic operations, and Count is kept exactly by whoever flips a bit.
// A search running concurrently with updates sees every bit either before or after its update.
// Fill, ClearAll and UnmarshalBinary change many words; they are safe against concurrent
// readers (each word is replaced atomically) but the caller must not run them concurrently with
// other writers if it needs Count and the bits to agree at every instant.
type Bitmap struct {
	volumeSize int64
	grainSize  int64
	n          int // number of grains
	words      []atomic.Uint64
	count      atomic.Int64
}

// New returns an all-clear bitmap over a volume of volumeSize bytes in grains of grainSize
// bytes. It panics if grainSize is not positive or volumeSize is negative: those are
// programming errors, like a negative length in make.
func New(volumeSize, grainSize int64) *Bitmap {
	if grainSize <= 0 || volumeSize < 0 {
		panic(fmt.Sprintf("bitmap.New(%d, %d): bad geometry", volumeSize, grainSize))
	}
	n := int((volumeSize + grainSize - 1) / grainSize)
	return &Bitmap{
		volumeSize: volumeSize,
		grainSize:  grainSize,
		n:          n,
		words:      make([]atomic.Uint64, (n+63)/64),
	}
}

// Len is the number of grains.
func (b *Bitmap) Len() int { return b.n }

// GrainSize is the grain size in bytes.
func (b *Bitmap) GrainSize() int64 { return b.grainSize }

// VolumeSize is the size in bytes of the volume the bitmap covers.
func (b *Bitmap) VolumeSize() int64 { return b.volumeSize }

// Grain returns the grain that holds byte offset off.
func (b *Bitmap) Grain(off int64) int { return int(off / b.grainSize) }

// Extent returns grain g's byte range: its offset and its length (short for a short last grain).
func (b *Bitmap) Extent(g int) (off, length int64) {
	off = int64(g) * b.grainSize
	return off, min(b.grainSize, b.volumeSize-off)
}

func (b *Bitmap) check(g int) {
	if g < 0 || g >= b.n {
		panic(fmt.Sprintf("bitmap: grain %d out of range [0, %d)", g, b.n))
	}
}

// Set sets grain g's bit and reports whether it was clear before.
func (b *Bitmap) Set(g int) bool {
	b.check(g)
	mask := uint64(1) << (g % 64)
	if b.words[g/64].Or(mask)&mask != 0 {
		return false
	}
	b.count.Add(1)
	return true
}

// Clear clears grain g's bit and reports whether it was set before.
func (b *Bitmap) Clear(g int) bool {
	b.check(g)
	mask := uint64(1) << (g % 64)
	if b.words[g/64].And(^mask)&mask == 0 {
		return false
	}
	b.count.Add(-1)
	return true
}

// Test reports whether grain g's bit is set.
func (b *Bitmap) Test(g int) bool {
	b.check(g)
	return b.words[g/64].Load()&(uint64(1)<<(g%64)) != 0
}

// Count is the number of set bits.
func (b *Bitmap) Count() int { return int(b.count.Load()) }

// Full reports whether every bit is set.
func (b *Bitmap) Full() bool { return b.Count() == b.n }

// lastMask is the mask of the valid bits in the last word.
func (b *Bitmap) lastMask() uint64 {
	if r := b.n % 64; r != 0 {
		return uint64(1)<<r - 1
	}
	return ^uint64(0)
}

// NextClear returns the lowest clear grain ≥ from, or -1 if there is none.
func (b *Bitmap) NextClear(from int) int { return b.next(from, true) }

// NextSet returns the lowest set grain ≥ from, or -1 if there is none.
func (b *Bitmap) NextSet(from int) int { return b.next(from, false) }

// PrevClear returns the highest clear grain ≤ from, or -1 if there is none. Cleaning walks a
// bitmap from the top with it.
func (b *Bitmap) PrevClear(from int) int { return b.prev(from, true) }

// PrevSet returns the highest set grain ≤ from, or -1 if there is none.
func (b *Bitmap) PrevSet(from int) int { return b.prev(from, false) }

func (b *Bitmap) word(i int, clear bool) uint64 {
	w := b.words[i].Load()
	if clear {
		w = ^w
	}
	if i == len(b.words)-1 {
		w &= b.lastMask()
	}
	return w
}

func (b *Bitmap) next(from int, clear bool) int {
	if from < 0 {
		from = 0
	}
	if from >= b.n {
		return -1
	}
	i := from / 64
	w := b.word(i, clear) &^ (uint64(1)<<(from%64) - 1)
	for {
		if w != 0 {
			return i*64 + bits.TrailingZeros64(w)
		}
		i++
		if i >= len(b.words) {
			return -1
		}
		w = b.word(i, clear)
	}
}

func (b *Bitmap) prev(from int, clear bool) int {
	if from >= b.n {
		from = b.n - 1
	}
	if from < 0 {
		return -1
	}
	i := from / 64
	w := b.word(i, clear)
	if r := from % 64; r != 63 {
		w &= uint64(1)<<(r+1) - 1
	}
	for {
		if w != 0 {
			return i*64 + 63 - bits.LeadingZeros64(w)
		}
		i--
		if i < 0 {
			return -1
		}
		w = b.word(i, clear)
	}
}

// Fill sets every bit.
func (b *Bitmap) Fill() {
	for i := range b.words {
		m := ^uint64(0)
		if i == len(b.words)-1 {
			m = b.lastMask()
		}
		old := b.words[i].Swap(m)
		b.count.Add(int64(bits.OnesCount64(m) - bits.OnesCount64(old)))
	}
}

// ClearAll clears every bit.
func (b *Bitmap) ClearAll() {
	for i := range b.words {
		old := b.words[i].Swap(0)
		b.count.Add(-int64(bits.OnesCount64(old)))
	}
}

// Clone returns an independent copy.
func (b *Bitmap) Clone() *Bitmap {
	c := New(b.volumeSize, b.grainSize)
	for i := range b.words {
		c.words[i].Store(b.words[i].Load())
	}
	c.count.Store(b.count.Load())
	return c
}

// Encoding (little-endian): magic "FCBM", version byte, kind byte, uvarint volumeSize, uvarint
// grainSize, then for kind raw the words as 8-byte values, then a CRC-32C of everything before
// it. A bitmap that is all clear or all set (the common cases: just started, finished) encodes
// in a few bytes whatever its length.
const (
	magic       = "FCBM"
	version     = 1
	kindClear   = 0
	kindFull    = 1
	kindRaw     = 2
	maxHeader   = 4 + 1 + 1 + 2*binary.MaxVarintLen64
	checksumLen = 4
	// maxGrains bounds what UnmarshalBinary accepts (256 TiB in 64 KiB grains), so a corrupt
	// header cannot make it allocate without limit.
	maxGrains = 1 << 32
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrCorrupt is returned (wrapped) by UnmarshalBinary for data that is not a valid encoding.
var ErrCorrupt = errors.New("bitmap: corrupt encoding")

// MarshalBinary encodes the geometry and the bits, checksummed. Concurrent updates may or may
// not be included.
func (b *Bitmap) MarshalBinary() ([]byte, error) {
	buf := make([]byte, 0, maxHeader+checksumLen)
	buf = append(buf, magic...)
	buf = append(buf, version, 0)
	buf = binary.AppendUvarint(buf, uint64(b.volumeSize))
	buf = binary.AppendUvarint(buf, uint64(b.grainSize))
	words := make([]uint64, len(b.words))
	ones := 0
	for i := range b.words {
		words[i] = b.words[i].Load()
		ones += bits.OnesCount64(words[i])
	}
	switch ones {
	case 0:
		buf[5] = kindClear
	case b.n:
		buf[5] = kindFull
	default:
		buf[5] = kindRaw
		for _, w := range words {
			buf = binary.LittleEndian.AppendUint64(buf, w)
		}
	}
	return binary.LittleEndian.AppendUint32(buf, crc32.Checksum(buf, castagnoli)), nil
}

// UnmarshalBinary replaces b with the decoded bitmap, geometry included. On error b is
// unchanged.
func (b *Bitmap) UnmarshalBinary(data []byte) error {
	if len(data) < 6+checksumLen || string(data[:4]) != magic {
		return fmt.Errorf("%w: bad header", ErrCorrupt)
	}
	body, sum := data[:len(data)-checksumLen], binary.LittleEndian.Uint32(data[len(data)-checksumLen:])
	if crc32.Checksum(body, castagnoli) != sum {
		return fmt.Errorf("%w: checksum mismatch", ErrCorrupt)
	}
	if body[4] != version {
		return fmt.Errorf("%w: version %d", ErrCorrupt, body[4])
	}
	kind := body[5]
	rest := body[6:]
	vs, n := binary.Uvarint(rest)
	if n <= 0 {
		return fmt.Errorf("%w: volume size", ErrCorrupt)
	}
	rest = rest[n:]
	gs, n := binary.Uvarint(rest)
	if n <= 0 {
		return fmt.Errorf("%w: grain size", ErrCorrupt)
	}
	rest = rest[n:]
	if gs == 0 || gs > 1<<62 || vs > 1<<62 || vs/gs >= maxGrains {
		return fmt.Errorf("%w: geometry %d/%d", ErrCorrupt, vs, gs)
	}
	if grains := (vs + gs - 1) / gs; kind == kindRaw && uint64(len(rest)) != 8*((grains+63)/64) {
		return fmt.Errorf("%w: %d bytes of bits for %d grains", ErrCorrupt, len(rest), grains)
	}
	nb := New(int64(vs), int64(gs))
	switch kind {
	case kindClear:
		if len(rest) != 0 {
			return fmt.Errorf("%w: trailing bytes", ErrCorrupt)
		}
	case kindFull:
		if len(rest) != 0 {
			return fmt.Errorf("%w: trailing bytes", ErrCorrupt)
		}
		nb.Fill()
	case kindRaw:
		if len(rest) != 8*len(nb.words) {
			return fmt.Errorf("%w: %d bytes of bits for %d grains", ErrCorrupt, len(rest), nb.n)
		}
		var ones int64
		for i := range nb.words {
			w := binary.LittleEndian.Uint64(rest[8*i:])
			if i == len(nb.words)-1 && w&^nb.lastMask() != 0 {
				return fmt.Errorf("%w: bits beyond the last grain", ErrCorrupt)
			}
			nb.words[i].Store(w)
			ones += int64(bits.OnesCount64(w))
		}
		nb.count.Store(ones)
	default:
		return fmt.Errorf("%w: kind %d", ErrCorrupt, kind)
	}
	b.volumeSize, b.grainSize, b.n = nb.volumeSize, nb.grainSize, nb.n
	b.words = nb.words
	b.count.Store(nb.count.Load())
	return nil
}
