package cachelayer

import (
	"fmt"

	"fcnbd/internal/blockdev"
)

// TryWriteAt performs a write without FUA exactly as WriteAt(p, off, false) would, provided it
// can be done at once in memory: p covers whole pages only, the cache is in write-back mode,
// the fence admits it without waiting, and the budget has room for p without waiting — or, when
// it has none, the write-through that WriteAt would do instead can be done at once: its
// stripes are free and the lower device takes it as a quickWriter (a plain store write). It then
// returns true and WriteAt's result. Otherwise it does nothing and returns false, and the caller
// uses WriteAt. A write it takes does no lower I/O and waits for no other request, except, in
// the rare case that another write is filling one of its pages from below (a partial write of
// an uncached page), for that one page read.
//
// It lets the NBD server run small cached writes on the connection's reader, with no
// goroutine and no wake-up of another thread per request, without ever stalling that reader
// on a disk or a fence.
func (c *Cache) TryWriteAt(p []byte, off int64) (bool, error) {
	if len(p) == 0 || off%PageSize != 0 || len(p)%PageSize != 0 {
		return false, nil
	}
	if blockdev.CheckRange(c.size, off, int64(len(p))) != nil {
		return false, nil // WriteAt reports it
	}
	n := int64(len(p) / PageSize)
	if n > c.maxCached || c.writeThrough.Load() || c.closed.Load() {
		return false, nil
	}
	if !c.pool.reserve(c, n) {
		// The budget is full: what WriteAt would do is write through.
		return c.tryWriteThrough(p, off)
	}
	if !c.fence.tryEnter() {
		c.pool.put(n)
		return false, nil
	}
	defer c.fence.exit()
	// As in WriteAt: write-through may have been switched on since the check above, and an
	// admitted write must see it.
	if c.writeThrough.Load() {
		c.pool.put(n)
		return false, nil
	}
	var used int64
	err := c.writeCached(p, off, &used)
	c.pool.put(n - used)
	return true, err
}

// quickWriter is a lower device that can sometimes do a write at once (cow's device: a volume
// nothing depends on); see TryWriteAt.
type quickWriter interface {
	TryWriteAt(p []byte, off int64) (bool, error)
}

// tryWriteThrough is writeThroughAt without FUA for TryWriteAt: it declines rather than wait
// for the fence, for a stripe (a destage run, a fill, a trim of the same pages) or for the lower
// device. The lower write goes first, so that nothing in the cache changes if the lower device
// declines; the stripes keep destage runs of these pages out meanwhile, as in writeThroughAt.
func (c *Cache) tryWriteThrough(p []byte, off int64) (bool, error) {
	qw, ok := c.lower.(quickWriter)
	if !ok || !c.fence.tryEnter() {
		return false, nil
	}
	defer c.fence.exit()
	if c.writeThrough.Load() {
		return false, nil
	}
	first, last := off/PageSize, (off+int64(len(p))-1)/PageSize
	if !c.stripes.tryLock(first, last) {
		return false, nil
	}
	defer c.stripes.unlock(first, last)
	ok, err := qw.TryWriteAt(p, off)
	if !ok {
		return false, nil
	}
	c.through.Add(int64(len(p)))
	end := off + int64(len(p))
	c.forResident(first, last+1, func(sh *shard, pg *page) {
		ps, lo, hi, whole := c.overlap(pg, off, end)
		if err == nil && whole && !pg.dirty {
			c.dropLocked(sh, pg) // as in writeThroughAt
			return
		}
		copy(pg.data[lo-ps:hi-ps], p[lo-off:hi-off])
		pg.gen++
		if err != nil {
			// Below is now unknown; the cached copies hold the new data: make them reach it.
			c.markWritten(sh, pg)
		}
	})
	if err != nil {
		return true, fmt.Errorf("cachelayer: write through [%d,+%d): %w", off, len(p), err)
	}
	return true, nil
}
