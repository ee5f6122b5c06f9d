package cow

import (
	"bytes"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"fcnbd/bitmap"
	"fcnbd/internal/blockdev"
)

func pattern(n int64, b byte) []byte { return bytes.Repeat([]byte{b}, int(n)) }

func TestRoutingThroughChain(t *testing.T) {
	r, _ := seedRand(t)
	g := newRig(t, 2, 1<<20, 64*kib, r)
	g.start(g.spec(1, 0, 1))
	g.checkAll(0, 1)
	// The target's own store is untouched until something is split.
	if n := g.files[1].writes.Load(); n != 0 {
		t.Fatalf("target store written %d times before any write", n)
	}
	g.write(0, 100, pattern(5000, 0xAA))
	g.checkAll(0, 1)
	if p := g.progress(1); p.Split != 1 || p.SplitOnWrite != 1 || p.Percent != 1*100/16 {
		t.Fatalf("progress after one CoW: %+v", p)
	}
	// A second write to the same grain needs no copy.
	w := g.files[1].writes.Load()
	g.write(0, 200, pattern(10, 0xBB))
	if g.files[1].writes.Load() != w {
		t.Fatal("a split grain was copied again")
	}
	g.checkAll(0, 1)
}

// TestMultiTarget: S ← T4 ← T3 ← T2 ← T1. A source write copies into the newest target only;
// older targets find the old data through the chain.
func TestMultiTarget(t *testing.T) {
	r, _ := seedRand(t)
	g := newRig(t, 5, 1<<20, 64*kib, r)
	for i := 1; i <= 4; i++ {
		g.start(g.spec(i, 0, i))
		g.write(0, int64(i)*64*kib+7, pattern(100, byte(i)))
		g.checkAll(0, 1, 2, 3, 4)
	}
	// Grain 9 written now: only T4 gets it.
	g.write(0, 9*64*kib, pattern(64*kib, 0x99))
	for i := 1; i <= 4; i++ {
		held := g.e.maps[i].split.Test(9)
		if held != (i == 4) {
			t.Fatalf("target %d holds grain 9: %v", i, held)
		}
	}
	// Grain 1 was written right after T1 started, so T1 holds it.
	if !g.e.maps[1].split.Test(1) || g.e.maps[2].split.Test(1) {
		t.Fatal("grain 1 should be held by T1 only")
	}
	// Writes to the middle targets protect the older ones.
	g.write(2, 9*64*kib+5, pattern(3, 0x22))
	g.write(3, 1*64*kib, pattern(64*kib, 0x33))
	g.write(1, 15*64*kib, pattern(64*kib+0, 0x11))
	g.checkAll(0, 1, 2, 3, 4)
}

// TestCascade: S → A → B → C, each a mapping whose source is the previous target.
func TestCascade(t *testing.T) {
	r, _ := seedRand(t)
	g := newRig(t, 4, 1<<20, 64*kib, r)
	g.start(g.spec(1, 0, 1))
	g.write(0, 0, pattern(4096, 1))
	g.start(g.spec(2, 1, 2))
	g.write(1, 64*kib, pattern(4096, 2))
	g.write(0, 128*kib, pattern(4096, 3))
	g.start(g.spec(3, 2, 3))
	g.write(2, 3*64*kib, pattern(4096, 4))
	g.write(1, 3*64*kib+100, pattern(4096, 5))
	g.write(0, 3*64*kib+200, pattern(4096, 6))
	g.checkAll(0, 1, 2, 3)
	if up := g.e.vols[3].upstream; up == nil || up.id != 2 {
		t.Fatalf("C's upstream: %v", up)
	}
}

