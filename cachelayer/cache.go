package cachelayer

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"fcnbd/internal/blockdev"
)

// Options tune a Cache. The zero value gives the defaults.
type Options struct {
	// DestageConcurrency bounds the background destage writes in flight (default 4). Between
	// the dirty low- and high-water marks one runs; above the high-water mark, all of them.
	DestageConcurrency int
	// DirtyLowWater is the fraction of the cache's fair share of the budget above which
	// background destage starts (default 0.7). Below it, dirty data waits for MaxDirtyAge, a
	// Flush, a FUA write or a Hold's prepare: data rewritten meanwhile costs no lower write,
	// and neighbours written meanwhile are destaged in one.
	DirtyLowWater float64
	// DirtyHighWater is the fraction of the cache's fair share of the budget above which every
	// destage worker runs (default 0.85; at least DirtyLowWater).
	DirtyHighWater float64
	// MaxDirtyAge is how long data may stay dirty below the low-water mark before background
	// destage writes it anyway (default 3s).
	MaxDirtyAge time.Duration
	// EagerDestage starts background destage as soon as anything is dirty, ignoring
	// DirtyLowWater and MaxDirtyAge: for tests that need destage in flight.
	EagerDestage bool
	// MaxDestageRun is the most bytes one destage write coalesces (default 256 KiB).
	MaxDestageRun int
	// MaxCachedWrite is the largest write the cache takes (default 256 KiB, one destage run); a
	// larger one goes through. Caching a large write costs two more copies of it (into pages,
	// and out again at destage) and gains little: it is rarely rewritten before destage, and
	// it is already a large lower write.
	MaxCachedWrite int
	// DestagePaused starts the cache with background destage paused, as PauseDestage does.
	DestagePaused bool
}

func (o Options) withDefaults() Options {
	if o.DestageConcurrency <= 0 {
		o.DestageConcurrency = 4
	}
	if o.DirtyLowWater <= 0 || o.DirtyLowWater > 1 {
		o.DirtyLowWater = 0.7
	}
	if o.DirtyHighWater <= 0 || o.DirtyHighWater > 1 {
		o.DirtyHighWater = 0.85
	}
	o.DirtyHighWater = max(o.DirtyHighWater, o.DirtyLowWater)
	if o.MaxDirtyAge <= 0 {
		o.MaxDirtyAge = 3 * time.Second
	}
	if o.MaxDestageRun < PageSize {
		o.MaxDestageRun = 256 << 10
	}
	o.MaxDestageRun = o.MaxDestageRun / PageSize * PageSize
	if o.MaxCachedWrite <= 0 {
		o.MaxCachedWrite = 256 << 10
	}
	o.MaxCachedWrite = max(o.MaxCachedWrite/PageSize*PageSize, PageSize)
	return o
}

// Stats is a snapshot of a cache's counters for metrics.
type Stats struct {
	DirtyBytes        int64 // data acknowledged but not yet below the cache
	CachedBytes       int64 // memory held by pages, clean and dirty
	ReadHits          int64 // pages read from the cache
	ReadMisses        int64 // pages read from below
	DestagedBytes     int64 // bytes written below by destage (background, Flush)
	DestageErrors     int64 // failed destage writes; their pages stayed dirty
	WriteThroughBytes int64 // bytes written straight below (write-through, FUA, large, budget full)
}

// Cache is a write-back cache over a lower device; it implements blockdev.Device. Writes are
// acknowledged once in the cache and destaged in the background, oldest first, coalesced.
// Flush destages every write acknowledged before it and then flushes the lower device.
// It also carries the controls prepare and start need: SetWriteThrough, Invalidate and the
// Hold/Release fence.
type Cache struct {
	lower     blockdev.Device
	size      int64
	pool      *Pool
	opts      Options
	maxCached int64 // pages; a larger write goes through
	maxRun    int   // pages per destage write

	fence   fence
	pt      ptable // page index → cached page
	shards  [nShards]shard
	stripes stripes

	seq          atomic.Uint64 // age of dirty data
	resident     atomic.Int64  // pages in the table (including fill placeholders)
	readMisses   atomic.Int64  // pages read from below
	clean        atomic.Int64  // pages in clean lists
	dirtyPages   atomic.Int64
	writeThrough atomic.Bool
	closed       atomic.Bool
	closeCh      chan struct{}
	closeOnce    sync.Once

	destaged, destageErrs, through atomic.Int64
	evictRot                       atomic.Uint64

	// Background destage.
	bgMu           sync.Mutex
	bgCond         sync.Cond // on bgMu: paused/stopping/dirty-above-high-water changed
	runsDone       sync.Cond // on bgMu: running dropped to zero
	paused         bool
	stopping       bool
	running        int          // background runs between claim and completion
	helpersWaiting atomic.Int32 // workers other than 0 waiting for the high-water mark
	kick           chan struct{}
	idle           atomic.Bool // worker 0 is waiting for work
	marks          []ageMark   // worker 0's: the write sequence over the last MaxDirtyAge
	wg             sync.WaitGroup

	// Run completions, for a Flush waiting on runs it did not start.
	runMu    sync.Mutex
	runCond  sync.Cond
	runEpoch uint64

	bufs sync.Pool // *[]byte of maxRun pages
}

