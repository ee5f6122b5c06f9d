package memdev

import (
	"bytes"
	"errors"
	"sync"
	"syscall"
	"testing"
)

func TestReadWriteAcrossPages(t *testing.T) {
	d := New(10 * PageSize)
	data := bytes.Repeat([]byte("0123456789"), 1000) // 10000 bytes, unaligned
	if err := d.WriteAt(data, 4000, false); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data)+200)
	if err := d.ReadAt(got, 3900); err != nil {
		t.Fatal(err)
	}
	want := append(append(make([]byte, 100), data...), make([]byte, 100)...)
	if !bytes.Equal(got, want) {
		t.Fatal("read back differs")
	}
	if a := d.Allocated(); a != 4*PageSize {
		t.Errorf("allocated %d", a)
	}
}

func TestZeroing(t *testing.T) {
	for _, tc := range []struct {
		name      string
		zero      func(d *Device) error
		wantAlloc int64
	}{
		{"trim", func(d *Device) error { return d.Trim(100, 3*PageSize) }, 3 * PageSize},
		{"write zeroes punch", func(d *Device) error { return d.WriteZeroes(100, 3*PageSize, true, false) }, 3 * PageSize},
		{"write zeroes no hole", func(d *Device) error { return d.WriteZeroes(100, 3*PageSize, false, true) }, 5 * PageSize},
		{"trim huge range", func(d *Device) error { return d.Trim(100, d.Size()-100) }, 1 * PageSize},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := New(1 << 30)
			if err := d.WriteAt(bytes.Repeat([]byte{0xaa}, 5*PageSize), 0, false); err != nil {
				t.Fatal(err)
			}
			if err := tc.zero(d); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 5*PageSize)
			if err := d.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			for i, b := range got {
				inZeroed := i >= 100 && (i < 100+3*PageSize || tc.name == "trim huge range")
				if want := map[bool]byte{true: 0, false: 0xaa}[inZeroed]; b != want {
					t.Fatalf("byte %d = %#x, want %#x", i, b, want)
				}
			}
			if a := d.Allocated(); a != tc.wantAlloc {
				t.Errorf("allocated %d, want %d", a, tc.wantAlloc)
			}
		})
	}
}

func TestRangeAndHook(t *testing.T) {
	d := New(PageSize)
	for name, err := range map[string]error{
		"read":  d.ReadAt(make([]byte, 2), PageSize-1),
		"write": d.WriteAt([]byte{1}, PageSize, false),
		"trim":  d.Trim(-1, 1),
		"zero":  d.WriteZeroes(0, PageSize+1, true, false),
	} {
		if !errors.Is(err, syscall.EINVAL) {
			t.Errorf("%s out of range: %v", name, err)
		}
	}
	var seen []Op
	var mu sync.Mutex
	d.SetHook(func(op Op, off, length int64) error {
		mu.Lock()
		defer mu.Unlock()
		seen = append(seen, op)
		if op == OpWrite {
			return syscall.EIO
		}
		return nil
	})
	if err := d.WriteAt([]byte{1}, 0, false); !errors.Is(err, syscall.EIO) {
		t.Fatalf("hooked write: %v", err)
	}
	if d.Allocated() != 0 {
		t.Error("failed write changed the device")
	}
	if err := d.Flush(); err != nil || d.Flushes() != 1 {
		t.Fatalf("flush: %v, %d", err, d.Flushes())
	}
	d.SetHook(nil)
	if err := d.WriteAt([]byte{1}, 0, false); err != nil {
		t.Fatal(err)
	}
	if len(seen) != 2 || seen[0] != OpWrite || seen[1] != OpFlush {
		t.Errorf("hook saw %v", seen)
	}
}