func TestTargetWrites(t *testing.T) {
	r, _ := seedRand(t)
	g := newRig(t, 2, 1<<20, 64*kib, r)
	g.start(g.spec(1, 0, 1))

	t.Run("partial write fills first", func(t *testing.T) {
		g.write(1, 64*kib+10, pattern(100, 0x5A))
		if !g.e.maps[1].split.Test(1) || !g.j.Durable(1, 1) {
			t.Fatal("partial write did not split the grain durably")
		}
		g.checkAll(0, 1)
	})
	t.Run("whole-grain write skips the fill", func(t *testing.T) {
		before := g.files[0].reads.Load()
		g.write(1, 2*64*kib, pattern(64*kib, 0x5B))
		if n := g.files[0].reads.Load() - before; n != 0 {
			t.Fatalf("whole-grain write read the source %d times", n)
		}
		if !g.e.maps[1].split.Test(2) || !g.j.Durable(1, 2) {
			t.Fatal("whole-grain write did not set the bit")
		}
		g.checkAll(0, 1)
	})
	t.Run("write across grains", func(t *testing.T) {
		g.write(1, 5*64*kib-10, pattern(3*64*kib+20, 0x5C))
		g.checkAll(0, 1)
	})
	t.Run("trim and zeroes", func(t *testing.T) {
		g.zero(1, 9*64*kib+512, 4096, true)
		g.zero(1, 10*64*kib, 64*kib, false)
		g.zero(0, 11*64*kib, 128*kib, true)
		g.checkAll(0, 1)
	})
}

func TestShortLastGrain(t *testing.T) {
	r, _ := seedRand(t)
	size := int64(3*64*kib + 8*kib)
	g := newRig(t, 3, size, 64*kib, r)
	g.start(g.spec(1, 0, 1))
	g.write(0, size-4096, pattern(4096, 1))     // CoW of the short grain
	g.write(1, 3*64*kib, pattern(8*kib, 2))     // whole short grain on the target... already split
	g.start(g.spec(2, 1, 2))                    // cascade
	g.write(1, 3*64*kib+100, pattern(100, 3))   // CoW into 2
	g.write(2, 3*64*kib, pattern(8*kib, 4))     // whole short grain, held already
	g.write(2, 2*64*kib+10, pattern(64*kib, 5)) // spans into the short grain
	g.checkAll(0, 1, 2)
	if err := g.e.SetRates(1, 150, 50); err != nil {
		t.Fatal(err)
	}
	g.waitEvent(CopyComplete, 1, 10*time.Second)
	g.checkAll(0, 1, 2)
}

func TestBackgroundCopyCompletes(t *testing.T) {
	r, _ := seedRand(t)
	g := newRig(t, 3, 2<<20, 64*kib, r)
	var holes int64 // the source's: the background copy neither reads nor writes them
	for _, x := range zeroBlockExtents(g.files[0].data, 0, 2<<20) {
		if x.Hole {
			holes += x.Length
		}
	}
	s := g.spec(1, 0, 1)
	s.CopyRate = 150
	g.start(s)
	g.write(0, 5*64*kib, pattern(10, 1))
	g.waitEvent(CopyComplete, 1, 10*time.Second)
	p := g.progress(1)
	// A split-on-write may copy a grain that a batch being made durable has copied already
	// (copyGrains): both copies were read and written, and bytes_copied counts both.
	if p.Percent != 100 || p.GrainsCopied+p.SplitOnWrite != int64(p.Grains) ||
		p.BytesCopied > 2<<20+p.SplitOnWrite*64*kib || p.BytesCopied < 2<<20-holes {
		t.Fatalf("progress at completion: %+v (the source had %d bytes of holes)", p, holes)
	}
	g.write(0, 0, pattern(64*kib, 2))
	g.checkAll(0, 1)
	if err := g.e.RemoveMapping(1); err != nil {
		t.Fatal(err)
	}
	if g.e.vols[1].linked() || g.e.vols[0].linked() {
		t.Fatal("removed mapping still linked")
	}
}

// TestCopyCompleteWaitsForDependants: T2 (newest) at 100 % still has T1 reading through it; it
// cleans into T1 before reporting CopyComplete.
func TestCopyCompleteWaitsForDependants(t *testing.T) {
	r, _ := seedRand(t)
	g := newRig(t, 3, 1<<20, 64*kib, r)
	g.start(g.spec(1, 0, 1))
	s := g.spec(2, 0, 2)
	s.CopyRate, s.CleanRate = 150, 150
	g.start(s)
	g.write(0, 0, pattern(4096, 9))
	g.waitEvent(CopyComplete, 2, 10*time.Second)
	if p := g.progress(1); p.Percent != 100 {
		t.Fatalf("T1 should have been cleaned into: %+v", p)
	}
	g.checkAll(0, 1, 2)
}

