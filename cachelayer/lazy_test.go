package cachelayer

import (
	"bytes"
	"sync"
	"testing"
	"time"
)

// Below the low-water mark dirty data stays in the cache until it is MaxDirtyAge old, and is
// then destaged without a Flush; above the mark destage starts at once.
func TestLazyDestage(t *testing.T) {
	t.Run("age", func(t *testing.T) {
		const age = 200 * time.Millisecond
		c, d := newTestCache(t, MiB, NewPool(1024*PageSize), Options{MaxDirtyAge: age})
		if err := c.WriteAt(fill(4096, 3), 8192, false); err != nil {
			t.Fatal(err)
		}
		time.Sleep(age / 2)
		if st := c.Stats(); st.DirtyBytes != 4096 || st.DestagedBytes != 0 {
			t.Fatalf("stats %+v before MaxDirtyAge: want the page dirty, nothing destaged", st)
		}
		deadline := time.Now().Add(10 * age)
		for c.Stats().DirtyBytes != 0 {
			if time.Now().After(deadline) {
				t.Fatalf("page still dirty %v after MaxDirtyAge %v", 10*age, age)
			}
			time.Sleep(age / 10)
		}
		if !bytes.Equal(lowerBytes(t, d, 8192, 4096), fill(4096, 3)) {
			t.Fatal("aged page not below")
		}
		if st := c.Stats(); st.CachedBytes != 4096 {
			t.Fatalf("stats %+v: the destaged page should stay cached, clean", st)
		}
	})
	t.Run("low water", func(t *testing.T) {
		const pages = 1024
		c, d := newTestCache(t, MiB, NewPool(pages*PageSize), Options{MaxDirtyAge: time.Hour, DirtyLowWater: 0.1})
		// 0.1 of 1024 pages: the 103rd dirty page crosses the mark.
		for i := range 120 {
			if err := c.WriteAt(fill(4096, byte(i)), int64(i)*4096, false); err != nil {
				t.Fatal(err)
			}
		}
		deadline := time.Now().Add(5 * time.Second)
		for c.Stats().DirtyBytes > 102*PageSize {
			if time.Now().After(deadline) {
				t.Fatalf("stats %+v: destage did not bring dirty data down to the low-water mark", c.Stats())
			}
			time.Sleep(time.Millisecond)
		}
		if !bytes.Equal(lowerBytes(t, d, 0, 4096), fill(4096, 0)) {
			t.Fatal("oldest page not destaged first")
		}
	})
}

// A read whose missing pages interleave with cached ones (one lower read of the span, cached
// pages copied over it) returns the newest data of every page, dirty or clean.
func TestReadSpan(t *testing.T) {
	const size = 2 * MiB
	c, d := newTestCache(t, size, nil, Options{DestagePaused: true})
	ref := make([]byte, size)
	for i := range ref {
		ref[i] = byte(i / 4096 * 7)
	}
	if err := d.WriteAt(ref, 0, false); err != nil {
		t.Fatal(err)
	}
	write := func(idx int, v byte) {
		p := fill(4096, v)
		if err := c.WriteAt(p, int64(idx)*4096, false); err != nil {
			t.Fatal(err)
		}
		copy(ref[idx*4096:], p)
	}
	// Clean pages (written, then flushed) and dirty ones, scattered.
	for idx := 3; idx < 512; idx += 5 {
		write(idx, byte(idx))
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	for idx := 1; idx < 512; idx += 7 {
		write(idx, byte(idx+1))
	}
	for _, r := range []struct{ off, n int64 }{
		{0, MiB}, {100, MiB}, {4096 * 3, 4096 * 3}, {4095, 3 * 4096}, {0, size}, {size - 5*4096 - 1, 5 * 4096},
	} {
		p := make([]byte, r.n)
		if err := c.ReadAt(p, r.off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(p, ref[r.off:r.off+r.n]) {
			t.Fatalf("read [%d,+%d) differs from what was written", r.off, r.n)
		}
	}
}

// afterRead runs a function after each lower read has returned its data.
type afterRead struct {
	*recDev
	after func(off, n int64)
}

func (a *afterRead) ReadAt(p []byte, off int64) error {
	err := a.recDev.ReadAt(p, off)
	a.after(off, int64(len(p)))
	return err
}

// A page cached when a span read begins, whose destage and eviction complete after the span's
// lower read, is read again: the span holds its data from before the destage.
func TestReadSpanEvicted(t *testing.T) {
	d := &afterRead{recDev: newRecDev(MiB)}
	c := New(d, nil, Options{DestagePaused: true})
	t.Cleanup(func() { _ = c.Close() })
	for _, idx := range []int64{1, 3} {
		if err := c.WriteAt(fill(4096, 9), idx*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	var once sync.Once
	d.after = func(off, n int64) {
		if n > 4096 {
			once.Do(func() {
				if err := c.Flush(); err != nil {
					t.Error(err)
				}
				c.evictClean(1 << 20)
			})
		}
	}
	p := make([]byte, 5*4096) // pages 0 and 2 and 4 missing, 1 and 3 cached
	if err := c.ReadAt(p, 0); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 5*4096)
	copy(want[4096:], fill(4096, 9))
	copy(want[3*4096:], fill(4096, 9))
	if !bytes.Equal(p, want) {
		t.Fatal("span read returned data older than a write acknowledged before it")
	}
	if st := c.Stats(); st.CachedBytes != 0 {
		t.Fatalf("stats %+v: the pages should have been evicted during the read", st)
	}
}
