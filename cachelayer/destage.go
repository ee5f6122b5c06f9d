package cachelayer

import (
	"fmt"
	"slices"
	"sync"
	"time"
)

// Background destage is lazy, the classic write-back policy: worker 0 runs while the dirty data
// is above the low-water mark or some of it is older than MaxDirtyAge; the other workers join
// while it is above the high-water mark. Data rewritten before it is due costs no lower write.
// Each worker is admitted through the fence for each run, so a Hold waits for the runs in
// flight and stops new ones.

// PauseDestage stops background destage and returns once no background run is in flight.
// Flush, FUA and write-through still write below. For tests that need data to stay dirty.
func (c *Cache) PauseDestage() {
	c.bgMu.Lock()
	c.paused = true
	for c.running > 0 {
		c.runsDone.Wait()
	}
	c.bgMu.Unlock()
}

// ResumeDestage undoes PauseDestage.
func (c *Cache) ResumeDestage() {
	c.bgMu.Lock()
	c.paused = false
	c.bgCond.Broadcast()
	c.bgMu.Unlock()
	c.wake()
}

func (c *Cache) wake() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// highWater is the dirty page count above which every worker destages.
func (c *Cache) highWater() int64 {
	return int64(float64(c.pool.share()) * c.opts.DirtyHighWater)
}

// lowWater is the dirty page count above which worker 0 destages whatever the age.
func (c *Cache) lowWater() int64 {
	return int64(float64(c.pool.share()) * c.opts.DirtyLowWater)
}

// ageMark records the write sequence at a moment: pages dirty with a sequence up to seq have
// been dirty since at least then.
type ageMark struct {
	at  time.Time
	seq uint64
}

// ageTick is how often worker 0 marks the sequence while data is dirty: data is destaged
// between MaxDirtyAge and MaxDirtyAge+ageTick after it was written.
func (c *Cache) ageTick() time.Duration { return c.opts.MaxDirtyAge / 4 }

// markAge adds a mark if the newest is at least an ageTick old, drops the marks made redundant
// by a newer one that is already old enough, and returns the highest sequence now older than
// MaxDirtyAge (0 if none). Only worker 0 calls it.
func (c *Cache) markAge(now time.Time) uint64 {
	if n := len(c.marks); n == 0 || now.Sub(c.marks[n-1].at) >= c.ageTick() {
		c.marks = append(c.marks, ageMark{now, c.seq.Load()})
	}
	limit := now.Add(-c.opts.MaxDirtyAge)
	i := 0
	for i+1 < len(c.marks) && !c.marks[i+1].at.After(limit) {
		i++
	}
	c.marks = c.marks[:copy(c.marks, c.marks[i:])]
	if c.marks[0].at.After(limit) {
		return 0
	}
	return c.marks[0].seq
}

// oldestDirty is the sequence of the oldest unclaimed dirty page, 0 if there is none.
func (c *Cache) oldestDirty() uint64 {
	var oldest uint64
	for i := range c.shards {
		if s := c.shards[i].headSeq.Load(); s != 0 && (oldest == 0 || s < oldest) {
			oldest = s
		}
	}
	return oldest
}

// due reports whether worker 0 has work: dirty data above the low-water mark, or older than
// MaxDirtyAge. Only worker 0 calls it.
func (c *Cache) due() bool {
	n := c.dirtyPages.Load()
	if n == 0 {
		c.marks = c.marks[:0]
		return false
	}
	if c.opts.EagerDestage || n > c.lowWater() {
		return true
	}
	aged := c.markAge(time.Now())
	oldest := c.oldestDirty()
	return oldest != 0 && oldest <= aged
}

func (c *Cache) worker(i int) {
	defer c.wg.Done()
	var backoff time.Duration
	for {
		if !c.waitWork(i) {
			return
		}
		if backoff > 0 && !c.sleep(backoff) {
			return
		}
		if !c.fence.enter(c.closeCh) {
			return
		}
		if !c.beginRun() {
			c.fence.exit()
			continue
		}
		run := c.pickRun()
		var err error
		if run != nil {
			err = c.destageRun(*run, false)
			c.putRun(run)
		}
		c.endRun()
		c.fence.exit()
		switch {
		case err != nil:
			backoff = min(max(2*backoff, 10*time.Millisecond), time.Second)
		case run == nil:
			// Everything dirty is claimed by other runs (or being filled): wait for a change.
			backoff = 0
			if !c.sleep(time.Millisecond) {
				return
			}
		default:
			backoff = 0
			if i == 0 && c.helpersWaiting.Load() > 0 && c.dirtyPages.Load() > c.highWater() {
				c.bgMu.Lock()
				c.bgCond.Broadcast()
				c.bgMu.Unlock()
			}
		}
	}
}