// TestStopWithCleaning: S ← T3 ← T2 ← T1; stopping T2 cleans its grains into T1, then T1 reads
// through T3.
func TestStopWithCleaning(t *testing.T) {
	r, _ := seedRand(t)
	g := newRig(t, 4, 1<<20, 64*kib, r)
	g.start(g.spec(1, 0, 1))
	g.write(0, 0, pattern(100, 1))
	g.start(g.spec(2, 0, 2))
	for i := range 8 {
		g.write(0, int64(i)*64*kib+50, pattern(100, 2))
	}
	g.write(2, 9*64*kib, pattern(100, 3)) // T2's own write: T1 protected first
	g.start(g.spec(3, 0, 3))
	g.write(0, 2*64*kib, pattern(64*kib, 4))
	g.checkAll(0, 1, 2, 3)

	if err := g.e.SetRates(2, 0, 150); err != nil {
		t.Fatal(err)
	}
	if deps, err := g.e.StopMapping(2, false); err != nil || deps != nil {
		t.Fatal(deps, err)
	}
	g.waitEvent(CleanComplete, 2, 10*time.Second)
	if up := g.e.vols[1].upstream; up == nil || up.id != 3 {
		t.Fatalf("T1's upstream after stop: %v", up)
	}
	if p := g.progress(2); p.Phase != Stopped || p.Cleaned == 0 {
		t.Fatalf("T2 progress: %+v", p)
	}
	g.write(0, 7*64*kib, pattern(4096, 5))
	g.write(3, 6*64*kib, pattern(4096, 6))
	g.checkAll(0, 1, 3)
	if _, err := g.e.StopMapping(2, false); !errors.Is(err, ErrState) {
		t.Fatalf("second stop: %v", err)
	}
}

func TestForceStopReportsDependants(t *testing.T) {
	r, _ := seedRand(t)
	g := newRig(t, 5, 1<<20, 64*kib, r)
	g.start(g.spec(1, 0, 1))           // T1, older
	g.start(g.spec(2, 0, 2))           // T2 newest: S ← T2 ← T1
	g.write(0, 0, pattern(100, 1))     // T2 holds grain 0, T1 reads it through T2
	g.start(g.spec(3, 2, 3))           // cascade T2 → T3 (T3 reads through T2)
	g.start(g.spec(4, 0, 4))           // S ← T4 ← T2 ← {T1, T3}
	g.write(1, 0, pattern(64*kib, 7))  // T1 holds grain 0 itself now
	g.write(3, 0, pattern(64*kib, 8))  // and T3
	g.write(0, 64*kib, pattern(10, 2)) // T4 holds grain 1; T2 does not
	g.checkAll(0, 1, 2, 3, 4)

	// Stopping T2: T1 and T3 hold every grain T2 holds (grain 0), so nobody depends on it.
	deps, err := g.e.StopMapping(2, true)
	if err != nil || len(deps) != 0 {
		t.Fatalf("deps %v, err %v", deps, err)
	}
	g.checkAll(0, 1, 3, 4)

	// Now T4 holds grain 1, which T1 and T3 read through it: both are dependants.
	deps, err = g.e.StopMapping(4, true)
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(deps)
	if !slices.Equal(deps, []int{1, 3}) {
		t.Fatalf("dependants %v, want [1 3]", deps)
	}
	for _, id := range []int{1, 3, 4} {
		if p := g.progress(id); p.Phase != Stopped {
			t.Fatalf("mapping %d: %v", id, p.Phase)
		}
	}
	g.checkAll(0)
}

func TestSplitKeepsDependants(t *testing.T) {
	r, _ := seedRand(t)
	g := newRig(t, 3, 1<<20, 64*kib, r)
	g.start(g.spec(1, 0, 1))
	s := g.spec(2, 0, 2)
	s.CopyRate = 150
	g.start(s) // S ← T2 ← T1
	deadline := time.Now().Add(10 * time.Second)
	for g.progress(2).Percent < 100 {
		if time.Now().After(deadline) {
			t.Fatal("no 100 %")
		}
		time.Sleep(time.Millisecond)
	}
	if err := g.e.Split(1); !errors.Is(err, ErrNotCopied) {
		t.Fatalf("split at <100 %%: %v", err)
	}
	if err := g.e.Split(2); err != nil {
		t.Fatal(err)
	}
	// T1 still reads through T2, which no longer depends on S; writes to T2 protect T1.
	g.write(0, 0, pattern(64*kib, 1))
	g.write(2, 64*kib, pattern(100, 2))
	g.checkAll(0, 1, 2)
	if g.e.vols[2].upstream != nil || g.e.vols[1].upstream.id != 2 {
		t.Fatal("split did not re-link as expected")
	}
}

