package driver

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"fcnbd/internal/api"
	"fcnbd/internal/fcerr"
	"fcnbd/internal/store"
)

// TestFenceIsBounded: docs/flashcopy.md §6. A source write hangs below the cache (in the store)
// while a start drains: the start is abandoned after FenceTimeout with CMMVC9002E, the mapping
// stays prepared, host I/O to the source goes on (reads now; the hung write and new writes once
// the store answers), and a later start succeeds with the right image.
func TestFenceIsBounded(t *testing.T) {
	h := &hangFS{}
	const timeout = 300 * time.Millisecond
	r := newRigFS(t, func(d store.Dir) store.FS { h.Dir = d; return h }, func(o *Options) { o.FenceTimeout = timeout })
	t.Cleanup(h.lift) // before the rig closes: its final flush must not hang
	ctx := context.Background()
	r.mkvol("src", "tgt")
	r.write("src", 0, pattern(0x11, volSize))
	if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "src", Target: "tgt", Name: "m", CopyRate: ip(0), GrainSize: ip(64)}); err != nil {
		t.Fatal(err)
	}
	if err := r.d.PrestartFcmap(ctx, "m", false); err != nil {
		t.Fatal(err)
	}
	r.waitStatus("m", "prepared")

	// The source is write-through now: this write goes straight to the store, and hangs there.
	src := r.vol("src")
	h.arm(volFile(0))
	hung := make(chan error, 1)
	go func() { hung <- src.WriteAt(pattern(0x22, 8192), 1<<20, false) }()
	select {
	case <-h.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the source write never reached the store")
	}

	t0 := time.Now()
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	err := r.d.StartFcmap(sctx, "m", false, false)
	cancel()
	took := time.Since(t0)
	if fcerr.CodeOf(err) != fcerr.FenceTimeout {
		t.Fatalf("start with a request stuck below the cache: %v, want %s", err, fcerr.FenceTimeout)
	}
	if took < timeout || took > timeout+time.Second {
		t.Fatalf("the abandoned start took %v; the fence timeout is %v", took, timeout)
	}
	if s := r.status("m"); s != "prepared" {
		t.Fatalf("after the abandoned start the mapping is %s, want prepared", s)
	}
	r.expectEIO("tgt")

	// The source was released: reads elsewhere on it work while the write is still stuck.
	readDone := make(chan error, 1)
	go func() {
		p := make([]byte, 4096)
		err := src.ReadAt(p, 3<<20)
		if err == nil && !bytes.Equal(p, pattern(0x11, 4096)) {
			err = errors.New("wrong data")
		}
		readDone <- err
	}()
	select {
	case err := <-readDone:
		if err != nil {
			t.Fatalf("source read after the abandoned start: %v", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("a source read hangs after the abandoned start: the source is still held")
	}
	select {
	case err := <-hung:
		t.Fatalf("the hung write returned before its store write did: %v", err)
	default:
	}

	h.lift()
	select {
	case err := <-hung:
		if err != nil {
			t.Fatalf("the hung write, once the store answered: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the hung write never completed")
	}
	r.write("src", 2<<20, pattern(0x33, 4096))

	if err := r.d.StartFcmap(ctx, "m", false, false); err != nil {
		t.Fatalf("start after the store recovered: %v", err)
	}
	if s := r.status("m"); s != "copying" {
		t.Fatalf("after the second start: %s", s)
	}
	r.write("src", 0, pattern(0x44, volSize))
	r.expect("tgt", 0, pattern(0x11, 1<<20))
	r.expect("tgt", 1<<20, pattern(0x22, 8192))
	r.expect("tgt", 2<<20, pattern(0x33, 4096))
	r.expect("tgt", 3<<20, pattern(0x11, 1<<20))
}

// TestGroupStartReportsHold: the hold of a group start is reported in lsfcconsistgrp's
// LastHold, and is short on an idle rig.
func TestGroupStartReportsHold(t *testing.T) {
	r := newRig(t, nil)
	ctx := context.Background()
	r.mkvol("a", "b", "a2", "b2")
	if _, err := r.d.MkConsistGrp(ctx, api.MkConsistGrp{Name: "g"}); err != nil {
		t.Fatal(err)
	}
	for _, m := range [][2]string{{"a", "a2"}, {"b", "b2"}} {
		if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: m[0], Target: m[1], ConsistGrp: "g", CopyRate: ip(0)}); err != nil {
			t.Fatal(err)
		}
	}
	if g, _ := r.d.ConsistGrp(ctx, "g"); g.LastHold != 0 {
		t.Fatalf("LastHold %v before any start", g.LastHold)
	}
	if err := r.d.StartConsistGrp(ctx, "g", true, false); err != nil {
		t.Fatal(err)
	}
	g, err := r.d.ConsistGrp(ctx, "g")
	if err != nil {
		t.Fatal(err)
	}
	if g.LastHold <= 0 || g.LastHold >= time.Second {
		t.Fatalf("LastHold %v after a start on an idle rig, want (0, 1s)", g.LastHold)
	}
	t.Logf("hold of an idle group start: %v", g.LastHold)
}

