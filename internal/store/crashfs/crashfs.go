// Package crashfs is an in-memory store.FS that can simulate a crash, after cockroachdb/pebble's
// crashable memory filesystem. Every file keeps two images: the volatile one that reads see, and
// the durable one as of its last Sync. CrashClone returns a new FS holding what a disk would
// hold after power loss at that instant: the durable images, optionally with a seeded random
// subset of the unsynced writes persisted, torn at 512-byte sector granularity and in any order.
// A test then reopens its state from the clone, deterministically from a printed seed.
//
// Directory operations (Create, Remove) are durable as soon as they return, as store.Dir makes
// them by syncing the directory; a created file's durable image is its initial (all-zero)
// content. A file's size after a crash is its size at its last Sync (or creation).
package crashfs

import (
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"slices"
	"sync"
	"syscall"

	"fcnbd/internal/store"
)

// SectorSize is the unit a crash tears writes at: each sector of an unsynced write is either
// persisted whole or not at all.
const SectorSize = 512

type sector = [SectorSize]byte

// image is a sparse file image: sector index → contents; absent sectors are zeroes. The
// sector arrays are never modified once stored, so images and histories may share them.
type image struct {
	size    int64
	sectors map[int64]*sector
}

func (im image) clone() image {
	c := image{size: im.size, sectors: make(map[int64]*sector, len(im.sectors))}
	for k, v := range im.sectors {
		c.sectors[k] = v
	}
	return c
}

// node is one file's state.
type node struct {
	mu       sync.Mutex
	volatile image
	durable  image
	// history lists, per sector written since the last Sync, each version it had after each
	// write (nil: zeroes). A crash may persist any of them, or none.
	history map[int64][]*sector
}

// FS is a crash-simulating in-memory store.FS. It is safe for concurrent use.
type FS struct {
	mu    sync.Mutex
	files map[string]*node
}

var _ store.FS = (*FS)(nil)

// New returns an empty FS.
func New() *FS { return &FS{files: map[string]*node{}} }

func pathErr(op, name string, err error) error { return &fs.PathError{Op: op, Path: name, Err: err} }

// Create implements store.FS. The file exists durably, all zeroes, when it returns.
func (f *FS) Create(name string, size int64) (store.File, error) {
	if size < 0 {
		return nil, pathErr("create", name, syscall.EINVAL)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.files[name]; ok {
		return nil, pathErr("create", name, fs.ErrExist)
	}
	n := &node{
		volatile: image{size: size, sectors: map[int64]*sector{}},
		durable:  image{size: size, sectors: map[int64]*sector{}},
		history:  map[int64][]*sector{},
	}
	f.files[name] = n
	return &File{n: n, name: name}, nil
}

// Open implements store.FS.
func (f *FS) Open(name string) (store.File, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	n, ok := f.files[name]
	if !ok {
		return nil, pathErr("open", name, fs.ErrNotExist)
	}
	return &File{n: n, name: name}, nil
}

// Remove implements store.FS; it is durable when it returns. Files still open keep working on
// the removed file's contents, as on Unix.
func (f *FS) Remove(name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.files, name)
	return nil
}

// List returns the names of the files, sorted.
func (f *FS) List() ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	names := make([]string, 0, len(f.files))
	for name := range f.files {
		names = append(names, name)
	}
	slices.Sort(names)
	return names, nil
}

// CrashConfig says what a crash persists beyond the synced state.
type CrashConfig struct {
	// UnsyncedPercent is the chance, 0 to 100, that a sector written since its file's last Sync
	// reached the disk; if it did, which of its unsynced versions it holds is chosen uniformly
	// (not necessarily the last: the disk may have reordered writes). 0 keeps only synced data.
	UnsyncedPercent int
	// Seed seeds the choices; the same seed and the same history give the same clone.
	Seed uint64
}

// CrashClone returns a new FS holding what would be on disk after a crash now: every file's
// durable image plus, per cfg, some unsynced sectors. The receiver is unchanged and its open
// Files keep working; the clone shares nothing mutable with it.
func (f *FS) CrashClone(cfg CrashConfig) *FS {
	f.mu.Lock()
	defer f.mu.Unlock()
	rng := rand.New(rand.NewPCG(cfg.Seed, cfg.Seed^0x5851f42d4c957f2d))
	c := New()
	// Sorted so that the random choices do not depend on map order.
	names := make([]string, 0, len(f.files))
	for name := range f.files {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		n := f.files[name]
		n.mu.Lock()
		im := n.durable.clone()
		if cfg.UnsyncedPercent > 0 {
			idx := make([]int64, 0, len(n.history))
			for s := range n.history {
				idx = append(idx, s)
			}
			slices.Sort(idx)
			for _, s := range idx {
				if rng.IntN(100) >= cfg.UnsyncedPercent || s*SectorSize >= im.size {
					continue
				}
				vs := n.history[s]
				if v := vs[rng.IntN(len(vs))]; v != nil {
					im.sectors[s] = v
				} else {
					delete(im.sectors, s)
				}
			}
		}
		n.mu.Unlock()
		c.files[name] = &node{volatile: im.clone(), durable: im, history: map[int64][]*sector{}}
	}
	return c
}

