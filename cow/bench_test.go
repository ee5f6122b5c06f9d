package cow

import (
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

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

// BenchmarkBackgroundCopy times the background copy at rate 150 of a volume on real files
// against a plain copy of the same source file (1 MiB reads and writes, one fsync at the end, as
// dd conv=fsync), each from a cold page cache where the machine lets us drop it. "full" is a
// 1 GiB source fully written; "sparse" a 16 GiB source with 1 GiB written in 64 MiB extents.
// Run with: go test -run - -bench BackgroundCopy -benchtime 1x ./cow
func BenchmarkBackgroundCopy(b *testing.B) {
	for _, c := range []struct {
		name          string
		size, written int64
	}{{"full", 1 << 30, 1 << 30}, {"sparse", 16 << 30, 1 << 30}} {
		b.Run(c.name, func(b *testing.B) {
			dir := store.Dir{Path: b.TempDir()}
			src, err := dir.Create("src", c.size)
			if err != nil {
				b.Fatal(err)
			}
			defer src.Close()
			r := rand.New(rand.NewPCG(1, 2))
			buf := make([]byte, 1<<20)
			stride := c.size / c.written * (64 << 20)
			for ext := int64(0); ext < c.size; ext += stride {
				for off := ext; off < ext+64<<20 && off < c.size; off += int64(len(buf)) {
					fill(r, buf)
					if _, err := src.WriteAt(buf, off); err != nil {
						b.Fatal(err)
					}
				}
			}
			if err := src.Sync(); err != nil {
				b.Fatal(err)
			}
			for i := 0; i < b.N; i++ {
				dropCaches()
				c0 := cpuTime()
				t0 := time.Now()
				tgt, err := dir.Create("tgt", c.size)
				if err != nil {
					b.Fatal(err)
				}
				e := New(&MemJournal{}, Options{})
				if err := e.AddVolume(0, c.size, src); err != nil {
					b.Fatal(err)
				}
				if err := e.AddVolume(1, c.size, tgt); err != nil {
					b.Fatal(err)
				}
				if err := e.StartMappings([]MappingSpec{{ID: 1, Source: 0, Target: 1, GrainSize: benchGrain(), CopyRate: 150}}); err != nil {
					b.Fatal(err)
				}
				for ev := range e.Events() {
					if ev.Kind == CopyComplete {
						break
					}
				}
				engine := time.Since(t0)
				engineCPU := cpuTime() - c0
				e.Close()
				tgt.Close()
				os.Remove(filepath.Join(dir.Path, "tgt"))

				dropCaches()
				c0 = cpuTime()
				t0 = time.Now()
				out, err := os.Create(filepath.Join(dir.Path, "dd"))
				if err != nil {
					b.Fatal(err)
				}
				for off := int64(0); off < c.size; off += int64(len(buf)) {
					if _, err := src.ReadAt(buf, off); err != nil {
						b.Fatal(err)
					}
					if _, err := out.WriteAt(buf, off); err != nil {
						b.Fatal(err)
					}
				}
				if err := out.Sync(); err != nil {
					b.Fatal(err)
				}
				dd := time.Since(t0)
				ddCPU := cpuTime() - c0
				b.ReportMetric(engineCPU.Seconds(), "engine-cpu-s")
				b.ReportMetric(ddCPU.Seconds(), "dd-cpu-s")
				out.Close()
				os.Remove(out.Name())
				b.ReportMetric(engine.Seconds(), "engine-s")
				b.ReportMetric(dd.Seconds(), "dd-s")
				b.ReportMetric(dd.Seconds()/engine.Seconds(), "engine/dd-speed")
			}
		})
	}
}

// dropCaches empties the page cache if the machine lets us (root); otherwise both sides of a
// comparison run warm.
func dropCaches() {
	exec.Command("sync").Run()
	os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0)
}

// benchGrain is the grain size BenchmarkBackgroundCopy uses: $FCNBD_BENCH_GRAIN_KIB, default 64
// (make bench's).
func benchGrain() int64 {
	if k, err := strconv.Atoi(os.Getenv("FCNBD_BENCH_GRAIN_KIB")); err == nil && k > 0 {
		return int64(k) * kib
	}
	return 64 * kib
}

// cpuTime is the process's user and system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