// TestRestore: S → T (M) copying, then T → S (R) with R's bits seeded from M's clear bits.
func TestRestore(t *testing.T) {
	r, _ := seedRand(t)
	g := newRig(t, 2, 1<<20, 64*kib, r)
	g.start(g.spec(1, 0, 1))
	g.write(0, 0, pattern(64*kib, 1))
	g.write(1, 3*64*kib+1, pattern(100, 2))
	seed := bitmap.New(1<<20, 64*kib)
	m := g.e.maps[1].split
	for i := range seed.Len() {
		if !m.Test(i) {
			seed.Set(i)
		}
	}
	rs := g.spec(2, 1, 0)
	rs.Split = seed
	g.start(rs)
	g.checkAll(0, 1)
	g.write(0, 3*64*kib, pattern(10, 3))
	g.write(1, 0, pattern(10, 4))
	g.write(0, 5*64*kib, pattern(10, 5))
	g.write(1, 6*64*kib, pattern(10, 6))
	g.checkAll(0, 1)
	// At 100 % S still has T reading through it: R cleans into T before it completes.
	if err := g.e.SetRates(2, 150, 150); err != nil {
		t.Fatal(err)
	}
	g.waitEvent(CopyComplete, 2, 10*time.Second)
	g.checkAll(0, 1)
}

func TestOffline(t *testing.T) {
	r, _ := seedRand(t)
	g := newRig(t, 1, 1<<20, 64*kib, r)
	if err := g.e.SetOnline(0, false); err != nil {
		t.Fatal(err)
	}
	reads, writes := g.files[0].reads.Load(), g.files[0].writes.Load()
	d := g.devs[0]
	for name, err := range map[string]error{
		"read":   d.ReadAt(make([]byte, 10), 0),
		"write":  d.WriteAt(make([]byte, 10), 0, false),
		"flush":  d.Flush(),
		"trim":   d.Trim(0, 4096),
		"zeroes": d.WriteZeroes(0, 4096, true, false),
	} {
		if blockdev.Errno(err) != syscall.EIO {
			t.Errorf("%s offline: %v", name, err)
		}
	}
	if g.files[0].reads.Load() != reads || g.files[0].writes.Load() != writes {
		t.Fatal("offline volume's store was touched")
	}
	g.e.SetOnline(0, true)
	g.write(0, 0, pattern(10, 1))
	g.checkAll(0)
	if err := d.ReadAt(make([]byte, 10), 1<<20-5); blockdev.Errno(err) != syscall.EINVAL {
		t.Fatalf("out of range: %v", err)
	}
}

// TestFailedGrainCopy: the target's store fails writes; a source write succeeds, the mapping
// reports IOError and leaves the chain.
func TestFailedGrainCopy(t *testing.T) {
	r, _ := seedRand(t)
	g := newRig(t, 3, 1<<20, 64*kib, r)
	g.start(g.spec(1, 0, 1)) // T1 older
	g.start(g.spec(2, 0, 2)) // S ← T2 ← T1
	g.files[2].setHook(func(op string, off, n int64) error {
		if op == "write" {
			return syscall.EIO
		}
		return nil
	})
	g.write(0, 64*kib, pattern(100, 1)) // CoW into T2 fails; T1 must be protected directly
	ev := g.waitEvent(IOError, 2, 5*time.Second)
	if !errors.Is(ev.Err, syscall.EIO) || len(ev.Dependants) != 0 {
		t.Fatalf("event %+v", ev)
	}
	if p := g.progress(2); p.Phase != Stopped || !p.Failed {
		t.Fatalf("T2: %+v", p)
	}
	g.checkAll(0, 1)
	g.write(0, 2*64*kib, pattern(100, 2))
	g.checkAll(0, 1)
}