// TestFenceLetsNothingThrough: many writers hammer a source with sequence-numbered records,
// each strictly sequential (the next write only after the acknowledgement), while the mapping
// is started. The target must show, per writer, exactly the records up to some k and none
// after: every record acknowledged before the start and none issued after it returned. Slots
// wrap around, so for each slot the target must hold the newest record not after k.
func TestFenceLetsNothingThrough(t *testing.T) {
	r := newRig(t, nil)
	ctx := context.Background()
	r.mkvol("src", "tgt")
	if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "src", Target: "tgt", Name: "m", CopyRate: ip(0), GrainSize: ip(64)}); err != nil {
		t.Fatal(err)
	}
	const writers = 8
	const slots = volSize / recSize / writers
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 5))
	for run := uint32(1); run <= 4; run++ {
		var (
			issued, acked [writers]atomic.Uint64
			stop          atomic.Bool
			wg            sync.WaitGroup
			errs          = make(chan error, writers)
		)
		src := r.vol("src")
		for w := range writers {
			wg.Go(func() {
				for n := uint64(1); !stop.Load(); n++ {
					off := int64(w*slots+int(n%slots)) * recSize
					issued[w].Store(n)
					if err := src.WriteAt(record(run, uint32(w), n), off, n%23 == 0); err != nil {
						errs <- err
						return
					}
					acked[w].Store(n)
				}
			})
		}
		time.Sleep(time.Duration(rng.IntN(20)) * time.Millisecond)
		var before, after [writers]uint64
		for w := range writers {
			before[w] = acked[w].Load()
		}
		prep := run%2 == 1
		if !prep {
			if err := r.d.PrestartFcmap(ctx, "m", false); err != nil {
				t.Fatal(err)
			}
			r.waitStatus("m", "prepared")
			for w := range writers {
				before[w] = acked[w].Load()
			}
		}
		err := r.d.StartFcmap(ctx, "m", prep, false)
		for w := range writers {
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
			t.Fatalf("run %d: start: %v", run, err)
		}
		img, err := r.read("tgt", 0, volSize)
		if err != nil {
			t.Fatal(err)
		}
		var ks [writers]uint64
		for w := range writers {
			// k is the newest record of the writer anywhere in the image.
			var k uint64
			got := make([]uint64, slots)
			for s := 0; s < slots; s++ {
				off := (w*slots + s) * recSize
				got[s] = parseRecord(img[off:off+recSize], run, uint32(w))
				k = max(k, got[s])
			}
			for s := 0; s < slots; s++ {
				var want uint64 // the newest n ≤ k with n ≡ s (mod slots), n ≥ 1
				if k >= uint64(s) {
					want = k - (k-uint64(s))%slots
				}
				if got[s] != want {
					t.Fatalf("run %d writer %d: the target's newest record is %d, but slot %d holds %d, want %d: not a prefix",
						run, w, k, s, got[s], want)
				}
			}
			if k < before[w] {
				t.Fatalf("run %d writer %d: record %d was acknowledged before the start, the target's newest is %d", run, w, before[w], k)
			}
			if k > after[w] {
				t.Fatalf("run %d writer %d: the target holds record %d, issued after the start returned (%d)", run, w, k, after[w])
			}
			ks[w] = k
		}
		t.Logf("run %d (prep %v): acknowledged before the start %v, in the image %v", run, prep, before, ks)
		if err := r.d.StopFcmap(ctx, "m", true, false); err != nil {
			t.Fatal(err)
		}
	}
}
