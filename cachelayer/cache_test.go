package cachelayer

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"syscall"
	"testing"
	"time"

	"fcnbd/internal/memdev"
)

const MiB = 1 << 20

func TestReadYourWrites(t *testing.T) {
	const size = 1 * MiB
	type wr struct {
		off int64
		n   int
	}
	tests := []struct {
		name   string
		writes []wr
	}{
		{"aligned page", []wr{{4096, 4096}}},
		{"unaligned inside page", []wr{{4096 + 100, 700}}},
		{"spanning pages", []wr{{4096 - 10, 3 * 4096}}},
		{"partial over partial", []wr{{8192 + 512, 512}, {8192 + 1000, 3000}}},
		{"many pages", []wr{{0, 64 * 4096}}},
		{"last page", []wr{{size - 4096 - 5, 4096 + 5}}},
		{"overwrite", []wr{{0, 3 * 4096}, {4096, 100}, {2 * 4096, 4096}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, d := newTestCache(t, size, nil, Options{DestagePaused: true})
			// Lower holds a pattern, so that partial hits must merge with what is below.
			ref := make([]byte, size)
			for i := range ref {
				ref[i] = byte(i*7 + 3)
			}
			if err := d.Device.WriteAt(ref, 0, false); err != nil {
				t.Fatal(err)
			}
			before := bytes.Clone(ref)
			for i, w := range tt.writes {
				p := fill(w.n, byte(0xA0+i))
				if err := c.WriteAt(p, w.off, false); err != nil {
					t.Fatalf("WriteAt: %v", err)
				}
				copy(ref[w.off:], p)
			}
			// Every window around the writes, including partial hits, reads the reference.
			for _, w := range tt.writes {
				for _, win := range [][2]int64{
					{w.off, int64(w.n)},
					{max(w.off-5000, 0), min(int64(w.n)+10000, size-max(w.off-5000, 0))},
					{w.off + 1, 1},
					{0, size},
				} {
					got := readCache(t, c, win[0], win[1])
					if !bytes.Equal(got, ref[win[0]:win[0]+win[1]]) {
						t.Fatalf("read [%d,+%d) differs from what was written", win[0], win[1])
					}
				}
			}
			if !bytes.Equal(lowerBytes(t, d, 0, size), before) {
				t.Fatal("acknowledged writes reached lower while destage was paused")
			}
			if st := c.Stats(); st.DirtyBytes == 0 || st.ReadHits == 0 {
				t.Fatalf("stats %+v: want dirty bytes and read hits", st)
			}
			if err := c.Flush(); err != nil {
				t.Fatalf("Flush: %v", err)
			}
			if !bytes.Equal(lowerBytes(t, d, 0, size), ref) {
				t.Fatal("lower differs from the writes after Flush")
			}
			evs := d.events()
			if len(evs) == 0 || evs[len(evs)-1].op != "flush" {
				t.Fatalf("last lower op is not flush: %+v", evs)
			}
			if st := c.Stats(); st.DirtyBytes != 0 {
				t.Fatalf("dirty bytes %d after Flush", st.DirtyBytes)
			}
		})
	}
}

func TestFlushCoversOtherGoroutines(t *testing.T) {
	const size = 4 * MiB
	c, d := newTestCache(t, size, nil, Options{DestagePaused: true})
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 20 {
				off := int64(g*20+i) * 4096
				if err := c.WriteAt(fill(4096, byte(g+1)), off, false); err != nil {
					t.Errorf("WriteAt: %v", err)
				}
			}
		})
	}
	wg.Wait() // all acknowledged before the Flush
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	for g := range 8 {
		for i := range 20 {
			off := int64(g*20+i) * 4096
			if !bytes.Equal(lowerBytes(t, d, off, 4096), fill(4096, byte(g+1))) {
				t.Fatalf("page at %d missing from lower after Flush", off)
			}
		}
	}
}

