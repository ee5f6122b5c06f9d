package crashfs

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"testing"
)

func mustCreate(t *testing.T, f *FS, name string, size int64) *File {
	t.Helper()
	h, err := f.Create(name, size)
	if err != nil {
		t.Fatal(err)
	}
	return h.(*File)
}

func mustOpen(t *testing.T, f *FS, name string) *File {
	t.Helper()
	h, err := f.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	return h.(*File)
}

func read(t *testing.T, h *File, off int64, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := h.ReadAt(b, off); err != nil {
		t.Fatalf("read %d+%d: %v", off, n, err)
	}
	return b
}

func fill(n int, v byte) []byte { return bytes.Repeat([]byte{v}, n) }

func TestUnsyncedWriteIsLostSyncedSurvives(t *testing.T) {
	m := New()
	h := mustCreate(t, m, "vol-0.img", 1<<20)
	h.WriteAt(fill(4096, 1), 0)
	if err := h.Sync(); err != nil {
		t.Fatal(err)
	}
	h.WriteAt(fill(4096, 2), 4096) // never synced
	h.WriteAt(fill(100, 3), 10)    // overwrites synced data, never synced

	// Before the crash, reads see everything.
	if got := read(t, h, 0, 8192); !bytes.Equal(got[4096:], fill(4096, 2)) || got[10] != 3 {
		t.Fatal("volatile image wrong")
	}
	after := mustOpen(t, m.CrashClone(CrashConfig{}), "vol-0.img")
	if got := read(t, after, 0, 4096); !bytes.Equal(got, fill(4096, 1)) {
		t.Fatal("synced write lost or unsynced overwrite survived")
	}
	if got := read(t, after, 4096, 4096); !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatal("unsynced write survived the crash")
	}
	// The original FS is untouched by the clone.
	if got := read(t, h, 4096, 4096); !bytes.Equal(got, fill(4096, 2)) {
		t.Fatal("CrashClone changed the original")
	}
	// The clone is independent: writing it does not change the original, and vice versa.
	after.WriteAt(fill(10, 9), 0)
	if read(t, h, 0, 1)[0] != 1 {
		t.Fatal("clone shares data with the original")
	}
}

func TestPunchAndDurability(t *testing.T) {
	m := New()
	h := mustCreate(t, m, "f", 8192)
	h.WriteAt(fill(8192, 7), 0)
	h.Sync()
	if err := h.Punch(100, 1000); err != nil { // partial sectors at both ends
		t.Fatal(err)
	}
	got := read(t, h, 0, 8192)
	want := fill(8192, 7)
	clear(want[100:1100])
	if !bytes.Equal(got, want) {
		t.Fatal("punch: wrong contents")
	}
	after := mustOpen(t, m.CrashClone(CrashConfig{}), "f")
	if !bytes.Equal(read(t, after, 0, 8192), fill(8192, 7)) {
		t.Fatal("unsynced punch survived")
	}
	h.Sync()
	after = mustOpen(t, m.CrashClone(CrashConfig{}), "f")
	if !bytes.Equal(read(t, after, 0, 8192), want) {
		t.Fatal("synced punch lost")
	}
}

func TestSizeAndEOF(t *testing.T) {
	m := New()
	h := mustCreate(t, m, "j", 0)
	if n, err := h.ReadAt(make([]byte, 1), 0); n != 0 || err != io.EOF {
		t.Fatalf("read of empty file: %d %v", n, err)
	}
	h.WriteAt([]byte("hello"), 0)
	h.Sync()
	h.WriteAt([]byte("world"), 5) // grows, unsynced
	buf := make([]byte, 20)
	if n, err := h.ReadAt(buf, 0); n != 10 || err != io.EOF || string(buf[:n]) != "helloworld" {
		t.Fatalf("short read: %d %v %q", n, err, buf[:n])
	}
	for _, pct := range []int{0, 100} {
		after := mustOpen(t, m.CrashClone(CrashConfig{UnsyncedPercent: pct, Seed: 1}), "j")
		if n, err := after.ReadAt(buf, 0); n != 5 || err != io.EOF || string(buf[:n]) != "hello" {
			t.Fatalf("pct %d: after crash the size is not the synced one: %d %v %q", pct, n, err, buf[:n])
		}
	}
}

func TestDirectoryOpsAreDurable(t *testing.T) {
	m := New()
	mustCreate(t, m, "a", 4096)
	mustCreate(t, m, "b", 4096)
	if _, err := m.Create("a", 4096); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("create existing: %v", err)
	}
	m.Remove("b")
	if err := m.Remove("missing"); err != nil {
		t.Fatalf("remove missing: %v", err)
	}
	c := m.CrashClone(CrashConfig{})
	names, _ := c.List()
	if len(names) != 1 || names[0] != "a" {
		t.Fatalf("after crash: %v", names)
	}
	if _, err := c.Open("b"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("open removed: %v", err)
	}
}

