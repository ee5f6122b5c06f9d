// Package blockdev defines the one interface every layer of the data path speaks: the NBD server
// calls it, the cache implements it over the copy-on-write layer, which implements it over the
// volume's store.
//
// Errors are reported as syscall.Errno values (wrapped with context as usual); the NBD server
// maps EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP and ESHUTDOWN to their NBD codes and every other
// error to EIO. Nothing in this package does I/O.
package blockdev

import (
	"errors"
	"fmt"
	"syscall"
)

// Device is one volume as a block device. Implementations must be safe for concurrent use: the
// NBD server executes many requests of many connections at once.
type Device interface {
	// Size is the capacity in bytes. It does not change while a Device is served.
	Size() int64
	// ReadAt fills p from offset off. It returns nil only if all of p was read.
	ReadAt(p []byte, off int64) error
	// WriteAt writes p at off. With fua, it returns only once p is on stable storage.
	WriteAt(p []byte, off int64, fua bool) error
	// Flush returns once every write that completed before Flush was called is on stable
	// storage, whichever connection sent it. After an error, nothing about those writes'
	// durability may be assumed, and a later Flush must not report success for them unless it
	// really made them durable.
	Flush() error
	// Trim tells the device that [off, off+length) is no longer needed; later reads of it may
	// return anything until it is written again (fcnbd's stores return zeroes).
	Trim(off, length int64) error
	// WriteZeroes makes [off, off+length) read as zeroes. With mayPunch it may deallocate
	// the range (NBD's WRITE_ZEROES without NO_HOLE); without, the blocks stay allocated.
	WriteZeroes(off, length int64, mayPunch bool, fua bool) error
}

// CheckRange returns an error wrapping syscall.EINVAL if [off, off+length) is not inside a
// device of the given size. Layers use it so that every one refuses the same requests.
func CheckRange(size, off, length int64) error {
	if off < 0 || length < 0 || off > size || length > size-off {
		return fmt.Errorf("range [%d, +%d) outside device of %d bytes: %w", off, length, size, syscall.EINVAL)
	}
	return nil
}

// Errno returns the errno that err carries, or EIO if it carries none.
func Errno(err error) syscall.Errno {
	var e syscall.Errno
	if errors.As(err, &e) {
		return e
	}
	return syscall.EIO
}
