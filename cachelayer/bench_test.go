package cachelayer

import (
	"math/rand/v2"
	"testing"

	"fcnbd/internal/memdev"
)

const benchSize = 1 << 30

func benchRandom(b *testing.B, dev func() *memdev.Device, cached bool, write bool) {
	d := dev()
	var target interface {
		ReadAt([]byte, int64) error
		WriteAt([]byte, int64, bool) error
	} = d
	if cached {
		c := New(d, NewPool(DefaultBudget), Options{})
		b.Cleanup(func() { _ = c.Close() })
		target = c
	}
	if !write {
		// Populate a region so reads hit data, half of it still in the cache.
		p := make([]byte, 1<<20)
		for off := int64(0); off < 256<<20; off += int64(len(p)) {
			_ = d.WriteAt(p, off, false)
		}
	}
	b.SetBytes(4096)
	b.SetParallelism(16) // 16 × GOMAXPROCS(2) = iodepth 32
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		rng := rand.New(rand.NewPCG(rand.Uint64(), 0))
		p := make([]byte, 4096)
		for pb.Next() {
			off := rng.Int64N(256<<20/4096) * 4096
			var err error
			if write {
				err = target.WriteAt(p, off, false)
			} else {
				err = target.ReadAt(p, off)
			}
			if err != nil {
				b.Fatal(err)
			}
		}
	})
}

func newBenchDev() *memdev.Device { return memdev.New(benchSize) }

func BenchmarkWrite4KRandom(b *testing.B) {
	b.Run("cache", func(b *testing.B) { benchRandom(b, newBenchDev, true, true) })
	b.Run("nocache", func(b *testing.B) { benchRandom(b, newBenchDev, false, true) })
}

func BenchmarkRead4KRandom(b *testing.B) {
	b.Run("cache", func(b *testing.B) { benchRandom(b, newBenchDev, true, false) })
	b.Run("nocache", func(b *testing.B) { benchRandom(b, newBenchDev, false, false) })
}
