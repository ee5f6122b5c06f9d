package cow

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"fcnbd/internal/blockdev"
)

// TestModelOracle drives every volume with concurrent random writes, trims and reads (one
// goroutine per volume, so the model of each volume is exact) while mappings start between
// phases (under the fence), background copy runs, cleaning stops run concurrently with I/O,
// and checks every read against the model.
func TestModelOracle(t *testing.T) {
	seeds := 2
	if testing.Short() {
		seeds = 1
	}
	for i := range seeds {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			r, seed := seedRand(t)
			runOracle(t, r, seed)
		})
	}
}

func runOracle(t *testing.T, r *rand.Rand, seed uint64) {
	const (
		nvols = 8
		grain = 64 * kib
	)
	size := int64(24*grain + 12*kib) // short last grain
	g := newRig(t, nvols, size, grain, r)

	// active[v]: v is read and written by its goroutine (a stopped target below 100 % has lost
	// its data and is left alone).
	active := map[int]bool{}
	for v := range nvols {
		active[v] = true
	}

	phase := func(name string, ops int, during func()) {
		var wg sync.WaitGroup
		errs := make(chan error, nvols)
		for v := range nvols {
			if !active[v] {
				continue
			}
			vr := rand.New(rand.NewPCG(r.Uint64(), uint64(v)))
			wg.Go(func() {
				for range ops {
					if err := randomOp(g, vr, v); err != nil {
						errs <- fmt.Errorf("%s: %w", name, err)
						return
					}
				}
			})
		}
		if during != nil {
			during()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatalf("seed %d: %v", seed, err)
		}
		for v := range nvols {
			if active[v] {
				if err := g.check(v, 0, size); err != nil {
					t.Fatalf("seed %d: after %s: %v", seed, name, err)
				}
			}
		}
	}

	phase("no mappings", 50, nil)
	// Multi-target: 0 → 1, 2, 3, 4 started one by one with I/O in between.
	for tgt := 1; tgt <= 4; tgt++ {
		g.start(g.spec(tgt, 0, tgt))
		phase(fmt.Sprintf("started 0→%d", tgt), 60, nil)
	}
	// Cascade of depth 3: 2 → 5 → 6 → 7, two of them in one group start.
	g.start(g.spec(5, 2, 5))
	phase("cascade 2→5", 60, nil)
	g.start(g.spec(6, 5, 6), g.spec(7, 6, 7))
	phase("cascade 5→6→7", 80, nil)

	// Background copy on some mappings while I/O runs.
	for _, id := range []int{3, 6} {
		if err := g.e.SetRates(id, 120+r.IntN(30), 100); err != nil {
			t.Fatal(err)
		}
	}
	phase("background copy", 100, nil)

	// A cleaning stop of a middle target (0→3) while I/O runs on everything else.
	active[3] = false
	phase("stopping 0→3", 100, func() {
		if _, err := g.e.StopMapping(3, false); err != nil {
			t.Error(err)
		}
	})
	g.waitEvent(CleanComplete, 3, 20*time.Second)
	if p := g.progress(3); p.Percent == 100 {
		active[3] = true // a finished target keeps its image
	}
	phase("after stop", 80, nil)

	// Everything copies to the end.
	for _, id := range []int{1, 2, 4, 5, 6, 7} {
		if err := g.e.SetRates(id, 150, 150); err != nil {
			t.Fatal(err)
		}
	}
	phase("copy to the end", 100, nil)
	deadline := time.Now().Add(30 * time.Second)
	for _, id := range []int{1, 2, 4, 5, 6, 7} {
		for g.progress(id).Percent < 100 {
			if time.Now().After(deadline) {
				t.Fatalf("seed %d: mapping %d stuck at %+v", seed, id, g.progress(id))
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	phase("all copied", 60, nil)
}

// randomOp is one host operation on volume v: mostly writes of random sizes (some whole grains,
// some across grain boundaries), some trims and zeroings (fast ones too), and a read checked
// against the model.
func randomOp(g *rig, r *rand.Rand, v int) error {
	off := r.Int64N(g.size)
	var n int64
	switch r.IntN(4) {
	case 0:
		off = off / g.grain * g.grain
		n = g.grain
	case 1:
		n = 1 + r.Int64N(3*g.grain)
	default:
		off = off / 512 * 512
		n = 512 * (1 + r.Int64N(16))
	}
	n = min(n, g.size-off)
	switch k := r.IntN(10); {
	case k < 6:
		p := make([]byte, n)
		fill(r, p)
		if err := g.devs[v].WriteAt(p, off, r.IntN(8) == 0); err != nil {
			return fmt.Errorf("write vol %d %d+%d: %w", v, off, n, err)
		}
		g.mu.Lock()
		copy(g.model[v][off:], p)
		g.mu.Unlock()
	case k < 7:
		var err error
		switch r.IntN(3) {
		case 0:
			err = g.devs[v].Trim(off, n)
		case 1:
			// FAST_ZERO: refused where a grain would be copied, and then nothing changed.
			err = blockdev.WriteZeroesFast(g.devs[v], off, n, r.IntN(2) == 0, false)
			if errors.Is(err, blockdev.ErrNotFast) {
				return g.check(v, off, n)
			}
		default:
			err = g.devs[v].WriteZeroes(off, n, r.IntN(2) == 0, false)
		}
		if err != nil {
			return fmt.Errorf("zero vol %d %d+%d: %w", v, off, n, err)
		}
		g.mu.Lock()
		clear(g.model[v][off : off+n])
		g.mu.Unlock()
	default:
		return g.check(v, off, n)
	}
	return nil
}
