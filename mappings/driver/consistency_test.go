package driver

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"fcnbd/cachelayer"
	"fcnbd/internal/api"
)

// TestGroupDependentWriteConsistency: docs/flashcopy.md §6. Writer pairs issue dependent writes
// — step n to A, wait for the acknowledgement, then step n to B — while the group {A→A', B→B'}
// is started with -prep. On the targets, for each writer: A' holds every step up to some a and
// none after, B' every step up to some b and none after, with a-1 ≤ b ≤ a (B(a-1) was
// acknowledged before A(a) was issued; B(n) is issued only after A(n) was acknowledged). Every
// step acknowledged before the start was called is in A', none issued after it returned is.
func TestGroupDependentWriteConsistency(t *testing.T) {
	cases := []struct {
		name   string
		rate   int
		paused bool
		runs   int
	}{
		{"nocopy", 0, false, 5},
		{"rate50", 50, false, 5},
		{"destage-paused", 0, true, 2},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			seed := uint64(time.Now().UnixNano())
			t.Logf("seed %d", seed)
			rng := rand.New(rand.NewPCG(seed, 3))
			r := newRig(t, func(o *Options) {
				if tc.paused {
					o.Cache = cachelayer.Options{DestagePaused: true}
				}
			})
			ctx := context.Background()
			r.mkvol("A", "B", "A2", "B2")
			if _, err := r.d.MkConsistGrp(ctx, api.MkConsistGrp{Name: "g"}); err != nil {
				t.Fatal(err)
			}
			for _, m := range [][2]string{{"A", "A2"}, {"B", "B2"}} {
				if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: m[0], Target: m[1], ConsistGrp: "g",
					CopyRate: ip(tc.rate), GrainSize: ip(64)}); err != nil {
					t.Fatal(err)
				}
			}
			for run := uint32(1); run <= uint32(tc.runs); run++ {
				groupRun(t, r, rng, run, tc.paused)
				if err := r.d.StopConsistGrp(ctx, "g", true, false); err != nil {
					t.Fatal(err)
				}
				if g, _ := r.d.ConsistGrp(ctx, "g"); g.Status != "stopped" {
					t.Fatalf("group after stop -force: %s", g.Status)
				}
			}
		})
	}
}

const pairs = 4

// groupRun is one start of the group under dependent writes.
func groupRun(t *testing.T, r *rig, rng *rand.Rand, run uint32, paused bool) {
	ctx := context.Background()
	slots := int64(volSize / recSize / pairs)
	var (
		acked  [pairs]atomic.Uint64 // highest step acknowledged on B (so the whole step is done)
		ackedA [pairs]atomic.Uint64 // highest step acknowledged on A
		issued [pairs]atomic.Uint64 // highest step issued to A
		stop   atomic.Bool
		wg     sync.WaitGroup
		errs   = make(chan error, 2*pairs)
	)
	a, b := r.vol("A"), r.vol("B")
	pace := time.Duration(rng.IntN(300)) * time.Microsecond
	for w := range pairs {
		wg.Go(func() {
			for n := uint64(1); n < uint64(slots) && !stop.Load(); n++ {
				off := (int64(w)*slots + int64(n)) * recSize
				rec := record(run, uint32(w), n)
				issued[w].Store(n)
				if err := a.WriteAt(rec, off, false); err != nil {
					errs <- fmt.Errorf("writer %d step %d on A: %w", w, n, err)
					return
				}
				ackedA[w].Store(n)
				if err := b.WriteAt(rec, off, false); err != nil {
					errs <- fmt.Errorf("writer %d step %d on B: %w", w, n, err)
					return
				}
				acked[w].Store(n)
				if pace > 0 {
					time.Sleep(time.Duration(rand.Int64N(int64(pace))))
				}
			}
		})
	}
	time.Sleep(time.Duration(rng.IntN(15)) * time.Millisecond)
	// At least one record acknowledged on A before the start, whatever the timing.
	for deadline := time.Now().Add(5 * time.Second); ackedA[0].Load() == 0 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	var before [pairs]uint64
	for w := range pairs {
		before[w] = ackedA[w].Load()
	}
	if paused {
		// The premise: acknowledged writes are still dirty in the source's cache, so only the
		// prepare's flush can bring them into the image.
		c, _ := r.d.Cache("A")
		if c.Stats().DirtyBytes == 0 {
			t.Fatalf("run %d: destage is paused but A's cache holds no dirty data before the start", run)
		}
	}
	err := r.d.StartConsistGrp(ctx, "g", true, false)
	var after [pairs]uint64
	for w := range pairs {
		after[w] = issued[w].Load()
	}
	time.Sleep(time.Duration(rng.IntN(5)) * time.Millisecond)
	stop.Store(true)
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Fatal(e)
	}
	if err != nil {
		t.Fatalf("run %d: startfcconsistgrp -prep: %v", run, err)
	}
	g, _ := r.d.ConsistGrp(ctx, "g")
	if g.Status != "copying" {
		t.Fatalf("run %d: group %s after start", run, g.Status)
	}
	a2, err := r.read("A2", 0, volSize)
	if err != nil {
		t.Fatal(err)
	}
	b2, err := r.read("B2", 0, volSize)
	if err != nil {
		t.Fatal(err)
	}
	for w := range pairs {
		ha := prefix(t, a2, run, w, slots, "A'")
		hb := prefix(t, b2, run, w, slots, "B'")
		if hb > ha || hb+1 < ha {
			t.Fatalf("run %d writer %d: A' holds steps 1..%d, B' 1..%d: not dependent-write consistent", run, w, ha, hb)
		}
		if ha < before[w] {
			t.Fatalf("run %d writer %d: step %d was acknowledged on A before the start, A' holds only 1..%d", run, w, before[w], ha)
		}
		if ha > after[w] {
			t.Fatalf("run %d writer %d: A' holds step %d, issued after the start returned (at %d)", run, w, ha, after[w])
		}
	}
	t.Logf("run %d: pace %v, steps before the start %v, in the image (A') %v", run, pace, before, func() (out [pairs]uint64) {
		for w := range pairs {
			out[w] = prefix(t, a2, run, w, slots, "A'")
		}
		return
	}())
}

// prefix returns h such that the image holds exactly writer w's steps 1..h of run at their
// slots; it fails the test if a step above a missing one is present.
func prefix(t *testing.T, img []byte, run uint32, w int, slots int64, vol string) uint64 {
	t.Helper()
	h := uint64(0)
	for n := int64(1); n < slots; n++ {
		off := (int64(w)*slots + n) * recSize
		got := parseRecord(img[off:off+recSize], run, uint32(w))
		switch {
		case got == uint64(n) && h == uint64(n-1):
			h = uint64(n)
		case got == uint64(n):
			t.Fatalf("run %d writer %d: %s holds step %d but not step %d (a hole below an image write)", run, w, vol, n, h+1)
		case got != 0:
			t.Fatalf("run %d writer %d: %s slot %d holds step %d", run, w, vol, n, got)
		}
	}
	return h
}
