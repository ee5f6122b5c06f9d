package cow

import (
	"context"
	"runtime"
	"time"

	"golang.org/x/time/rate"
)

// RateBytes is the bandwidth of a copy or clean rate (flashcopy.md §3): 0 for rate 0, 128 KiB/s
// for 1–10, doubling every ten up to 2 GiB/s for 141–150.
func RateBytes(r int) int64 {
	if r <= 0 {
		return 0
	}
	r = min(r, 150)
	return (128 << 10) << ((r - 1) / 10)
}

// startWorker runs fn as m's background worker, replacing (cancelling) any previous one.
func (e *Engine) startWorker(m *mapping, fn func(context.Context, *mapping)) {
	ctx, cancel := context.WithCancel(e.ctx)
	m.mu.Lock()
	if m.cancel != nil {
		m.cancel()
	}
	m.cancel = cancel
	m.mu.Unlock()
	e.wg.Go(func() { fn(ctx, m) })
}

// stopWorker cancels m's worker without waiting for it: a worker re-checks the mapping's phase
// under the target's gate before each grain, so one that is mid-grain finishes harmlessly.
func (e *Engine) stopWorker(m *mapping) {
	m.mu.Lock()
	if m.cancel != nil {
		m.cancel()
		m.cancel = nil
	}
	m.mu.Unlock()
}

// waitRate waits until the mapping's current rate allows n more bytes, or until enough (if not
// nil) reports the work done. A rate change (or a wake for any reason) re-plans the wait at
// once. It returns false if ctx ended.
func waitRate(ctx context.Context, m *mapping, n int, rateOf func() int, enough func() bool) bool {
	for {
		if enough != nil && enough() {
			return true
		}
		bps := RateBytes(rateOf())
		if bps == 0 {
			select {
			case <-m.wake:
				continue
			case <-ctx.Done():
				return false
			}
		}
		now := time.Now()
		m.lim.SetLimitAt(now, rate.Limit(bps))
		if m.lim.Burst() < n {
			m.lim.SetBurstAt(now, n)
		}
		r := m.lim.ReserveN(now, n)
		d := r.DelayFrom(now)
		if d == 0 {
			return true
		}
		t := time.NewTimer(d)
		select {
		case <-t.C:
			return true
		case <-m.wake:
			t.Stop()
			r.Cancel()
		case <-ctx.Done():
			t.Stop()
			r.Cancel()
			return false
		}
	}
}

// slot takes one of the engine's background copy slots; workers give way between grains.
func (e *Engine) slot(ctx context.Context) bool {
	select {
	case e.bgSlots <- struct{}{}:
		return true
	case <-ctx.Done():
		return false
	}
}

func (e *Engine) unslot() {
	<-e.bgSlots
	runtime.Gosched()
}

// copyBatchBytes is the most a background copy batch covers: its grains are copied one by one
// and then made durable together, with one target sync and one journal commit. A batch is also
// kept to about copyBatchTime's worth at the copy rate, so that a slow copy still progresses
// grain by grain.
const (
	copyBatchBytes = 4 << 20
	copyBatchTime  = 64 * time.Millisecond
)

// batchLimit is the byte size of a copy batch at rate r.
func batchLimit(r int) int64 {
	return min(copyBatchBytes, RateBytes(r)*int64(copyBatchTime)/int64(time.Second))
}

// copyWorker is the background copy (lowest unsplit grain first, at the copy rate) and, once
// every grain is split, the cleaning a copying mapping needs before it can complete.
func (e *Engine) copyWorker(ctx context.Context, m *mapping) {
	next := 0
	batch := make([]int, 0, max(copyBatchBytes/m.grain, 1))
	for !m.split.Full() {
		batch = m.nextBatch(batch[:0], next, batchLimit(int(m.copyRate.Load())))
		if len(batch) == 0 {
			next = 0
			continue
		}
		if !waitRate(ctx, m, m.batchBytes(batch), func() int { return int(m.copyRate.Load()) }, m.split.Full) {
			return
		}
		if m.split.Full() {
			break
		}
		// The wait may have been long: take the batch again from its first grain.
		batch = m.nextBatch(batch[:0], batch[0], batchLimit(int(m.copyRate.Load())))
		if len(batch) == 0 {
			continue
		}
		if !e.slot(ctx) {
			return
		}
		ok := e.copyGrains(m, batch)
		e.unslot()
		if !ok {
			return
		}
		next = batch[len(batch)-1] + 1
	}
	// flashcopy.md §5: a copying mapping at 100 % that still has dependants cleans (at its clean
	// rate; 0 means none) until nothing reads through its target.
	if !e.clean(ctx, m, func() int { return int(m.cleanRate.Load()) }) || m.getPhase() != Copying {
		return
	}
	e.events.push(Event{Kind: CopyComplete, Mapping: m.id})
}

