package cow

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"fcnbd/internal/blockdev"
	"fcnbd/internal/store"
)

// memFile is an in-memory store.File. Hooks, if set, run before each operation and may fail it.
type memFile struct {
	name   string
	mu     sync.Mutex
	data   []byte
	reads  atomic.Int64
	writes atomic.Int64
	syncs  atomic.Int64
	hook   func(op string, off, length int64) error
}

var _ store.File = (*memFile)(nil)

func newMemFile(name string, size int64) *memFile {
	return &memFile{name: name, data: make([]byte, size)}
}

func (f *memFile) callHook(op string, off, length int64) error {
	f.mu.Lock()
	h := f.hook
	f.mu.Unlock()
	if h != nil {
		return h(op, off, length)
	}
	return nil
}

func (f *memFile) setHook(h func(op string, off, length int64) error) {
	f.mu.Lock()
	f.hook = h
	f.mu.Unlock()
}

func (f *memFile) ReadAt(p []byte, off int64) (int, error) {
	if err := f.callHook("read", off, int64(len(p))); err != nil {
		return 0, err
	}
	f.reads.Add(1)
	f.mu.Lock()
	defer f.mu.Unlock()
	return copy(p, f.data[off:]), nil
}

func (f *memFile) WriteAt(p []byte, off int64) (int, error) {
	if err := f.callHook("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	f.writes.Add(1)
	f.mu.Lock()
	defer f.mu.Unlock()
	return copy(f.data[off:], p), nil
}

func (f *memFile) Sync() error {
	if err := f.callHook("sync", 0, 0); err != nil {
		return err
	}
	f.syncs.Add(1)
	return nil
}

func (f *memFile) Punch(off, length int64) error {
	if err := f.callHook("punch", off, length); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	clear(f.data[off : off+length])
	return nil
}

func (f *memFile) Close() error { return nil }

// rig is an engine over memory volumes plus the model oracle: model[v] is what volume v must
// read as.
type rig struct {
	t     testing.TB
	e     *Engine
	j     *MemJournal
	size  int64
	grain int64
	files map[int]*memFile
	devs  map[int]blockdev.Device

	mu    sync.Mutex
	model map[int][]byte
}

const kib = 1024

func newRig(t testing.TB, vols int, size, grain int64, r *rand.Rand) *rig {
	t.Helper()
	g := &rig{
		t: t, j: &MemJournal{}, size: size, grain: grain,
		files: map[int]*memFile{}, devs: map[int]blockdev.Device{}, model: map[int][]byte{},
	}
	g.e = New(g.j, Options{})
	t.Cleanup(func() { g.e.Close() })
	for v := range vols {
		f := newMemFile(fmt.Sprintf("vol%d", v), size)
		fill(r, f.data)
		// Holes, as sparse files have: a few runs of zeroes (memFile's Extents reports a block
		// of zeroes as a hole), so that the background copy's sparse path (holes neither read
		// nor written) runs under every randomized test.
		for range r.IntN(4) {
			off := r.Int64N(size)
			clear(f.data[off:min(off+r.Int64N(4*grain)+1, size)])
		}
		g.files[v] = f
		g.model[v] = bytes.Clone(f.data)
		if err := g.e.AddVolume(v, size, f); err != nil {
			t.Fatal(err)
		}
		d, err := g.e.Device(v)
		if err != nil {
			t.Fatal(err)
		}
		g.devs[v] = d
	}
	return g
}

func fill(r *rand.Rand, p []byte) {
	for i := 0; i < len(p); i += 8 {
		x := r.Uint64()
		for j := 0; j < 8 && i+j < len(p); j++ {
			p[i+j] = byte(x >> (8 * j))
		}
	}
}

func (g *rig) spec(id, src, tgt int) MappingSpec {
	return MappingSpec{ID: id, Source: src, Target: tgt, GrainSize: g.grain}
}

// start starts mappings (under the fence: no I/O may run) and updates the model.
func (g *rig) start(specs ...MappingSpec) {
	g.t.Helper()
	if err := g.e.StartMappings(specs); err != nil {
		g.t.Fatal(err)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, s := range specs {
		g.model[s.Target] = bytes.Clone(g.model[s.Source])
	}
}

func (g *rig) write(v int, off int64, p []byte) {
	g.t.Helper()
	if err := g.devs[v].WriteAt(p, off, false); err != nil {
		g.t.Fatalf("write vol %d at %d+%d: %v", v, off, len(p), err)
	}
	g.mu.Lock()
	copy(g.model[v][off:], p)
	g.mu.Unlock()
}

func (g *rig) zero(v int, off, n int64, trim bool) {
	g.t.Helper()
	var err error
	if trim {
		err = g.devs[v].Trim(off, n)
	} else {
		err = g.devs[v].WriteZeroes(off, n, false, true)
	}
	if err != nil {
		g.t.Fatalf("zero vol %d at %d+%d: %v", v, off, n, err)
	}
	g.mu.Lock()
	clear(g.model[v][off : off+n])
	g.mu.Unlock()
}

// check reads [off, off+n) of v and compares it with the model.
func (g *rig) check(v int, off, n int64) error {
	p := make([]byte, n)
	if err := g.devs[v].ReadAt(p, off); err != nil {
		return fmt.Errorf("read vol %d at %d+%d: %w", v, off, n, err)
	}
	g.mu.Lock()
	want := g.model[v][off : off+n]
	g.mu.Unlock()
	if !bytes.Equal(p, want) {
		i := 0
		for p[i] == want[i] {
			i++
		}
		return fmt.Errorf("vol %d differs from the model at byte %d (grain %d)", v, off+int64(i), (off+int64(i))/g.grain)
	}
	return nil
}

func (g *rig) checkAll(vols ...int) {
	g.t.Helper()
	for _, v := range vols {
		if err := g.check(v, 0, g.size); err != nil {
			g.t.Fatal(err)
		}
	}
}

func (g *rig) progress(id int) Progress {
	g.t.Helper()
	p, err := g.e.Progress(id)
	if err != nil {
		g.t.Fatal(err)
	}
	return p
}

// waitEvent waits for an event of kind for mapping id, skipping others.
func (g *rig) waitEvent(kind EventKind, id int, d time.Duration) Event {
	g.t.Helper()
	timeout := time.After(d)
	for {
		select {
		case ev := <-g.e.Events():
			if ev.Kind == kind && ev.Mapping == id {
				return ev
			}
		case <-timeout:
			g.t.Fatalf("no %v event for mapping %d within %v", kind, id, d)
		}
	}
}

func seedRand(t testing.TB) (*rand.Rand, uint64) {
	seed := uint64(time.Now().UnixNano())
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("seed %d", seed)
		}
	})
	return rand.New(rand.NewPCG(seed, 0x5eed)), seed
}
