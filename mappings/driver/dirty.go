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
// home of the rule of which grains each reports dirty, from two bitmaps of the mapping:
//
//   - live: its difference bitmap, the grains written on its source or target since its last
//     start (cow's TrackDifference; reset by the start commit);
//   - start: the difference bitmap as that start found it, which the start recopied — every
//     grain if the start copied everything (the first start, or a difference not trusted).
//     Written by the start commit with the reset (journal.commitStart, kind
//     StartDifferenceBitmap), so it survives restarts exactly as the reset does.
//
// The target reports start ∪ live: the grains in which the target's image may differ from the
// image it held before the last start (what that start recopied, and whatever was written on
// either volume since). A backup that copied the target after the previous start and now
// copies the target's dirty extents holds the target's image at the last start, plus the
// target's own writes. The source reports live: the grains in which it may differ from the
// point-in-time image of the last start. A mapping never started (no start record, or one lost
// with the difference bitmap) reports every grain dirty on both volumes.
//
// Ordering: a write acknowledged by a volume's write-back cache reaches the engine, which
// records its difference bit, only when destaged. So both volumes' caches are flushed first,
// then live is read, then start: a write acknowledged before the request is in live, and a
// start in between moves live's bits into start, read after it.

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
	for _, v := range []mappings.VolumeID{ref.source, ref.target} {
		if vs := d.stackOf(v); vs != nil {
			if err := vs.cache.Flush(); err != nil {
				return nil, fmt.Errorf("dirty bitmap %s: flush volume %d: %w", name, v, err)
			}
		}
	}
	var live, start *bitmap.Bitmap
	if ref.tracked {
		if live, err = d.eng.Difference(int(ref.id)); err != nil {
			live = nil
		}
	}
	if live != nil {
		start = d.journal.bitmapIfAny(startKey(int(ref.id)), ref.size, ref.grain)
	}
	if start == nil || live.GrainSize() != ref.grain || start.GrainSize() != ref.grain {
		// Never started, or the record is lost: everything may have changed.
		return []blockdev.DirtyExtent{{Length: length, Dirty: true}}, nil
	}
	return blockdev.GrainDirtyExtents(ref.size, ref.grain, off, length, func(g int) bool {
		return live.Test(g) || (ref.onTarget && start.Test(g))
	}), nil
}

var _ blockdev.DirtyBitmaps = (*stack)(nil)
