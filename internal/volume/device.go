package volume

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"

	"fcnbd/internal/blockdev"
	"fcnbd/internal/store"
)

// fileDevice is the bottom of every volume's stack: a blockdev.Device straight over the
// volume's backing file.
type fileDevice struct {
	f    store.File
	size int64
}

// NewFileDevice returns a Device over f, a backing file of size bytes. Requests outside the
// device fail with EINVAL, except writes running past the end, which fail with ENOSPC as NBD
// asks. Durability (FUA, Flush) is the file's Sync.
func NewFileDevice(f store.File, size int64) blockdev.Device {
	return &fileDevice{f: f, size: size}
}

func (d *fileDevice) Size() int64 { return d.size }

func (d *fileDevice) ReadAt(p []byte, off int64) error {
	if err := blockdev.CheckRange(d.size, off, int64(len(p))); err != nil {
		return err
	}
	if _, err := d.f.ReadAt(p, off); err != nil {
		return fmt.Errorf("read [%d, +%d): %w", off, len(p), ioErr(err))
	}
	return nil
}

// Extents reports the backing file's holes.
func (d *fileDevice) Extents(off, length int64) ([]blockdev.Extent, error) {
	if err := blockdev.CheckRange(d.size, off, length); err != nil {
		return nil, err
	}
	exts, err := store.Extents(d.f, off, length)
	if err != nil {
		return nil, fmt.Errorf("extents [%d, +%d): %w", off, length, ioErr(err))
	}
	return exts, nil
}

func (d *fileDevice) WriteAt(p []byte, off int64, fua bool) error {
	if off < 0 {
		return fmt.Errorf("write at %d: %w", off, syscall.EINVAL)
	}
	if off > d.size || int64(len(p)) > d.size-off {
		return fmt.Errorf("write [%d, +%d) past the end of %d bytes: %w", off, len(p), d.size, syscall.ENOSPC)
	}
	if _, err := d.f.WriteAt(p, off); err != nil {
		return fmt.Errorf("write [%d, +%d): %w", off, len(p), ioErr(err))
	}
	if fua {
		return d.Flush()
	}
	return nil
}

func (d *fileDevice) Flush() error {
	if err := d.f.Sync(); err != nil {
		return fmt.Errorf("sync: %w", ioErr(err))
	}
	return nil
}

func (d *fileDevice) Trim(off, length int64) error {
	if err := blockdev.CheckRange(d.size, off, length); err != nil {
		return err
	}
	if err := d.f.Punch(off, length); err != nil {
		return fmt.Errorf("trim [%d, +%d): %w", off, length, ioErr(err))
	}
	return nil
}

var zeroes = make([]byte, 1<<20)

func (d *fileDevice) WriteZeroes(off, length int64, mayPunch, fua bool) error {
	if err := blockdev.CheckRange(d.size, off, length); err != nil {
		return err
	}
	if mayPunch {
		if err := d.f.Punch(off, length); err != nil {
			return fmt.Errorf("write zeroes [%d, +%d): %w", off, length, ioErr(err))
		}
	} else {
		for done := int64(0); done < length; {
			n := min(length-done, int64(len(zeroes)))
			if _, err := d.f.WriteAt(zeroes[:n], off+done); err != nil {
				return fmt.Errorf("write zeroes [%d, +%d): %w", off+done, n, ioErr(err))
			}
			done += n
		}
	}
	if fua {
		return d.Flush()
	}
	return nil
}

// WriteZeroesFast zeroes with one fallocate, or refuses (store.ZeroFast).
func (d *fileDevice) WriteZeroesFast(off, length int64, mayPunch, fua bool) error {
	if err := blockdev.CheckRange(d.size, off, length); err != nil {
		return err
	}
	if err := store.ZeroFast(d.f, off, length, mayPunch); err != nil {
		if blockdev.IsNotFast(err) {
			return err
		}
		return fmt.Errorf("write zeroes [%d, +%d): %w", off, length, ioErr(err))
	}
	if fua {
		return d.Flush()
	}
	return nil
}

// ioErr keeps an errno the store reported (ENOSPC from a full disk means something to the
// client) and makes anything else EIO.
func ioErr(err error) error {
	var e syscall.Errno
	if errors.As(err, &e) {
		return err
	}
	return fmt.Errorf("%v: %w", err, syscall.EIO)
}

