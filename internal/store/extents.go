package store

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"fcnbd/internal/blockdev"
)

// Extents returns f's allocation over [off, off+length): f's own if it implements
// blockdev.Extenter, else one data extent. The range must lie inside the file.
func Extents(f File, off, length int64) ([]blockdev.Extent, error) {
	if x, ok := f.(blockdev.Extenter); ok {
		return x.Extents(off, length)
	}
	return blockdev.AppendExtent(nil, blockdev.Extent{Length: length}), nil
}

// Extents implements blockdev.Extenter with SEEK_HOLE and SEEK_DATA: one lseek for a range that
// is all data. A filesystem without them reports the whole file as data, which the contract
// allows. Unwritten (preallocated) extents may be reported as holes: they read as zeroes.
func (o *osFile) Extents(off, length int64) ([]blockdev.Extent, error) {
	fd := int(o.f.Fd())
	end := off + length
	var exts []blockdev.Extent
	for pos := off; pos < end; {
		hole, err := unix.Seek(fd, pos, unix.SEEK_HOLE)
		if err != nil {
			if errors.Is(err, unix.ENXIO) { // pos at or past the end of the file: reads as zeroes
				return blockdev.AppendExtent(exts, blockdev.Extent{Length: end - pos, Hole: true}), nil
			}
			return nil, fmt.Errorf("seek hole in %s at %d: %w", o.f.Name(), pos, err)
		}
		if hole > pos {
			exts = blockdev.AppendExtent(exts, blockdev.Extent{Length: min(hole, end) - pos})
			pos = hole
			continue
		}
		data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) { // no data from pos to the end of the file
			data = end
		} else if err != nil {
			return nil, fmt.Errorf("seek data in %s at %d: %w", o.f.Name(), pos, err)
		}
		exts = blockdev.AppendExtent(exts, blockdev.Extent{Length: min(data, end) - pos, Hole: true})
		pos = data
	}
	return exts, nil
}

// Extents forwards to the wrapped file.
func (s *stickyFile) Extents(off, length int64) ([]blockdev.Extent, error) {
	return Extents(s.File, off, length)
}
