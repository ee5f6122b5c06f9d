package store

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"fcnbd/internal/blockdev"
)

func TestDirListAndRoundTrip(t *testing.T) {
	d := Dir{Path: t.TempDir()}
	f, err := d.Create("vol-0.img", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := d.Create("vol-0.img", 4096); err == nil {
		t.Fatal("Create over an existing file succeeded")
	}
	os.Mkdir(filepath.Join(d.Path, "sub"), 0o700) // not a file: not listed
	if _, err := f.WriteAt([]byte("data"), 4096); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := f.Punch(0, 8192); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 8)
	if _, err := f.ReadAt(buf, 4096); err != nil || !bytes.Equal(buf, make([]byte, 8)) {
		t.Fatalf("after punch: %q %v", buf, err)
	}
	names, err := d.List()
	if err != nil || !slices.Equal(names, []string{"vol-0.img"}) {
		t.Fatalf("List = %v, %v", names, err)
	}
	if err := d.Remove("vol-0.img"); err != nil {
		t.Fatal(err)
	}
	if err := d.Remove("vol-0.img"); err != nil {
		t.Fatalf("removing a missing file: %v", err)
	}
	if names, _ := d.List(); len(names) != 0 {
		t.Fatalf("List after Remove = %v", names)
	}
}

// failSyncOnce fails its first Sync and lets later ones through, as Linux may after a
// writeback error.
type failSyncOnce struct {
	File
	n int
}

func (f *failSyncOnce) Sync() error {
	f.n++
	if f.n == 1 {
		return errors.New("injected writeback error")
	}
	return nil
}

// TestStickySync: after one failed Sync every later Sync fails, though the store below would
// report success.
func TestStickySync(t *testing.T) {
	d := Dir{Path: t.TempDir()}
	raw, err := d.Create("f", 4096)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	inner := &failSyncOnce{File: raw}
	f := StickySync(inner)
	if StickySync(f) != f {
		t.Fatal("StickySync of a sticky file wraps it again")
	}
	if err := f.Sync(); err == nil {
		t.Fatal("first sync: want the injected error")
	}
	for i := range 3 {
		if err := f.Sync(); err == nil {
			t.Fatalf("sync %d after a failure succeeded", i+2)
		}
	}
	if inner.n != 1 {
		t.Fatalf("the store below saw %d syncs, want 1 (later syncs must not reach it)", inner.n)
	}
}

func TestZeroFast(t *testing.T) {
	d := Dir{Path: t.TempDir()}
	f, err := d.Create("vol", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	data := bytes.Repeat([]byte{0xAB}, 1<<20)
	if _, err := f.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	sf := StickySync(f) // the wrapper the driver uses must pass ZeroFast on
	if err := ZeroFast(sf, 64<<10, 128<<10, true); err != nil {
		t.Fatalf("punch: %v", err)
	}
	if err := ZeroFast(sf, 512<<10, 128<<10, false); err != nil {
		t.Fatalf("zero range: %v", err)
	}
	buf := make([]byte, 1<<20)
	if _, err := f.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(data)
	clear(want[64<<10 : 192<<10])
	clear(want[512<<10 : 640<<10])
	if !bytes.Equal(buf, want) {
		t.Fatal("ZeroFast did not zero exactly its ranges")
	}
	exts, err := Extents(f, 0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	// The punched range is a hole; what was not zeroed is data. (The range zeroed with
	// ZERO_RANGE is unwritten extents, which SEEK_HOLE may report as a hole or as data.)
	pos := int64(0)
	for _, e := range exts {
		inPunch := pos < 192<<10 && pos+e.Length > 64<<10
		inZero := pos < 640<<10 && pos+e.Length > 512<<10
		switch {
		case e.Hole && !inPunch && !inZero:
			t.Fatalf("hole at [%d,+%d) outside the zeroed ranges: %v", pos, e.Length, exts)
		case !e.Hole && inPunch:
			t.Fatalf("data at [%d,+%d) overlaps the punched range: %v", pos, e.Length, exts)
		}
		pos += e.Length
	}
}

// noFast is a File without FastZeroer.
type noFast struct{ File }

func TestZeroFastRefusedWithoutSupport(t *testing.T) {
	if err := ZeroFast(noFast{}, 0, 4096, true); !errors.Is(err, blockdev.ErrNotFast) {
		t.Fatalf("got %v, want ErrNotFast", err)
	}
}