// nextBatch appends to batch the unsplit grains from grain from on, lowest first: at least one,
// and more while they add up to less than limit bytes.
func (m *mapping) nextBatch(batch []int, from int, limit int64) []int {
	var n int64
	for g := m.split.NextClear(from); g >= 0 && (len(batch) == 0 || n < limit); g = m.split.NextClear(g + 1) {
		_, l := m.split.Extent(g)
		batch = append(batch, g)
		n += l
	}
	return batch
}

func (m *mapping) batchBytes(batch []int) int {
	var n int64
	for _, g := range batch {
		_, l := m.split.Extent(g)
		n += l
	}
	return int(n)
}

// copyGrains fills the grains of batch in m's target from its upstream view, with the
// copy-on-write order for the whole batch: every grain written, the target synced and all their
// bits committed at once, and only then the bits published. Each grain is copied under its
// exclusive lock, but the lock is not held until the bit is published: a host write to the grain
// meanwhile finds the bit clear and copies the grain itself (the same data, since the upstream
// view of an unsplit grain can only change after a copy-on-write into this target), which is
// safe. The target's gate is held throughout, so the topology cannot change under the batch. It
// returns false if the mapping is no longer copying or failed.
func (e *Engine) copyGrains(m *mapping, batch []int) bool {
	t := m.target
	t.gate.RLock()
	defer t.gate.RUnlock()
	if t.target != m || m.getPhase() != Copying || m.failed.Load() {
		return false
	}
	buf := getBuf(m.grain)
	defer putBuf(buf)
	copied := make([]int, 0, len(batch)) // the journal may keep it
	for _, g := range batch {
		done, err := e.copyOne(m, g, *buf)
		if err != nil {
			e.fail(m, err)
			return false
		}
		if done {
			copied = append(copied, g)
		}
	}
	if len(copied) == 0 {
		return true
	}
	failpoint("cow-after-copy-write")
	if err := e.commit.commit(t, []BitUpdate{{Mapping: m.id, Grains: copied}}); err != nil {
		e.fail(m, err)
		return false
	}
	for _, g := range copied {
		_, n := m.split.Extent(g)
		e.setSplit(m, g, n, &m.grainsCopied)
	}
	return true
}

// copyOne copies grain g into m's target under the grain's exclusive lock, unless it is split
// already; done reports whether it copied.
func (e *Engine) copyOne(m *mapping, g int, buf []byte) (done bool, err error) {
	t := m.target
	k := lockKey{t.comp, g}
	l := e.locks.acquire(k, true)
	defer e.locks.release(k, l, true)
	if m.split.Test(g) {
		return false, nil
	}
	off, n := m.split.Extent(g)
	data := buf[:n]
	// The target's downstream need nothing: its view of g does not change.
	if err := e.readView(t.upstream, g, data, off); err != nil {
		return false, err
	}
	if err := writeFull(t, data, off); err != nil {
		return false, err
	}
	return true, nil
}