func TestJournalFailureFailsWrite(t *testing.T) {
	r, _ := seedRand(t)
	g := newRig(t, 2, 1<<20, 64*kib, r)
	g.start(g.spec(1, 0, 1))
	g.j.Fail = func([]BitUpdate) error { return errors.New("disk full") }
	err := g.devs[0].WriteAt(pattern(10, 1), 0, false)
	if !errors.Is(err, ErrJournal) {
		t.Fatalf("write with failing journal: %v", err)
	}
	g.checkAll(0, 1) // nothing changed on the source
	g.j.Fail = nil
	g.write(0, 0, pattern(10, 1))
	g.checkAll(0, 1)
}

func TestRateChange(t *testing.T) {
	if got := []int64{RateBytes(0), RateBytes(1), RateBytes(10), RateBytes(11), RateBytes(50), RateBytes(150)}; !slices.Equal(got, []int64{0, 128 << 10, 128 << 10, 256 << 10, 2 << 20, 2 << 30}) {
		t.Fatalf("rate table %v", got)
	}
	r, _ := seedRand(t)
	g := newRig(t, 2, 4<<20, 64*kib, r)
	s := g.spec(1, 0, 1)
	s.CopyRate = 1 // 128 KiB/s: 2 grains a second
	g.start(s)
	// The rate is charged for the bytes read (grains whose image is a hole are free), so the
	// checks count bytes.
	time.Sleep(300 * time.Millisecond)
	if p := g.progress(1); p.BytesCopied > 2*64*kib {
		t.Fatalf("rate 1 copied %d bytes in 300 ms", p.BytesCopied)
	}
	if err := g.e.SetRates(1, 0, 0); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	before := g.progress(1).BytesCopied
	time.Sleep(600 * time.Millisecond)
	if p := g.progress(1); p.BytesCopied > before+64*kib {
		t.Fatalf("rate 0 still copies: %d → %d bytes", before, p.BytesCopied)
	}
	start := time.Now()
	if err := g.e.SetRates(1, 150, 0); err != nil {
		t.Fatal(err)
	}
	g.waitEvent(CopyComplete, 1, 5*time.Second)
	t.Logf("64 grains at rate 150 in %v", time.Since(start))
	g.checkAll(0, 1)
}

func TestStartRefusals(t *testing.T) {
	r, _ := seedRand(t)
	g := newRig(t, 3, 1<<20, 64*kib, r)
	g.start(g.spec(1, 0, 1))
	bad := []MappingSpec{
		{ID: 2, Source: 0, Target: 1, GrainSize: 64 * kib},  // already a target
		{ID: 2, Source: 0, Target: 0, GrainSize: 64 * kib},  // same volume
		{ID: 2, Source: 0, Target: 9, GrainSize: 64 * kib},  // no volume
		{ID: 2, Source: 0, Target: 2, GrainSize: 256 * kib}, // grain size differs in the tree
		{ID: 1, Source: 0, Target: 2, GrainSize: 64 * kib},  // active id
	}
	for i, s := range bad {
		if err := g.e.StartMappings([]MappingSpec{s}); err == nil {
			t.Fatalf("spec %d accepted", i)
		}
	}
	// All or nothing.
	if err := g.e.StartMappings([]MappingSpec{g.spec(2, 0, 2), g.spec(3, 0, 0)}); err == nil || g.e.vols[2].linked() {
		t.Fatalf("half a group started: %v", err)
	}
}

