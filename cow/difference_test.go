package cow

import (
	"errors"
	"sync"
	"testing"
	"time"

	"fcnbd/bitmap"
)

// TestDifferenceRecording: writes, trims and write-zeroes on the source or the target of a
// tracked mapping set its difference bits, in any phase (here: never started, then copying,
// then stopped), each committed before the write reaches the store; a write whose bits are set
// already makes no journal call; untracked, nothing more is recorded.
func TestDifferenceRecording(t *testing.T) {
	r, _ := seedRand(t)
	g := newRig(t, 3, 4<<20, 64*kib, r)
	bm := bitmap.New(4<<20, 64*kib)
	if err := g.e.TrackDifference(7, 0, 1, bm); err != nil {
		t.Fatal(err)
	}
	// Ordering: when the store write of a recorded grain happens, its bit is durable.
	var mu sync.Mutex
	var early []int64
	for _, v := range []int{0, 1} {
		g.files[v].setHook(func(op string, off, length int64) error {
			if op == "write" || op == "punch" {
				for o := off; o < off+length; o += 64 * kib {
					if gr := int(o / (64 * kib)); !g.j.DurableKind(DifferenceBits, 7, gr) {
						mu.Lock()
						early = append(early, o)
						mu.Unlock()
					}
				}
			}
			return nil
		})
	}
	g.write(0, 3*64*kib+5, pattern(10, 1)) // grain 3 (idle)
	g.write(1, 9*64*kib-4, pattern(8, 2))  // grains 8 and 9, on the target
	g.zero(0, 12*64*kib, 2*64*kib, true)   // trim of grains 12, 13
	g.zero(1, 15*64*kib+1, 1, false)       // write-zeroes in grain 15
	g.write(2, 0, pattern(64*kib, 3))      // another volume: nothing
	commits := g.j.Commits()
	g.write(0, 3*64*kib, pattern(64*kib, 4)) // set already: no journal call
	if got := g.j.Commits(); got != commits {
		t.Fatalf("a write whose difference bit is set made %d journal commits", got-commits)
	}
	g.start(g.spec(1, 0, 1))
	g.write(0, 20*64*kib, pattern(10, 5)) // copying: on the source (copy-on-write too)
	g.write(1, 21*64*kib, pattern(10, 6)) // and the target
	if _, err := g.e.StopMapping(1, true); err != nil {
		t.Fatal(err)
	}
	g.write(1, 22*64*kib, pattern(10, 7)) // stopped
	want := []int{3, 8, 9, 12, 13, 15, 20, 21, 22}
	if len(early) > 0 {
		t.Fatalf("store writes at %v before their difference bit was durable", early)
	}
	got, err := g.e.Difference(7)
	if err != nil {
		t.Fatal(err)
	}
	for gr := range got.Len() {
		in := false
		for _, w := range want {
			in = in || w == gr
		}
		if got.Test(gr) != in || g.j.DurableKind(DifferenceBits, 7, gr) != in {
			t.Fatalf("grain %d: in memory %v, durable %v, want %v", gr, got.Test(gr), g.j.DurableKind(DifferenceBits, 7, gr), in)
		}
	}
	// Split bits of mapping 1 and difference bits of mapping 7 do not mix.
	if g.j.DurableKind(DifferenceBits, 1, 20) {
		t.Fatal("a split bit was journalled as a difference bit")
	}

	// A reset (a new bitmap) starts from nothing; untracked, nothing is recorded.
	if err := g.e.TrackDifference(7, 0, 1, bitmap.New(4<<20, 64*kib)); err != nil {
		t.Fatal(err)
	}
	g.write(0, 30*64*kib, pattern(10, 8))
	if got, _ := g.e.Difference(7); got.Count() != 1 || !got.Test(30) {
		t.Fatalf("after the reset: %d bits", got.Count())
	}
	g.e.UntrackDifference(7)
	commits = g.j.Commits()
	g.write(0, 31*64*kib, pattern(10, 9))
	if g.j.Commits() != commits {
		t.Fatal("an untracked mapping still records")
	}
	if _, err := g.e.Difference(7); !errors.Is(err, ErrNoMapping) {
		t.Fatalf("Difference after untrack: %v", err)
	}
	g.checkAll(0, 2) // volume 1 is a stopped target: its data is what its store holds
}

// TestDifferenceJournalFailureFailsWrite: a difference bit that can't be committed fails the
// write, and the store is not touched.
func TestDifferenceJournalFailureFailsWrite(t *testing.T) {
	r, _ := seedRand(t)
	g := newRig(t, 2, 1<<20, 64*kib, r)
	if err := g.e.TrackDifference(3, 0, 1, bitmap.New(1<<20, 64*kib)); err != nil {
		t.Fatal(err)
	}
	g.j.Fail = func([]BitUpdate) error { return errors.New("disk on fire") }
	before := g.files[0].writes.Load()
	if err := g.devs[0].WriteAt(pattern(10, 1), 0, false); !errors.Is(err, ErrJournal) {
		t.Fatalf("write: %v, want ErrJournal", err)
	}
	if g.files[0].writes.Load() != before {
		t.Fatal("the store was written although the difference bit was not durable")
	}
	g.j.Fail = nil
	g.write(0, 0, pattern(10, 2))
	g.checkAll(0, 1)
}

// TestRestoreKeepsOtherTargets: S → T (M1) started, S → U (M2) started later, S written; then
// the restore T → S, seeded from M1's unsplit grains. S reads as T did, T and U keep their own
// points in time, under writes to every volume and until the restore completes.
func TestRestoreKeepsOtherTargets(t *testing.T) {
	r, _ := seedRand(t)
	const size, grain = 1 << 20, 64 * kib
	g := newRig(t, 3, size, grain, r)
	g.start(g.spec(1, 0, 1)) // M1: S → T
	for i := range 6 {
		g.write(0, int64(i)*grain, pattern(100, byte(10+i))) // M1 splits 0..5
	}
	g.start(g.spec(2, 0, 2)) // M2: S → U
	for i := 3; i < 9; i++ {
		g.write(0, int64(i)*grain+7, pattern(100, byte(20+i))) // U splits 3..8
	}
	g.write(1, 10*grain, pattern(10, 30)) // T's own write
	g.start(g.spec(3, 1, 0))              // the engine seeds the restore from the chain
	if p := g.progress(3); p.Split != 16-10 {
		t.Fatalf("restore seeded with %d grains, want the 6 that neither T (0-5, 10) nor U (3-8) holds", p.Split)
	}
	g.checkAll(0, 1, 2)
	for i := range 16 {
		v := i % 3
		g.write(v, int64(r.IntN(16))*grain+int64(r.IntN(1000)), pattern(200, byte(40+i)))
		g.checkAll(0, 1, 2)
	}
	for _, id := range []int{1, 2, 3} {
		if err := g.e.SetRates(id, 150, 150); err != nil {
			t.Fatal(err)
		}
	}
	g.waitEvent(CopyComplete, 3, 10*time.Second)
	g.checkAll(0, 1, 2)
}
