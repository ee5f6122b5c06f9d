package bitmap

import (
	"errors"
	"math/rand/v2"
	"sync"
	"testing"
)

func TestGeometry(t *testing.T) {
	for _, tc := range []struct {
		name            string
		size, grain     int64
		grains          int
		lastOff, lastLn int64
	}{
		{"exact", 1 << 20, 64 << 10, 16, 15 * 64 << 10, 64 << 10},
		{"short last", 1<<20 + 4096, 64 << 10, 17, 1 << 20, 4096},
		{"one short", 4096, 256 << 10, 1, 0, 4096},
		{"empty", 0, 256 << 10, 0, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := New(tc.size, tc.grain)
			if b.Len() != tc.grains {
				t.Fatalf("Len = %d, want %d", b.Len(), tc.grains)
			}
			if tc.grains == 0 {
				return
			}
			off, ln := b.Extent(b.Len() - 1)
			if off != tc.lastOff || ln != tc.lastLn {
				t.Fatalf("last extent = %d+%d, want %d+%d", off, ln, tc.lastOff, tc.lastLn)
			}
			if g := b.Grain(tc.size - 1); g != tc.grains-1 {
				t.Fatalf("Grain(last byte) = %d", g)
			}
		})
	}
}

func TestSetClearCount(t *testing.T) {
	b := New(200*4096, 4096)
	if !b.Set(3) || b.Set(3) {
		t.Fatal("Set must report the change once")
	}
	b.Set(199)
	b.Set(64)
	if b.Count() != 3 || !b.Test(64) || b.Test(65) {
		t.Fatalf("count %d", b.Count())
	}
	if !b.Clear(3) || b.Clear(3) || b.Count() != 2 {
		t.Fatal("Clear must report the change once")
	}
	b.Fill()
	if b.Count() != 200 || !b.Full() || b.NextClear(0) != -1 || b.PrevClear(199) != -1 {
		t.Fatalf("after Fill count %d", b.Count())
	}
	b.ClearAll()
	if b.Count() != 0 || b.NextSet(0) != -1 || b.NextClear(0) != 0 {
		t.Fatalf("after ClearAll count %d", b.Count())
	}
}

// TestSearch compares the searches with a linear scan on random bitmaps of awkward lengths.
func TestSearch(t *testing.T) {
	seed := rand.Uint64()
	r := rand.New(rand.NewPCG(seed, 1))
	for _, n := range []int{1, 63, 64, 65, 127, 128, 129, 1000} {
		b := New(int64(n)*512, 512)
		ref := make([]bool, n)
		density := r.Float64()
		for g := range n {
			if r.Float64() < density {
				b.Set(g)
				ref[g] = true
			}
		}
		lin := func(from, step int, want bool) int {
			for g := from; g >= 0 && g < n; g += step {
				if ref[g] == want {
					return g
				}
			}
			return -1
		}
		for from := -1; from <= n; from++ {
			f := min(max(from, 0), n)
			p := min(from, n-1)
			checks := []struct {
				name      string
				got, want int
			}{
				{"NextClear", b.NextClear(from), lin(f, 1, false)},
				{"NextSet", b.NextSet(from), lin(f, 1, true)},
				{"PrevClear", b.PrevClear(from), lin(p, -1, false)},
				{"PrevSet", b.PrevSet(from), lin(p, -1, true)},
			}
			for _, c := range checks {
				if c.got != c.want {
					t.Fatalf("seed %d n %d: %s(%d) = %d, want %d", seed, n, c.name, from, c.got, c.want)
				}
			}
		}
	}
}

func TestMarshalRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name string
		fill func(*Bitmap)
		max  int // encoded size bound
	}{
		{"clear", func(*Bitmap) {}, 32},
		{"full", (*Bitmap).Fill, 32},
		{"sparse", func(b *Bitmap) { b.Set(0); b.Set(1000); b.Set(b.Len() - 1) }, 32 + b2w(1<<14)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := New(1<<30+12345, 64<<10)
			tc.fill(b)
			data, err := b.MarshalBinary()
			if err != nil {
				t.Fatal(err)
			}
			if len(data) > tc.max {
				t.Fatalf("encoding is %d bytes, want ≤ %d", len(data), tc.max)
			}
			var c Bitmap
			if err := c.UnmarshalBinary(data); err != nil {
				t.Fatal(err)
			}
			if c.Len() != b.Len() || c.Count() != b.Count() || c.GrainSize() != b.GrainSize() || c.VolumeSize() != b.VolumeSize() {
				t.Fatalf("geometry/count differ: %d/%d", c.Count(), b.Count())
			}
			for g := range b.Len() {
				if b.Test(g) != c.Test(g) {
					t.Fatalf("grain %d differs", g)
				}
			}
		})
	}
}

func b2w(grains int) int { return (grains + 63) / 64 * 8 }

func TestUnmarshalCorrupt(t *testing.T) {
	b := New(1<<20, 4096)
	b.Set(7)
	data, _ := b.MarshalBinary()
	for i := range data {
		bad := append([]byte(nil), data...)
		bad[i] ^= 0x40
		c := New(4096, 4096)
		if err := c.UnmarshalBinary(bad); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("flip at %d: err %v", i, err)
		}
		if c.Len() != 1 {
			t.Fatal("failed UnmarshalBinary changed the bitmap")
		}
	}
	if err := new(Bitmap).UnmarshalBinary(data[:5]); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("truncated: %v", err)
	}
}

func TestConcurrentSet(t *testing.T) {
	b := New(10000*4096, 4096)
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for g := w; g < b.Len(); g += 2 { // every grain set by two goroutines
				b.Set(g)
				_ = b.NextClear(g)
			}
		})
	}
	wg.Wait()
	if b.Count() != b.Len() || !b.Full() {
		t.Fatalf("count %d of %d", b.Count(), b.Len())
	}
}

func FuzzUnmarshal(f *testing.F) {
	b := New(1<<20+512, 4096)
	b.Set(3)
	data, _ := b.MarshalBinary()
	f.Add(data)
	f.Fuzz(func(t *testing.T, data []byte) {
		var b Bitmap
		if err := b.UnmarshalBinary(data); err != nil {
			return
		}
		again, err := b.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		var c Bitmap
		if err := c.UnmarshalBinary(again); err != nil || c.Count() != b.Count() {
			t.Fatalf("re-encoding does not round-trip: %v", err)
		}
	})
}
