package cow

import (
	"cmp"
	"context"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	"fcnbd/bitmap"
	"fcnbd/internal/blockdev"
	"fcnbd/internal/store"
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

// A background copy batch holds at most copyBatchBytes of grains that hold data (about
// copyBatchTime's worth at the copy rate, so that a slow copy still progresses grain by grain)
// and at most copyBatchGrains grains in all: grains whose image is a hole cost no I/O, only
// their bits. Its data is copied in pieces of up to copyChunkBytes of consecutive grains, each
// under the locks of its grains, in one read and one write per run that one store holds; then
// the whole batch is made durable with one target sync and one journal commit.
const (
	copyBatchBytes  = 64 << 20
	copyBatchTime   = 64 * time.Millisecond
	copyBatchGrains = 16384
	copyChunkBytes  = 1 << 20
)

// batchLimit is the most data bytes of a copy batch at rate r.
func batchLimit(r int) int64 {
	return min(copyBatchBytes, RateBytes(r)*int64(copyBatchTime)/int64(time.Second))
}

// yieldBatchBytes bounds a batch's data while hosts are writing: the copy gives way to them.
const yieldBatchBytes = 4 << 20

// copyStreams is how many batches of one mapping are copied at once: while some are being made
// durable (synced and committed), the next are read and written. With copyBatchBytes, measured
// with scripts/bench-copy.sh's full and clean rows on this project's machine: 2 streams of
// 16 MiB copied a 1 GiB volume at about 780 MiB/s and cleaned it at 760; 4 of 64 MiB, at 980
// and 1030.
const copyStreams = 4

// copyWorker is the background copy (lowest unsplit grain first, at the copy rate) and, once
// every grain is split, the cleaning a copying mapping needs before it can complete. The rate
// is charged for the bytes a batch reads, not for the grains whose image is a hole. It plans
// the batches and waits for the rate itself; each batch is copied by a goroutine of its own, up
// to copyStreams at once (and within the engine's background slots).
func (e *Engine) copyWorker(ctx context.Context, m *mapping) {
	next := 0
	batch := make([]int, 0, 64)
	inflight := make(chan struct{}, copyStreams)
	var wg sync.WaitGroup
	var stopped atomic.Bool // a batch found the mapping no longer copying, or failed it
	hostSeen := e.hostWrites.Load()
plan:
	for !m.split.Full() && !stopped.Load() {
		// Host I/O keeps priority: while hosts write (anywhere in the engine), one batch at a
		// time, of at most yieldBatchBytes.
		busy := false
		if h := e.hostWrites.Load(); h != hostSeen {
			hostSeen, busy = h, true
		}
		limit := batchLimit(int(m.copyRate.Load()))
		if busy {
			limit = min(limit, yieldBatchBytes)
		}
		var data int64
		batch, data = e.nextBatch(m, batch[:0], next, limit)
		if len(batch) == 0 {
			// What is left is below next: start again from the lowest, once the batches in
			// flight are published (so as not to copy their grains twice).
			wg.Wait()
			next = 0
			continue
		}
		if !waitRate(ctx, m, int(max(data, 1)), func() int { return int(m.copyRate.Load()) }, m.split.Full) {
			break
		}
		if m.split.Full() {
			break
		}
		// The wait may have been long: take the batch again from its first grain.
		batch, _ = e.nextBatch(m, batch[:0], batch[0], min(limit, batchLimit(int(m.copyRate.Load()))))
		if len(batch) == 0 {
			continue
		}
		if !e.slot(ctx) {
			break
		}
		select {
		case inflight <- struct{}{}:
		case <-ctx.Done():
			e.unslot()
			break plan
		}
		b := slices.Clone(batch)
		wg.Go(func() {
			defer func() { <-inflight; e.unslot() }()
			if !e.copyGrains(m, b) {
				stopped.Store(true)
			}
		})
		next = b[len(b)-1] + 1
		if busy {
			wg.Wait()
		}
	}
	wg.Wait()
	if stopped.Load() || ctx.Err() != nil || !m.split.Full() {
		return
	}
	// flashcopy.md §5: a copying mapping at 100 % that still has dependants cleans (at its clean
	// rate; 0 means none) until nothing reads through its target.
	if !e.clean(ctx, m, func() int { return int(m.cleanRate.Load()) }) || m.getPhase() != Copying {
		return
	}
	e.events.push(Event{Kind: CopyComplete, Mapping: m.id})
}

// nextBatch appends to batch the unsplit grains of m from grain from on, lowest first: at least
// one, and more while the grains whose image holds data add up to less than limit bytes and
// the batch has fewer than copyBatchGrains grains. data is those grains' bytes, as the stores
// said when asked: only a hint, since the image may change before the copy takes the locks
// (copyGrains decides again under them). A failed question counts the grain as data.
func (e *Engine) nextBatch(m *mapping, batch []int, from int, limit int64) (_ []int, data int64) {
	t := m.target
	t.gate.RLock()
	defer t.gate.RUnlock()
	up := t.upstream
	if t.target != m {
		up = nil // unlinked: copyGrains will find out; no hint needed
	}
	for g := m.split.NextClear(from); g >= 0; {
		run := m.unsplitRun(g, copyBatchGrains-len(batch))
		holes := make([]bool, run)
		if up != nil {
			holes = imageHoles(up, m.split, g, run)
		}
		for i := range run {
			if len(batch) > 0 && (data >= limit || len(batch) >= copyBatchGrains) {
				return batch, data
			}
			batch = append(batch, g+i)
			if !holes[i] {
				_, n := m.split.Extent(g + i)
				data += n
			}
		}
		if len(batch) >= copyBatchGrains {
			break
		}
		g = m.split.NextClear(g + run)
	}
	return batch, data
}

// unsplitRun is the number of consecutive unsplit grains of m from g (which is unsplit), at most
// limit (at least 1).
func (m *mapping) unsplitRun(g, limit int) int {
	n := 1
	for n < limit && g+n < m.split.Len() && !m.split.Test(g+n) {
		n++
	}
	return n
}

// imageHoles reports, for each of the n grains from g, whether v's image of it is all hole,
// asking each store that holds a run of them (as readView walks) once. Errors count as data.
func imageHoles(v *volume, split *bitmap.Bitmap, g, n int) []bool {
	holes := make([]bool, n)
	for i := 0; i < n; {
		h, err := holder(v, g+i)
		if err != nil {
			i++
			continue
		}
		j := i + 1
		for j < n {
			if next, err := holder(v, g+j); err != nil || next != h {
				break
			}
			j++
		}
		off, _ := split.Extent(g + i)
		lastOff, lastLen := split.Extent(g + j - 1)
		exts, err := fileExtents(h, off, lastOff+lastLen-off)
		if err == nil {
			markHoles(holes[i:j], exts, split, g+i)
		}
		i = j
	}
	return holes
}

// markHoles sets holes[k] for each grain first+k that exts (which start at that grain's offset)
// cover entirely with holes.
func markHoles(holes []bool, exts []blockdev.Extent, split *bitmap.Bitmap, first int) {
	base, _ := split.Extent(first)
	pos, ei := base, 0 // exts[ei] starts at pos
	for k := range holes {
		off, n := split.Extent(first + k)
		for ei < len(exts) && pos+exts[ei].Length <= off {
			pos += exts[ei].Length
			ei++
		}
		hole := true
		for p, i := pos, ei; p < off+n; p, i = p+exts[i].Length, i+1 {
			if i >= len(exts) || !exts[i].Hole {
				hole = false
				break
			}
		}
		holes[k] = hole
	}
}

// copyGrains fills the grains of batch in m's target from its upstream view, with the
// copy-on-write order for the whole batch: every grain written, the target synced and all their
// bits committed at once, and only then the bits published. Each piece of the batch is copied
// under its grains' exclusive locks, but the locks are not held until the bits are published: a
// host write to a grain meanwhile finds the bit clear and copies the grain itself (the same
// data, since the upstream view of an unsplit grain can only change after a copy-on-write into
// this target), which is safe. The target's gate is held throughout, so the topology cannot
// change under the batch. It returns false if the mapping is no longer copying or failed.
func (e *Engine) copyGrains(m *mapping, batch []int) bool {
	t := m.target
	t.gate.RLock()
	defer t.gate.RUnlock()
	if t.target != m || m.getPhase() != Copying || m.failed.Load() {
		return false
	}
	buf := getBuf(max(copyChunkBytes, m.grain))
	defer putBuf(buf)
	copied := make([]int, 0, len(batch)) // the journal may keep it
	var bytes int64
	for i := 0; i < len(batch); {
		j := pieceEnd(m.split, batch, i, int64(len(*buf)))
		var err error
		copied, bytes, err = e.copyPiece(m, batch[i:j], *buf, copied, bytes)
		if err != nil {
			e.fail(m, err)
			return false
		}
		i = j
	}
	if len(copied) == 0 {
		return true
	}
	// While the batch is made durable, the disk can already read the next one.
	e.prefetchView(m, batch[len(batch)-1]+1, copyBatchBytes)
	failpoint("cow-after-copy-write")
	if err := e.commit.commit(t, []BitUpdate{{Mapping: m.id, Grains: copied}}); err != nil {
		e.fail(m, err)
		return false
	}
	for k, g := range copied {
		var n int64
		if k == 0 {
			n = bytes // the batch's bytes, counted once
		}
		e.setSplit(m, g, n, &m.grainsCopied)
	}
	return true
}

// prefetchView asks the store that holds grain from of m's target's upstream view to start
// reading up to n bytes from there (a hint: nothing is locked, and a wrong guess costs only a
// read-ahead).
func (e *Engine) prefetchView(m *mapping, from int, n int64) {
	g := m.split.NextClear(from)
	if g < 0 {
		return
	}
	h, err := holder(m.target.upstream, g)
	if err != nil {
		return
	}
	off, _ := m.split.Extent(g)
	store.Prefetch(h.file, off, min(n, m.target.size-off))
}

// pieceEnd is where the piece of grains (ascending) that starts at index i ends: consecutive
// grains adding up to at most limit bytes, at least one.
func pieceEnd(split *bitmap.Bitmap, grains []int, i int, limit int64) int {
	j := i + 1
	_, size := split.Extent(grains[i])
	for j < len(grains) && grains[j] == grains[j-1]+1 {
		_, n := split.Extent(grains[j])
		if size+n > limit {
			break
		}
		size += n
		j++
	}
	return j
}

// copyPiece copies the consecutive grains of piece that are not split yet into m's target,
// under their exclusive locks (taken in ascending order, as every multi-grain holder does), and
// appends them to copied. The grains are walked in runs that one store holds for the target's
// upstream view; each run is asked for its holes: data is read and written in one piece, and a
// hole leaves a hole in the target (punched, if the target's own file holds stale data there),
// neither read nor written. buf holds the piece.
func (e *Engine) copyPiece(m *mapping, piece []int, buf []byte, copied []int, bytes int64) ([]int, int64, error) {
	t := m.target
	for _, g := range piece {
		k := lockKey{t.comp, g}
		l := e.locks.acquire(k, true)
		defer e.locks.release(k, l, true)
	}
	for i := 0; i < len(piece); {
		if m.split.Test(piece[i]) {
			i++
			continue
		}
		h, err := holder(t.upstream, piece[i])
		if err != nil {
			return copied, bytes, err
		}
		j := i + 1
		for j < len(piece) && !m.split.Test(piece[j]) {
			if next, err := holder(t.upstream, piece[j]); err != nil || next != h {
				break
			}
			j++
		}
		off, _ := m.split.Extent(piece[i])
		lastOff, lastLen := m.split.Extent(piece[j-1])
		n, rerr, werr := copyRange(h, t, off, lastOff+lastLen-off, buf)
		if err := cmp.Or(rerr, werr); err != nil {
			return copied, bytes, err
		}
		copied = append(copied, piece[i:j]...)
		bytes += n
		i = j
	}
	return copied, bytes, nil
}

// copyRange makes [off, off+length) of dst read as it reads in src's store: the data extents
// read and written, the holes punched in dst where dst's own file holds data. It returns the
// bytes read and written, and the error of a failed read of src or of a failed write of dst.
func copyRange(src, dst *volume, off, length int64, buf []byte) (copied int64, readErr, writeErr error) {
	exts, err := fileExtents(src, off, length)
	if err != nil {
		exts = []blockdev.Extent{{Length: length}} // copy it all
	}
	pos := off
	for _, x := range exts {
		if x.Hole {
			if err := punchIfData(dst, pos, x.Length); err != nil {
				return copied, nil, err
			}
			pos += x.Length
			continue
		}
		for end := pos + x.Length; pos < end; {
			n := min(end-pos, int64(len(buf)))
			if err := readFull(src, buf[:n], pos); err != nil {
				return copied, err, nil
			}
			if err := writeFull(dst, buf[:n], pos); err != nil {
				return copied, nil, err
			}
			copied += n
			pos += n
		}
	}
	store.StartWriteback(dst.file, off, length)
	return copied, nil, nil
}

// punchIfData makes [off, off+length) of v's store read as zeroes, punching only if it holds
// data there.
func punchIfData(v *volume, off, length int64) error {
	exts, err := fileExtents(v, off, length)
	if err == nil && len(exts) == 1 && exts[0].Hole {
		return nil
	}
	if err := v.file.Punch(off, length); err != nil {
		return fmt.Errorf("punch volume %d at %d: %w", v.id, off, err)
	}
	return nil
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
// that does not hold it, until none is left, in batches as the background copy makes them
// (charged to the rate for the bytes they read), up to copyStreams batches at once as the
// background copy does: while one is made durable, the next (the grains below it) is copied.
// When nothing is owed below the batches in flight, it waits for them and looks again from the
// top. It returns false if ctx ended or m failed.
func (e *Engine) clean(ctx context.Context, m *mapping, rateOf func() int) bool {
	var grains []int
	inflight := make(chan struct{}, copyStreams)
	var wg sync.WaitGroup
	var stopped atomic.Bool // a batch failed m
	below := m.split.Len()  // the next batch is below the batches in flight
	defer wg.Wait()
	for !stopped.Load() {
		var d *volume
		var data int64
		d, grains, data = e.nextClean(m, grains[:0], below, batchLimit(rateOf()))
		if d == nil {
			if below < m.split.Len() {
				wg.Wait()
				below = m.split.Len()
				continue
			}
			return ctx.Err() == nil && !m.failed.Load()
		}
		if !waitRate(ctx, m, int(max(data, 1)), rateOf, nil) || !e.slot(ctx) {
			return false
		}
		select {
		case inflight <- struct{}{}:
		case <-ctx.Done():
			e.unslot()
			return false
		}
		b := slices.Clone(grains)
		below = b[len(b)-1]
		wg.Go(func() {
			defer func() { <-inflight; e.unslot() }()
			if !e.cleanGrains(m, d, b) {
				stopped.Store(true)
			}
		})
	}
	return false
}

// nextClean finds the highest grain below grain below that some downstream volume d of m's
// target reads through it, and returns it with the grains below it that d also reads through
// the target, down to the first that it does not, while their data adds up to less than limit
// bytes (as the target's store says: a hint) and they are fewer than copyBatchGrains; grains
// are in descending order.
func (e *Engine) nextClean(m *mapping, grains []int, below int, limit int64) (_ *volume, _ []int, data int64) {
	t := m.target
	t.gate.RLock()
	defer t.gate.RUnlock()
	if t.target != m || below <= 0 {
		return nil, grains, 0
	}
	var best *volume
	bestG := -1
	for _, d := range t.downstream {
		if d.target.failed.Load() {
			continue
		}
		ds := d.target.split
		for g := ds.PrevClear(min(below, ds.Len()) - 1); g > bestG; g = ds.PrevClear(g - 1) {
			if m.split.Test(g) {
				best, bestG = d, g
				break
			}
		}
	}
	if best == nil {
		return nil, grains, 0
	}
	ds := best.target.split
	low := bestG
	for low > 0 && bestG-low+1 < copyBatchGrains && !ds.Test(low-1) && m.split.Test(low-1) {
		low--
	}
	holes := imageHoles(t, m.split, low, bestG-low+1)
	for g := bestG; g >= low; g-- {
		if len(grains) > 0 && data >= limit {
			break
		}
		grains = append(grains, g)
		if !holes[g-low] {
			_, n := m.split.Extent(g)
			data += n
		}
	}
	return best, grains, data
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

// cleanGrains copies the grains (descending) of m's target into downstream volume d, in the
// copy-on-write order for the whole batch as copyGrains does: each piece under its grains'
// locks, then d synced and the bits committed at once, then published. A failed read stops m; a
// failed write or commit stops d's mapping (it is d that could not be given its data).
func (e *Engine) cleanGrains(m *mapping, d *volume, grains []int) bool {
	t := m.target
	t.gate.RLock()
	defer t.gate.RUnlock()
	if t.target != m || d.upstream != t || m.failed.Load() {
		return true // the topology moved; nextClean looks again
	}
	dm := d.target
	slices.Reverse(grains) // ascending, the lock order
	buf := getBuf(max(copyChunkBytes, m.grain))
	defer putBuf(buf)
	done := make([]int, 0, len(grains)) // the journal may keep it
	var bytes int64
	for i := 0; i < len(grains); {
		j := pieceEnd(m.split, grains, i, int64(len(*buf)))
		var readErr, writeErr error
		done, bytes, readErr, writeErr = e.cleanPiece(m, d, grains[i:j], *buf, done, bytes)
		if readErr != nil {
			e.fail(m, readErr)
			return false
		}
		if writeErr != nil {
			e.fail(dm, writeErr)
			return true
		}
		i = j
	}
	if len(done) == 0 {
		return true
	}
	// While the batch is made durable, the disk can already read the next one, below it.
	if low, _ := m.split.Extent(grains[0]); low > 0 {
		store.Prefetch(t.file, max(0, low-copyBatchBytes), min(low, copyBatchBytes))
	}
	failpoint("cow-after-clean-write")
	if err := e.commit.commit(d, []BitUpdate{{Mapping: dm.id, Grains: done}}); err != nil {
		e.fail(dm, err)
		return true
	}
	for k, g := range done {
		var n int64
		if k == 0 {
			n = bytes
		}
		e.setSplit(dm, g, n, &dm.grainsCopied)
	}
	m.cleaned.Add(int64(len(done)))
	return true
}

// cleanPiece copies, under their exclusive locks, the consecutive grains of piece that d still
// reads through m's target into d, a run at a time, and appends them to done.
func (e *Engine) cleanPiece(m *mapping, d *volume, piece []int, buf []byte, done []int, bytes int64) (_ []int, _ int64, readErr, writeErr error) {
	t, dm := m.target, d.target
	for _, g := range piece {
		k := lockKey{t.comp, g}
		l := e.locks.acquire(k, true)
		defer e.locks.release(k, l, true)
	}
	owed := func(g int) bool { return !dm.split.Test(g) && m.split.Test(g) && !dm.failed.Load() }
	for i := 0; i < len(piece); {
		if !owed(piece[i]) {
			i++
			continue
		}
		j := i + 1
		for j < len(piece) && owed(piece[j]) {
			j++
		}
		off, _ := m.split.Extent(piece[i])
		lastOff, lastLen := m.split.Extent(piece[j-1])
		n, rerr, werr := copyRange(t, d, off, lastOff+lastLen-off, buf)
		if rerr != nil || werr != nil {
			return done, bytes, rerr, werr
		}
		done = append(done, piece[i:j]...)
		bytes += n
		i = j
	}
	return done, bytes, nil, nil
}
