package cachelayer

import (
	"context"
	"sync"
	"sync/atomic"
)

// fence is the admission gate of Hold/Release. Admitted requests are counted; once held, new
// requests wait before being counted, and hold waits until the count drains to zero.
//
// The fast path is two atomic operations each way. Correctness rests on sequentially
// consistent atomics: a request adds itself and then loads held; hold stores held and then
// loads the count, so either the request sees held and backs out, or hold sees the request.
type fence struct {
	inflight atomic.Int64
	held     atomic.Bool

	mu       sync.Mutex
	depth    int           // Holds not yet Released
	released chan struct{} // closed when depth returns to zero
	drained  chan struct{} // closed when inflight reaches zero while held
}

// enter admits a request, waiting while the fence is held. It returns false if stop is closed
// while waiting; the request is then not admitted.
func (f *fence) enter(stop <-chan struct{}) bool {
	for {
		f.inflight.Add(1)
		if !f.held.Load() {
			return true
		}
		f.exit()
		f.mu.Lock()
		ch, held := f.released, f.depth > 0
		f.mu.Unlock()
		if !held {
			continue
		}
		select {
		case <-ch:
		case <-stop:
			return false
		}
	}
}

// exit ends an admitted request.
func (f *fence) exit() {
	if f.inflight.Add(-1) == 0 && f.held.Load() {
		f.mu.Lock()
		if f.depth > 0 && f.drained != nil && f.inflight.Load() == 0 {
			close(f.drained)
			f.drained = nil
		}
		f.mu.Unlock()
	}
}

// hold stops admission and waits for the admitted requests to finish. On ctx expiry the fence
// stays held; release undoes it either way.
func (f *fence) hold(ctx context.Context) error {
	f.mu.Lock()
	if f.depth == 0 {
		f.released = make(chan struct{})
	}
	f.depth++
	f.held.Store(true)
	if f.inflight.Load() == 0 {
		f.mu.Unlock()
		return nil
	}
	if f.drained == nil {
		f.drained = make(chan struct{})
	}
	d := f.drained
	f.mu.Unlock()
	select {
	case <-d:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// release undoes one hold; the last one lets waiting requests in.
func (f *fence) release() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.depth == 0 {
		return
	}
	f.depth--
	if f.depth > 0 {
		return
	}
	f.held.Store(false)
	close(f.released)
	if f.drained != nil {
		close(f.drained)
		f.drained = nil
	}
}

// isHeld reports whether a Hold is in effect.
func (f *fence) isHeld() bool { return f.held.Load() }
