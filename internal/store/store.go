// Package store holds volume data: one sparse backing file per volume. Its interfaces are the
// standard ReaderAt/WriterAt/Sync shape so that a fault-injecting or crash-simulating store can
// wrap or replace the real one in tests; nothing above this package touches the filesystem
// directly for volume data.
package store

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"fcnbd/internal/blockdev"
)

// File is one volume's backing store.
type File interface {
	io.ReaderAt
	io.WriterAt
	// Sync makes every completed WriteAt and Punch durable.
	Sync() error
	// Punch deallocates [off, off+length); it reads as zeroes afterwards.
	Punch(off, length int64) error
	Close() error
}

// FastZeroer is implemented by a File that can zero a range with a metadata operation alone
// (NBD's FAST_ZERO). Files without it are never asked to: ZeroFast refuses for them.
type FastZeroer interface {
	// ZeroFast makes [off, off+length) read as zeroes without writing zeroes: deallocated
	// (punch) or turned into allocated-but-unwritten blocks (not punch). If the filesystem
	// cannot, it returns an error wrapping blockdev.ErrNotFast and the range is unchanged.
	ZeroFast(off, length int64, punch bool) error
}

// ZeroFast calls f's ZeroFast, or refuses with blockdev.ErrNotFast if f has none.
func ZeroFast(f File, off, length int64, punch bool) error {
	if z, ok := f.(FastZeroer); ok {
		return z.ZeroFast(off, length, punch)
	}
	return blockdev.ErrNotFast
}

// FS creates, opens and removes backing files by name.
type FS interface {
	// Create makes a new sparse file of the given size; it fails if name exists.
	Create(name string, size int64) (File, error)
	// Open opens an existing file for reading and writing.
	Open(name string) (File, error)
	// Remove deletes name; removing a missing file is not an error.
	Remove(name string) error
}

// Dir is the real FS: files in one directory of the host filesystem.
type Dir struct {
	Path string
	// Fence, if set, admits every change to the directory and its files (writes, punches,
	// truncation, creation, removal): in cluster mode, only the I/O group's owner writes.
	Fence *Fence
}

// guard runs fn as a fenced change if the directory has a fence.
func guard(f *Fence, fn func() error) error {
	if f == nil {
		return fn()
	}
	return f.Guard(fn)
}

// Create implements FS. The new file and its directory entry are synced before it returns.
func (d Dir) Create(name string, size int64) (file File, err error) {
	err = guard(d.Fence, func() error {
		file, err = d.create(name, size)
		return err
	})
	return file, err
}

func (d Dir) create(name string, size int64) (File, error) {
	p := filepath.Join(d.Path, name)
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		os.Remove(p)
		return nil, fmt.Errorf("size %s: %w", p, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(p)
		return nil, err
	}
	if err := SyncDir(d.Path); err != nil {
		f.Close()
		return nil, err
	}
	return &osFile{f: f, fence: d.Fence}, nil
}

// Open implements FS.
func (d Dir) Open(name string) (File, error) {
	f, err := os.OpenFile(filepath.Join(d.Path, name), os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	return &osFile{f: f, fence: d.Fence}, nil
}

// List returns the names of the regular files in the directory, sorted. It lets callers find
// files no catalogued volume owns (volume.Lister).
func (d Dir) List() ([]string, error) {
	ents, err := os.ReadDir(d.Path)
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(ents))
	for _, e := range ents {
		if e.Type().IsRegular() {
			names = append(names, e.Name())
		}
	}
	return names, nil
}

// Remove implements FS.
func (d Dir) Remove(name string) error {
	return guard(d.Fence, func() error { return d.remove(name) })
}

func (d Dir) remove(name string) error {
	err := os.Remove(filepath.Join(d.Path, name))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	return SyncDir(d.Path)
}

// SyncDir makes the entries of the directory at path durable (fsync of the directory).
func SyncDir(path string) error {
	dir, err := os.Open(path)
	if err != nil {
		return err
	}
	defer dir.Close()
	return dir.Sync()
}

type osFile struct {
	f     *os.File
	fence *Fence // nil outside cluster mode
	// syncErr is the first failed sync's error. Linux reports a writeback failure to one
	// fsync and may then forget it, so a later fsync could "succeed" for data that never
	// reached the disk: once a sync failed, every later one fails too, until the file is
	// reopened (by a daemon restart, which re-reads the durable state).
	syncErr atomic.Pointer[error]
}