var _ blockdev.Device = (*Cache)(nil)

// New returns a cache over lower that takes its memory from pool (a pool of DefaultBudget of
// its own if nil) and starts its background destage. Close stops it.
func New(lower blockdev.Device, pool *Pool, opts Options) *Cache {
	if pool == nil {
		pool = NewPool(DefaultBudget)
	}
	opts = opts.withDefaults()
	c := &Cache{
		lower:   lower,
		size:    lower.Size(),
		pool:    pool,
		opts:    opts,
		maxRun:  opts.MaxDestageRun / PageSize,
		closeCh: make(chan struct{}),
		kick:    make(chan struct{}, 1),
		paused:  opts.DestagePaused,
	}
	c.maxCached = min(int64(opts.MaxCachedWrite/PageSize), max(pool.total/8, 1))
	c.pt.init((c.size + PageSize - 1) / PageSize)
	for i := range c.shards {
		c.shards[i].cond.L = &c.shards[i].mu
	}
	c.bgCond.L = &c.bgMu
	c.runsDone.L = &c.bgMu
	c.runCond.L = &c.runMu
	c.bufs.New = func() any {
		b := make([]byte, c.maxRun*PageSize)
		return &b
	}
	pool.register(c)
	c.wg.Add(opts.DestageConcurrency)
	for i := range opts.DestageConcurrency {
		go c.worker(i)
	}
	return c
}

// Size returns the lower device's size.
func (c *Cache) Size() int64 { return c.size }

func (c *Cache) shard(idx int64) *shard { return &c.shards[idx%nShards] }

// pageLen is the length of page idx: PageSize except for a short last page.
func (c *Cache) pageLen(idx int64) int64 { return min(PageSize, c.size-idx*PageSize) }

var errClosed = fmt.Errorf("cachelayer: cache closed: %w", syscall.ESHUTDOWN)

// enter admits a request through the fence.
func (c *Cache) enter() error {
	if c.closed.Load() || !c.fence.enter(c.closeCh) {
		return errClosed
	}
	return nil
}

