package cow

import (
	"fmt"
	"syscall"

	"fcnbd/internal/blockdev"
	"fcnbd/internal/store"
)

var _ blockdev.Extenter = (*device)(nil)

// Extents reports v's image: for a volume that is no active target, its own store's holes; for
// a target, each run of grains that one volume's store holds for it (the target's own for the
// grains it has split, else the nearest upstream volume that holds them, as readView walks)
// is asked of that store.
//
// No grain lock is taken. A volume's store changes for a grain only once every volume reading
// it there holds the grain (its split bit set, in memory too, before the change), and the bits
// only go from clear to set while the links stay (the gate, held shared, keeps them): so once a
// run's answer is in, the run's holders are walked again, and an answer is kept only for the
// grains whose holder is still the one asked. The others are asked again of their new holder,
// which is nearer v; that ends within the chain's depth.
func (d *device) Extents(off, length int64) ([]blockdev.Extent, error) {
	leave, err := d.enter(off, length)
	if err != nil {
		return nil, err
	}
	defer leave()
	v := d.v
	if v.target == nil {
		return fileExtents(v, off, length)
	}
	grain := v.target.grain
	var exts []blockdev.Extent
	for pos, end := off, off+length; pos < end; {
		g := int(pos / grain)
		h, err := holder(v, g)
		if err != nil {
			return nil, err
		}
		runEnd := min(int64(g+1)*grain, end)
		for runEnd < end {
			next, err := holder(v, int(runEnd/grain))
			if err != nil {
				return nil, err
			}
			if next != h {
				break
			}
			runEnd = min(runEnd+grain, end)
		}
		run, err := fileExtents(h, pos, runEnd-pos)
		if err != nil {
			return nil, err
		}
		// Keep the answer up to the first grain whose holder changed meanwhile.
		kept := runEnd
		for p := pos; p < runEnd; p = (p/grain + 1) * grain {
			now, err := holder(v, int(p/grain))
			if err != nil {
				return nil, err
			}
			if now != h {
				kept = max(pos, p/grain*grain)
				break
			}
		}
		exts = appendPrefix(exts, run, kept-pos)
		pos = kept
	}
	return exts, nil
}

// holder returns the volume whose store holds grain g of v's view, as readView finds it.
func holder(v *volume, g int) (*volume, error) {
	for range maxDepth {
		if m := v.target; m == nil || m.split.Test(g) {
			return v, nil
		}
		v = v.upstream
	}
	return nil, fmt.Errorf("grain %d: dependency chain deeper than %d: %w", g, maxDepth, syscall.EIO)
}

func fileExtents(v *volume, off, length int64) ([]blockdev.Extent, error) {
	exts, err := store.Extents(v.file, off, length)
	if err != nil {
		return nil, fmt.Errorf("extents of volume %d at %d: %w", v.id, off, err)
	}
	return exts, nil
}

// appendPrefix appends the first n bytes' worth of src to exts.
func appendPrefix(exts, src []blockdev.Extent, n int64) []blockdev.Extent {
	for _, e := range src {
		if n <= 0 {
			break
		}
		e.Length = min(e.Length, n)
		n -= e.Length
		exts = blockdev.AppendExtent(exts, e)
	}
	return exts
}
