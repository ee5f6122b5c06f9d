package store

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestTruncate: a Dir file's Truncate changes its size on disk; growth is a hole that reads
// zeroes, a shrink drops what was past the new end.
func TestTruncate(t *testing.T) {
	d := Dir{Path: t.TempDir()}
	f, err := d.Create("v", 8192)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(bytes.Repeat([]byte{1}, 8192), 0); err != nil {
		t.Fatal(err)
	}
	tr := f.(interface{ Truncate(int64) error })
	if err := tr.Truncate(4096); err != nil {
		t.Fatal(err)
	}
	if err := tr.Truncate(1 << 20); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(d.Path, "v"))
	if err != nil || st.Size() != 1<<20 {
		t.Fatalf("size %v %v", st.Size(), err)
	}
	p := make([]byte, 1<<20)
	if _, err := f.ReadAt(p, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p[:4096], bytes.Repeat([]byte{1}, 4096)) || !bytes.Equal(p[4096:], make([]byte, len(p)-4096)) {
		t.Fatal("after shrink and growth the file does not read data then zeroes")
	}
}
