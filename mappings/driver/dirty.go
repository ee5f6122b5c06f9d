package driver

import (
	"fmt"
	"slices"
	"syscall"

	"fcnbd/bitmap"
	"fcnbd/internal/blockdev"
	"fcnbd/mappings"
)

// Dirty bitmaps (the NBD meta contexts qemu:dirty-bitmap:NAME): every incremental mapping
// offers one, named after it, on its source and on its target volume. This file is the one
// home of the rule of which grains each reports dirty, from three bitmaps of the mapping:
//
//   - live: its difference bitmap, the grains written on its source or target since its last
//     start (cow's TrackDifference; reset by the start commit; journalled);
//   - start: the difference bitmap as that start found it, which the start recopied — every
//     grain if the start copied everything (the first start, or a difference not trusted).
//     Written by the start commit with the reset (journal.commitStart, catalogue kind
//     StartDifferenceBitmap), so it survives restarts exactly as the reset does;
//   - targetWrites: the grains written on the target since the last start, in memory only
//     (see targetWrites), when this process has it.
//
// The target reports start ∪ targetWrites, or start ∪ live without targetWrites: the grains
// in which the target's image may differ from the image it held before the last start (what
// that start recopied, and what was written on it since). A backup that copied the target
// after the previous start and now copies the target's dirty extents holds the target's image
// at the last start, plus the target's own writes. The source reports live: the grains in
// which it may differ from the point-in-time image of the last start. A mapping never started
// (no start record, or one lost with the difference bitmap) reports every grain dirty.
//
// Ordering: a write acknowledged by a volume's write-back cache reaches the engine, which
// records its difference bit, only when destaged. So before live is read both volumes' caches
// are flushed; targetWrites is set before a write enters the cache, and needs no flush. The
// start swaps targetWrites and commits start under startMu, which the read shares; live is
// read before start, so a start in between moves live's bits into start, read after it.

// DirtyBitmapNames implements blockdev.DirtyBitmaps: the names of the incremental mappings
// whose source or target the volume is, sorted.
func (s *stack) DirtyBitmapNames() []string {
	d := s.d
	d.mu.Lock()
	defer d.mu.Unlock()
	var names []string
	for _, mp := range d.model.Mappings {
		if mp.Incremental && (mp.Source == s.id || mp.Target == s.id) {
			names = append(names, mp.Name)
		}
	}
	slices.Sort(names)
	return names
}

// dirtyRef is what DirtyExtents needs of the mapping behind one bitmap.
type dirtyRef struct {
	id             mappings.MappingID
	source, target mappings.VolumeID
	onTarget       bool
	size, grain    int64
	tracked        bool // the engine records the mapping's difference
}

func (d *Driver) dirtyRef(vol mappings.VolumeID, name string) (dirtyRef, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, mp := range d.model.Mappings {
		if mp.Name != name || !mp.Incremental || (mp.Source != vol && mp.Target != vol) {
			continue
		}
		return dirtyRef{
			id: mp.ID, source: mp.Source, target: mp.Target, onTarget: mp.Target == vol,
			size: d.model.Volumes[mp.Source].Size, grain: int64(mp.GrainKiB) << 10,
			tracked: d.diffs[mp.ID],
		}, nil
	}
	return dirtyRef{}, fmt.Errorf("no incremental FlashCopy mapping %q of volume %s: %w", name, d.volName(vol), syscall.ENOENT)
}

