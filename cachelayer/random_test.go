package cachelayer

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"runtime"
	"sync"
	"testing"
	"time"

	"fcnbd/internal/blockdev"
	"fcnbd/internal/memdev"
)

// TestRandomized runs concurrent random operations against a reference image. Each goroutine
// owns a region whose edges are not page aligned, so neighbours share pages; every read must
// equal the reference, and after the final Flush lower must equal it too. A controller toggles
// destage, write-through and the fence meanwhile, and the budget is small enough to force
// eviction and write-through. Prefetches and fast zeroes (a third refused below) are in the mix.
func TestRandomized(t *testing.T) {
	const (
		goroutines = 6
		region     = 100*1024 + 300
		size       = (goroutines*region/PageSize + 2) * PageSize
	)
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	d := newRecDev(size)
	hookRng := rand.New(rand.NewPCG(seed, 99))
	var hookMu sync.Mutex
	d.SetHook(func(op memdev.Op, off, n int64) error {
		hookMu.Lock()
		r := hookRng.IntN(8)
		hookMu.Unlock()
		if r == 0 {
			runtime.Gosched()
		}
		if r == 1 {
			time.Sleep(50 * time.Microsecond)
		}
		return nil
	})
	pool := NewPool(128 * PageSize)
	c := New(d, pool, Options{MaxDestageRun: 16 * PageSize, EagerDestage: true})
	t.Cleanup(func() { _ = c.Close() })

	ref := make([]byte, size)
	iters := 2000
	if testing.Short() {
		iters = 500
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for g := range goroutines {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(seed, uint64(g)))
			base := int64(g) * region
			buf := make([]byte, region)
			for i := range iters {
				off := rng.Int64N(region)
				n := rng.Int64N(min(region-off, 3*PageSize)) + 1
				if rng.IntN(10) == 0 {
					n = region - off // large, often over the cached-write limit
				}
				switch k := rng.IntN(20); {
				case k < 8:
					p := buf[:n]
					for j := range p {
						p[j] = byte(rng.Uint32())
					}
					if err := c.WriteAt(p, base+off, rng.IntN(10) == 0); err != nil {
						t.Errorf("write: %v", err)
						return
					}
					copy(ref[base+off:], p)
				case k < 16:
					p := buf[:n]
					if err := c.ReadAt(p, base+off); err != nil {
						t.Errorf("read: %v", err)
						return
					}
					if !bytes.Equal(p, ref[base+off:base+off+n]) {
						t.Errorf("goroutine %d op %d: read [%d,+%d) differs from the reference", g, i, base+off, n)
						return
					}
				case k < 17:
					if err := c.Trim(base+off, n); err != nil {
						t.Errorf("trim: %v", err)
						return
					}
					clear(ref[base+off : base+off+n])
				case k < 18:
					if err := c.WriteZeroes(base+off, n, rng.IntN(2) == 0, rng.IntN(2) == 0); err != nil {
						t.Errorf("zeroes: %v", err)
						return
					}
					clear(ref[base+off : base+off+n])
				case k < 19 && rng.IntN(2) == 0:
					if err := c.Prefetch(base+off, n); err != nil {
						t.Errorf("prefetch: %v", err)
						return
					}
				case k < 19:
					err := c.WriteZeroesFast(base+off, n, rng.IntN(2) == 0, rng.IntN(2) == 0)
					switch {
					case (base+off)%3 == 1:
						if !errors.Is(err, blockdev.ErrNotFast) {
							t.Errorf("fast zero the lower refuses: %v", err)
							return
						}
					case err != nil:
						t.Errorf("fast zero: %v", err)
						return
					default:
						clear(ref[base+off : base+off+n])
					}
				default:
					if err := c.Flush(); err != nil {
						t.Errorf("flush: %v", err)
						return
					}
				}
			}
		})
	}
	var ctl sync.WaitGroup
	ctl.Go(func() {
		rng := rand.New(rand.NewPCG(seed, 1000))
		for {
			select {
			case <-stop:
				c.ResumeDestage()
				c.SetWriteThrough(false)
				return
			case <-time.After(time.Duration(rng.IntN(3000)) * time.Microsecond):
			}
			switch rng.IntN(4) {
			case 0:
				c.PauseDestage()
			case 1:
				c.ResumeDestage()
			case 2:
				c.SetWriteThrough(rng.IntN(2) == 0)
			case 3:
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				if err := c.Hold(ctx); err != nil {
					t.Errorf("Hold: %v", err)
				}
				cancel()
				time.Sleep(200 * time.Microsecond)
				c.Release()
			}
		}
	})
	wg.Wait()
	close(stop)
	ctl.Wait()
	if t.Failed() {
		return
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(lowerBytes(t, d, 0, size), ref) {
		t.Fatal("lower differs from the reference after the final Flush")
	}
	if pool.Used() > pool.Size() {
		t.Fatalf("pool uses %d of %d", pool.Used(), pool.Size())
	}
	t.Logf("stats %+v", c.Stats())
}
