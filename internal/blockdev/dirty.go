package blockdev

// DirtyExtent is a run of a device's bytes that share one state in a dirty bitmap.
type DirtyExtent struct {
	Length int64
	// Dirty says the run may have changed since the bitmap's reference point. False is a
	// promise: a clean run holds what it held then.
	Dirty bool
}

// DirtyBitmaps is implemented by a Device that can tell, per named bitmap, which of its grains
// may have changed since some reference point (fcnbd: the incremental FlashCopy mappings of the
// volume, one bitmap per mapping, named after it). The NBD server offers each one as the meta
// context qemu:dirty-bitmap:<name>.
type DirtyBitmaps interface {
	// DirtyBitmapNames lists the bitmaps the device offers now.
	DirtyBitmapNames() []string
	// DirtyExtents describes [off, off+length) in bitmap name as consecutive extents from
	// off whose lengths add up to length. It is correct over precise: every byte written (by
	// a write acknowledged before the call) since the reference point is in a dirty extent. A
	// name the device does not offer (any more) is an error wrapping syscall.ENOENT; the range
	// is checked as by CheckRange.
	DirtyExtents(name string, off, length int64) ([]DirtyExtent, error)
}

// GrainDirtyExtents describes [off, off+length) of a device of size bytes, tracked in grains of
// grain bytes (the last one may be short), as dirty extents: a byte is dirty if dirty(g) is
// true for its grain g. The range must be inside the device (CheckRange).
func GrainDirtyExtents(size, grain, off, length int64, dirty func(g int) bool) []DirtyExtent {
	var out []DirtyExtent
	end := off + length
	for pos := off; pos < end; {
		g := pos / grain
		next := min((g+1)*grain, end, size)
		out = AppendDirtyExtent(out, DirtyExtent{Length: next - pos, Dirty: dirty(int(g))})
		pos = next
	}
	return out
}

// AppendDirtyExtent appends e to exts, merging it into the last extent if they have the same
// state. An empty extent is dropped.
func AppendDirtyExtent(exts []DirtyExtent, e DirtyExtent) []DirtyExtent {
	if e.Length <= 0 {
		return exts
	}
	if n := len(exts); n > 0 && exts[n-1].Dirty == e.Dirty {
		exts[n-1].Length += e.Length
		return exts
	}
	return append(exts, e)
}
