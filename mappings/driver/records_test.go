package driver

import (
	"encoding/binary"
	"hash/crc32"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"fcnbd/internal/store"
)

// Helpers shared by the consistency, fence and prefix tests: sequence-numbered 4 KiB records
// and a rig whose store can be made to hang.

const recSize = 4096

// record is the 4 KiB a writer puts at one slot: magic, run, writer, step, then filler, with
// a checksum over all of it at the end, so a torn or stale record is never taken for a step.
func record(run, writer uint32, step uint64) []byte {
	p := make([]byte, recSize)
	binary.LittleEndian.PutUint32(p[0:], 0xfc0dbeef)
	binary.LittleEndian.PutUint32(p[4:], run)
	binary.LittleEndian.PutUint32(p[8:], writer)
	binary.LittleEndian.PutUint64(p[12:], step)
	for i := 20; i < recSize-4; i++ {
		p[i] = byte(uint64(i) * (step + 7))
	}
	binary.LittleEndian.PutUint32(p[recSize-4:], crc32.ChecksumIEEE(p[:recSize-4]))
	return p
}

// parseRecord returns the step of an intact record of run and writer, or 0.
func parseRecord(p []byte, run, writer uint32) uint64 {
	if binary.LittleEndian.Uint32(p[0:]) != 0xfc0dbeef ||
		binary.LittleEndian.Uint32(p[recSize-4:]) != crc32.ChecksumIEEE(p[:recSize-4]) ||
		binary.LittleEndian.Uint32(p[4:]) != run || binary.LittleEndian.Uint32(p[8:]) != writer {
		return 0
	}
	return binary.LittleEndian.Uint64(p[12:])
}

// hangFS is the real store whose files can be made to block WriteAt: while armed, a WriteAt
// to the named file signals entered and waits until the hang is lifted.
type hangFS struct {
	store.Dir
	mu      sync.Mutex
	name    string        // the file to hang; "" when disarmed
	gate    chan struct{} // closed by lift
	entered chan struct{} // one signal per hung WriteAt
}

func (h *hangFS) Create(name string, size int64) (store.File, error) {
	f, err := h.Dir.Create(name, size)
	if err != nil {
		return nil, err
	}
	return &hangFile{File: f, fs: h, name: name}, nil
}

func (h *hangFS) Open(name string) (store.File, error) {
	f, err := h.Dir.Open(name)
	if err != nil {
		return nil, err
	}
	return &hangFile{File: f, fs: h, name: name}, nil
}

// arm makes WriteAt to file name hang until lift.
func (h *hangFS) arm(name string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.name, h.gate, h.entered = name, make(chan struct{}), make(chan struct{}, 64)
}

func (h *hangFS) lift() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.gate != nil {
		close(h.gate)
	}
	h.name, h.gate = "", nil
}

type hangFile struct {
	store.File
	fs   *hangFS
	name string
}

func (f *hangFile) WriteAt(p []byte, off int64) (int, error) {
	f.fs.mu.Lock()
	gate, entered := f.fs.gate, f.fs.entered
	hang := f.fs.name == f.name
	f.fs.mu.Unlock()
	if hang {
		select {
		case entered <- struct{}{}:
		default:
		}
		<-gate
	}
	return f.File.WriteAt(p, off)
}

// newRigFS is newRig with a store made by wrap from the real one in the rig's directory.
func newRigFS(t *testing.T, wrap func(store.Dir) store.FS, mod func(*Options)) *rig {
	t.Helper()
	r := &rig{t: t, dir: t.TempDir()}
	r.fs = wrap(store.Dir{Path: r.dir})
	r.opt = Options{Logger: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel),
		ProgressInterval: 10 * time.Millisecond, FenceTimeout: 2 * time.Second}
	if mod != nil {
		mod(&r.opt)
	}
	r.open()
	t.Cleanup(func() { r.close() })
	return r
}

// volFile is the backing file name of volume id in the rig's store.
func volFile(id int) string { return "vol-" + strconv.Itoa(id) + ".img" }