// sleep waits d, or returns false if the cache closes first.
func (c *Cache) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-c.closeCh:
		return false
	}
}

// waitWork blocks worker i until it has something to destage; false means the cache closed.
func (c *Cache) waitWork(i int) bool {
	if i > 0 {
		c.bgMu.Lock()
		defer c.bgMu.Unlock()
		for !c.stopping && (c.paused || c.dirtyPages.Load() <= c.highWater()) {
			c.helpersWaiting.Add(1)
			c.bgCond.Wait()
			c.helpersWaiting.Add(-1)
		}
		return !c.stopping
	}
	for {
		c.bgMu.Lock()
		paused, stopping := c.paused, c.stopping
		c.bgMu.Unlock()
		if stopping {
			return false
		}
		if !paused && c.due() {
			return true
		}
		// A writer stores the dirty count, then loads idle; we store idle, then load the count:
		// one of us sees the other, so no kick is lost. Writers kick when the count crosses the
		// low-water mark and when it leaves zero, which starts the age ticks.
		c.idle.Store(true)
		if !paused && c.due() {
			c.idle.Store(false)
			return true
		}
		var tick *time.Timer
		var tickC <-chan time.Time
		if !paused && c.dirtyPages.Load() > 0 {
			tick = time.NewTimer(c.ageTick())
			tickC = tick.C
		}
		select {
		case <-c.kick:
		case <-tickC:
		case <-c.closeCh:
		}
		if tick != nil {
			tick.Stop()
		}
		c.idle.Store(false)
	}
}

func (c *Cache) beginRun() bool {
	c.bgMu.Lock()
	defer c.bgMu.Unlock()
	if c.paused || c.stopping {
		return false
	}
	c.running++
	return true
}

func (c *Cache) endRun() {
	c.bgMu.Lock()
	c.running--
	if c.running == 0 {
		// Not bgCond: the helpers waiting for the high-water mark have no use for this.
		c.runsDone.Broadcast()
	}
	c.bgMu.Unlock()
}

var runPool = sync.Pool{New: func() any { s := make([]*page, 0, 64); return &s }}

func (c *Cache) getRun() *[]*page {
	r := runPool.Get().(*[]*page)
	*r = (*r)[:0]
	return r
}

func (c *Cache) putRun(r *[]*page) {
	clear(*r)
	runPool.Put(r)
}

// claimLocked takes pg off the dirty list for a destage run. Called with its shard locked.
func (c *Cache) claimLocked(sh *shard, pg *page) {
	pg.destaging = true
	pg.moveTo(&sh.destaging)
	sh.updateHead()
}

func (c *Cache) tryClaim(idx int64) *page {
	if idx < 0 || idx*PageSize >= c.size {
		return nil
	}
	if c.pt.get(idx) == nil {
		return nil
	}
	sh := c.shard(idx)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if pg := c.pt.get(idx); pg != nil && pg.list == &sh.dirty {
		c.claimLocked(sh, pg)
		return pg
	}
	return nil
}

// pickRun claims the oldest dirty page and the dirty pages adjacent to it, up to maxRun, in
// ascending order. It returns nil if nothing is left to claim.
func (c *Cache) pickRun() *[]*page {
	for range 4 {
		best, bestSeq := -1, uint64(0)
		for i := range c.shards {
			if s := c.shards[i].headSeq.Load(); s != 0 && (best < 0 || s < bestSeq) {
				best, bestSeq = i, s
			}
		}
		if best < 0 {
			return nil
		}
		sh := &c.shards[best]
		sh.mu.Lock()
		h := sh.dirty.head
		if h == nil {
			sh.mu.Unlock()
			continue
		}
		c.claimLocked(sh, h)
		sh.mu.Unlock()

		r := c.getRun()
		run := append(*r, h)
		for idx := h.idx - 1; len(run) < c.maxRun; idx-- {
			pg := c.tryClaim(idx)
			if pg == nil {
				break
			}
			run = append(run, pg)
		}
		slices.Reverse(run)
		for idx := h.idx + 1; len(run) < c.maxRun; idx++ {
			pg := c.tryClaim(idx)
			if pg == nil {
				break
			}
			run = append(run, pg)
		}
		*r = run
		return r
	}
	return nil
}