// TestOrdering records, for every copy-on-write, the order of the target write, the target
// sync, the bit commit and the source write, and asserts target-write < target-sync <
// bit-commit < source-write for each grain.
func TestOrdering(t *testing.T) {
	r, _ := seedRand(t)
	const grain = 64 * kib
	g := newRig(t, 3, 1<<20, grain, r)
	var mu sync.Mutex
	var log []string
	rec := func(s string) { mu.Lock(); log = append(log, s); mu.Unlock() }
	for v, f := range g.files {
		name := string(rune('S' + v))
		f.setHook(func(op string, off, n int64) error {
			switch op {
			case "write":
				rec(fmt.Sprintf("write %s %d", name, off/grain))
			case "sync":
				rec("sync " + name)
			}
			return nil
		})
	}
	g.j.Fail = func(u []BitUpdate) error {
		for _, b := range u {
			for _, gr := range b.Grains {
				rec(fmt.Sprintf("commit %c %d", 'S'+b.Mapping, gr))
			}
		}
		return nil
	}
	g.start(g.spec(1, 0, 1))
	g.start(g.spec(2, 0, 2))
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			g.write(0, int64(i)*grain+int64(i), pattern(100, byte(i)))
		})
	}
	wg.Wait()
	g.write(2, 9*grain+1, pattern(10, 1)) // a target write: protect T1, fill T2, write T2
	g.checkAll(0, 1, 2)

	mu.Lock()
	defer mu.Unlock()
	find := func(from, to int, s string) int {
		for i := from; i < to; i++ {
			if log[i] == s {
				return i
			}
		}
		return -1
	}
	// order checks that, before position end, copy target tgt got grain gr written, then
	// synced, then its bit committed.
	order := func(end int, tgt string, gr int) {
		t.Helper()
		w := find(0, end, fmt.Sprintf("write %s %d", tgt, gr))
		sy := find(w+1, end, "sync "+tgt)
		c := find(sy+1, end, fmt.Sprintf("commit %s %d", tgt, gr))
		if w < 0 || sy < 0 || c < 0 {
			t.Fatalf("before entry %d: %s grain %d: write %d, sync %d, commit %d\n%q", end, tgt, gr, w, sy, c, log)
		}
	}
	for i := range 8 {
		src := find(0, len(log), fmt.Sprintf("write S %d", i))
		if src < 0 {
			t.Fatalf("source write %d not logged", i)
		}
		order(src, "U", i)
	}
	// The target write: T1 protected, then T2 filled and committed, then T2 written.
	own := len(log) - 1
	if log[own] != "write U 9" {
		t.Fatalf("last entry %q", log[own])
	}
	fill := find(0, own, "write U 9")
	order(fill, "T", 9)
	order(own, "U", 9)
	t.Logf("%d journal commits for 9 copy-on-writes", g.j.Commits())
}

// TestGrainSizePerTree: the one-grain-size rule holds per connected set as it will be after the
// start, not across a StartMappings call: two unrelated trees with different grain sizes start
// together (as every chain does when the daemon restarts) and route correctly, while a spec
// that would join a tree of another grain size — directly, or through another spec of the same
// call — is refused and starts nothing.
func TestGrainSizePerTree(t *testing.T) {
	r, _ := seedRand(t)
	g := newRig(t, 9, 1<<20, 64*kib, r)
	spec := func(id, src, tgt int, grain int64) MappingSpec {
		return MappingSpec{ID: id, Source: src, Target: tgt, GrainSize: grain}
	}
	g.start(spec(1, 0, 1, 64*kib), spec(2, 2, 3, 256*kib))
	g.write(0, 100*kib, bytes.Repeat([]byte{0xa1}, 300*kib))
	g.write(2, 0, bytes.Repeat([]byte{0xa2}, 600*kib))
	g.write(3, 512*kib, bytes.Repeat([]byte{0xa3}, 4*kib))
	g.checkAll(0, 1, 2, 3)

	refused := []struct {
		name  string
		specs []MappingSpec
	}{
		{"onto a tree of another grain", []MappingSpec{spec(3, 0, 4, 256*kib)}},
		{"cascade from a target", []MappingSpec{spec(3, 3, 4, 64*kib)}},
		{"two specs joined by a volume", []MappingSpec{spec(3, 5, 6, 64*kib), spec(4, 6, 7, 256*kib)}},
		{"a new tree joined to an old one", []MappingSpec{spec(3, 5, 6, 256*kib), spec(4, 1, 5, 256*kib)}},
	}
	for _, c := range refused {
		t.Run(c.name, func(t *testing.T) {
			err := g.e.StartMappings(c.specs)
			if !errors.Is(err, ErrBadSpec) || !strings.Contains(err.Error(), "grain size") {
				t.Fatalf("StartMappings: %v, want a grain size refusal", err)
			}
			for _, s := range c.specs {
				if _, err := g.e.Progress(s.ID); !errors.Is(err, ErrNoMapping) {
					t.Fatalf("mapping %d exists after a refused start", s.ID)
				}
			}
		})
	}
	// Apart from both trees, either grain size goes, in the same call.
	g.start(spec(5, 5, 6, 256*kib), spec(6, 7, 8, 64*kib))
	g.write(5, 0, bytes.Repeat([]byte{0xa5}, 1<<20))
	g.write(7, 0, bytes.Repeat([]byte{0xa7}, 1<<20))
	g.checkAll(0, 1, 2, 3, 4, 5, 6, 7, 8)
}