// DirtyExtents implements blockdev.DirtyBitmaps (see the rule above).
func (s *stack) DirtyExtents(name string, off, length int64) ([]blockdev.DirtyExtent, error) {
	if err := s.check(); err != nil {
		return nil, err
	}
	if err := blockdev.CheckRange(s.Size(), off, length); err != nil {
		return nil, err
	}
	d := s.d
	ref, err := d.dirtyRef(s.id, name)
	if err != nil {
		return nil, err
	}
	var tw *targetWrites
	var live, start *bitmap.Bitmap
	for flushed := false; ; {
		d.startMu.RLock()
		tw = nil
		if ref.onTarget {
			if ts := d.stackOf(ref.target); ts != nil {
				if t := ts.tw.Load(); t != nil && t.id == ref.id && t.bm.GrainSize() == ref.grain {
					tw = t
				}
			}
		}
		if tw == nil && !flushed {
			d.startMu.RUnlock()
			if err := d.flushPair(ref); err != nil {
				return nil, fmt.Errorf("dirty bitmap %s: %w", name, err)
			}
			flushed = true
			continue
		}
		live = nil
		if tw == nil && ref.tracked {
			if live, err = d.eng.Difference(int(ref.id)); err != nil || live.GrainSize() != ref.grain {
				live = nil
			}
		}
		start = d.journal.bitmapIfAny(startKey(int(ref.id)), ref.size, ref.grain)
		d.startMu.RUnlock()
		break
	}
	if start == nil || (tw == nil && live == nil) || start.GrainSize() != ref.grain {
		// Never started, or a record is lost: everything may have changed.
		return []blockdev.DirtyExtent{{Length: length, Dirty: true}}, nil
	}
	return blockdev.GrainDirtyExtents(ref.size, ref.grain, off, length, func(g int) bool {
		switch {
		case !ref.onTarget:
			return live.Test(g)
		case tw != nil:
			return start.Test(g) || tw.bm.Test(g)
		default:
			return start.Test(g) || live.Test(g)
		}
	}), nil
}

// flushPair destages both volumes of ref's mapping, so that every write acknowledged before
// is in the engine's difference bitmap.
func (d *Driver) flushPair(ref dirtyRef) error {
	for _, v := range []mappings.VolumeID{ref.source, ref.target} {
		if vs := d.stackOf(v); vs != nil {
			if err := vs.cache.Flush(); err != nil {
				return fmt.Errorf("flush volume %d: %w", v, err)
			}
		}
	}
	return nil
}

var _ blockdev.DirtyBitmaps = (*stack)(nil)

// targetWrites is the record, in memory, of the grains written on an incremental mapping's
// target by the host since the mapping's last start in this process: set by the target's
// stack before a write, trim or write-zeroes goes on to the cache, so that it is exact at once
// (no flush needed), and replaced by an empty one by the start, before its commit, while the
// target is offline. A daemon restart, a start whose commit failed, or another mapping's start
// onto the same target leaves none: the live difference stands in for it (a superset: it also
// has the source's writes).
type targetWrites struct {
	id mappings.MappingID
	bm *bitmap.Bitmap
}

// recordTargetWrite marks the grains of [off, off+length) in s's targetWrites, if it has one.
// A start may replace it meanwhile: the new one gets the bits too.
func (s *stack) recordTargetWrite(off, length int64) {
	if length <= 0 || blockdev.CheckRange(s.Size(), off, length) != nil {
		return // refused below, or nothing written
	}
	for {
		tw := s.tw.Load()
		if tw == nil {
			return
		}
		grain := tw.bm.GrainSize()
		for g := int(off / grain); g <= int((off+length-1)/grain); g++ {
			if !tw.bm.Test(g) {
				tw.bm.Set(g)
			}
		}
		if s.tw.Load() == tw {
			return
		}
	}
}

// startTargetWrites gives the target of every starting mapping of e a new targetWrites: empty
// for an incremental mapping whose difference the start resets, none for any other. Called
// with startMu held, before the start commit.
func (d *Driver) startTargetWrites(next *mappings.Model, e mappings.CommitStart) {
	for _, en := range e.Entries {
		s := d.stackOf(en.Target)
		if s == nil {
			continue
		}
		if !en.ResetDifference || !d.diffs[en.Map] {
			s.tw.Store(nil)
			continue
		}
		size := next.Volumes[en.Target].Size
		s.tw.Store(&targetWrites{id: en.Map, bm: bitmap.New(size, int64(en.GrainKiB)<<10)})
	}
}

// dropTargetWrites undoes startTargetWrites after a failed commit: the writes since the
// previous start are no longer in any targetWrites.
func (d *Driver) dropTargetWrites(e mappings.CommitStart) {
	for _, en := range e.Entries {
		if s := d.stackOf(en.Target); s != nil {
			s.tw.Store(nil)
		}
	}
}

// forgetTargetWrites drops mapping id's targetWrites (rmfcmap).
func (d *Driver) forgetTargetWrites(id mappings.MappingID) {
	d.stacksMu.Lock()
	defer d.stacksMu.Unlock()
	for _, s := range d.stacks {
		if tw := s.tw.Load(); tw != nil && tw.id == id {
			s.tw.CompareAndSwap(tw, nil)
		}
	}
}
