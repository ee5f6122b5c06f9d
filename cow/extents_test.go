package cow

import (
	"bytes"
	"reflect"
	"testing"

	"fcnbd/internal/blockdev"
)

// Extents makes memFile sparse for the tests: a 4 KiB block of zeroes counts as a hole.
func (f *memFile) Extents(off, length int64) ([]blockdev.Extent, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return zeroBlockExtents(f.data, off, length), nil
}

// zeroBlockExtents describes data[off:off+length) with each 4 KiB block of zeroes as a hole.
func zeroBlockExtents(data []byte, off, length int64) []blockdev.Extent {
	var exts []blockdev.Extent
	for end := off + length; off < end; {
		n := min(end, (off/4096+1)*4096) - off
		b := off / 4096 * 4096
		zero := !bytes.ContainsFunc(data[b:min(b+4096, int64(len(data)))], func(r rune) bool { return r != 0 })
		exts = blockdev.AppendExtent(exts, blockdev.Extent{Length: n, Hole: zero})
		off += n
	}
	return exts
}

// TestExtentsThroughChain: a target's extents are its image's, whichever store holds each
// grain — its own for split grains, its source's (or further up a cascade) for the others —
// through host writes and trims on every volume of the chain.
func TestExtentsThroughChain(t *testing.T) {
	r, _ := seedRand(t)
	const size, grain = 1 << 20, 64 * kib
	g := newRig(t, 3, size, grain, r)
	for v, f := range g.files { // start sparse: every volume all zeroes
		clear(f.data)
		clear(g.model[v])
	}
	g.write(0, 0, bytes.Repeat([]byte{1}, 3*grain))
	g.write(0, 5*grain+100, []byte{2})
	g.start(g.spec(1, 0, 1))
	g.start(g.spec(2, 1, 2)) // cascade: 2 reads through 1, which reads through 0

	check := func(step string) {
		t.Helper()
		for v := range 3 {
			for _, rng := range [][2]int64{{0, size}, {grain/2 + 4096, 3*grain + 17}, {size - 5000, 5000}} {
				got, err := blockdev.Extents(g.devs[v], rng[0], rng[1])
				if err != nil {
					t.Fatalf("%s: vol %d: %v", step, v, err)
				}
				g.mu.Lock()
				want := zeroBlockExtents(g.model[v], rng[0], rng[1])
				g.mu.Unlock()
				if !reflect.DeepEqual(got, want) {
					t.Fatalf("%s: vol %d [%d,+%d): extents %v, want %v", step, v, rng[0], rng[1], got, want)
				}
			}
		}
	}
	check("after start")
	g.zero(0, 0, 2*grain, true) // source trimmed: the targets keep their images
	check("source trimmed")
	g.write(1, 7*grain, []byte{3}) // the middle target splits a grain that was a hole
	check("middle target written")
	g.zero(1, 2*grain, grain, true) // the middle target trims a grain its source holds
	check("middle target trimmed")
	g.write(2, 9*grain+4096, bytes.Repeat([]byte{4}, 4096))
	g.write(0, 12*grain, []byte{5})
	check("last target and source written")
	for range 50 {
		v := r.IntN(3)
		off := r.Int64N(size - 21*4096)
		if r.IntN(3) == 0 {
			g.zero(v, off/4096*4096, 4096*(1+r.Int64N(20)), true)
		} else {
			g.write(v, off, bytes.Repeat([]byte{byte(1 + r.IntN(200))}, 1+r.IntN(10000)))
		}
	}
	check("random writes and trims")
}
