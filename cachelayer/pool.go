package cachelayer

import (
	"sync"
	"sync/atomic"
)

// DefaultBudget is the daemon's default cache memory (its --cache-size).
const DefaultBudget = 256 << 20

// Pool is the cache memory budget shared by every volume's Cache. Each Cache's fair share is
// the budget divided by the number of open caches; a cache may borrow memory nobody uses, and a
// cache under its share that finds the budget full evicts clean pages of the cache furthest over
// its share. A writer that still finds no memory writes through instead of waiting, so the
// budget is never exceeded and no writer ever waits for another volume's destage.
type Pool struct {
	total int64 // pages
	used  atomic.Int64

	mu     sync.Mutex
	caches []*Cache
	nOpen  atomic.Int64

	free sync.Pool // *page
}

// NewPool returns a budget of size bytes, rounded down to whole pages (at least 16 pages).
func NewPool(size int64) *Pool {
	return &Pool{total: max(size/PageSize, 16)}
}

// Size returns the budget in bytes.
func (p *Pool) Size() int64 { return p.total * PageSize }

// Used returns the bytes held by pages and reservations of all caches.
func (p *Pool) Used() int64 { return p.used.Load() * PageSize }

// share is each open cache's fair share in pages.
func (p *Pool) share() int64 {
	return p.total / max(p.nOpen.Load(), 1)
}

func (p *Pool) register(c *Cache) {
	p.mu.Lock()
	p.caches = append(p.caches, c)
	p.nOpen.Store(int64(len(p.caches)))
	p.mu.Unlock()
}

func (p *Pool) unregister(c *Cache) {
	p.mu.Lock()
	for i, x := range p.caches {
		if x == c {
			p.caches = append(p.caches[:i], p.caches[i+1:]...)
			break
		}
	}
	p.nOpen.Store(int64(len(p.caches)))
	p.mu.Unlock()
}

func (p *Pool) tryTake(n int64) bool {
	for {
		u := p.used.Load()
		if u+n > p.total {
			return false
		}
		if p.used.CompareAndSwap(u, u+n) {
			return true
		}
	}
}

func (p *Pool) put(n int64) {
	if n != 0 {
		p.used.Add(-n)
	}
}

// evictBatch is how many clean pages a writer short of memory evicts at least.
const evictBatch = 32

// reserve takes n pages for c. It returns false if the memory cannot be had without waiting;
// the caller then writes through.
func (p *Pool) reserve(c *Cache, n int64) bool {
	if n > p.total {
		return false
	}
	if p.tryTake(n) {
		return true
	}
	for range 3 {
		share := p.share()
		if c.resident.Load()+n <= share {
			if v := p.mostOverShare(c, share); v != nil {
				v.evictClean(n)
				if p.tryTake(n) {
					return true
				}
			}
		}
		// A batch, so that a stream of writes to new pages does not lock shards per write.
		if c.evictClean(max(n, evictBatch)) == 0 {
			break
		}
		if p.tryTake(n) {
			return true
		}
	}
	return false
}

// mostOverShare returns the cache other than c furthest over its share that has clean pages.
func (p *Pool) mostOverShare(c *Cache, share int64) *Cache {
	p.mu.Lock()
	defer p.mu.Unlock()
	var best *Cache
	var bestOver int64
	for _, x := range p.caches {
		if x == c || x.clean.Load() == 0 {
			continue
		}
		if over := x.resident.Load() - share; over > bestOver {
			best, bestOver = x, over
		}
	}
	return best
}

func (p *Pool) newPage(idx int64) *page {
	pg, _ := p.free.Get().(*page)
	if pg == nil {
		pg = new(page)
	}
	// Field by field: the data is about to be overwritten, so clearing it would be wasted work.
	pg.idx, pg.prev, pg.next, pg.list = idx, nil, nil, nil
	pg.gen, pg.snapGen, pg.seq, pg.redirtySeq = 0, 0, 0, 0
	pg.dirty, pg.destaging, pg.redirty, pg.loading, pg.dropped = false, false, false, false, false
	return pg
}

func (p *Pool) recycle(pg *page) { p.free.Put(pg) }
