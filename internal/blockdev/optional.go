package blockdev

import (
	"errors"
	"fmt"
	"syscall"
)

// ErrNotFast is returned by WriteZeroesFast when zeroing the range would cost about as much as
// writing zeroes (a copy-on-write of a grain, a filesystem that cannot punch or zero a range
// without writing it); the range has not been changed. It wraps syscall.ENOTSUP, which the NBD
// server reports as NBD_ENOTSUP.
var ErrNotFast = fmt.Errorf("zeroing would not be faster than writing zeroes: %w", syscall.ENOTSUP)

// FastZeroer is implemented by a Device that can honour NBD's WRITE_ZEROES with FAST_ZERO.
type FastZeroer interface {
	// WriteZeroesFast is WriteZeroes done only if it is faster than writing zeroes: by
	// deallocating the range (mayPunch) or converting it to unwritten extents, with no data
	// copied or written. If it cannot, it returns an error wrapping ErrNotFast and has changed
	// nothing the range reads back.
	WriteZeroesFast(off, length int64, mayPunch, fua bool) error
}

// WriteZeroesFast calls d's WriteZeroesFast, or fails with ErrNotFast if d has none.
func WriteZeroesFast(d Device, off, length int64, mayPunch, fua bool) error {
	if z, ok := d.(FastZeroer); ok {
		return z.WriteZeroesFast(off, length, mayPunch, fua)
	}
	if err := CheckRange(d.Size(), off, length); err != nil {
		return err
	}
	return ErrNotFast
}

// IsNotFast reports whether err is a WriteZeroesFast refusal.
func IsNotFast(err error) bool { return errors.Is(err, ErrNotFast) }

// Prefetcher is implemented by a Device with a cache that can load a range ahead of reads
// (NBD_CMD_CACHE).
type Prefetcher interface {
	// Prefetch loads as much of [off, off+length) into the cache as its bounds allow and
	// returns once that is cached; a later read of it is served without the lower device. It
	// is advisory: what does not fit is left out and still succeeds. The range is checked as
	// by CheckRange.
	Prefetch(off, length int64) error
}

// Prefetch calls d's Prefetch; a device without one only has the range checked.
func Prefetch(d Device, off, length int64) error {
	if p, ok := d.(Prefetcher); ok {
		return p.Prefetch(off, length)
	}
	return CheckRange(d.Size(), off, length)
}