// TestViaRebuildsRelinkedCascade: in a cascade T1 → C1 → C2, C1's stop relinks C2 under T1;
// a fresh engine (a daemon start) rebuilds that with the spec's Via, and C2 keeps its image.
func TestViaRebuildsRelinkedCascade(t *testing.T) {
	r, _ := seedRand(t)
	const grain = 64 * kib
	g := newRig(t, 3, 16*grain, grain, r)
	g.start(g.spec(1, 0, 1))
	g.start(g.spec(2, 1, 2))
	g.write(0, 3*grain, pattern(grain, 1)) // into C1
	g.write(1, 0, pattern(4096, 2))        // C1's own: into C2 first
	if err := g.e.SetRates(1, 0, 150); err != nil {
		t.Fatal(err)
	}
	if _, err := g.e.StopMapping(1, false); err != nil {
		t.Fatal(err)
	}
	g.waitEvent(CleanComplete, 1, 10*time.Second)
	if got := g.e.Upstreams(); !reflect.DeepEqual(got, map[int]int{2: 0}) {
		t.Fatalf("upstreams after C1's stop: %v", got)
	}
	g.checkAll(0, 2)

	e2 := New(&MemJournal{}, Options{})
	old := g.e
	t.Cleanup(func() { old.Close() }) // the rig closes g.e, e2 below
	for v := range 3 {
		if err := e2.AddVolume(v, g.size, g.files[v]); err != nil {
			t.Fatal(err)
		}
	}
	via := 0
	s := g.spec(2, 1, 2)
	s.Split, s.Via = g.e.maps[2].split.Clone(), &via
	if err := e2.StartMappings([]MappingSpec{s}); err != nil {
		t.Fatal(err)
	}
	if got := e2.Upstreams(); !reflect.DeepEqual(got, map[int]int{2: 0}) {
		t.Fatalf("upstreams after the rebuild: %v", got)
	}
	g.e = e2
	for v := range 3 {
		d, err := e2.Device(v)
		if err != nil {
			t.Fatal(err)
		}
		g.devs[v] = d
	}
	g.checkAll(0, 2)
	g.write(0, 5*grain, pattern(grain, 3)) // T1's write still preserves C2's image
	g.checkAll(0, 2)
}

// TestCleanManyBatches: S ← T2 ← T1 on volumes of several cleaning batches, so that batches
// overlap (copyStreams) and the cleaning wraps around to grains it passed over, with host writes
// to every volume meanwhile. Cleaning runs both ways: before T2's CopyComplete, and when T2 is
// stopped. Every image is the model's at the end, and T1 holds every grain.
func TestCleanManyBatches(t *testing.T) {
	for _, stop := range []bool{false, true} {
		t.Run(fmt.Sprintf("stop=%v", stop), func(t *testing.T) {
			r, _ := seedRand(t)
			const rate = 110 // 128 MiB/s: batches of 8 MiB, so that the volumes stay small
			size := 3*batchLimit(rate) + 5*64*kib
			g := newRig(t, 3, size, 64*kib, r)
			g.start(g.spec(1, 0, 1)) // copy rate 0: T1 reads through T2 once T2 starts
			s := g.spec(2, 0, 2)
			s.CopyRate, s.CleanRate = rate, rate
			if stop {
				s.CopyRate = 0
			}
			g.start(s)
			if stop {
				// T2 gets grains by host writes only; stopping it cleans them into T1.
				for range 200 {
					g.write(0, r.Int64N(size-4096), pattern(4096, byte(r.IntN(256))))
				}
				if err := g.e.SetRates(2, 0, rate); err != nil {
					t.Fatal(err)
				}
				if _, err := g.e.StopMapping(2, false); err != nil {
					t.Fatal(err)
				}
			}
			for i := range 300 {
				g.write(i%3, r.Int64N(size-4096), pattern(4096, byte(i)))
			}
			if stop {
				g.waitEvent(CleanComplete, 2, 30*time.Second)
				g.checkAll(0, 1)
				return
			}
			g.waitEvent(CopyComplete, 2, 30*time.Second)
			if p := g.progress(1); p.Percent != 100 {
				t.Fatalf("T1 should hold every grain after T2's cleaning: %+v", p)
			}
			g.checkAll(0, 1, 2)
		})
	}
}
