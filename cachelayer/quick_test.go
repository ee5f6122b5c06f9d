package cachelayer

import (
	"bytes"
	"context"
	"testing"
)

// TryWriteAt takes exactly the writes it can finish in memory at once, and a write it takes is
// a write-back write like any other: readable, dirty, below only after Flush.
func TestTryWriteAt(t *testing.T) {
	c, d := newTestCache(t, MiB, NewPool(64*PageSize), Options{DestagePaused: true})

	// Declined, and nothing written: not whole pages, out of range, larger than a cached write.
	for _, w := range []struct {
		name string
		off  int64
		n    int
	}{
		{"unaligned offset", 100, PageSize},
		{"partial page", 0, 100},
		{"empty", 0, 0},
		{"out of range", MiB, PageSize},
		{"larger than a cached write", 0, 16 * PageSize}, // maxCached is 64/8 pages here
	} {
		if ok, err := c.TryWriteAt(fill(w.n, 1), w.off); ok || err != nil {
			t.Errorf("%s: TryWriteAt = %v, %v; want false, nil", w.name, ok, err)
		}
	}
	if st := c.Stats(); st.DirtyBytes != 0 || st.CachedBytes != 0 {
		t.Fatalf("declined writes left %d dirty, %d cached bytes", st.DirtyBytes, st.CachedBytes)
	}

	// Taken: whole pages in write-back mode.
	if ok, err := c.TryWriteAt(fill(2*PageSize, 7), 3*PageSize); !ok || err != nil {
		t.Fatalf("TryWriteAt = %v, %v; want true, nil", ok, err)
	}
	if st := c.Stats(); st.DirtyBytes != 2*PageSize {
		t.Fatalf("dirty bytes %d after a taken write, want %d", st.DirtyBytes, 2*PageSize)
	}
	if !bytes.Equal(readCache(t, c, 3*PageSize, 2*PageSize), fill(2*PageSize, 7)) {
		t.Fatal("taken write not readable")
	}
	if len(d.events()) != 0 {
		t.Fatalf("taken write reached below before Flush: %v", d.events())
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(lowerBytes(t, d, 3*PageSize, 2*PageSize), fill(2*PageSize, 7)) {
		t.Fatal("taken write not below after Flush")
	}

	// Declined while the fence is held (a FlashCopy start must not see it slip in), and the
	// memory it reserved is given back.
	used := c.pool.Used()
	if err := c.Hold(context.Background()); err != nil {
		t.Fatal(err)
	}
	if ok, _ := c.TryWriteAt(fill(PageSize, 8), 0); ok {
		t.Fatal("TryWriteAt took a write while the fence was held")
	}
	c.Release()
	if got := c.pool.Used(); got != used {
		t.Fatalf("pool used %d after a declined write, want %d", got, used)
	}

	// Declined in write-through mode (prepare): the write must reach below before its reply.
	c.SetWriteThrough(true)
	if ok, _ := c.TryWriteAt(fill(PageSize, 9), 0); ok {
		t.Fatal("TryWriteAt took a write in write-through mode")
	}
	c.SetWriteThrough(false)

	// Declined when the budget has no room for it, rather than waiting or writing through.
	for i := int64(0); ; i++ {
		ok, err := c.TryWriteAt(fill(PageSize, 10), (16+i)*PageSize)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			break
		}
		if i > 64 {
			t.Fatal("TryWriteAt took more pages than the budget has")
		}
	}

	// Declined once the cache is closed: WriteAt reports the error.
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if ok, _ := c.TryWriteAt(fill(PageSize, 11), 0); ok {
		t.Fatal("TryWriteAt took a write on a closed cache")
	}
}
