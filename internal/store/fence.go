package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// FenceFileName is the fence's file in an I/O group's shared directory.
const FenceFileName = "fence"

// ErrFenced is wrapped by every write a Fence refuses: another node has claimed the storage
// with a newer epoch, and this node must stand down.
var ErrFenced = errors.New("fenced: another node owns this storage now")

// A Fence keeps an old owner of shared storage from writing to it once a new owner has taken
// over, whatever the old one is doing (paused, cut off from etcd, about to write). It is checked
// at the store on every write, not by timing:
//
//   - the fence file holds the epoch of the current owner (8 bytes, big-endian);
//   - a writer takes a shared byte-range lock on it (an open-file-description lock, released by
//     the kernel if the process dies), reads the epoch, and writes only if it is its own,
//     holding the lock until its write has returned;
//   - a new owner writes its epoch first and then takes the exclusive lock, which waits for every
//     write that had already passed the check. Once Claim returns, no write of an older epoch
//     can start or is still running.
//
// A node frozen inside a write (between its check and the end of its write syscall) delays a
// takeover until it resumes or dies; a node frozen anywhere else does not. The shared
// filesystem must keep byte-range locks and file contents coherent between its nodes (a local
// filesystem, or a cluster filesystem such as GFS2 or OCFS2; not NFS).
type Fence struct {
	path  string
	word  []byte        // the fence file's first page, mapped shared: the recorded epoch, read without a syscall
	epoch atomic.Uint64 // this node's claim; 0 until Claim
	slots chan *os.File // open file descriptions for shared locks, one per concurrent writer
	// onFenced is called (once per refusal) when a write finds a newer epoch.
	onFenced func(theirs uint64)
}

const fencePage = 4096

// fenceSlots bounds the writes that hold the shared lock at once; more wait for a slot.
const fenceSlots = 64

// OpenFence opens (creating if needed) the fence file in dir. onFenced, if not nil, is called
// when a write is refused because another node claimed the storage.
func OpenFence(dir string, onFenced func(theirs uint64)) (*Fence, error) {
	path := dir + "/" + FenceFileName
	f := &Fence{path: path, slots: make(chan *os.File, fenceSlots), onFenced: onFenced}
	for range fenceSlots {
		fd, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("fence: %w", err)
		}
		f.slots <- fd
	}
	fd := <-f.slots
	defer func() { f.slots <- fd }()
	// The file is one page, so that the mapping never reaches past its end; growing it keeps the
	// epoch (zero bytes were never an epoch).
	if st, err := fd.Stat(); err != nil || st.Size() < fencePage {
		if err == nil {
			err = fd.Truncate(fencePage)
		}
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("fence: %w", err)
		}
	}
	word, err := unix.Mmap(int(fd.Fd()), 0, fencePage, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("fence: map %s: %w", path, err)
	}
	f.word = word
	return f, nil
}

// Close releases the fence's files (and so any lock still held).
func (f *Fence) Close() error {
	if f.word != nil {
		unix.Munmap(f.word)
		f.word = nil
	}
	for {
		select {
		case fd := <-f.slots:
			fd.Close()
		default:
			return nil
		}
	}
}

// Claim makes epoch the owner of the storage: it refuses an epoch not above the recorded one,
// records it durably, and returns once every write of an older epoch has finished.
func (f *Fence) Claim(epoch uint64) error {
	fd := <-f.slots
	defer func() { f.slots <- fd }()
	cur, err := readEpoch(fd)
	if err != nil {
		return err
	}
	if epoch <= cur {
		return fmt.Errorf("fence %s: epoch %d is not above the recorded %d: %w", f.path, epoch, cur, ErrFenced)
	}
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], epoch)
	if _, err := fd.WriteAt(b[:], 0); err != nil {
		return fmt.Errorf("fence %s: %w", f.path, err)
	}
	if err := fd.Sync(); err != nil {
		return fmt.Errorf("fence %s: %w", f.path, err)
	}
	f.epoch.Store(epoch)
	// Wait for the writes that passed their check before the new epoch was written.
	if err := lockRange(fd, unix.F_WRLCK); err != nil {
		return fmt.Errorf("fence %s: %w", f.path, err)
	}
	return lockRange(fd, unix.F_UNLCK)
}

// Enter admits one write: it returns leave, to be called once the write has returned, or an
// error wrapping ErrFenced if this node's epoch is no longer the recorded one.
func (f *Fence) Enter() (leave func(), err error) {
	mine := f.epoch.Load()
	fd := <-f.slots
	if err := lockRange(fd, unix.F_RDLCK); err != nil {
		f.slots <- fd
		return nil, fmt.Errorf("fence %s: %w", f.path, err)
	}
	// Read through the shared mapping: the same page cache page Claim's write goes to, so the
	// lock orders the two as it would a read(2).
	if cur := binary.BigEndian.Uint64(f.word[:8]); mine == 0 || cur != mine {
		lockRange(fd, unix.F_UNLCK)
		f.slots <- fd
		if f.onFenced != nil {
			f.onFenced(cur)
		}
		return nil, fmt.Errorf("fence %s: this node's epoch %d, the storage's %d: %w", f.path, mine, cur, ErrFenced)
	}
	return func() {
		lockRange(fd, unix.F_UNLCK)
		f.slots <- fd
	}, nil
}

// Guard runs fn as one fenced write.
func (f *Fence) Guard(fn func() error) error {
	leave, err := f.Enter()
	if err != nil {
		return err
	}
	defer leave()
	return fn()
}

func readEpoch(fd *os.File) (uint64, error) {
	var b [8]byte
	n, err := fd.ReadAt(b[:], 0)
	switch {
	case n == 0:
		return 0, nil
	case n < 8:
		return 0, fmt.Errorf("fence %s: %d bytes", fd.Name(), n)
	case err != nil && n != 8:
		return 0, err
	}
	return binary.BigEndian.Uint64(b[:]), nil
}

// lockRange takes (waiting) or releases an open-file-description lock on the epoch's bytes.
func lockRange(fd *os.File, typ int16) error {
	lk := unix.Flock_t{Type: typ, Whence: 0, Start: 0, Len: 8}
	for {
		err := unix.FcntlFlock(fd.Fd(), unix.F_OFD_SETLKW, &lk)
		if err != unix.EINTR {
			return err
		}
	}
}
