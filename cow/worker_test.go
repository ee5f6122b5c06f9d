package cow

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"fcnbd/internal/store"
)

// Background copy makes a batch of grains durable with one journal commit, and host writes to
// the source during the copy (each may copy-on-write a grain the batch has copied but not yet
// published) leave the target exactly the source's image at start.
func TestCopyBatches(t *testing.T) {
	r, _ := seedRand(t)
	const size, grain = 64 << 20, 16 * kib
	g := newRig(t, 2, size, grain, r)
	s := g.spec(1, 0, 1)
	s.CopyRate = 150
	g.start(s)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		p := make([]byte, 4*kib)
		for {
			select {
			case <-stop:
				return
			default:
			}
			fill(r, p)
			g.write(0, r.Int64N(size/int64(len(p)))*int64(len(p)), p)
		}
	}()
	g.waitEvent(CopyComplete, 1, 30*time.Second)
	close(stop)
	<-done
	g.checkAll(0, 1)
	grains := int64(size / grain)
	if p := g.progress(1); p.GrainsCopied+p.SplitOnWrite != grains {
		t.Fatalf("progress %+v: copied and split-on-write grains should add up to %d", p, grains)
	}
	if c := g.j.Commits(); int64(c) >= grains/2 {
		t.Fatalf("%d journal commits for %d grains: background copy does not batch", c, grains)
	}
}

func TestBatchLimit(t *testing.T) {
	for _, tt := range []struct {
		rate int
		want int64
	}{
		{150, copyBatchBytes},
		{1, 131072 * 64 / 1000}, // 128 KiB/s: 64 ms is about 8 KiB, so a batch is one grain
		{0, 0},
	} {
		if got := batchLimit(tt.rate); got != tt.want {
			t.Errorf("batchLimit(%d) = %d, want %d", tt.rate, got, tt.want)
		}
	}
}

// TestSparseCopy: on real sparse files, the background copy reads and writes only the grains
// whose image holds data; a grain that is a hole in the source stays a hole in the target (its
// stale data punched), and holes are not charged to the copy rate: at rate 11 (256 KiB/s) the
// 64 MiB volume below would take over four minutes if they were.
func TestSparseCopy(t *testing.T) {
	const size, grain = 64 << 20, 64 * kib
	dir := store.Dir{Path: t.TempDir()}
	src, err := dir.Create("src", size)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	tgt, err := dir.Create("tgt", size)
	if err != nil {
		t.Fatal(err)
	}
	defer tgt.Close()
	if x, err := store.Extents(src, 0, size); err != nil || len(x) != 1 || !x[0].Hole {
		t.Skipf("the filesystem under %s reports no holes (%v, %v)", dir.Path, x, err)
	}
	// The target held another image before: stale data everywhere.
	stale := bytes.Repeat([]byte{0xAA}, 1<<20)
	for off := int64(0); off < size; off += int64(len(stale)) {
		if _, err := tgt.WriteAt(stale, off); err != nil {
			t.Fatal(err)
		}
	}
	// The source: 4 KiB in grain 3, grain 100 whole, 8 KiB across grains 500 and 501.
	writes := []struct{ off, n int64 }{{3*grain + 8192, 4096}, {100 * grain, grain}, {501*grain - 4096, 8192}}
	r := rand.New(rand.NewPCG(1, 2))
	var written int64
	for _, w := range writes {
		p := make([]byte, w.n)
		fill(r, p)
		if _, err := src.WriteAt(p, w.off); err != nil {
			t.Fatal(err)
		}
		written += w.n
	}
	want := make([]byte, size)
	if _, err := src.ReadAt(want, 0); err != nil {
		t.Fatal(err)
	}

	j := &MemJournal{}
	e := New(j, Options{})
	defer e.Close()
	for v, f := range []store.File{src, tgt} {
		if err := e.AddVolume(v, size, f); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.StartMappings([]MappingSpec{{ID: 1, Source: 0, Target: 1, GrainSize: grain, CopyRate: 11}}); err != nil {
		t.Fatal(err)
	}
	timeout := time.After(60 * time.Second)
	for done := false; !done; {
		select {
		case ev := <-e.Events():
			done = ev.Kind == CopyComplete
		case <-timeout:
			p, _ := e.Progress(1)
			t.Fatalf("no CopyComplete within 60 s: %+v", p)
		}
	}
	p, err := e.Progress(1)
	if err != nil {
		t.Fatal(err)
	}
	if p.GrainsCopied != size/grain || p.BytesCopied < written || p.BytesCopied > 4*grain {
		t.Errorf("progress %+v: want every grain copied and between %d and %d bytes read and written", p, written, 4*grain)
	}
	got := make([]byte, size)
	if _, err := tgt.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("target differs from the source at byte %d (grain %d)", i, i/grain)
	}
	// Grains the source has no data in are holes in the target again.
	for _, g := range []int64{0, 4, 99, 101, 499, 502, size/grain - 1} {
		x, err := store.Extents(tgt, g*grain, grain)
		if err != nil || len(x) != 1 || !x[0].Hole {
			t.Errorf("target grain %d: extents %v, %v; want one hole", g, x, err)
		}
	}
	for g := range int64(size / grain) {
		if !j.Durable(1, int(g)) {
			t.Fatalf("grain %d split but its bit is not durable", g)
		}
	}
}