func TestClosedFile(t *testing.T) {
	m := New()
	h := mustCreate(t, m, "a", 4096)
	h.Close()
	if _, err := h.WriteAt([]byte{1}, 0); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("write after close: %v", err)
	}
	if err := h.Sync(); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("sync after close: %v", err)
	}
	if err := h.Close(); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("second close: %v", err)
	}
}

// TestTornCrash checks the torn model: after a crash with unsynced writes partly persisted,
// every sector holds its synced contents or one of the versions it was written with since, never
// a mix within a sector; the outcome depends only on the seed; and across seeds both outcomes
// occur for each sector.
func TestTornCrash(t *testing.T) {
	const size = 64 * SectorSize
	m := New()
	h := mustCreate(t, m, "f", size)
	h.WriteAt(fill(size, 0x11), 0)
	h.Sync()
	rng := rand.New(rand.NewPCG(1, 2))
	// versions[s] lists the sector's contents allowed after a crash.
	versions := make([][][]byte, size/SectorSize)
	for s := range versions {
		versions[s] = [][]byte{fill(SectorSize, 0x11)}
	}
	for i := range 40 {
		off := rng.Int64N(size - 3000)
		n := 1 + rng.IntN(3000)
		h.WriteAt(fill(n, byte(0x20+i)), off)
		for s := off / SectorSize; s <= (off+int64(n)-1)/SectorSize; s++ {
			versions[s] = append(versions[s], read(t, h, s*SectorSize, SectorSize))
		}
	}
	seen := make([]map[int]bool, len(versions))
	for s := range seen {
		seen[s] = map[int]bool{}
	}
	for seed := range uint64(60) {
		c := m.CrashClone(CrashConfig{UnsyncedPercent: 50, Seed: seed})
		img := read(t, mustOpen(t, c, "f"), 0, size)
		again := read(t, mustOpen(t, m.CrashClone(CrashConfig{UnsyncedPercent: 50, Seed: seed}), "f"), 0, size)
		if !bytes.Equal(img, again) {
			t.Fatalf("seed %d: two clones differ", seed)
		}
		for s := range versions {
			got := img[s*SectorSize : (s+1)*SectorSize]
			found := -1
			for v, want := range versions[s] {
				if bytes.Equal(got, want) {
					found = v
				}
			}
			if found < 0 {
				t.Fatalf("seed %d: sector %d holds a state it never had: %x…", seed, s, got[:16])
			}
			seen[s][min(found, 1)] = true
		}
	}
	for s := range versions {
		if len(versions[s]) > 1 && len(seen[s]) != 2 {
			t.Errorf("sector %d: over 60 seeds only outcomes %v", s, seen[s])
		}
	}
	// The original still reads its volatile image and a plain clone only the synced one.
	if !bytes.Equal(read(t, mustOpen(t, m.CrashClone(CrashConfig{}), "f"), 0, size), fill(size, 0x11)) {
		t.Fatal("plain clone has unsynced data")
	}
}

func TestUnsynced(t *testing.T) {
	m := New()
	h := mustCreate(t, m, "f", 1<<20)
	h.WriteAt(fill(4096, 1), 0)
	if n, _ := m.Unsynced("f"); n != 8 {
		t.Fatalf("unsynced sectors %d, want 8", n)
	}
	h.Sync()
	if n, _ := m.Unsynced("f"); n != 0 {
		t.Fatalf("unsynced sectors after sync %d", n)
	}
}

// TestTruncate: a shrink drops the data past the new end (a later growth reads zeroes there),
// and the size is durable at once: a crash clone has it, with every unsynced write lost.
func TestTruncate(t *testing.T) {
	f := New()
	h := mustCreate(t, f, "v", 4096)
	if _, err := h.WriteAt(fill(4096, 1), 0); err != nil {
		t.Fatal(err)
	}
	if err := h.Truncate(8192); err != nil {
		t.Fatal(err)
	}
	if _, err := h.WriteAt(fill(1024, 2), 6144); err != nil {
		t.Fatal(err)
	}
	if err := h.Truncate(2048 + 100); err != nil { // mid-sector
		t.Fatal(err)
	}
	if err := h.Truncate(8192); err != nil {
		t.Fatal(err)
	}
	want := append(fill(2148, 1), make([]byte, 8192-2148)...)
	if got := read(t, h, 0, 8192); !bytes.Equal(got, want) {
		t.Fatal("after shrink and growth: the data past the shrink's end is not zero, or data before it changed")
	}
	if _, err := h.WriteAt(fill(512, 3), 0); err != nil { // not synced
		t.Fatal(err)
	}
	c := f.CrashClone(CrashConfig{UnsyncedPercent: 0, Seed: 1})
	hc := mustOpen(t, c, "v")
	if got := read(t, hc, 0, 8192); !bytes.Equal(got, want) {
		t.Fatal("the crash clone differs from the state at the last truncate")
	}
	if _, err := hc.ReadAt(make([]byte, 1), 8192); err != io.EOF {
		t.Fatalf("read past the clone's end: %v, want EOF", err)
	}
	if err := h.Truncate(-1); err == nil {
		t.Error("a negative size was accepted")
	}
}
