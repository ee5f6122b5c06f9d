package blockdev

// Extent is a run of a device's bytes that share one allocation state.
type Extent struct {
	Length int64
	// Hole says the run is not allocated and reads as zeroes. False promises nothing: an
	// allocated run may hold zeroes too.
	Hole bool
}

// Extenter is implemented by a Device (or a layer's store) that can tell the runs it has
// allocated from its holes.
type Extenter interface {
	// Extents describes [off, off+length) as consecutive extents from off, whose lengths add
	// up to length. It is correct over precise: a hole is reported only where the range reads
	// as zeroes (at some instant during the call) and nothing is allocated; anything else,
	// including what it could not determine, is reported as data. The range is checked as by
	// CheckRange.
	Extents(off, length int64) ([]Extent, error)
}

// Extents returns d's extents for [off, off+length), or one data extent if d cannot tell.
func Extents(d Device, off, length int64) ([]Extent, error) {
	if x, ok := d.(Extenter); ok {
		return x.Extents(off, length)
	}
	if err := CheckRange(d.Size(), off, length); err != nil {
		return nil, err
	}
	return AppendExtent(nil, Extent{Length: length}), nil
}

// AppendExtent appends e to exts, merging it into the last extent if they have the same state.
// An empty extent is dropped.
func AppendExtent(exts []Extent, e Extent) []Extent {
	if e.Length <= 0 {
		return exts
	}
	if n := len(exts); n > 0 && exts[n-1].Hole == e.Hole {
		exts[n-1].Length += e.Length
		return exts
	}
	return append(exts, e)
}

// OverlayData returns exts (describing a range from base) with every part that overlaps one of
// the byte ranges data (sorted, from base, [start, end) pairs) turned into data. It is how a
// layer that holds newer data over a lower device's extents reports it.
func OverlayData(exts []Extent, base int64, data [][2]int64) []Extent {
	if len(data) == 0 {
		return exts
	}
	out := make([]Extent, 0, len(exts)+2*len(data))
	pos := base
	di := 0
	for _, e := range exts {
		end := pos + e.Length
		if !e.Hole {
			out = AppendExtent(out, e)
			pos = end
			continue
		}
		for pos < end {
			for di < len(data) && data[di][1] <= pos {
				di++
			}
			if di == len(data) || data[di][0] >= end {
				out = AppendExtent(out, Extent{Length: end - pos, Hole: true})
				pos = end
				break
			}
			if s := data[di][0]; s > pos {
				out = AppendExtent(out, Extent{Length: s - pos, Hole: true})
				pos = s
			}
			de := min(data[di][1], end)
			out = AppendExtent(out, Extent{Length: de - pos})
			pos = de
		}
	}
	return out
}
