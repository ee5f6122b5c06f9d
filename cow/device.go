package cow

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"

	"fcnbd/internal/blockdev"
)

// device is one volume as seen from the cache: reads routed through the chain, writes with
// copy-on-write.
type device struct {
	e *Engine
	v *volume
}

var _ blockdev.Device = (*device)(nil)

func (d *device) Size() int64 { return d.v.size }

// enter admits a request: it takes the volume's gate shared. The returned function releases it.
func (d *device) enter(off, length int64) (func(), error) {
	if err := blockdev.CheckRange(d.v.size, off, length); err != nil {
		return nil, err
	}
	if !d.v.online.Load() {
		return nil, fmt.Errorf("volume %d is offline: %w", d.v.id, syscall.EIO)
	}
	d.v.gate.RLock()
	if d.v.removed || d.e.ctx.Err() != nil {
		d.v.gate.RUnlock()
		return nil, fmt.Errorf("volume %d: %w", d.v.id, errShutdown)
	}
	return d.v.gate.RUnlock, nil
}

// ReadAt reads v's view: its own store for grains it holds (or always, if it is not an active
// target), else its upstream's view under the grain's shared lock.
func (d *device) ReadAt(p []byte, off int64) error {
	leave, err := d.enter(off, int64(len(p)))
	if err != nil {
		return err
	}
	defer leave()
	v, e := d.v, d.e
	m := v.target
	if m == nil {
		return readFull(v, p, off)
	}
	// Runs of grains the target holds are read in one call.
	runStart := int64(-1)
	flush := func(end int64) error {
		if runStart < 0 {
			return nil
		}
		s := runStart
		runStart = -1
		return readFull(v, p[s-off:end-off], s)
	}
	for pos := off; pos < off+int64(len(p)); {
		g := int(pos / m.grain)
		end := min(int64(g+1)*m.grain, off+int64(len(p)))
		if m.split.Test(g) {
			if runStart < 0 {
				runStart = pos
			}
			pos = end
			continue
		}
		if err := flush(pos); err != nil {
			return err
		}
		if err := e.readRedirected(v, g, p[pos-off:end-off], pos); err != nil {
			return err
		}
		pos = end
	}
	return flush(off + int64(len(p)))
}

// readRedirected reads part of grain g of target v under the grain's shared lock. The bit is
// tested again under the lock: a fill or copy may have split the grain meanwhile, after which
// the upstream no longer keeps v's data for it.
func (e *Engine) readRedirected(v *volume, g int, p []byte, off int64) error {
	k := lockKey{v.comp, g}
	l := e.locks.acquire(k, false)
	defer e.locks.release(k, l, false)
	return e.readView(v, g, p, off)
}

// maxDepth bounds a walk up a chain; deeper means the topology is corrupt.
const maxDepth = 4096

// readView reads v's current view of [off, off+len(p)) inside grain g. The caller holds g's
// lock (shared or exclusive) unless v holds g.
func (e *Engine) readView(v *volume, g int, p []byte, off int64) error {
	for range maxDepth {
		if m := v.target; m == nil || m.split.Test(g) {
			return readFull(v, p, off)
		}
		v = v.upstream
	}
	return fmt.Errorf("grain %d: dependency chain deeper than %d: %w", g, maxDepth, syscall.EIO)
}

func readFull(v *volume, p []byte, off int64) error {
	n, err := v.file.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil {
		err = syscall.EIO
	}
	return fmt.Errorf("read volume %d at %d: %w", v.id, off, err)
}

func writeFull(v *volume, p []byte, off int64) error {
	if _, err := v.file.WriteAt(p, off); err != nil {
		return fmt.Errorf("write volume %d at %d: %w", v.id, off, err)
	}
	return nil
}

// op is a host write, a trim or a zeroing, applied to a byte range.
type op struct {
	data  []byte // nil: zeroes
	punch bool   // zeroes may be punched
	fua   bool
}

