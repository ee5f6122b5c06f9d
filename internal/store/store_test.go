package store

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"testing"
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
