package cachelayer

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"fcnbd/internal/blockdev"
	"fcnbd/internal/memdev"
)

// countReads counts the lower reads of d from now on.
func countReads(d *memdev.Device) *atomic.Int64 {
	var n atomic.Int64
	d.SetHook(func(op memdev.Op, off, length int64) error {
		if op == memdev.OpRead {
			n.Add(1)
		}
		return nil
	})
	return &n
}

func randomFill(t *testing.T, d blockdev.Device) []byte {
	t.Helper()
	ref := make([]byte, d.Size())
	r := rand.New(rand.NewPCG(1, 2))
	for i := range ref {
		ref[i] = byte(r.Uint32())
	}
	if err := d.WriteAt(ref, 0, false); err != nil {
		t.Fatal(err)
	}
	return ref
}

// TestPrefetch: after Prefetch, a read of the range is served without the lower device, and
// writes afterwards are still seen.
func TestPrefetch(t *testing.T) {
	const size = 1 * MiB
	c, d := newTestCache(t, size, NewPool(16*MiB), Options{DestagePaused: true})
	ref := randomFill(t, d.Device)
	reads := countReads(d.Device)

	if err := c.Prefetch(4096+100, 512*1024); err != nil {
		t.Fatal(err)
	}
	if reads.Load() == 0 {
		t.Fatal("Prefetch read nothing below")
	}
	reads.Store(0)
	got := make([]byte, 512*1024)
	if err := c.ReadAt(got, 4096+100); err != nil {
		t.Fatal(err)
	}
	if n := reads.Load(); n != 0 {
		t.Fatalf("a read of a prefetched range went below %d times", n)
	}
	if !bytes.Equal(got, ref[4096+100:4096+100+512*1024]) {
		t.Fatal("prefetched data differs from the device")
	}
	// Prefetching again reads nothing: it is all cached.
	if err := c.Prefetch(4096, 256*1024); err != nil || reads.Load() != 0 {
		t.Fatalf("second prefetch: %v, %d lower reads", err, reads.Load())
	}
	// A write over prefetched pages is read back, and destaged.
	if err := c.WriteAt([]byte("new"), 8192+5, false); err != nil {
		t.Fatal(err)
	}
	copy(ref[8192+5:], "new")
	if err := c.ReadAt(got[:4096], 8192); err != nil || !bytes.Equal(got[:4096], ref[8192:8192+4096]) {
		t.Fatalf("read after write over a prefetched page: %v", err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	below := make([]byte, size)
	if err := d.Device.ReadAt(below, 0); err != nil || !bytes.Equal(below, ref) {
		t.Fatalf("lower after flush differs: %v", err)
	}
}

// TestPrefetchHostile: ranges outside the device fail with EINVAL, an empty one does nothing,
// and a huge one is bounded to a quarter of the cache's share and never evicts dirty pages.
func TestPrefetchHostile(t *testing.T) {
	const size = 64 * MiB
	pool := NewPool(4 * MiB)
	c, d := newTestCache(t, size, pool, Options{DestagePaused: true})
	reads := countReads(d.Device)
	for _, r := range [][2]int64{{size - 4096, 8192}, {size + 4096, 0}, {-1, 10}, {0, size + 1}} {
		if err := c.Prefetch(r[0], r[1]); !errors.Is(err, syscall.EINVAL) {
			t.Errorf("Prefetch(%d, %d) = %v, want EINVAL", r[0], r[1], err)
		}
	}
	if err := c.Prefetch(4096, 0); err != nil || reads.Load() != 0 {
		t.Fatalf("empty prefetch: %v, %d lower reads", err, reads.Load())
	}
	dirty := bytes.Repeat([]byte{7}, 64*1024)
	if err := c.WriteAt(dirty, 32*MiB, false); err != nil {
		t.Fatal(err)
	}
	before := c.Stats()
	if err := c.Prefetch(0, size); err != nil {
		t.Fatal(err)
	}
	s := c.Stats()
	limit := pool.Size() / prefetchShareDiv
	if loaded := s.CachedBytes - before.CachedBytes; loaded <= 0 || loaded > limit {
		t.Fatalf("a whole-device prefetch cached %d bytes, want (0, %d]", loaded, limit)
	}
	if s.DirtyBytes != before.DirtyBytes {
		t.Fatalf("prefetch changed dirty bytes: %d → %d", before.DirtyBytes, s.DirtyBytes)
	}
	got := make([]byte, len(dirty))
	if err := c.ReadAt(got, 32*MiB); err != nil || !bytes.Equal(got, dirty) {
		t.Fatalf("dirty data after a huge prefetch: %v", err)
	}
}

// fastDev is a memdev that can zero fast (it punches pages).
type fastDev struct{ *memdev.Device }

func (d fastDev) WriteZeroesFast(off, length int64, mayPunch, fua bool) error {
	return d.Device.WriteZeroes(off, length, true, fua)
}

// TestWriteZeroesFast: the cache passes FAST_ZERO's decision down; a refusal changes no cached
// page, a success zeroes them.
func TestWriteZeroesFast(t *testing.T) {
	const size = 1 * MiB
	for _, fast := range []bool{false, true} {
		md := memdev.New(size)
		var lower blockdev.Device = md
		if fast {
			lower = fastDev{md}
		}
		c := New(lower, NewPool(16*MiB), Options{DestagePaused: true})
		t.Cleanup(func() { _ = c.Close() })
		ref := randomFill(t, md)
		// Dirty pages the zeroing covers partly and wholly.
		w := bytes.Repeat([]byte{0x5A}, 5*4096)
		if err := c.WriteAt(w, 4096, false); err != nil {
			t.Fatal(err)
		}
		copy(ref[4096:], w)
		dirty := c.Stats().DirtyBytes
		off, n := int64(4096+1000), int64(3*4096)
		err := c.WriteZeroesFast(off, n, true, false)
		if !fast {
			if !errors.Is(err, syscall.ENOTSUP) {
				t.Fatalf("fast zero over a device without it: %v, want ENOTSUP", err)
			}
			if d := c.Stats().DirtyBytes; d != dirty {
				t.Fatalf("refused fast zero changed dirty bytes %d → %d", dirty, d)
			}
		} else {
			if err != nil {
				t.Fatal(err)
			}
			clear(ref[off : off+n])
		}
		got := make([]byte, size)
		if err := c.ReadAt(got, 0); err != nil || !bytes.Equal(got, ref) {
			t.Fatalf("fast=%v: cache reads wrong data: %v", fast, err)
		}
		if err := c.Flush(); err != nil {
			t.Fatal(err)
		}
		if err := md.ReadAt(got, 0); err != nil || !bytes.Equal(got, ref) {
			t.Fatalf("fast=%v: lower after flush wrong: %v", fast, err)
		}
	}
}

// WriteZeroesFast makes recDev a blockdev.FastZeroer that refuses a third of the requests (by
// their offset, off%3 == 1, so that a test knows which), as a layer below that would have to
// copy does.
func (d *recDev) WriteZeroesFast(off, n int64, mayPunch, fua bool) error {
	if err := blockdev.CheckRange(d.Size(), off, n); err != nil {
		return err
	}
	if off%3 == 1 {
		return blockdev.ErrNotFast
	}
	return d.WriteZeroes(off, n, mayPunch, fua)
}

// TestPrefetchRacesWrites: prefetches of a range run while one writer writes it through the
// cache below (whole pages, so the cached copies are dropped and prefetched again) and checks
// every read against its model. A prefetch that installed what it read below before such a
// write would serve the old data from then on.
func TestPrefetchRacesWrites(t *testing.T) {
	const span = 256 << 10
	c, d := newTestCache(t, 1*MiB, NewPool(16*MiB), Options{MaxCachedWrite: PageSize})
	d.SetHook(func(op memdev.Op, off, length int64) error {
		if op == memdev.OpRead {
			time.Sleep(20 * time.Microsecond) // widen the window between a prefetch's read and its install
		}
		return nil
	})
	ref := make([]byte, span)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				if err := c.Prefetch(0, span); err != nil {
					t.Errorf("prefetch: %v", err)
					return
				}
			}
		})
	}
	r := rand.New(rand.NewPCG(3, 4))
	got := make([]byte, span)
	iters := 1000
	if testing.Short() {
		iters = 300
	}
	for i := range iters {
		off := r.Int64N(span/PageSize-1) * PageSize
		p := bytes.Repeat([]byte{byte(i)}, 2*PageSize) // two pages: written through
		if err := c.WriteAt(p, off, false); err != nil {
			t.Fatal(err)
		}
		copy(ref[off:], p)
		if err := c.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, ref) {
			close(stop)
			wg.Wait()
			t.Fatalf("iteration %d: a read after a write-through differs from the model", i)
		}
	}
	close(stop)
	wg.Wait()
}
