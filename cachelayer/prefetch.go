package cachelayer

import (
	"fmt"

	"fcnbd/internal/blockdev"
)

// prefetchShareDiv bounds one Prefetch to this fraction of the cache's fair share of the pool:
// a huge NBD_CMD_CACHE loads its first part and leaves the rest, instead of evicting every
// other page of this cache (and, through the pool, of the others).
const prefetchShareDiv = 4

var _ blockdev.Prefetcher = (*Cache)(nil)

// Prefetch implements NBD_CMD_CACHE: it reads the pages of [off, off+length) that are not cached
// from below, one destage-run-sized span at a time, and keeps them as clean pages, so that a
// later read of them is served from memory. It returns once they are cached. It is bounded: at
// most a quarter of the cache's fair share of the pool, from off; and it stops early, with
// success, when the pool has no memory for more without waiting (clean pages are evicted for
// it, never dirty ones). Its memory is one buffer of a destage run.
func (c *Cache) Prefetch(off, length int64) error {
	first, last, done, err := c.admitRange(off, length)
	if done || err != nil {
		return err
	}
	defer c.fence.exit()
	last = min(last, first+max(c.pool.share()/prefetchShareDiv, 1)-1)
	bp := c.bufs.Get().(*[]byte)
	defer c.bufs.Put(bp)
	for idx := first; idx <= last; {
		runLast := min(idx+int64(c.maxRun)-1, last)
		full, err := c.prefetchRun(idx, runLast, *bp)
		if err != nil || full {
			return err
		}
		idx = runLast + 1
	}
	return nil
}

// prefetchRun caches the pages of [first, last] that are not cached, reading the span from the
// first missing one to the last below in one call. It reports full if the pool had no memory
// for them. The stripes keep every lower write of these pages (destage, write-through, trim,
// zeroing, fill) out while the lower data is read and installed, so what is read is current
// for every page not cached; a page a cached write creates meanwhile is newer and is kept.
func (c *Cache) prefetchRun(first, last int64, buf []byte) (full bool, err error) {
	c.stripes.lock(first, last)
	defer c.stripes.unlock(first, last)
	lo, hi, n := int64(-1), int64(-1), int64(0)
	for idx := first; idx <= last; idx++ {
		if c.pt.get(idx) == nil {
			n++
			if lo < 0 {
				lo = idx
			}
			hi = idx
		}
	}
	if n == 0 {
		return false, nil
	}
	if !c.pool.reserve(c, n) {
		return true, nil
	}
	off, end := lo*PageSize, min((hi+1)*PageSize, c.size)
	if err := c.lower.ReadAt(buf[:end-off], off); err != nil {
		c.pool.put(n)
		return false, fmt.Errorf("cachelayer: prefetch [%d,+%d): %w", off, end-off, err)
	}
	var used int64
	for idx := lo; idx <= hi; idx++ {
		sh := c.shard(idx)
		sh.mu.Lock()
		if c.pt.get(idx) == nil {
			pg := c.pool.newPage(idx)
			s := (idx - lo) * PageSize
			copy(pg.data[:c.pageLen(idx)], buf[s:s+c.pageLen(idx)])
			c.pt.set(idx, pg)
			c.resident.Add(1)
			pg.moveTo(&sh.clean)
			c.clean.Add(1)
			used++
		}
		sh.mu.Unlock()
	}
	c.pool.put(n - used)
	c.readMisses.Add(used)
	return false, nil
}