// destageRun writes the claimed pages of run (ascending, contiguous) below and settles each:
// clean if not written since its snapshot, dirty again otherwise or on error. The stripes order
// it with trims, write-through writes and other runs of the same pages.
func (c *Cache) destageRun(run []*page, fua bool) error {
	first, last := run[0].idx, run[len(run)-1].idx
	c.stripes.lock(first, last)
	defer c.stripes.unlock(first, last)
	bp := c.bufs.Get().(*[]byte)
	defer c.bufs.Put(bp)
	buf := *bp
	// dropped is only set by holders of these stripes, so it is stable now.
	for i, pg := range run {
		if pg.dropped {
			continue
		}
		sh := c.shard(pg.idx)
		sh.mu.Lock()
		copy(buf[i*PageSize:(i+1)*PageSize], pg.data[:])
		pg.snapGen = pg.gen
		pg.redirty = false
		sh.mu.Unlock()
	}
	var firstErr error
	for i := 0; i < len(run); {
		if run[i].dropped {
			i++
			continue
		}
		j := i + 1
		for j < len(run) && !run[j].dropped {
			j++
		}
		off := run[i].idx * PageSize
		n := min(int64(j-i)*PageSize, c.size-off)
		err := c.lower.WriteAt(buf[i*PageSize:int64(i*PageSize)+n], off, fua)
		if err != nil {
			c.destageErrs.Add(1)
			if firstErr == nil {
				firstErr = fmt.Errorf("cachelayer: destage [%d,+%d): %w", off, n, err)
			}
		} else {
			c.destaged.Add(n)
		}
		c.settle(run[i:j], err)
		i = j
	}
	c.runMu.Lock()
	c.runEpoch++
	c.runCond.Broadcast()
	c.runMu.Unlock()
	return firstErr
}

func (c *Cache) settle(pages []*page, err error) {
	stillDirty := false
	defer func() {
		// A run of Flush's may leave pages dirty while worker 0 sleeps for want of a kick.
		if stillDirty && c.idle.Load() {
			c.wake()
		}
	}()
	for _, pg := range pages {
		sh := c.shard(pg.idx)
		sh.mu.Lock()
		pg.destaging = false
		switch {
		case err != nil:
			// The data is still only here: keep the page dirty with its age, so that the next
			// Flush writes it again rather than succeeding without it.
			pg.redirty = false
			pg.moveTo(&sh.dirty)
			stillDirty = true
		case pg.gen == pg.snapGen:
			pg.dirty = false
			pg.moveTo(&sh.clean)
			c.dirtyPages.Add(-1)
			c.clean.Add(1)
		default:
			if pg.redirty {
				pg.seq = pg.redirtySeq
				pg.redirty = false
			}
			pg.moveTo(&sh.dirty)
			stillDirty = true
		}
		sh.updateHead()
		sh.mu.Unlock()
	}
}

// destageUpTo writes below every page holding data of age s or older: it claims those not
// claimed yet and waits for the runs that hold the others. Pages a run fails to write stay
// dirty and are retried here; a failure of its own runs is returned.
func (c *Cache) destageUpTo(s uint64) error {
	for {
		c.runMu.Lock()
		epoch := c.runEpoch
		c.runMu.Unlock()
		claimed, waiting := c.claimUpTo(s)
		if len(claimed) == 0 && !waiting {
			return nil
		}
		if err := c.execRuns(claimed); err != nil {
			return err
		}
		if waiting {
			c.runMu.Lock()
			for c.runEpoch == epoch {
				c.runCond.Wait()
			}
			c.runMu.Unlock()
		}
	}
}

// claimUpTo claims the unclaimed dirty pages of age s or older, sorted by index, and reports
// whether other runs hold such pages.
func (c *Cache) claimUpTo(s uint64) (claimed []*page, waiting bool) {
	for i := range c.shards {
		sh := &c.shards[i]
		sh.mu.Lock()
		for pg := sh.destaging.head; pg != nil && !waiting; pg = pg.next {
			waiting = pg.seq <= s
		}
		for pg := sh.dirty.head; pg != nil; {
			next := pg.next
			if pg.seq <= s {
				c.claimLocked(sh, pg)
				claimed = append(claimed, pg)
			}
			pg = next
		}
		sh.mu.Unlock()
	}
	slices.SortFunc(claimed, func(a, b *page) int {
		switch {
		case a.idx < b.idx:
			return -1
		case a.idx > b.idx:
			return 1
		}
		return 0
	})
	return claimed, waiting
}

// execRuns destages claimed (sorted) as contiguous runs, DestageConcurrency at a time, and
// returns the first error after all have finished.
func (c *Cache) execRuns(claimed []*page) error {
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
		sem      = make(chan struct{}, c.opts.DestageConcurrency)
	)
	for len(claimed) > 0 {
		n := 1
		for n < len(claimed) && n < c.maxRun && claimed[n].idx == claimed[n-1].idx+1 {
			n++
		}
		run := claimed[:n]
		claimed = claimed[n:]
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := c.destageRun(run, false); err != nil {
				mu.Lock()
				if firstErr == nil {
					firstErr = err
				}
				mu.Unlock()
			}
			<-sem
		}()
	}
	wg.Wait()
	return firstErr
}