// ReadAt fills p from the cache where it holds the pages and from below for the rest: each
// piece of up to maxSpanRead reads the span of its missing pages below in one call (readSpan).
func (c *Cache) ReadAt(p []byte, off int64) error {
	if err := blockdev.CheckRange(c.size, off, int64(len(p))); err != nil {
		return err
	}
	if err := c.enter(); err != nil {
		return err
	}
	defer c.fence.exit()
	if c.resident.Load() == 0 {
		// Nothing cached: every write acknowledged so far is below.
		return c.readBelow(p, off)
	}
	for len(p) > 0 {
		n := min(len(p), maxSpanRead)
		if err := c.readSpan(p[:n], off); err != nil {
			return err
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// maxSpanRead is the largest read readSpan handles (its page set lives on the stack); ReadAt
// splits larger ones.
const maxSpanRead = 4 << 20

// copyCached copies into q the bytes of page idx from offset in, if the page is cached, and
// reports whether it was. The caller counts misses.
func (c *Cache) copyCached(q []byte, idx, in int64) bool {
	if c.pt.get(idx) == nil {
		return false
	}
	// Fault q's memory in (at most two pages of it) before the shard lock, not in the copy
	// under it: a buffer fresh from the kernel faults once per page, and a fault under the
	// lock stalls every read of that shard's pages, which is all of them for a large read (the
	// pages of 64 consecutive indices are in 64 shards): 256 KiB reads over cached data in a
	// new daemon queued up on the shard locks behind each other's faults.
	q[0], q[len(q)-1] = 0, 0
	sh := c.shard(idx)
	sh.mu.Lock()
	if pg := c.pt.get(idx); pg != nil && !pg.loading {
		copy(q, pg.data[in:])
		sh.hits++
		sh.mu.Unlock()
		return true
	}
	sh.mu.Unlock()
	return false
}

// readSpan looks the read's pages up in the page table, reads the span from its first missing
// page to its last below in one call, however many cached pages lie between (one lower read
// instead of one per run of missing pages), and then copies the cached pages over what that
// read returned, the cache being the newer. A page missing at the lookup has every write
// acknowledged by then below, so the lower read that follows returns it. A page cached at the
// lookup but gone (or a fill placeholder) by the copy, evicted after a destage that may have
// finished after the lower read, is read below again on its own, which is correct once it is
// not cached.
func (c *Cache) readSpan(p []byte, off int64) error {
	var hit spanSet // pages cached at the lookup, by index from the first
	first, last := off/PageSize, (off+int64(len(p))-1)/PageSize
	lo, hi := int64(-1), int64(-1) // [lo, hi) in p: the span of missing pages
	var misses int64
	for idx := first; idx <= last; idx++ {
		if c.pt.get(idx) != nil {
			hit.add(idx - first)
			continue
		}
		misses++
		if lo < 0 {
			lo = max(idx*PageSize-off, 0)
		}
		hi = min((idx+1)*PageSize-off, int64(len(p)))
	}
	if lo >= 0 {
		c.readMisses.Add(misses)
		if err := c.readBelow(p[lo:hi], off+lo); err != nil {
			return err
		}
		if misses == last-first+1 {
			return nil
		}
	}
	reread := int64(-1) // start in p of a pending run of pages to read again
	for pos := int64(0); pos < int64(len(p)); {
		cur := off + pos
		idx, in := cur/PageSize, cur%PageSize
		n := min(int64(len(p))-pos, PageSize-in)
		if !hit.has(idx-first) || c.copyCached(p[pos:pos+n], idx, in) {
			if reread >= 0 {
				if err := c.readBelow(p[reread:pos], off+reread); err != nil {
					return err
				}
				reread = -1
			}
		} else {
			c.readMisses.Add(1)
			if reread < 0 {
				reread = pos
			}
		}
		pos += n
	}
	if reread >= 0 {
		return c.readBelow(p[reread:], off+reread)
	}
	return nil
}

// spanSet is a set of the pages of a read, by index from its first.
type spanSet [maxSpanRead/PageSize/64 + 1]uint64 // an unaligned read spans one page more

func (s *spanSet) add(i int64)      { s[i/64] |= 1 << (i % 64) }
func (s *spanSet) has(i int64) bool { return s[i/64]&(1<<(i%64)) != 0 }

func (c *Cache) readBelow(p []byte, off int64) error {
	if err := c.lower.ReadAt(p, off); err != nil {
		return fmt.Errorf("cachelayer: read [%d,+%d): %w", off, len(p), err)
	}
	return nil
}

// WriteAt caches p and returns (write-back), or writes it below before returning: with fua
// (then p is on stable storage below), in write-through mode, when p is larger than a cache
// write may be, or when the budget has no room for it.
func (c *Cache) WriteAt(p []byte, off int64, fua bool) error {
	if err := blockdev.CheckRange(c.size, off, int64(len(p))); err != nil {
		return err
	}
	if len(p) == 0 {
		return nil
	}
	first, last := off/PageSize, (off+int64(len(p))-1)/PageSize
	n := last - first + 1
	through := fua || c.writeThrough.Load() || n > c.maxCached
	// Memory is reserved before admission so that a held fence never waits for a writer that
	// waits for memory.
	var reserved int64
	if !through {
		if c.pool.reserve(c, n) {
			reserved = n
		} else {
			through = true
		}
	}
	if err := c.enter(); err != nil {
		c.pool.put(reserved)
		return err
	}
	defer c.fence.exit()
	// Write-through may have been switched on since the check above; SetWriteThrough waits
	// only for requests already admitted, so an admitted write must see the switch.
	if !through && c.writeThrough.Load() {
		through = true
		c.pool.put(reserved)
		reserved = 0
	}
	if through {
		return c.writeThroughAt(p, off, fua)
	}
	var used int64
	err := c.writeCached(p, off, &used)
	c.pool.put(reserved - used)
	return err
}

func (c *Cache) writeCached(p []byte, off int64, used *int64) error {
	for len(p) > 0 {
		idx, in := off/PageSize, off%PageSize
		n := min(int64(len(p)), PageSize-in)
		if err := c.writePage(idx, in, p[:n], used); err != nil {
			return err
		}
		p, off = p[n:], off+n
	}
	return nil
}

// writePage writes data at offset in of page idx, creating the page from the reservation if it
// is not cached (reading it from below first if data does not cover it).
func (c *Cache) writePage(idx, in int64, data []byte, used *int64) error {
	sh := c.shard(idx)
	sh.mu.Lock()
	for {
		pg := c.pt.get(idx)
		if pg == nil {
			break
		}
		if pg.loading {
			sh.cond.Wait()
			continue
		}
		copy(pg.data[in:], data)
		c.markWritten(sh, pg)
		sh.mu.Unlock()
		return nil
	}
	if int64(len(data)) == c.pageLen(idx) {
		pg := c.pool.newPage(idx)
		*used++
		copy(pg.data[:], data)
		c.pt.set(idx, pg)
		c.resident.Add(1)
		c.markWritten(sh, pg)
		sh.mu.Unlock()
		return nil
	}
	sh.mu.Unlock()
	return c.fillAndWrite(idx, in, data, used)
}

// fillAndWrite reads page idx from below into a placeholder and merges data into it. The stripe
// keeps trims and write-through writes of the page from racing with the read.
func (c *Cache) fillAndWrite(idx, in int64, data []byte, used *int64) error {
	c.stripes.lock(idx, idx)
	defer c.stripes.unlock(idx, idx)
	sh := c.shard(idx)
	sh.mu.Lock()
	pg := c.pt.get(idx)
	if pg != nil {
		// Another writer created it meanwhile; a loading page needs our stripe, so it is ready.
		copy(pg.data[in:], data)
		c.markWritten(sh, pg)
		sh.mu.Unlock()
		return nil
	}
	pg = c.pool.newPage(idx)
	pg.loading = true
	*used++
	c.pt.set(idx, pg)
	c.resident.Add(1)
	sh.mu.Unlock()

	err := c.lower.ReadAt(pg.data[:c.pageLen(idx)], idx*PageSize)

	sh.mu.Lock()
	pg.loading = false
	if err != nil {
		c.pt.set(idx, nil)
		c.resident.Add(-1)
		*used--
		sh.cond.Broadcast()
		sh.mu.Unlock()
		c.pool.recycle(pg)
		return fmt.Errorf("cachelayer: write: read page %d for merge: %w", idx, err)
	}
	copy(pg.data[in:], data)
	c.markWritten(sh, pg)
	sh.cond.Broadcast()
	sh.mu.Unlock()
	return nil
}

// markWritten records a write into pg's data. Called with the shard locked.
func (c *Cache) markWritten(sh *shard, pg *page) {
	pg.gen++
	switch {
	case !pg.dirty:
		if pg.list == &sh.clean {
			c.clean.Add(-1)
		}
		pg.dirty = true
		pg.seq = c.seq.Add(1)
		pg.moveTo(&sh.dirty)
		sh.updateHead()
		if n := c.dirtyPages.Add(1); c.idle.Load() && (n == 1 || c.opts.EagerDestage || n > c.lowWater()) {
			select {
			case c.kick <- struct{}{}:
			default:
			}
		}
	case pg.destaging && !pg.redirty:
		// The run in flight may carry older data; this write must be destaged after it.
		pg.redirty = true
		pg.redirtySeq = c.seq.Add(1)
	}
}

// forResident calls fn, with the shard locked, for each cached page in [first, last) that is
// not a fill placeholder. fn may drop the page. The caller holds the stripes of the range, so
// no fill is in progress there.
func (c *Cache) forResident(first, last int64, fn func(sh *shard, pg *page)) {
	c.pt.each(first, last, func(idx int64) {
		sh := c.shard(idx)
		sh.mu.Lock()
		if pg := c.pt.get(idx); pg != nil && !pg.loading {
			fn(sh, pg)
		}
		sh.mu.Unlock()
	})
}

// overlap returns where page pg starts and the part [lo, hi) of it that [off, end) covers,
// as device offsets, and whether that is the whole page.
func (c *Cache) overlap(pg *page, off, end int64) (ps, lo, hi int64, whole bool) {
	ps = pg.idx * PageSize
	pe := ps + c.pageLen(pg.idx)
	lo, hi = max(off, ps), min(end, pe)
	return ps, lo, hi, lo == ps && hi == pe
}

// writeThroughAt writes p below before returning, keeping cached copies of its pages current.
// The stripes order it against destage runs of those pages: an older run completes first, a
// newer one starts after.
func (c *Cache) writeThroughAt(p []byte, off int64, fua bool) error {
	first, last := off/PageSize, (off+int64(len(p))-1)/PageSize
	c.stripes.lock(first, last)
	defer c.stripes.unlock(first, last)
	end := off + int64(len(p))
	c.forResident(first, last+1, func(sh *shard, pg *page) {
		ps, lo, hi, whole := c.overlap(pg, off, end)
		if whole && !pg.dirty {
			// A clean page wholly rewritten: dropping the copy is cheaper than updating it.
			// A dirty one is updated instead: dropped, its acknowledged data would be missing
			// below until this write is, and a Flush running meanwhile would not wait for it.
			c.dropLocked(sh, pg)
			return
		}
		copy(pg.data[lo-ps:hi-ps], p[lo-off:hi-off])
		pg.gen++ // a clean page stays clean: it is about to equal what is below
	})
	c.through.Add(int64(len(p)))
	if err := c.lower.WriteAt(p, off, fua); err != nil {
		// Below is now unknown; the cached copies hold the new data, so make them reach it.
		c.forResident(first, last+1, func(sh *shard, pg *page) { c.markWritten(sh, pg) })
		return fmt.Errorf("cachelayer: write through [%d,+%d): %w", off, len(p), err)
	}
	return nil
}

// Trim drops the cached pages of the range (zeroing the cached part of pages it covers
// partly) and passes the trim down. Destage of older data for the range is ordered before it.
func (c *Cache) Trim(off, length int64) error {
	return c.rangeOp(off, length, func() error { return c.lower.Trim(off, length) })
}

// WriteZeroes is Trim's counterpart that guarantees zeroes, passed down with its flags.
func (c *Cache) WriteZeroes(off, length int64, mayPunch bool, fua bool) error {
	return c.rangeOp(off, length, func() error { return c.lower.WriteZeroes(off, length, mayPunch, fua) })
}

var _ blockdev.FastZeroer = (*Cache)(nil)

// WriteZeroesFast is WriteZeroes for FAST_ZERO: the lower device decides (it refuses with
// blockdev.ErrNotFast if it would have to copy or write data), and only once it has zeroed the
// range are the cached pages changed; a refusal leaves the cache as it was.
func (c *Cache) WriteZeroesFast(off, length int64, mayPunch bool, fua bool) error {
	first, last, done, err := c.admitRange(off, length)
	if done || err != nil {
		return err
	}
	defer c.fence.exit()
	end := off + length
	// The stripes order the zeroing after destage runs of older data for the range, and keep
	// fills from reading it, as in rangeOp.
	c.stripes.lock(first, last)
	defer c.stripes.unlock(first, last)
	if err := blockdev.WriteZeroesFast(c.lower, off, length, mayPunch, fua); err != nil {
		return fmt.Errorf("cachelayer: fast zero [%d,+%d): %w", off, length, err)
	}
	// Below is zero now. Pages wholly covered go, clean or dirty (their data is older than the
	// zeroing); partly covered ones get the covered part zeroed, clean staying clean since below
	// holds the same zeroes, dirty ones to be destaged with the zeroes in them.
	c.forResident(first, last+1, func(sh *shard, pg *page) {
		ps, lo, hi, whole := c.overlap(pg, off, end)
		if whole {
			c.dropLocked(sh, pg)
			return
		}
		clear(pg.data[lo-ps : hi-ps])
		pg.gen++
	})
	return nil
}

// admitRange checks that [off, off+length) is within the volume and admits an operation on it
// through the fence, returning its first and last pages. done reports an empty range, with
// nothing admitted; otherwise, with a nil error, the caller must call c.fence.exit when finished.
func (c *Cache) admitRange(off, length int64) (first, last int64, done bool, err error) {
	if err := blockdev.CheckRange(c.size, off, length); err != nil {
		return 0, 0, true, err
	}
	if length == 0 {
		return 0, 0, true, nil
	}
	if err := c.enter(); err != nil {
		return 0, 0, true, err
	}
	return off / PageSize, (off + length - 1) / PageSize, false, nil
}

func (c *Cache) rangeOp(off, length int64, below func() error) error {
	first, last, done, err := c.admitRange(off, length)
	if done || err != nil {
		return err
	}
	defer c.fence.exit()
	end := off + length
	// Holding the stripes: no destage run of older data for the range is in flight or can start
	// before the operation is below, and no fill can read the range meanwhile.
	c.stripes.lock(first, last)
	defer c.stripes.unlock(first, last)
	// Dirty pages the operation covers wholly are dropped only once it is below: until then
	// they are the only copy of acknowledged data, and a Flush meanwhile must wait for them
	// (their destage waits for the stripes) rather than find nothing to write.
	var covered []*page
	c.forResident(first, last+1, func(sh *shard, pg *page) {
		ps, lo, hi, whole := c.overlap(pg, off, end)
		if whole {
			if pg.dirty {
				covered = append(covered, pg)
			} else {
				c.dropLocked(sh, pg)
			}
			return
		}
		clear(pg.data[lo-ps : hi-ps])
		pg.gen++
	})
	if err := below(); err != nil {
		c.forResident(first, last+1, func(sh *shard, pg *page) { c.markWritten(sh, pg) })
		return fmt.Errorf("cachelayer: [%d,+%d): %w", off, length, err)
	}
	for _, pg := range covered {
		sh := c.shard(pg.idx)
		sh.mu.Lock()
		if c.pt.get(pg.idx) == pg {
			c.dropLocked(sh, pg)
		}
		sh.mu.Unlock()
	}
	return nil
}

// dropLocked removes pg from the cache. Called with its shard locked and its stripe held.
func (c *Cache) dropLocked(sh *shard, pg *page) {
	c.pt.set(pg.idx, nil)
	if pg.list != nil {
		if pg.list == &sh.clean {
			c.clean.Add(-1)
		}
		pg.list.remove(pg)
		sh.updateHead()
	}
	if pg.dirty {
		c.dirtyPages.Add(-1)
	}
	c.resident.Add(-1)
	c.pool.put(1)
	if pg.destaging {
		// A run has claimed it and waits for the stripe; it will see dropped and skip it.
		pg.dropped = true
		return
	}
	c.pool.recycle(pg)
}

// evictClean frees up to n clean pages, oldest clean first, and returns how many it freed.
func (c *Cache) evictClean(n int64) int64 {
	if c.clean.Load() == 0 {
		return 0
	}
	var k int64
	start := c.evictRot.Add(1)
	for i := uint64(0); i < nShards && k < n; i++ {
		sh := &c.shards[(start+i)%nShards]
		sh.mu.Lock()
		for k < n && sh.clean.head != nil {
			pg := sh.clean.head
			sh.clean.remove(pg)
			c.pt.set(pg.idx, nil)
			c.pool.recycle(pg)
			k++
		}
		sh.mu.Unlock()
	}
	c.clean.Add(-k)
	c.resident.Add(-k)
	c.pool.put(k)
	return k
}

// Flush destages every write acknowledged before the call, from any caller, and then flushes
// the lower device. On error it returns one wrapping syscall.EIO: pages that failed to destage
// stay dirty, so a later Flush writes them again and cannot succeed without them.
func (c *Cache) Flush() error {
	if err := c.enter(); err != nil {
		return err
	}
	defer c.fence.exit()
	if err := c.destageUpTo(c.seq.Load()); err != nil {
		return fmt.Errorf("cachelayer: flush: %w: %w", syscall.EIO, err)
	}
	if err := c.lower.Flush(); err != nil {
		return fmt.Errorf("cachelayer: flush below: %w: %w", syscall.EIO, err)
	}
	return nil
}

// Invalidate drops every cached page, clean and dirty: writes not yet below the cache are
// lost, by design (a FlashCopy target's cache at prepare). It waits for fills and destage
// runs in flight, and is not subject to the fence.
func (c *Cache) Invalidate() {
	c.stripes.lock(0, nStripes-1)
	defer c.stripes.unlock(0, nStripes-1)
	// Holding every stripe: no fill is in flight, so every page in the table is a whole one.
	c.pt.each(0, int64(len(c.pt.chunks))<<chunkShift, func(idx int64) {
		sh := c.shard(idx)
		sh.mu.Lock()
		if pg := c.pt.get(idx); pg != nil {
			c.dropLocked(sh, pg)
		}
		sh.mu.Unlock()
	})
}

// SetWriteThrough switches write-through mode. While on, every write reaches the lower device
// (WriteAt) before it is acknowledged and cached copies stay as they were, clean or dirty.
// Pages dirty from before are not written by the switch: prepare turns write-through on and
// then calls Flush, so that no write can slip into the cache between the two.
//
// Switching it on returns only once every request admitted before the switch has finished, so
// that a write which chose the cached path just before the switch is dirty in the cache by the
// time the Flush that follows looks — never acknowledged after that Flush and left behind.
func (c *Cache) SetWriteThrough(on bool) {
	c.writeThrough.Store(on)
	if on {
		// failpoint: cache-writethrough-drain
		c.fence.hold(context.Background())
		c.fence.release()
		c.wake()
	}
}

// WriteThrough reports whether write-through mode is on.
func (c *Cache) WriteThrough() bool { return c.writeThrough.Load() }

// Hold is the start fence. New requests of every kind (and background destage) wait at
// admission from now on; Hold returns nil once every request admitted before it has finished,
// including destage writes in flight, so nothing is in flight below the cache. If ctx ends
// first it returns ctx.Err() with the cache still held; either way the caller must Release.
// Holds nest: admission resumes at the last Release.
func (c *Cache) Hold(ctx context.Context) error { return c.fence.hold(ctx) }

// Release ends a Hold: waiting requests proceed. Without a Hold it does nothing.
func (c *Cache) Release() {
	c.fence.release()
	c.wake()
}

// Held reports whether a Hold is in effect.
func (c *Cache) Held() bool { return c.fence.isHeld() }

// Stats returns the cache's counters.
func (c *Cache) Stats() Stats {
	s := Stats{
		DirtyBytes:        c.dirtyPages.Load() * PageSize,
		CachedBytes:       c.resident.Load() * PageSize,
		DestagedBytes:     c.destaged.Load(),
		DestageErrors:     c.destageErrs.Load(),
		WriteThroughBytes: c.through.Load(),
		ReadMisses:        c.readMisses.Load(),
	}
	for i := range c.shards {
		sh := &c.shards[i]
		sh.mu.Lock()
		s.ReadHits += sh.hits
		sh.mu.Unlock()
	}
	return s
}

// Close flushes (the error, if any, is returned), stops background destage, drops the cache's
// memory back to the pool and makes later requests fail with ESHUTDOWN. Dirty data that the
// flush could not write is lost.
func (c *Cache) Close() error {
	var err error
	c.closeOnce.Do(func() {
		err = c.Flush()
		c.closed.Store(true)
		c.bgMu.Lock()
		c.stopping = true
		c.bgCond.Broadcast()
		c.bgMu.Unlock()
		close(c.closeCh)
		c.wg.Wait()
		c.Invalidate()
		c.pool.unregister(c)
	})
	return err
}

var _ blockdev.Extenter = (*Cache)(nil)

// Extents reports the lower device's extents with every cached page counted as data, dirty or
// clean. The cached pages are looked up before the lower device is asked: a page not cached at
// the lookup has every write acknowledged by then below, so the lower answer covers it.
func (c *Cache) Extents(off, length int64) ([]blockdev.Extent, error) {
	if err := blockdev.CheckRange(c.size, off, length); err != nil {
		return nil, err
	}
	if err := c.enter(); err != nil {
		return nil, err
	}
	defer c.fence.exit()
	var cached [][2]int64 // byte ranges of cached pages, clipped to the request
	if end := off + length; length > 0 && c.resident.Load() > 0 {
		c.pt.each(off/PageSize, (end-1)/PageSize+1, func(idx int64) {
			s, e := max(idx*PageSize, off), min((idx+1)*PageSize, end)
			if n := len(cached); n > 0 && cached[n-1][1] == s {
				cached[n-1][1] = e
			} else {
				cached = append(cached, [2]int64{s, e})
			}
		})
	}
	if len(cached) == 1 && cached[0] == [2]int64{off, off + length} {
		// All cached, so all data whatever the device below says: no need to ask it (a
		// large structured READ of cached data asks, and a store answers with a lseek or two).
		return blockdev.AppendExtent(nil, blockdev.Extent{Length: length}), nil
	}
	exts, err := blockdev.Extents(c.lower, off, length)
	if err != nil {
		return nil, fmt.Errorf("cachelayer: extents [%d,+%d): %w", off, length, err)
	}
	return blockdev.OverlayData(exts, off, cached), nil
}
