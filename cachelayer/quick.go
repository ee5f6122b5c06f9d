package cachelayer

import "fcnbd/internal/blockdev"

// TryWriteAt performs a write without FUA exactly as WriteAt(p, off, false) would, provided it
// can be done at once in memory: p covers whole pages only, the cache is in write-back mode,
// the budget has room for p without waiting and the fence admits it without waiting. It then
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
		return false, nil
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