func TestFUA(t *testing.T) {
	c, d := newTestCache(t, MiB, nil, Options{DestagePaused: true})
	// An older dirty copy of the page must not overwrite the FUA data later.
	if err := c.WriteAt(fill(4096, 1), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteAt(fill(100, 2), 50, true); err != nil {
		t.Fatal(err)
	}
	want := fill(4096, 1)
	copy(want[50:], fill(100, 2))
	low := lowerBytes(t, d, 50, 100)
	if !bytes.Equal(low, fill(100, 2)) {
		t.Fatal("FUA data not in lower when the write returned")
	}
	evs := d.events()
	if e := evs[len(evs)-1]; e.op != "write" || !e.fua || e.off != 50 {
		t.Fatalf("FUA write reached lower as %+v, want a fua write at 50", e)
	}
	if !bytes.Equal(readCache(t, c, 0, 4096), want) {
		t.Fatal("read after FUA differs")
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(lowerBytes(t, d, 0, 4096), want) {
		t.Fatal("lower after Flush differs")
	}
}

func TestFlushFailure(t *testing.T) {
	c, d := newTestCache(t, MiB, nil, Options{DestagePaused: true, EagerDestage: true})
	if err := c.WriteAt(fill(8192, 7), 4096, false); err != nil {
		t.Fatal(err)
	}
	d.failWrites.Store(true)
	err := c.Flush()
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("Flush with failing lower = %v, want EIO", err)
	}
	if st := c.Stats(); st.DirtyBytes != 8192 || st.DestageErrors == 0 {
		t.Fatalf("after failed Flush: %+v, want 8192 dirty bytes and a destage error", st)
	}
	// Background destage fails too while the fault lasts; Flush keeps failing.
	c.ResumeDestage()
	time.Sleep(30 * time.Millisecond)
	if err := c.Flush(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("second Flush with failing lower = %v, want EIO", err)
	}
	if !bytes.Equal(readCache(t, c, 4096, 8192), fill(8192, 7)) {
		t.Fatal("data lost from the cache after failed destage")
	}
	d.failWrites.Store(false)
	if err := c.Flush(); err != nil {
		t.Fatalf("Flush after the fault cleared: %v", err)
	}
	if !bytes.Equal(lowerBytes(t, d, 4096, 8192), fill(8192, 7)) {
		t.Fatal("data not in lower after successful Flush")
	}
	// A failing lower flush fails the Flush.
	d.failFlush.Store(true)
	if err := c.Flush(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("Flush with failing lower flush = %v, want EIO", err)
	}
}

// A write landing on a page whose destage is in flight must survive it.
func TestWriteDuringDestage(t *testing.T) {
	d := newRecDev(MiB)
	entered, unblock := make(chan struct{}, 1), make(chan struct{})
	var once sync.Once
	d.SetHook(func(op memdev.Op, off, n int64) error {
		if op == memdev.OpWrite {
			once.Do(func() { entered <- struct{}{}; <-unblock })
		}
		return nil
	})
	c := New(d, nil, Options{EagerDestage: true})
	t.Cleanup(func() { _ = c.Close() })
	if err := c.WriteAt(fill(4096, 1), 0, false); err != nil {
		t.Fatal(err)
	}
	<-entered // background destage of version 1 is in flight
	if err := c.WriteAt(fill(10, 2), 100, false); err != nil {
		t.Fatal(err)
	}
	close(unblock)
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	want := fill(4096, 1)
	copy(want[100:], fill(10, 2))
	if !bytes.Equal(lowerBytes(t, d, 0, 4096), want) {
		t.Fatal("the write made during destage was lost below")
	}
	if !bytes.Equal(readCache(t, c, 0, 4096), want) {
		t.Fatal("the write made during destage was lost in the cache")
	}
}

func TestWriteThrough(t *testing.T) {
	d := newRecDev(MiB)
	gate := make(chan struct{})
	d.SetHook(func(op memdev.Op, off, n int64) error {
		if op == memdev.OpWrite {
			<-gate
		}
		return nil
	})
	c := New(d, nil, Options{DestagePaused: true})
	t.Cleanup(func() { _ = c.Close() })
	c.SetWriteThrough(true)
	done := make(chan error, 1)
	go func() { done <- c.WriteAt(fill(6000, 9), 1000, false) }()
	select {
	case err := <-done:
		t.Fatalf("write-through write returned (%v) before lower.WriteAt did", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(gate)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(lowerBytes(t, d, 1000, 6000), fill(6000, 9)) {
		t.Fatal("write-through data not in lower at reply")
	}
	if st := c.Stats(); st.DirtyBytes != 0 {
		t.Fatalf("write-through left %d dirty bytes", st.DirtyBytes)
	}
	// A page dirty from before write-through keeps its other bytes until Flush.
	c.SetWriteThrough(false)
	if err := c.WriteAt(fill(4096, 3), 64*1024, false); err != nil {
		t.Fatal(err)
	}
	c.SetWriteThrough(true)
	if err := c.WriteAt(fill(10, 4), 64*1024+10, false); err != nil {
		t.Fatal(err)
	}
	want := fill(4096, 3)
	copy(want[10:], fill(10, 4))
	if !bytes.Equal(readCache(t, c, 64*1024, 4096), want) {
		t.Fatal("read differs after write-through over a dirty page")
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(lowerBytes(t, d, 64*1024, 4096), want) {
		t.Fatal("lower differs after Flush")
	}
}

func TestInvalidate(t *testing.T) {
	c, d := newTestCache(t, MiB, nil, Options{DestagePaused: true})
	if err := d.Device.WriteAt(fill(3*4096, 5), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteAt(fill(3*4096, 6), 0, false); err != nil {
		t.Fatal(err)
	}
	c.Invalidate()
	if !bytes.Equal(readCache(t, c, 0, 3*4096), fill(3*4096, 5)) {
		t.Fatal("read after Invalidate does not come from lower")
	}
	if st := c.Stats(); st.DirtyBytes != 0 || st.CachedBytes != 0 {
		t.Fatalf("stats after Invalidate: %+v", st)
	}
	if c.pool.Used() != 0 {
		t.Fatalf("pool still holds %d bytes", c.pool.Used())
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(lowerBytes(t, d, 0, 3*4096), fill(3*4096, 5)) {
		t.Fatal("invalidated data reached lower")
	}
}

func TestTrimAndZeroesOrdering(t *testing.T) {
	const size = MiB
	ops := []struct {
		name string
		do   func(c *Cache, off, n int64) error
	}{
		{"trim", func(c *Cache, off, n int64) error { return c.Trim(off, n) }},
		{"zeroes", func(c *Cache, off, n int64) error { return c.WriteZeroes(off, n, false, false) }},
		{"zeroes punch fua", func(c *Cache, off, n int64) error { return c.WriteZeroes(off, n, true, true) }},
		{"huge zeroes", func(c *Cache, off, n int64) error { return c.WriteZeroes(0, size, true, false) }},
	}
	for _, op := range ops {
		for _, inflight := range []bool{false, true} {
			name := op.name + "/dirty"
			if inflight {
				name = op.name + "/destage in flight"
			}
			t.Run(name, func(t *testing.T) {
				d := newRecDev(size)
				var slow atomic32
				d.SetHook(func(o memdev.Op, off, n int64) error {
					if o == memdev.OpWrite && slow.get() {
						time.Sleep(20 * time.Millisecond)
					}
					return nil
				})
				c := New(d, nil, Options{DestagePaused: true, EagerDestage: true})
				t.Cleanup(func() { _ = c.Close() })
				if err := c.WriteAt(fill(4*4096, 1), 0, false); err != nil {
					t.Fatal(err)
				}
				off, n := int64(4096+100), int64(2*4096) // partial, whole, partial
				if inflight {
					slow.set(true)
					c.ResumeDestage()
					time.Sleep(5 * time.Millisecond) // destage of the old data is in flight
				}
				if err := op.do(c, off, n); err != nil {
					t.Fatal(err)
				}
				want := fill(4*4096, 1)
				if op.name == "huge zeroes" {
					off, n = 0, 4*4096
				}
				clear(want[off : off+n])
				if !bytes.Equal(readCache(t, c, 0, 4*4096), want) {
					t.Fatal("read after trim/zeroes does not show zeroes")
				}
				slow.set(false)
				c.ResumeDestage()
				if err := c.Flush(); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(lowerBytes(t, d, 0, 4*4096), want) {
					t.Fatal("older dirty data overwrote the zeroes below")
				}
				if !bytes.Equal(readCache(t, c, 0, 4*4096), want) {
					t.Fatal("read after Flush differs")
				}
			})
		}
	}
}

func TestBudget(t *testing.T) {
	pool := NewPool(64 * 4096)
	c, d := newTestCache(t, 4*MiB, pool, Options{DestagePaused: true, EagerDestage: true})
	ref := make([]byte, 4*MiB)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 1000 {
		off := rng.Int64N(4*MiB/4096) * 4096
		p := fill(4096, byte(i))
		if err := c.WriteAt(p, off, false); err != nil {
			t.Fatal(err)
		}
		copy(ref[off:], p)
		if pool.Used() > pool.Size() {
			t.Fatalf("pool uses %d of %d bytes", pool.Used(), pool.Size())
		}
	}
	if st := c.Stats(); st.CachedBytes > pool.Size() || st.WriteThroughBytes == 0 {
		t.Fatalf("stats %+v: want at most %d cached and some write-through", st, pool.Size())
	}
	if !bytes.Equal(readCache(t, c, 0, 4*MiB), ref) {
		t.Fatal("reads differ while the budget is full")
	}
	c.ResumeDestage()
	// With destage running again the cache takes writes again.
	for i := range 200 {
		if err := c.WriteAt(fill(4096, byte(i)), int64(i)*4096, false); err != nil {
			t.Fatal(err)
		}
		copy(ref[int64(i)*4096:], fill(4096, byte(i)))
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(lowerBytes(t, d, 0, 4*MiB), ref) {
		t.Fatal("lower differs after Flush")
	}
}

func TestFairness(t *testing.T) {
	pool := NewPool(64 * 4096)
	a, _ := newTestCache(t, 4*MiB, pool, Options{DestagePaused: true})
	b, _ := newTestCache(t, 4*MiB, pool, Options{DestagePaused: true})
	// A borrows the whole budget while B is idle, and keeps it dirty.
	for i := range 100 {
		if err := a.WriteAt(fill(4096, 1), int64(i)*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	if got := a.Stats().CachedBytes; got != pool.Size() {
		t.Fatalf("A caches %d bytes, want the whole idle budget %d", got, pool.Size())
	}
	// B can't take dirty memory from A: it writes through, without waiting.
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 10 {
			if err := b.WriteAt(fill(4096, 2), int64(i)*4096, false); err != nil {
				t.Error(err)
			}
		}
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("B's writes wait for A's paused destage")
	}
	if b.Stats().WriteThroughBytes != 10*4096 {
		t.Fatalf("B: %+v, want 10 pages written through", b.Stats())
	}
	// Once A's data is clean, B reclaims up to its share from A; A can't take it back.
	if err := a.Flush(); err != nil {
		t.Fatal(err)
	}
	for i := range 64 {
		if err := b.WriteAt(fill(4096, 3), int64(i)*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 64 {
		if err := a.WriteAt(fill(4096, 4), int64(200+i)*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	share := pool.Size() / 2
	if got := b.Stats().CachedBytes; got < share {
		t.Fatalf("B caches %d bytes, want at least its share %d", got, share)
	}
	if a.Stats().CachedBytes+b.Stats().CachedBytes > pool.Size() {
		t.Fatal("budget exceeded")
	}
}

func TestCloseFlushes(t *testing.T) {
	d := newRecDev(MiB)
	c := New(d, nil, Options{DestagePaused: true})
	if err := c.WriteAt(fill(4096, 8), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(lowerBytes(t, d, 0, 4096), fill(4096, 8)) {
		t.Fatal("Close did not flush")
	}
	if err := c.WriteAt(fill(1, 1), 0, false); !errors.Is(err, syscall.ESHUTDOWN) {
		t.Fatalf("write after Close = %v, want ESHUTDOWN", err)
	}
}

func TestHoldContextWithHungLower(t *testing.T) {
	d := newRecDev(MiB)
	hang, entered := make(chan struct{}), make(chan struct{})
	d.SetHook(func(op memdev.Op, off, n int64) error {
		if op == memdev.OpWrite && off == 0 {
			close(entered)
			<-hang
		}
		return nil
	})
	c := New(d, nil, Options{EagerDestage: true})
	t.Cleanup(func() { _ = c.Close() })
	hung := make(chan error, 1)
	go func() { hung <- c.WriteAt(fill(4096, 1), 0, true) }()
	<-entered
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := c.Hold(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Hold = %v, want deadline exceeded", err)
	}
	// New requests wait, they don't fail.
	later := make(chan error, 2)
	go func() { later <- c.WriteAt(fill(4096, 2), 8192, false) }()
	go func() { later <- c.ReadAt(make([]byte, 4096), 8192) }()
	select {
	case err := <-later:
		t.Fatalf("request admitted while held: %v", err)
	case <-time.After(30 * time.Millisecond):
	}
	c.Release()
	for range 2 {
		if err := <-later; err != nil {
			t.Fatalf("request after Release: %v", err)
		}
	}
	close(hang)
	if err := <-hung; err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
}

// The fence must let nothing through: many writers hammer the cache, and the recording device
// shows no write below between Hold's return and Release, while every write acknowledged
// before Hold was called is below when it returns (write-through) or in the cache (write-back).
func TestHoldFence(t *testing.T) {
	for _, wt := range []bool{true, false} {
		name := "write-back"
		if wt {
			name = "write-through"
		}
		t.Run(name, func(t *testing.T) {
			const writers = 16
			c, d := newTestCache(t, 4*MiB, nil, Options{EagerDestage: true})
			c.SetWriteThrough(wt)
			var acked [writers]atomic32
			stop := make(chan struct{})
			var wg sync.WaitGroup
			for w := range writers {
				wg.Go(func() {
					p := make([]byte, 4096)
					for v := 1; ; v++ {
						select {
						case <-stop:
							return
						default:
						}
						p[0], p[1] = byte(v), byte(v>>8)
						fua := v%7 == 0
						if err := c.WriteAt(p, int64(w)*4096, fua); err != nil {
							t.Error(err)
							return
						}
						acked[w].store(int32(v))
						if v%5 == 0 {
							_ = c.ReadAt(p[:512], int64(w)*4096)
						}
						if v%11 == 0 {
							_ = c.Flush()
						}
					}
				})
			}
			for round := range 5 {
				time.Sleep(20 * time.Millisecond)
				var before [writers]int32
				for w := range writers {
					before[w] = acked[w].load()
				}
				if err := c.Hold(context.Background()); err != nil {
					t.Fatal(err)
				}
				d.mark("held")
				if wt {
					for w := range writers {
						b := lowerBytes(t, d, int64(w)*4096, 2)
						if got := int32(b[0]) | int32(b[1])<<8; got < before[w]&0xffff && before[w] < 0xffff {
							t.Fatalf("round %d: writer %d acked %d before Hold, lower has %d", round, w, before[w], got)
						}
					}
				}
				time.Sleep(20 * time.Millisecond)
				d.mark("release")
				c.Release()
				if evs := between(d.events(), "held", "release"); len(evs) > 0 {
					t.Fatalf("round %d: %d lower ops while held, first %+v", round, len(evs), evs[0])
				}
				d.mu.Lock()
				d.log = d.log[:0]
				d.mu.Unlock()
			}
			close(stop)
			wg.Wait()
		})
	}
}

type atomic32 struct {
	mu sync.Mutex
	v  int32
}

func (a *atomic32) store(v int32) { a.mu.Lock(); a.v = v; a.mu.Unlock() }
func (a *atomic32) load() int32   { a.mu.Lock(); defer a.mu.Unlock(); return a.v }
func (a *atomic32) set(b bool) {
	if b {
		a.store(1)
	} else {
		a.store(0)
	}
}
func (a *atomic32) get() bool { return a.load() != 0 }

// A device whose size is not a multiple of the page size: the short last page is written,
// read, destaged and trimmed within the device.
func TestShortLastPage(t *testing.T) {
	const size = 5*4096 + 1000
	c, d := newTestCache(t, size, nil, Options{DestagePaused: true})
	ref := make([]byte, size)
	for _, w := range []struct{ off, n int64 }{{5 * 4096, 1000}, {5*4096 + 10, 20}, {4096*4 + 7, 4096}} {
		p := fill(int(w.n), byte(w.off))
		if err := c.WriteAt(p, w.off, false); err != nil {
			t.Fatal(err)
		}
		copy(ref[w.off:], p)
	}
	if err := c.WriteAt(fill(2, 1), size-1, false); err == nil {
		t.Fatal("write past the end accepted")
	}
	if !bytes.Equal(readCache(t, c, 0, size), ref) {
		t.Fatal("read differs")
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(lowerBytes(t, d, 0, size), ref) {
		t.Fatal("lower differs after Flush")
	}
	if err := c.Trim(5*4096, 1000); err != nil {
		t.Fatal(err)
	}
	clear(ref[5*4096:])
	if !bytes.Equal(readCache(t, c, 0, size), ref) {
		t.Fatal("read after trim of the last page differs")
	}
}

// A FLUSH that runs while a TRIM or WRITE_ZEROES of a dirty page is on its way below must not
// return with that page's acknowledged data missing below: not written, and not yet replaced
// by the zeroes.
func TestFlushDuringRangeOpOfDirtyPage(t *testing.T) {
	ops := map[string]func(c *Cache, off, n int64) error{
		"trim":   func(c *Cache, off, n int64) error { return c.Trim(off, n) },
		"zeroes": func(c *Cache, off, n int64) error { return c.WriteZeroes(off, n, false, false) },
	}
	for name, op := range ops {
		t.Run(name, func(t *testing.T) {
			d := newRecDev(MiB)
			old, acked := fill(4096, 7), fill(4096, 1)
			if err := d.Device.WriteAt(old, 4096, false); err != nil {
				t.Fatal(err)
			}
			entered, release := make(chan struct{}), make(chan struct{})
			var once sync.Once
			d.SetHook(func(o memdev.Op, off, n int64) error {
				if o == memdev.OpTrim || o == memdev.OpWriteZeroes {
					once.Do(func() { close(entered) })
					<-release
				}
				return nil
			})
			c := New(d, nil, Options{DestagePaused: true})
			t.Cleanup(func() { _ = c.Close() })
			if err := c.WriteAt(acked, 4096, false); err != nil {
				t.Fatal(err)
			}
			opDone := make(chan error, 1)
			go func() { opDone <- op(c, 4096, 4096) }()
			<-entered
			flushed := make(chan []byte, 1)
			go func() {
				if err := c.Flush(); err != nil {
					t.Error(err)
				}
				flushed <- lowerBytes(t, d, 4096, 4096)
			}()
			var below []byte
			select {
			case below = <-flushed:
			case <-time.After(100 * time.Millisecond):
			}
			close(release)
			if err := <-opDone; err != nil {
				t.Fatal(err)
			}
			if below == nil {
				below = <-flushed
			}
			if bytes.Equal(below, old) {
				t.Fatal("Flush returned with the page's acknowledged data neither below nor replaced by the zeroes")
			}
			// The operation was acknowledged after the write, so once both are settled below,
			// the zeroes are what is there: a destage of the dropped page must not follow them.
			if err := c.Flush(); err != nil {
				t.Fatal(err)
			}
			if got := lowerBytes(t, d, 4096, 4096); !bytes.Equal(got, make([]byte, 4096)) {
				t.Fatal("the page's older data is below after the acknowledged trim or zeroing")
			}
		})
	}
}

// A read larger than maxSpanRead, unaligned, over cached pages (dirty and clean) and pages only
// below, returns the newest data of every byte.
func TestLargeReadAcrossCachedPages(t *testing.T) {
	const size = 3*maxSpanRead + 5*PageSize
	c, d := newTestCache(t, size, NewPool(4*MiB), Options{DestagePaused: true})
	want := make([]byte, size)
	for i := range want {
		want[i] = byte(i / PageSize)
	}
	if err := d.Device.WriteAt(want, 0, false); err != nil {
		t.Fatal(err)
	}
	// Cached pages scattered over every maxSpanRead piece and across its boundaries.
	for idx := int64(3); idx*PageSize < size; idx += 97 {
		p := fill(PageSize, 0xA0+byte(idx%16))
		if err := c.WriteAt(p, idx*PageSize, false); err != nil {
			t.Fatal(err)
		}
		copy(want[idx*PageSize:], p)
	}
	off := int64(1234)
	got := readCache(t, c, off, size-off-777)
	if !bytes.Equal(got, want[off:size-777]) {
		t.Fatal("large read differs from the newest data")
	}
}