func firstDiff(a, b []byte) int64 {
	for i := range a {
		if a[i] != b[i] {
			return int64(i)
		}
	}
	return -1
}

// TestBackgroundOrdering: the background copy and the cleaning, which copy grains in pieces of
// many grains at once and skip holes, still keep the copy-on-write order for every grain: the
// grain written (or its hole punched) in the target, then the target synced, then the bit
// committed. Checked on the log of every store operation and journal commit.
func TestBackgroundOrdering(t *testing.T) {
	r, _ := seedRand(t)
	const grain = 16 * kib
	const size = 96*grain + 4*kib // short last grain
	g := newRig(t, 3, size, grain, r)
	// Holes in the source: grains 10-12 whole, and half of grain 40.
	for _, h := range [][2]int64{{10 * grain, 3 * grain}, {40 * grain, grain / 2}} {
		clear(g.files[0].data[h[0] : h[0]+h[1]])
		clear(g.model[0][h[0] : h[0]+h[1]])
	}
	var mu sync.Mutex
	var log []string
	rec := func(s string) { mu.Lock(); log = append(log, s); mu.Unlock() }
	for v, f := range g.files {
		f.setHook(func(op string, off, n int64) error {
			switch op {
			case "write", "punch":
				for gr := off / grain; gr*grain < off+n; gr++ {
					rec(fmt.Sprintf("put %d %d", v, gr))
				}
			case "sync":
				rec(fmt.Sprintf("sync %d", v))
			}
			return nil
		})
	}
	target := map[int]int{1: 1, 2: 2} // mapping → target volume
	g.j.Fail = func(u []BitUpdate) error {
		for _, b := range u {
			for _, gr := range b.Grains {
				rec(fmt.Sprintf("commit %d %d", target[b.Mapping], gr))
			}
		}
		return nil
	}
	// S→T1 at rate 0, then S→T2 (upstream of T1) copying: at 100 % it cleans its grains into
	// T1, which reads through it, before it completes.
	g.start(g.spec(1, 0, 1))
	s2 := g.spec(2, 0, 2)
	s2.CopyRate, s2.CleanRate = 150, 150
	g.start(s2)
	g.waitEvent(CopyComplete, 2, 20*time.Second)
	g.checkAll(0, 1, 2)

	mu.Lock()
	defer mu.Unlock()
	commits := map[int]int{}
	for i, e := range log {
		var v, gr int
		if _, err := fmt.Sscanf(e, "commit %d %d", &v, &gr); err != nil {
			continue
		}
		commits[v]++
		put := -1
		for k := i - 1; k >= 0; k-- {
			if log[k] == fmt.Sprintf("put %d %d", v, gr) {
				put = k
				break
			}
		}
		if put < 0 {
			t.Fatalf("entry %d: volume %d grain %d committed, never written or punched before", i, v, gr)
		}
		if !slices.Contains(log[put+1:i], fmt.Sprintf("sync %d", v)) {
			t.Fatalf("entry %d: volume %d grain %d committed with no sync since it was written (entry %d)", i, v, gr, put)
		}
	}
	if commits[2] != 97 || commits[1] == 0 {
		t.Fatalf("commits per volume %v: want every grain of T2 (97) and T2's cleaning into T1", commits)
	}
}