// gate counts the requests in progress on a volume so that deletion and shutdown can wait for
// them, and refuses requests once the volume is closed. Connections may keep a Device after its
// volume is deleted; every request on it then fails with EIO.
type gate struct {
	mu     sync.RWMutex // held shared by each request, exclusively by close
	closed bool
}

func (g *gate) enter() bool {
	g.mu.RLock()
	if g.closed {
		g.mu.RUnlock()
		return false
	}
	return true
}

func (g *gate) leave() { g.mu.RUnlock() }

// close waits for every request in progress and refuses later ones.
func (g *gate) close() {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
}

// gatedDevice is what the NBD server is handed: the volume's stack behind its gate. inner is
// read by requests inside the gate and replaced only with the gate held exclusively (Expand);
// size is inner's, readable without the gate.
type gatedDevice struct {
	name  string
	gate  *gate
	inner blockdev.Device
	size  atomic.Int64
}

func newGatedDevice(name string, g *gate, inner blockdev.Device) *gatedDevice {
	d := &gatedDevice{name: name, gate: g, inner: inner}
	d.size.Store(inner.Size())
	return d
}

func (d *gatedDevice) gone() error {
	return fmt.Errorf("volume %s is deleted or the daemon is stopping: %w", d.name, syscall.EIO)
}

func (d *gatedDevice) Size() int64 { return d.size.Load() }

func (d *gatedDevice) ReadAt(p []byte, off int64) error {
	if !d.gate.enter() {
		return d.gone()
	}
	defer d.gate.leave()
	return d.inner.ReadAt(p, off)
}

// Extents forwards to the stack, which reports all data if it cannot tell.
func (d *gatedDevice) Extents(off, length int64) ([]blockdev.Extent, error) {
	if !d.gate.enter() {
		return nil, d.gone()
	}
	defer d.gate.leave()
	return blockdev.Extents(d.inner, off, length)
}

func (d *gatedDevice) WriteAt(p []byte, off int64, fua bool) error {
	if !d.gate.enter() {
		return d.gone()
	}
	defer d.gate.leave()
	return d.inner.WriteAt(p, off, fua)
}

func (d *gatedDevice) Flush() error {
	if !d.gate.enter() {
		return d.gone()
	}
	defer d.gate.leave()
	return d.inner.Flush()
}

func (d *gatedDevice) Trim(off, length int64) error {
	if !d.gate.enter() {
		return d.gone()
	}
	defer d.gate.leave()
	return d.inner.Trim(off, length)
}

func (d *gatedDevice) WriteZeroes(off, length int64, mayPunch, fua bool) error {
	if !d.gate.enter() {
		return d.gone()
	}
	defer d.gate.leave()
	return d.inner.WriteZeroes(off, length, mayPunch, fua)
}

// WriteZeroesFast forwards FAST_ZERO's zeroing; a stack without it refuses (not fast).
func (d *gatedDevice) WriteZeroesFast(off, length int64, mayPunch, fua bool) error {
	if !d.gate.enter() {
		return d.gone()
	}
	defer d.gate.leave()
	return blockdev.WriteZeroesFast(d.inner, off, length, mayPunch, fua)
}

// Prefetch forwards NBD_CMD_CACHE; a stack without a cache only has the range checked.
func (d *gatedDevice) Prefetch(off, length int64) error {
	if !d.gate.enter() {
		return d.gone()
	}
	defer d.gate.leave()
	return blockdev.Prefetch(d.inner, off, length)
}

// DirtyBitmapNames forwards to the stack (the driver's: the volume's incremental mappings).
func (d *gatedDevice) DirtyBitmapNames() []string {
	if !d.gate.enter() {
		return nil
	}
	defer d.gate.leave()
	db, ok := d.inner.(blockdev.DirtyBitmaps)
	if !ok {
		return nil
	}
	return db.DirtyBitmapNames()
}

// DirtyExtents forwards to the stack; a stack with no dirty bitmaps has no such name.
func (d *gatedDevice) DirtyExtents(name string, off, length int64) ([]blockdev.DirtyExtent, error) {
	if !d.gate.enter() {
		return nil, d.gone()
	}
	defer d.gate.leave()
	db, ok := d.inner.(blockdev.DirtyBitmaps)
	if !ok {
		return nil, fmt.Errorf("volume %s has no dirty bitmap %q: %w", d.name, name, syscall.ENOENT)
	}
	return db.DirtyExtents(name, off, length)
}