// apply writes the op's bytes for [off, off+length) straight to v's store.
func (o *op) apply(v *volume, base, off, length int64) error {
	switch {
	case o.data != nil:
		return writeFull(v, o.data[off-base:off-base+length], off)
	case o.punch:
		if err := v.file.Punch(off, length); err != nil {
			return fmt.Errorf("punch volume %d at %d: %w", v.id, off, err)
		}
		return nil
	}
	for length > 0 {
		n := min(length, int64(len(zeroes)))
		if err := writeFull(v, zeroes[:n], off); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}

var zeroes = make([]byte, 256<<10)

func (d *device) WriteAt(p []byte, off int64, fua bool) error {
	return d.write(&op{data: p, fua: fua}, off, int64(len(p)))
}

// Trim is a write of zeroes for copy-on-write purposes; the volume's own range is punched.
func (d *device) Trim(off, length int64) error {
	return d.write(&op{punch: true}, off, length)
}

func (d *device) WriteZeroes(off, length int64, mayPunch, fua bool) error {
	return d.write(&op{punch: mayPunch, fua: fua}, off, length)
}

// Flush syncs the volume's file (through the group commit, so concurrent flushes and
// copy-on-write syncs share one fdatasync). Split bits are durable before the write they allow,
// so no journal commit is owed here.
func (d *device) Flush() error {
	leave, err := d.enter(0, 0)
	if err != nil {
		return err
	}
	defer leave()
	return d.e.commit.commit(d.v, nil)
}

// write applies o to [off, off+length): grains nobody depends on in one store call per run,
// the others one by one through writeGrain.
func (d *device) write(o *op, off, length int64) error {
	leave, err := d.enter(off, length)
	if err != nil {
		return err
	}
	defer leave()
	v, e := d.v, d.e
	if length == 0 {
		return nil
	}
	if len(v.diffs) > 0 {
		if err := e.recordDifference(v, off, length); err != nil {
			return err
		}
	}
	if !v.linked() {
		if err := o.apply(v, off, off, length); err != nil {
			return err
		}
	} else if err := e.writeLinked(v, o, off, length); err != nil {
		return err
	}
	if o.fua {
		return e.commit.commit(v, nil)
	}
	return nil
}

// grainSize of a linked volume: every mapping in a component has the same one.
func (v *volume) grainSize() int64 {
	if v.target != nil {
		return v.target.grain
	}
	return v.downstream[0].target.grain
}

// downstreamNeeds reports whether some volume directly downstream of v does not hold g.
func (v *volume) downstreamNeeds(g int) bool {
	for _, d := range v.downstream {
		if !d.target.split.Test(g) {
			return true
		}
	}
	return false
}

// needsCopy reports whether writing grain g of v needs steps 1–2 of flashcopy.md §5: some
// downstream volume does not hold g, or v is a target that does not hold it. Bits only go from
// clear to set while the links stay, so "false" stays false for the rest of the request.
func (v *volume) needsCopy(g int) bool {
	if m := v.target; m != nil && !m.split.Test(g) {
		return true
	}
	return v.downstreamNeeds(g)
}

func (e *Engine) writeLinked(v *volume, o *op, off, length int64) error {
	grain := v.grainSize()
	end := off + length
	runStart := int64(-1)
	flush := func(to int64) error {
		if runStart < 0 {
			return nil
		}
		s := runStart
		runStart = -1
		return o.apply(v, off, s, to-s)
	}
	for pos := off; pos < end; {
		g := int(pos / grain)
		segEnd := min(int64(g+1)*grain, end)
		if !v.needsCopy(g) {
			if runStart < 0 {
				runStart = pos
			}
			pos = segEnd
			continue
		}
		if err := flush(pos); err != nil {
			return err
		}
		if err := e.writeGrain(v, g, o, off, pos, segEnd-pos); err != nil {
			return err
		}
		pos = segEnd
	}
	return flush(end)
}

// bufPools hands out grain buffers, one pool per grain size.
var bufPools sync.Map // int64 → *sync.Pool

func getBuf(n int64) *[]byte {
	p, _ := bufPools.LoadOrStore(n, &sync.Pool{New: func() any { b := make([]byte, n); return &b }})
	return p.(*sync.Pool).Get().(*[]byte)
}

func putBuf(b *[]byte) {
	if p, ok := bufPools.Load(int64(len(*b))); ok {
		p.(*sync.Pool).Put(b)
	}
}

// writeGrain is flashcopy.md §5 for one grain, under the grain's exclusive lock:
//  1. every downstream volume that does not hold g gets v's current view of g, durably, with its
//     bit durable, before anything changes v;
//  2. if v is a target that does not hold g: fill it from the upstream view (durable, then the
//     bit durable), unless the write covers the whole grain (then the bit follows the write);
//  3. v is written.
//
// A failed copy into a downstream target stops that mapping (reported as IOError); the write
// itself goes on. A failed fill of v fails the write and v's mapping.
func (e *Engine) writeGrain(v *volume, g int, o *op, base, off, length int64) error {
	k := lockKey{v.comp, g}
	l := e.locks.acquire(k, true)
	defer e.locks.release(k, l, true)

	m := v.target
	grain := v.grainSize()
	gOff := int64(g) * grain
	gLen := min(grain, v.size-gOff)
	whole := off == gOff && length == gLen
	fill := m != nil && !m.split.Test(g) && !whole

	// v's current view of g, read once for step 1 and the fill; a whole-grain write to a
	// target whose downstream all hold g reads nothing.
	var view []byte
	var viewErr error
	if fill || v.downstreamNeeds(g) {
		buf := getBuf(grain)
		defer putBuf(buf)
		view = (*buf)[:gLen]
		viewErr = e.readView(v, g, view, gOff)
	}

	// Step 1: protect the downstream.
	if err := e.protect(v, g, view, gOff, viewErr); err != nil {
		return err
	}

	// Step 2: v's own grain.
	if fill {
		if viewErr != nil {
			e.fail(m, viewErr)
			return fmt.Errorf("fill grain %d of volume %d: %w", g, v.id, viewErr)
		}
		if err := writeFull(v, view, gOff); err != nil {
			e.fail(m, err)
			return err
		}
		failpoint("cow-after-fill-write")
		if err := e.commit.commit(v, []BitUpdate{{Mapping: m.id, Grains: []int{g}}}); err != nil {
			if !errors.Is(err, ErrJournal) {
				e.fail(m, err)
			}
			return err
		}
		failpoint("cow-after-fill-commit")
		e.setSplit(m, g, gLen, &m.splitOnWrite)
	}

	// Step 3: the write itself.
	if err := o.apply(v, base, off, length); err != nil {
		return err
	}
	failpoint("cow-after-source-write")
	if m != nil && !m.split.Test(g) && whole {
		if err := e.commit.commit(v, []BitUpdate{{Mapping: m.id, Grains: []int{g}}}); err != nil {
			return err
		}
		e.setSplit(m, g, 0, &m.splitOnWrite)
	}
	return nil
}

// setSplit publishes a durable split bit and counts it.
func (e *Engine) setSplit(m *mapping, g int, copied int64, counter *atomic.Int64) {
	if m.split.Set(g) {
		counter.Add(1)
		m.bytesCopied.Add(copied)
		if m.split.Full() {
			m.poke()
		}
	}
}

// protect is step 1 for grain g of v: view holds v's current view of g (or viewErr says why it
// could not be read). Every downstream volume that does not hold g gets it — written, synced,
// bit committed, all targets of one round through one group commit. A target whose copy fails
// is stopped (fail) and its own downstream is protected in its place with the same data, since
// they read through it to v. It returns an error only if the journal failed: then v must not
// change.
func (e *Engine) protect(v *volume, g int, view []byte, gOff int64, viewErr error) error {
	type pending struct {
		d   *volume
		req *commitReq
	}
	seen := map[*volume]bool{v: true}
	parents := []*volume{v}
	for len(parents) > 0 {
		var round []pending
		var next []*volume
		for len(parents) > 0 {
			u := parents[0]
			parents = parents[1:]
			for _, d := range u.downstream {
				dm := d.target
				if seen[d] || dm.split.Test(g) {
					continue
				}
				seen[d] = true
				switch {
				case dm.failed.Load():
					if ferr := dm.failure(); ferr != nil {
						return ferr
					}
					parents = append(parents, d)
				case viewErr != nil:
					if ferr := e.fail(dm, viewErr); ferr != nil {
						return ferr
					}
					parents = append(parents, d)
				default:
					if err := writeFull(d, view, gOff); err != nil {
						if ferr := e.fail(dm, err); ferr != nil {
							return ferr
						}
						parents = append(parents, d)
						continue
					}
					failpoint("cow-after-target-write")
					round = append(round, pending{d, e.commit.submit(d, []BitUpdate{{Mapping: dm.id, Grains: []int{g}}})})
				}
			}
		}
		var jerr error
		for _, p := range round {
			err := <-p.req.done
			switch {
			case err == nil:
				e.setSplit(p.d.target, g, int64(len(view)), &p.d.target.splitOnWrite)
			case errors.Is(err, ErrJournal), errors.Is(err, errShutdown):
				// The bit is not durable: v must not change. (A closed engine is no copy
				// failure either: stopping the mapping for it and going ahead would leave
				// the target reading this write through its source after the restart.)
				jerr = err
			default:
				if ferr := e.fail(p.d.target, err); ferr != nil {
					jerr = ferr
				}
				next = append(next, p.d)
			}
		}
		if jerr != nil {
			return fmt.Errorf("copy-on-write of grain %d of volume %d: %w", g, v.id, jerr)
		}
		parents = next
	}
	return nil
}
