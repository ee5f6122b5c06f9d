package cow

import (
	"errors"
	"syscall"
	"testing"

	"fcnbd/internal/blockdev"
	"fcnbd/internal/store"
)

// ZeroFast makes memFile a store.FastZeroer: clearing memory is a metadata operation's equal.
func (f *memFile) ZeroFast(off, length int64, punch bool) error {
	if err := f.callHook("zerofast", off, length); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	clear(f.data[off : off+length])
	return nil
}

var _ store.FastZeroer = (*memFile)(nil)

func fastZero(g *rig, v int, off, n int64) error {
	return blockdev.WriteZeroesFast(g.devs[v], off, n, true, false)
}

// TestFastZero: FAST_ZERO's decision in the engine. Zeroing that would copy a grain is refused
// with ENOTSUP and changes nothing; zeroing that copies nothing is done.
func TestFastZero(t *testing.T) {
	r, _ := seedRand(t)
	const grain = 64 * kib
	g := newRig(t, 3, 1<<20, grain, r)

	// Unlinked volume: done.
	if err := fastZero(g, 2, 1000, 3*grain); err != nil {
		t.Fatalf("fast zero of an unlinked volume: %v", err)
	}
	clear(g.model[2][1000 : 1000+3*grain])
	g.checkAll(2)

	g.start(g.spec(1, 0, 1))
	w0, w1 := g.files[0].writes.Load(), g.files[1].writes.Load()

	// The source's grains are not held by the target: zeroing would copy them first.
	err := fastZero(g, 0, 2*grain, grain)
	if !errors.Is(err, blockdev.ErrNotFast) || !errors.Is(err, syscall.ENOTSUP) {
		t.Fatalf("fast zero of an unsplit source grain: got %v, want ENOTSUP", err)
	}
	// A partial grain of the target it does not hold: it would be filled first.
	if err := fastZero(g, 1, 5*grain+10, 100); !errors.Is(err, blockdev.ErrNotFast) {
		t.Fatalf("fast zero of part of an unsplit target grain: got %v, want ENOTSUP", err)
	}
	if g.files[0].writes.Load() != w0 || g.files[1].writes.Load() != w1 {
		t.Fatal("a refused fast zero wrote to a store")
	}
	if p := g.progress(1); p.Split != 0 {
		t.Fatalf("a refused fast zero split grains: %+v", p)
	}
	g.checkAll(0, 1)

	// Whole grains of the target: no fill is needed, the bits follow the zeroing.
	if err := fastZero(g, 1, 6*grain, 2*grain); err != nil {
		t.Fatalf("fast zero of whole target grains: %v", err)
	}
	clear(g.model[1][6*grain : 8*grain])
	if p := g.progress(1); p.Split != 2 {
		t.Fatalf("after zeroing two whole target grains: %+v", p)
	}
	g.checkAll(0, 1)

	// Once the target holds a grain, the source's is free to zero fast, partly or wholly.
	g.write(0, 3*grain+5, pattern(10, 0x33)) // copy-on-write splits grain 3
	if err := fastZero(g, 0, 3*grain+100, 1000); err != nil {
		t.Fatalf("fast zero of a split source grain: %v", err)
	}
	clear(g.model[0][3*grain+100 : 3*grain+1100])
	g.checkAll(0, 1)

	// A store that cannot zero fast refuses, unchanged.
	g.files[2].setHook(func(op string, off, length int64) error {
		if op == "zerofast" {
			return blockdev.ErrNotFast
		}
		return nil
	})
	if err := fastZero(g, 2, 0, 4096); !errors.Is(err, syscall.ENOTSUP) {
		t.Fatalf("fast zero on a store that cannot: got %v, want ENOTSUP", err)
	}
	g.checkAll(2)
}