func (o *osFile) ReadAt(p []byte, off int64) (int, error) {
	n, err := o.f.ReadAt(p, off)
	if err == io.EOF && n == len(p) {
		err = nil
	}
	return n, err
}

func (o *osFile) WriteAt(p []byte, off int64) (n int, err error) {
	if o.fence == nil {
		return o.f.WriteAt(p, off)
	}
	err = o.fence.Guard(func() error {
		n, err = o.f.WriteAt(p, off)
		return err
	})
	return n, err
}

// Truncate sets the file's size and makes it durable (fsync, for the size is metadata). A
// volume's expansion grows its file with it: the new range is a hole and reads as zeroes.
func (o *osFile) Truncate(size int64) error {
	if err := guard(o.fence, func() error { return o.f.Truncate(size) }); err != nil {
		return err
	}
	return o.f.Sync()
}

// Sync uses fdatasync: the size changes only by Truncate (a volume's expansion), which syncs
// the size itself, so metadata sync is not needed.
func (o *osFile) Sync() error {
	if p := o.syncErr.Load(); p != nil {
		return *p
	}
	if err := unix.Fdatasync(int(o.f.Fd())); err != nil {
		err = fmt.Errorf("fdatasync %s: %w (later syncs of this file fail too)", o.f.Name(), err)
		o.syncErr.CompareAndSwap(nil, &err)
		return *o.syncErr.Load()
	}
	return nil
}

func (o *osFile) Punch(off, length int64) error {
	if length == 0 {
		return nil
	}
	err := guard(o.fence, func() error {
		return unix.Fallocate(int(o.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	})
	if errors.Is(err, unix.EOPNOTSUPP) {
		// Filesystems without hole punching still get the contract: the range reads as zeroes.
		return writeZeroes(o, off, length)
	}
	return err
}

// ZeroFast implements FastZeroer with one fallocate: PUNCH_HOLE, or ZERO_RANGE to keep the
// blocks allocated. Where the filesystem supports neither it refuses, unlike Punch, which falls
// back to writing zeroes.
func (o *osFile) ZeroFast(off, length int64, punch bool) error {
	if length == 0 {
		return nil
	}
	mode := uint32(unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE)
	if punch {
		mode = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
	}
	err := guard(o.fence, func() error { return unix.Fallocate(int(o.f.Fd()), mode, off, length) })
	if errors.Is(err, unix.EOPNOTSUPP) {
		return fmt.Errorf("fallocate %s: %v: %w", o.f.Name(), err, blockdev.ErrNotFast)
	}
	return err
}

func (o *osFile) Close() error { return o.f.Close() }

func writeZeroes(w io.WriterAt, off, length int64) error {
	buf := make([]byte, min(length, 1<<20))
	for length > 0 {
		n := min(length, int64(len(buf)))
		if _, err := w.WriteAt(buf[:n], off); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}

// WriteBackStarter is implemented by a File that can start writing a range back to disk
// without waiting for it (Linux sync_file_range), so that a later Sync finds less to do.
type WriteBackStarter interface {
	StartWriteback(off, length int64)
}

// StartWriteback starts writing [off, off+length) of f back if f can; it is only a hint.
func StartWriteback(f File, off, length int64) {
	if w, ok := f.(WriteBackStarter); ok {
		w.StartWriteback(off, length)
	}
}

// StartWriteback implements WriteBackStarter; errors are ignored (Sync reports them).
func (o *osFile) StartWriteback(off, length int64) {
	_ = unix.SyncFileRange(int(o.f.Fd()), off, length, unix.SYNC_FILE_RANGE_WRITE)
}

// StartWriteback forwards to the wrapped file.
func (s *stickyFile) StartWriteback(off, length int64) { StartWriteback(s.File, off, length) }

// Prefetcher is implemented by a File that can start reading a range into memory without
// waiting for it (posix_fadvise WILLNEED), so that a later read finds it there.
type Prefetcher interface {
	Prefetch(off, length int64)
}

// Prefetch starts reading [off, off+length) of f if f can; it is only a hint.
func Prefetch(f File, off, length int64) {
	if p, ok := f.(Prefetcher); ok {
		p.Prefetch(off, length)
	}
}

// Prefetch implements Prefetcher.
func (o *osFile) Prefetch(off, length int64) {
	_ = unix.Fadvise(int(o.f.Fd()), off, length, unix.FADV_WILLNEED)
}

// Prefetch forwards to the wrapped file.
func (s *stickyFile) Prefetch(off, length int64) { Prefetch(s.File, off, length) }
