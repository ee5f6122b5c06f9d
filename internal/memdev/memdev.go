// Package memdev is an in-memory blockdev.Device for tests: sparse 4 KiB pages that read as
// zeroes until written, safe for concurrent use, with an optional hook that can delay or fail any
// operation. It owns no files and never does I/O; nothing in the data path may depend on it.
package memdev

import (
	"sync"
	"sync/atomic"

	"fcnbd/internal/blockdev"
)

// PageSize is the allocation unit. Trim and WriteZeroes with mayPunch free whole pages.
const PageSize = 4096

// Op names a Device operation, as passed to a Hook.
type Op int

// The operations a Hook sees.
const (
	OpRead Op = iota
	OpWrite
	OpFlush
	OpTrim
	OpWriteZeroes
)

func (o Op) String() string {
	switch o {
	case OpRead:
		return "read"
	case OpWrite:
		return "write"
	case OpFlush:
		return "flush"
	case OpTrim:
		return "trim"
	case OpWriteZeroes:
		return "write_zeroes"
	}
	return "unknown"
}

// Hook is called before every operation, after its range has been checked, with the
// operation's range (zero for Flush). If it returns an error the operation fails with it and
// changes nothing. A hook may block to simulate a slow device; it runs concurrently with other
// operations and must be safe for that.
type Hook func(op Op, off, length int64) error

type page [PageSize]byte

// Device is a sparse in-memory block device. The zero value is not usable; call New.
type Device struct {
	size int64
	hook atomic.Pointer[Hook]

	mu    sync.RWMutex
	pages map[int64]*page // page index → contents; absent pages read as zeroes

	flushes atomic.Int64
}

var _ blockdev.Device = (*Device)(nil)

// New returns a zeroed device of size bytes.
func New(size int64) *Device {
	return &Device{size: size, pages: make(map[int64]*page)}
}

// SetHook installs h (nil removes the hook). It applies to operations that start afterwards.
func (d *Device) SetHook(h Hook) {
	if h == nil {
		d.hook.Store(nil)
		return
	}
	d.hook.Store(&h)
}

func (d *Device) callHook(op Op, off, length int64) error {
	if h := d.hook.Load(); h != nil {
		return (*h)(op, off, length)
	}
	return nil
}

// Size returns the capacity in bytes.
func (d *Device) Size() int64 { return d.size }

// Flushes returns how many Flush calls have succeeded.
func (d *Device) Flushes() int64 { return d.flushes.Load() }

// Allocated returns how many bytes of pages are allocated (written and not since punched).
func (d *Device) Allocated() int64 {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return int64(len(d.pages)) * PageSize
}

// ReadAt fills p from off; unwritten ranges read as zeroes.
func (d *Device) ReadAt(p []byte, off int64) error {
	if err := blockdev.CheckRange(d.size, off, int64(len(p))); err != nil {
		return err
	}
	if err := d.callHook(OpRead, off, int64(len(p))); err != nil {
		return err
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	for len(p) > 0 {
		idx, in := off/PageSize, off%PageSize
		n := min(int64(len(p)), PageSize-in)
		if pg := d.pages[idx]; pg != nil {
			copy(p[:n], pg[in:in+n])
		} else {
			clear(p[:n])
		}
		p, off = p[n:], off+n
	}
	return nil
}

// WriteAt writes p at off. Memory is as stable as this device's storage gets, so fua changes
// nothing.
func (d *Device) WriteAt(p []byte, off int64, fua bool) error {
	if err := blockdev.CheckRange(d.size, off, int64(len(p))); err != nil {
		return err
	}
	if err := d.callHook(OpWrite, off, int64(len(p))); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for len(p) > 0 {
		idx, in := off/PageSize, off%PageSize
		n := min(int64(len(p)), PageSize-in)
		pg := d.pages[idx]
		if pg == nil {
			pg = new(page)
			d.pages[idx] = pg
		}
		copy(pg[in:in+n], p[:n])
		p, off = p[n:], off+n
	}
	return nil
}

// Flush succeeds unless the hook fails it, and counts the successes.
func (d *Device) Flush() error {
	if err := d.callHook(OpFlush, 0, 0); err != nil {
		return err
	}
	d.flushes.Add(1)
	return nil
}

// Trim zeroes the range, freeing the pages it covers entirely.
func (d *Device) Trim(off, length int64) error {
	if err := blockdev.CheckRange(d.size, off, length); err != nil {
		return err
	}
	if err := d.callHook(OpTrim, off, length); err != nil {
		return err
	}
	d.zero(off, length, true)
	return nil
}

// WriteZeroes zeroes the range; with mayPunch, pages it covers entirely are freed, otherwise
// every page of the range is allocated (so a large range without mayPunch costs its size in
// memory, as it would cost disk space on a real device).
func (d *Device) WriteZeroes(off, length int64, mayPunch bool, fua bool) error {
	if err := blockdev.CheckRange(d.size, off, length); err != nil {
		return err
	}
	if err := d.callHook(OpWriteZeroes, off, length); err != nil {
		return err
	}
	d.zero(off, length, mayPunch)
	return nil
}

func (d *Device) zero(off, length int64, punch bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	end := off + length
	if punch && length >= int64(len(d.pages))*PageSize*4 {
		// A huge range over a small map: walk the map, not the range.
		for idx, pg := range d.pages {
			ps := idx * PageSize
			if ps >= off && ps+PageSize <= end {
				delete(d.pages, idx)
			} else if ps < end && ps+PageSize > off {
				lo, hi := max(off, ps)-ps, min(end, ps+PageSize)-ps
				clear(pg[lo:hi])
			}
		}
		return
	}
	for off < end {
		idx, in := off/PageSize, off%PageSize
		n := min(end-off, PageSize-in)
		pg := d.pages[idx]
		switch {
		case n == PageSize && punch:
			delete(d.pages, idx)
		case n == PageSize && pg == nil:
			d.pages[idx] = new(page)
		case pg == nil && punch:
			// Already zero.
		case pg == nil:
			d.pages[idx] = new(page)
		default:
			clear(pg[in : in+n])
		}
		off += n
	}
}

var _ blockdev.Extenter = (*Device)(nil)

// Extents reports pages never written (or freed by a punch) as holes, every other page as data.
func (d *Device) Extents(off, length int64) ([]blockdev.Extent, error) {
	if err := blockdev.CheckRange(d.size, off, length); err != nil {
		return nil, err
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	var exts []blockdev.Extent
	for end := off + length; off < end; {
		idx := off / PageSize
		n := min(end, (idx+1)*PageSize) - off
		_, data := d.pages[idx]
		exts = blockdev.AppendExtent(exts, blockdev.Extent{Length: n, Hole: !data})
		off += n
	}
	return exts, nil
}