// File is an open file of an FS.
type File struct {
	n      *node
	name   string
	mu     sync.Mutex
	closed bool
}

var _ store.File = (*File)(nil)

func (h *File) check(op string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return pathErr(op, h.name, os.ErrClosed)
	}
	return nil
}

// ReadAt implements io.ReaderAt over the volatile image: it returns io.EOF if p reaches past
// the end of the file.
func (h *File) ReadAt(p []byte, off int64) (int, error) {
	if err := h.check("read"); err != nil {
		return 0, err
	}
	if off < 0 {
		return 0, pathErr("read", h.name, syscall.EINVAL)
	}
	n := h.n
	n.mu.Lock()
	defer n.mu.Unlock()
	size := n.volatile.size
	if off >= size {
		return 0, io.EOF
	}
	end := min(off+int64(len(p)), size)
	for pos := off; pos < end; {
		s := pos / SectorSize
		in := pos % SectorSize
		k := min(SectorSize-in, end-pos)
		dst := p[pos-off : pos-off+k]
		if sec := n.volatile.sectors[s]; sec != nil {
			copy(dst, sec[in:in+k])
		} else {
			clear(dst)
		}
		pos += k
	}
	if got := int(end - off); got < len(p) {
		return got, io.EOF
	}
	return len(p), nil
}

// WriteAt implements io.WriterAt. Writing past the end grows the file; the new size is durable
// after the next Sync.
func (h *File) WriteAt(p []byte, off int64) (int, error) {
	if err := h.check("write"); err != nil {
		return 0, err
	}
	if off < 0 {
		return 0, pathErr("write", h.name, syscall.EINVAL)
	}
	h.n.mu.Lock()
	defer h.n.mu.Unlock()
	h.n.modify(off, int64(len(p)), p)
	return len(p), nil
}

// Punch implements store.File: the range reads as zeroes; it stays within the file's size.
func (h *File) Punch(off, length int64) error {
	if err := h.check("punch"); err != nil {
		return err
	}
	if off < 0 || length < 0 {
		return pathErr("punch", h.name, syscall.EINVAL)
	}
	h.n.mu.Lock()
	defer h.n.mu.Unlock()
	end := min(off+length, h.n.volatile.size)
	if end > off {
		h.n.modify(off, end-off, nil)
	}
	return nil
}

// Truncate sets the file's size and makes the file durable, as store's files do (a volume's
// expansion): a shrink drops the data past the new end, a growth reads as zeroes.
func (h *File) Truncate(size int64) error {
	if err := h.check("truncate"); err != nil {
		return err
	}
	if size < 0 {
		return pathErr("truncate", h.name, syscall.EINVAL)
	}
	h.n.mu.Lock()
	if size < h.n.volatile.size {
		h.n.modify(size, h.n.volatile.size-size, nil)
	}
	h.n.volatile.size = size
	h.n.mu.Unlock()
	return h.Sync()
}

// modify writes data (nil: zeroes) over [off, off+length) of the volatile image, recording
// each touched sector's new version. n.mu is held.
func (n *node) modify(off, length int64, data []byte) {
	end := off + length
	if end > n.volatile.size {
		n.volatile.size = end
	}
	for pos := off; pos < end; {
		s := pos / SectorSize
		in := pos % SectorSize
		k := min(SectorSize-in, end-pos)
		old := n.volatile.sectors[s]
		var nv *sector
		if data != nil || (old != nil && k < SectorSize) {
			nv = new(sector)
			if old != nil {
				*nv = *old
			}
			if data != nil {
				copy(nv[in:in+k], data[pos-off:])
			} else {
				clear(nv[in : in+k])
			}
			if *nv == (sector{}) {
				nv = nil
			}
		}
		if nv != nil {
			n.volatile.sectors[s] = nv
		} else {
			delete(n.volatile.sectors, s)
		}
		n.history[s] = append(n.history[s], nv)
		pos += k
	}
}

// Sync implements store.File: every completed write and punch becomes durable.
func (h *File) Sync() error {
	if err := h.check("sync"); err != nil {
		return err
	}
	n := h.n
	n.mu.Lock()
	defer n.mu.Unlock()
	for s := range n.history {
		if v := n.volatile.sectors[s]; v != nil {
			n.durable.sectors[s] = v
		} else {
			delete(n.durable.sectors, s)
		}
	}
	n.durable.size = n.volatile.size
	clear(n.history)
	return nil
}

// Close implements store.File. Later operations on h fail with os.ErrClosed.
func (h *File) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return pathErr("close", h.name, os.ErrClosed)
	}
	h.closed = true
	return nil
}

// Unsynced reports how many sectors of the file named name were written since its last Sync.
// It is for tests that assert a code path synced what it should have.
func (f *FS) Unsynced(name string) (int, error) {
	f.mu.Lock()
	n, ok := f.files[name]
	f.mu.Unlock()
	if !ok {
		return 0, pathErr("unsynced", name, fs.ErrNotExist)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	return len(n.history), nil
}

// String describes the FS for test failure messages.
func (f *FS) String() string {
	names, _ := f.List()
	return fmt.Sprintf("crashfs%v", names)
}