// cleanWorker runs while m is stopping: clean at the clean rate (0 means 50), then take the
// target out of the chain and report CleanComplete.
func (e *Engine) cleanWorker(ctx context.Context, m *mapping) {
	rateOf := func() int {
		if r := int(m.cleanRate.Load()); r > 0 {
			return r
		}
		return 50
	}
	for {
		if !e.clean(ctx, m, rateOf) {
			return
		}
		e.topoMu.Lock()
		if m.getPhase() != Stopping || ctx.Err() != nil {
			e.topoMu.Unlock()
			return
		}
		done, held := false, false
		failpoint("cow-clean-recheck")
		e.topoChange([]*volume{m.target}, func() {
			// Checked again with every gate held: a mapping started meanwhile with this
			// target as source would read through it.
			if done = e.cleanWorkLocked(m, false) == 0; done {
				e.unlink(m, true)
			} else {
				held = e.cleanWorkLocked(m, true) == 0
			}
		})
		if held {
			// topoChange pokes every mapping of the tree, m too: that poke is not news.
			// Another topology change can't poke meanwhile (topoMu).
			select {
			case <-m.wake:
			default:
			}
		}
		e.topoMu.Unlock()
		if done {
			e.events.push(Event{Kind: CleanComplete, Mapping: m.id})
			return
		}
		if held {
			// What is left is owed only to dependants whose grain copy failed: nothing is
			// copied into them, and they read through the target until they leave the chain,
			// once their failure is recorded (fail), which pokes m. Re-checking at once would
			// take every gate of the tree over and over meanwhile.
			t := time.NewTimer(time.Second)
			select {
			case <-m.wake:
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return
			}
			t.Stop()
		}
	}
}

// clean copies, highest grain first, every grain m's target holds into each downstream volume
// that does not hold it, until none is left. It returns false if ctx ended or m failed.
func (e *Engine) clean(ctx context.Context, m *mapping, rateOf func() int) bool {
	for {
		d, g := e.nextClean(m)
		if d == nil {
			return ctx.Err() == nil && !m.failed.Load()
		}
		_, n := m.split.Extent(g)
		if !waitRate(ctx, m, int(n), rateOf, nil) || !e.slot(ctx) {
			return false
		}
		ok := e.cleanGrain(m, d, g)
		e.unslot()
		if !ok {
			return false
		}
	}
}

// nextClean finds the highest grain some downstream volume of m's target reads through it.
func (e *Engine) nextClean(m *mapping) (*volume, int) {
	t := m.target
	t.gate.RLock()
	defer t.gate.RUnlock()
	if t.target != m {
		return nil, -1
	}
	var best *volume
	bestG := -1
	for _, d := range t.downstream {
		if d.target.failed.Load() {
			continue
		}
		ds := d.target.split
		for g := ds.PrevClear(ds.Len() - 1); g > bestG; g = ds.PrevClear(g - 1) {
			if m.split.Test(g) {
				best, bestG = d, g
				break
			}
		}
	}
	return best, bestG
}

// cleanWorkLocked is cleanWork for a caller that holds the gates; skipFailed leaves out the
// dependants whose own grain copy failed, which nextClean skips.
func (e *Engine) cleanWorkLocked(m *mapping, skipFailed bool) int {
	n := 0
	for _, d := range m.target.downstream {
		if skipFailed && d.target.failed.Load() {
			continue
		}
		ds := d.target.split
		for g := ds.NextClear(0); g >= 0; g = ds.NextClear(g + 1) {
			if m.split.Test(g) {
				n++
			}
		}
	}
	return n
}

// cleanGrain copies grain g of m's target into downstream volume d, in the copy-on-write order.
// A failure stops d's mapping (it is d that could not be given its data).
func (e *Engine) cleanGrain(m *mapping, d *volume, g int) bool {
	t := m.target
	t.gate.RLock()
	defer t.gate.RUnlock()
	if t.target != m || d.upstream != t || m.failed.Load() {
		return true // the topology moved; nextClean looks again
	}
	dm := d.target
	k := lockKey{t.comp, g}
	l := e.locks.acquire(k, true)
	defer e.locks.release(k, l, true)
	if dm.split.Test(g) || !m.split.Test(g) || dm.failed.Load() {
		return true
	}
	off, n := m.split.Extent(g)
	buf := getBuf(m.grain)
	defer putBuf(buf)
	data := (*buf)[:n]
	if err := readFull(t, data, off); err != nil {
		e.fail(m, err)
		return false
	}
	if err := writeFull(d, data, off); err != nil {
		e.fail(dm, err)
		return true
	}
	failpoint("cow-after-clean-write")
	if err := e.commit.commit(d, []BitUpdate{{Mapping: dm.id, Grains: []int{g}}}); err != nil {
		e.fail(dm, err)
		return true
	}
	e.setSplit(dm, g, n, &dm.grainsCopied)
	m.cleaned.Add(1)
	return true
}
