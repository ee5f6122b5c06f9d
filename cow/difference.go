package cow

import (
	"fmt"
	"slices"

	"fcnbd/bitmap"
)

// difference is the difference bitmap of one incremental mapping (flashcopy.md §5
// "Incremental"): a bit is set for every grain written on the mapping's source or target since
// the control plane last reset the bitmap (at the mapping's start commit). A bit is published
// in bm only once it is durable, so a set bit means "recorded"; a clear one means a write must
// journal it first.
type difference struct {
	id             int
	source, target *volume
	bm             *bitmap.Bitmap
}

// TrackDifference makes the engine record, in bm, every grain written on volume source or
// volume target from now on (host writes, trims and write-zeroes that reach the engine; a
// write below a write-back cache reaches it at destage), for incremental mapping id, in every
// state of the mapping. The bit is made durable through the BitJournal (Kind DifferenceBits,
// group-committed with split bits) before the write it records may reach any store; a write
// whose bits are all set already costs one bit test per grain and no journal call. The bits
// already set in bm must be durable. A second call for the same id replaces the bitmap (the
// control plane's reset at a start, with a fresh one); the engine owns bm from then on.
//
// The change waits for the I/O in flight on both volumes, so a write is recorded either in the
// old bitmap or in the new one, never lost between them.
func (e *Engine) TrackDifference(id, source, target int, bm *bitmap.Bitmap) error {
	e.topoMu.Lock()
	defer e.topoMu.Unlock()
	src, tgt := e.vols[source], e.vols[target]
	switch {
	case src == nil || tgt == nil:
		return fmt.Errorf("track difference of mapping %d: %w", id, ErrNoVolume)
	case src == tgt || bm == nil || bm.VolumeSize() != src.size || src.size != tgt.size:
		return fmt.Errorf("track difference of mapping %d: %w: volumes %d, %d", id, ErrBadSpec, source, target)
	}
	old := e.diffs[id]
	d := &difference{id: id, source: src, target: tgt, bm: bm}
	for _, v := range diffVolumes(old, d) {
		v.gate.Lock()
		v.diffs = slices.DeleteFunc(slices.Clone(v.diffs), func(x *difference) bool { return x == old })
		if v == src || v == tgt {
			v.diffs = append(v.diffs, d)
		}
		v.gate.Unlock()
	}
	e.diffs[id] = d
	return nil
}

// UntrackDifference stops recording for mapping id (rmfcmap). When it returns, no write is
// recording a bit for id any more, so the journal may forget the bitmap.
func (e *Engine) UntrackDifference(id int) {
	e.topoMu.Lock()
	defer e.topoMu.Unlock()
	old := e.diffs[id]
	if old == nil {
		return
	}
	for _, v := range diffVolumes(old, nil) {
		v.gate.Lock()
		v.diffs = slices.DeleteFunc(slices.Clone(v.diffs), func(x *difference) bool { return x == old })
		v.gate.Unlock()
	}
	delete(e.diffs, id)
}

// diffVolumes lists the distinct volumes of a and b (either may be nil).
func diffVolumes(a, b *difference) []*volume {
	var out []*volume
	for _, d := range []*difference{a, b} {
		if d == nil {
			continue
		}
		for _, v := range []*volume{d.source, d.target} {
			if !slices.Contains(out, v) {
				out = append(out, v)
			}
		}
	}
	return out
}

// AddDifference sets in mapping id's difference bitmap every bit set in grains (same
// geometry). The caller has made them durable already: the control plane marks this way the
// grains whose view a start changed on the mapping's volumes.
func (e *Engine) AddDifference(id int, grains *bitmap.Bitmap) error {
	e.topoMu.Lock()
	d := e.diffs[id]
	e.topoMu.Unlock()
	if d == nil {
		return fmt.Errorf("add difference to mapping %d: %w", id, ErrNoMapping)
	}
	if grains.Len() != d.bm.Len() || grains.GrainSize() != d.bm.GrainSize() {
		return fmt.Errorf("add difference to mapping %d: %w: geometry", id, ErrBadSpec)
	}
	for g := grains.NextSet(0); g >= 0; g = grains.NextSet(g + 1) {
		d.bm.Set(g)
	}
	return nil
}

// DifferenceCount is the number of grains set in mapping id's difference bitmap.
func (e *Engine) DifferenceCount(id int) (int, error) {
	e.topoMu.Lock()
	d := e.diffs[id]
	e.topoMu.Unlock()
	if d == nil {
		return 0, fmt.Errorf("difference of mapping %d: %w", id, ErrNoMapping)
	}
	return d.bm.Count(), nil
}

// Difference returns a copy of mapping id's difference bitmap.
func (e *Engine) Difference(id int) (*bitmap.Bitmap, error) {
	e.topoMu.Lock()
	d := e.diffs[id]
	e.topoMu.Unlock()
	if d == nil {
		return nil, fmt.Errorf("difference of mapping %d: %w", id, ErrNoMapping)
	}
	return d.bm.Clone(), nil
}

// recordDifference is rule 5 of docs/architecture.md for a write of [off, off+length) to v:
// every difference bit it needs and does not find set is committed, in one group commit,
// before the write may go on. The caller holds v's gate shared.
func (e *Engine) recordDifference(v *volume, off, length int64) error {
	var ups []BitUpdate
	var bms []*bitmap.Bitmap
	for _, d := range v.diffs {
		grain := d.bm.GrainSize()
		var gs []int
		for g, last := int(off/grain), int((off+length-1)/grain); g <= last; g++ {
			if !d.bm.Test(g) {
				gs = append(gs, g)
			}
		}
		if gs != nil {
			ups = append(ups, BitUpdate{Mapping: d.id, Kind: DifferenceBits, Grains: gs})
			bms = append(bms, d.bm)
		}
	}
	if ups == nil {
		return nil
	}
	if err := e.commit.commit(nil, ups); err != nil {
		return fmt.Errorf("record the difference of a write to volume %d at %d: %w", v.id, off, err)
	}
	failpoint("cow-after-difference-commit")
	for i, u := range ups {
		for _, g := range u.Grains {
			bms[i].Set(g)
		}
	}
	return nil
}
