package cow

import (
	"sync"
)

// lockKey names one grain of one connected set of volumes (a component of the dependency
// graph). Every volume of a component shares the key space, because a copy-on-write for grain
// g touches g on the written volume, on its downstream and on everything its view reads through.
type lockKey struct {
	comp uint64
	g    int
}

// grainLock is a reader/writer lock for one key, alive while someone holds or waits for it.
type grainLock struct {
	mu   sync.RWMutex
	refs int
}

const lockShards = 64

// lockTable is a sharded map of grain locks created on demand: two different grains never share
// a lock (unlike a striped array), and the shard mutexes are held only for the map update.
type lockTable struct {
	shards [lockShards]struct {
		mu sync.Mutex
		m  map[lockKey]*grainLock
		_  [40]byte // keep shards on separate cache lines
	}
	pool sync.Pool
}

func (t *lockTable) shard(k lockKey) int {
	h := k.comp*0x9E3779B97F4A7C15 ^ uint64(k.g)*0xC2B2AE3D27D4EB4F
	return int((h >> 32) % lockShards)
}

func (t *lockTable) acquire(k lockKey, exclusive bool) *grainLock {
	s := &t.shards[t.shard(k)]
	s.mu.Lock()
	if s.m == nil {
		s.m = map[lockKey]*grainLock{}
	}
	l := s.m[k]
	if l == nil {
		if p, ok := t.pool.Get().(*grainLock); ok {
			l = p
		} else {
			l = new(grainLock)
		}
		s.m[k] = l
	}
	l.refs++
	s.mu.Unlock()
	if exclusive {
		l.mu.Lock()
	} else {
		l.mu.RLock()
	}
	return l
}

func (t *lockTable) release(k lockKey, l *grainLock, exclusive bool) {
	if exclusive {
		l.mu.Unlock()
	} else {
		l.mu.RUnlock()
	}
	s := &t.shards[t.shard(k)]
	s.mu.Lock()
	l.refs--
	if l.refs == 0 {
		delete(s.m, k)
		t.pool.Put(l)
	}
	s.mu.Unlock()
}
