package cow

import (
	"math/rand/v2"
	"testing"

	"fcnbd/bitmap"
	"fcnbd/internal/store"
)

// BenchmarkRandomWrite4K: 4 KiB random writes to a source on real files, with no mapping, with a
// mapping whose grains are all split already (the fast path), and with a fresh mapping (the
// first write to each grain copies 256 KiB and waits for the group commit).
func BenchmarkRandomWrite4K(b *testing.B) {
	const (
		size  = 1 << 30
		grain = 256 * kib
	)
	for _, mode := range []string{"nomapping", "allsplit", "firstsplit"} {
		b.Run(mode, func(b *testing.B) {
			dir := store.Dir{Path: b.TempDir()}
			e := New(&MemJournal{}, Options{})
			defer e.Close()
			for v, name := range []string{"src", "tgt"} {
				f, err := dir.Create(name, size)
				if err != nil {
					b.Fatal(err)
				}
				defer f.Close()
				if err := e.AddVolume(v, size, f); err != nil {
					b.Fatal(err)
				}
			}
			switch mode {
			case "allsplit":
				split := bitmap.New(size, grain)
				split.Fill()
				if err := e.StartMappings([]MappingSpec{{ID: 1, Source: 0, Target: 1, GrainSize: grain, Split: split}}); err != nil {
					b.Fatal(err)
				}
			case "firstsplit":
				if err := e.StartMappings([]MappingSpec{{ID: 1, Source: 0, Target: 1, GrainSize: grain}}); err != nil {
					b.Fatal(err)
				}
			}
			dev, err := e.Device(0)
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(4096)
			b.SetParallelism(4)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				r := rand.New(rand.NewPCG(rand.Uint64(), 1))
				buf := make([]byte, 4096)
				fill(r, buf)
				for pb.Next() {
					off := r.Int64N(size/4096) * 4096
					if err := dev.WriteAt(buf, off, false); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.StopTimer()
			if mode == "firstsplit" {
				p, _ := e.Progress(1)
				b.ReportMetric(float64(p.SplitOnWrite)/float64(b.N), "cow/op")
			}
		})
	}
}
