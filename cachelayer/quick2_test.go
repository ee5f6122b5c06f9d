package cachelayer

import (
	"bytes"
	"context"
	"errors"
	"syscall"
	"testing"
)

// quickDev is a lower device that takes quick writes (as cow's device does for a volume nothing
// depends on) unless told to decline, and can fail them.
type quickDev struct {
	*recDev
	decline bool
	fail    error
	quick   int
}

func (d *quickDev) TryWriteAt(p []byte, off int64) (bool, error) {
	if d.decline {
		return false, nil
	}
	d.quick++
	if d.fail != nil {
		return true, d.fail
	}
	return true, d.recDev.WriteAt(p, off, false)
}

// With the budget full, TryWriteAt does the write-through WriteAt would do, at once, if the
// lower device takes it quickly; it keeps cached copies current, and declines, changing
// nothing, when the lower device declines, a stripe is busy or the fence is held.
func TestTryWriteAtThrough(t *testing.T) {
	d := &quickDev{recDev: newRecDev(MiB)}
	c := New(d, NewPool(16*PageSize), Options{DestagePaused: true})
	t.Cleanup(func() { _ = c.Close() })
	// Fill the budget with dirty pages 0..15.
	for i := int64(0); i < 16; i++ {
		if err := c.WriteAt(fill(PageSize, 1), i*PageSize, false); err != nil {
			t.Fatal(err)
		}
	}
	if c.pool.Used() != c.pool.Size() {
		t.Fatalf("budget not full: %d of %d", c.pool.Used(), c.pool.Size())
	}

	// A page not cached: written below at once.
	if ok, err := c.TryWriteAt(fill(PageSize, 2), 20*PageSize); !ok || err != nil {
		t.Fatalf("TryWriteAt = %v, %v; want true, nil", ok, err)
	}
	if d.quick != 1 || !bytes.Equal(lowerBytes(t, d.recDev, 20*PageSize, PageSize), fill(PageSize, 2)) {
		t.Fatal("write-through not below at return")
	}
	// A dirty cached page: below and in the cache, which stays dirty (it is below now, but
	// the page's other writes are accounted for by its destage as before).
	if ok, err := c.TryWriteAt(fill(PageSize, 3), 5*PageSize); !ok || err != nil {
		t.Fatalf("TryWriteAt = %v, %v; want true, nil", ok, err)
	}
	if !bytes.Equal(readCache(t, c, 5*PageSize, PageSize), fill(PageSize, 3)) {
		t.Fatal("cached copy not updated by a write-through")
	}

	// Declines: the lower device declines; a stripe is held (a destage run of the page); the
	// fence is held. Nothing changes.
	d.decline = true
	if ok, _ := c.TryWriteAt(fill(PageSize, 4), 6*PageSize); ok {
		t.Fatal("took a write the lower device declined")
	}
	d.decline = false
	c.stripes.lock(6, 6)
	if ok, _ := c.TryWriteAt(fill(PageSize, 4), 6*PageSize); ok {
		t.Fatal("took a write whose stripe is held")
	}
	c.stripes.unlock(6, 6)
	if err := c.Hold(context.Background()); err != nil {
		t.Fatal(err)
	}
	if ok, _ := c.TryWriteAt(fill(PageSize, 4), 6*PageSize); ok {
		t.Fatal("took a write while the fence was held")
	}
	c.Release()
	if !bytes.Equal(readCache(t, c, 6*PageSize, PageSize), fill(PageSize, 1)) {
		t.Fatal("a declined write changed the cache")
	}
	// Declines do not leak stripes: a normal write of the page still goes through.
	if err := c.WriteAt(fill(PageSize, 4), 6*PageSize, false); err != nil {
		t.Fatal(err)
	}

	// A failed quick write-through leaves the cached copy dirty with the new data, so that a
	// Flush writes it again.
	d.fail = syscall.EIO
	if ok, err := c.TryWriteAt(fill(PageSize, 5), 7*PageSize); !ok || !errors.Is(err, syscall.EIO) {
		t.Fatalf("TryWriteAt = %v, %v; want true, EIO", ok, err)
	}
	d.fail = nil
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(lowerBytes(t, d.recDev, 7*PageSize, PageSize), fill(PageSize, 5)) {
		t.Fatal("Flush did not write the page whose write-through failed")
	}
}

func TestStripesTryLock(t *testing.T) {
	var s stripes
	for _, r := range [][2]int64{{3, 3}, {nStripes - 2, nStripes + 1}, {5, 9}} {
		if !s.tryLock(r[0], r[1]) {
			t.Fatalf("tryLock%v of free stripes failed", r)
		}
		if s.tryLock(r[1], r[1]) {
			t.Fatalf("tryLock of a held stripe in %v succeeded", r)
		}
		s.unlock(r[0], r[1])
	}
	s.lock(7, 7)
	if s.tryLock(5, 9) {
		t.Fatal("tryLock over a held stripe succeeded")
	}
	s.unlock(7, 7)
	s.lock(5, 9) // would deadlock if the failed tryLock had left any of them locked
	s.unlock(5, 9)
}
