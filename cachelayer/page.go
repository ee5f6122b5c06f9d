package cachelayer

import (
	"sync"
	"sync/atomic"
)

// PageSize is the cache unit. A write of a whole page never reads below the cache; a write of
// part of a page that is not cached reads that one page first.
const PageSize = 4096

const (
	nShards  = 64   // page index → shard: the lock for its table entries, its lists and its data
	nStripes = 1024 // page index → stripe: held across every lower I/O that must be ordered per page
)

// page is one cached 4 KiB page. Every field is guarded by its shard's mutex, except that a page
// a destage run has claimed (destaging) or a fill is loading is referenced by that run or fill
// without the lock; such a page is never recycled.
type page struct {
	idx        int64
	prev, next *page
	list       *plist // the shard list holding the page; nil while loading

	gen     uint64 // bumped by every change to data
	snapGen uint64 // gen of the snapshot a destage run is writing
	// seq orders dirty pages by age (the cache's write sequence when the oldest data that is not
	// yet below the cache arrived); redirtySeq is the sequence of the first write since the
	// snapshot a destage run is writing.
	seq, redirtySeq uint64

	dirty     bool // data holds writes not yet below the cache
	destaging bool // claimed by a destage run (in the shard's destaging list)
	redirty   bool // written after the destage snapshot
	loading   bool // placeholder: a fill is reading the page from below
	dropped   bool // removed (trim, invalidate) while claimed; the run must skip it

	data [PageSize]byte
}

// plist is an intrusive doubly linked list of pages, oldest first.
type plist struct {
	head, tail *page
	n          int
}

func (l *plist) pushBack(p *page) {
	p.list, p.prev, p.next = l, l.tail, nil
	if l.tail != nil {
		l.tail.next = p
	} else {
		l.head = p
	}
	l.tail = p
	l.n++
}

func (l *plist) remove(p *page) {
	if p.prev != nil {
		p.prev.next = p.next
	} else {
		l.head = p.next
	}
	if p.next != nil {
		p.next.prev = p.prev
	} else {
		l.tail = p.prev
	}
	p.prev, p.next, p.list = nil, nil, nil
	l.n--
}

// moveTo puts p at the back of l, taking it off the list it is on.
func (p *page) moveTo(l *plist) {
	if p.list != nil {
		p.list.remove(p)
	}
	l.pushBack(p)
}

// shard owns the pages whose index is congruent to it modulo nShards.
type shard struct {
	mu   sync.Mutex
	cond sync.Cond // on mu: a fill finished

	dirty     plist // dirty, not claimed; by age
	destaging plist // claimed by a destage run
	clean     plist // same as below the cache; eviction order

	// headSeq is dirty.head.seq (0 when empty), readable without mu so that the destager can
	// find the oldest dirty page without locking every shard.
	headSeq atomic.Uint64

	hits int64
	_    [64]byte
}

func (sh *shard) updateHead() {
	if h := sh.dirty.head; h != nil {
		sh.headSeq.Store(h.seq)
	} else {
		sh.headSeq.Store(0)
	}
}

// stripes serialise lower I/O per page: fills, destage runs, write-through writes, trims and
// invalidation hold the stripes of their pages, always locked in ascending stripe order.
type stripes [nStripes]sync.Mutex

func (s *stripes) lock(first, last int64) {
	if last-first+1 >= nStripes {
		for i := range s {
			s[i].Lock()
		}
		return
	}
	a, b := int(first%nStripes), int(last%nStripes)
	if a <= b {
		for i := a; i <= b; i++ {
			s[i].Lock()
		}
		return
	}
	for i := 0; i <= b; i++ {
		s[i].Lock()
	}
	for i := a; i < nStripes; i++ {
		s[i].Lock()
	}
}

func (s *stripes) unlock(first, last int64) {
	if last-first+1 >= nStripes {
		for i := range s {
			s[i].Unlock()
		}
		return
	}
	a, b := int(first%nStripes), int(last%nStripes)
	if a <= b {
		for i := a; i <= b; i++ {
			s[i].Unlock()
		}
		return
	}
	for i := 0; i <= b; i++ {
		s[i].Unlock()
	}
	for i := a; i < nStripes; i++ {
		s[i].Unlock()
	}
}

// The page table maps a page index to its cached page: one atomic load per lookup, without the
// shard lock. It has two levels so that a large, sparsely cached volume costs little: chunks of
// chunkLen entries are allocated on the first insert into them and kept until the cache goes.
// Entries change only with the page's shard locked (a page enters and leaves the table where it
// entered and left the shard's map before), so a lookup under the shard lock sees the current
// entry; a lookup without it is a hint, exact for "not cached" at the moment of the load.
const (
	chunkShift = 10
	chunkLen   = 1 << chunkShift
)

type pchunk [chunkLen]atomic.Pointer[page]

type ptable struct {
	chunks []atomic.Pointer[pchunk]
}

func (t *ptable) init(pages int64) {
	t.chunks = make([]atomic.Pointer[pchunk], (pages+chunkLen-1)>>chunkShift)
}

func (t *ptable) get(idx int64) *page {
	ch := t.chunks[idx>>chunkShift].Load()
	if ch == nil {
		return nil
	}
	return ch[idx&(chunkLen-1)].Load()
}

// set stores pg (nil: none) as page idx. Called with the page's shard locked.
func (t *ptable) set(idx int64, pg *page) {
	cp := &t.chunks[idx>>chunkShift]
	ch := cp.Load()
	if ch == nil {
		if pg == nil {
			return
		}
		if nc := new(pchunk); cp.CompareAndSwap(nil, nc) {
			ch = nc
		} else {
			ch = cp.Load()
		}
	}
	ch[idx&(chunkLen-1)].Store(pg)
}

// each calls fn for every page index in [first, last) whose entry is set at the moment of the
// load, skipping unallocated chunks.
func (t *ptable) each(first, last int64, fn func(idx int64)) {
	for idx := first; idx < last; {
		ci := idx >> chunkShift
		end := min(last, (ci+1)<<chunkShift)
		if ch := t.chunks[ci].Load(); ch != nil {
			for ; idx < end; idx++ {
				if ch[idx&(chunkLen-1)].Load() != nil {
					fn(idx)
				}
			}
		}
		idx = end
	}
}
