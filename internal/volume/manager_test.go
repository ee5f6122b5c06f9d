package volume

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"fcnbd/internal/blockdev"
	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
	"fcnbd/internal/store"
)

type env struct {
	dir string
	cat *catalog.DB
	m   *Manager
}

func open(t *testing.T, dir string, stack StackFunc) *env {
	t.Helper()
	cat, err := catalog.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	m, err := Open(Options{Catalog: cat, FS: store.Dir{Path: dir}, Stack: stack})
	if err != nil {
		cat.Close()
		t.Fatal(err)
	}
	e := &env{dir: dir, cat: cat, m: m}
	t.Cleanup(e.close)
	return e
}

func (e *env) close() {
	if e.m != nil {
		e.m.Close()
		e.cat.Close()
		e.m = nil
	}
}

func TestCreateValidates(t *testing.T) {
	e := open(t, t.TempDir(), nil)
	if _, err := e.m.Create("taken", 4096); err != nil {
		t.Fatal(err)
	}
	long := "a" + string(bytes.Repeat([]byte("b"), MaxNameLen))
	tests := []struct {
		name string
		size int64
		code string
	}{
		{"", 4096, fcerr.BadName},
		{"1abc", 4096, fcerr.BadName},
		{"-abc", 4096, fcerr.BadName},
		{".abc", 4096, fcerr.BadName},
		{"a b", 4096, fcerr.BadName},
		{"a/b", 4096, fcerr.BadName},
		{"é", 4096, fcerr.BadName},
		{"123", 4096, fcerr.BadName},
		{"Inf", 4096, fcerr.BadName},
		{long, 4096, fcerr.BadName},
		{"taken", 4096, fcerr.NameInUse},
		{"ok", 0, fcerr.BadValue},
		{"ok", -4096, fcerr.BadValue},
		{"ok", 4095, fcerr.BadValue},
		{"ok", 4096 + 512, fcerr.BadValue},
		{"ok", MaxCapacity + 4096, fcerr.BadValue},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.m.Create(tc.name, tc.size)
			if got := fcerr.CodeOf(err); got != tc.code {
				t.Fatalf("Create(%q, %d) = %v, want code %s", tc.name, tc.size, err, tc.code)
			}
		})
	}
	if n := len(e.m.Volumes()); n != 1 {
		t.Fatalf("%d volumes after refusals, want 1", n)
	}
	for _, good := range []string{"a", "_", "A_b-c.d9", long[:MaxNameLen]} {
		if _, err := e.m.Create(good, 8192); err != nil {
			t.Errorf("Create(%q): %v", good, err)
		}
	}
	ents, _ := os.ReadDir(e.dir)
	imgs := 0
	for _, ent := range ents {
		if orphanName.MatchString(ent.Name()) {
			imgs++
		}
	}
	if imgs != 5 {
		t.Errorf("%d backing files, want 5", imgs)
	}
}

func TestLifecyclePersistsAndCleansOrphans(t *testing.T) {
	dir := t.TempDir()
	e := open(t, dir, nil)
	a, err := e.m.Create("a", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	b, err := e.m.Create("b", 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	if a.ID != 0 || b.ID != 1 || a.Status != StatusOnline || a.Capacity != 1<<20 {
		t.Fatalf("created %+v %+v", a, b)
	}
	dev, err := e.m.Device("a")
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("fcnbd!"), 1000)
	if err := dev.WriteAt(data, 12345, true); err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{"0", "a"} {
		if got, err := e.m.Get(ref); err != nil || got.Name != "a" {
			t.Errorf("Get(%q) = %+v, %v", ref, got, err)
		}
	}
	for _, ref := range []string{"2", "zz", "01x"} {
		if _, err := e.m.Get(ref); fcerr.CodeOf(err) != fcerr.NoSuchObject {
			t.Errorf("Get(%q) = %v, want NoSuchObject", ref, err)
		}
	}
	if err := e.m.Delete("1", DeleteMode{}); err != nil {
		t.Fatal(err)
	}
	if err := e.m.Delete("b", DeleteMode{}); fcerr.CodeOf(err) != fcerr.NoSuchObject {
		t.Fatalf("second delete: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, FileName(1))); !os.IsNotExist(err) {
		t.Fatalf("deleted volume's file still there: %v", err)
	}
	e.close()

	// Orphans as a crash would leave them: a deleted volume's file, and a create's file whose
	// commit never happened.
	for _, name := range []string{FileName(1), FileName(2)} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	e = open(t, dir, nil)
	for _, name := range []string{FileName(1), FileName(2)} {
		if _, err := os.Stat(filepath.Join(dir, name)); !os.IsNotExist(err) {
			t.Errorf("orphan %s not removed: %v", name, err)
		}
	}
	vols := e.m.Volumes()
	if len(vols) != 1 || vols[0].Name != "a" {
		t.Fatalf("volumes after reopen: %+v", vols)
	}
	dev, _ = e.m.Device("a")
	got := make([]byte, len(data))
	if err := dev.ReadAt(got, 12345); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("data after reopen differs (err %v)", err)
	}
	c, err := e.m.Create("c", 4096)
	if err != nil || c.ID != 2 {
		t.Fatalf("create after reopen: %+v %v (ids are not reused)", c, err)
	}
	exports := e.m.List()
	if len(exports) != 2 || exports[0].Name != "a" || exports[1].Name != "c" || exports[1].Description != "fcnbd volume c, id 2" {
		t.Fatalf("exports %+v", exports)
	}
	if ex, ok := e.m.Lookup("c"); !ok || ex.Device.Size() != 4096 {
		t.Fatalf("Lookup(c) = %+v, %v", ex, ok)
	}
	if _, ok := e.m.Lookup("2"); ok {
		t.Fatal("Lookup by id should not find an export")
	}
}

func TestOpenFailsOnMissingBackingFile(t *testing.T) {
	dir := t.TempDir()
	e := open(t, dir, nil)
	if _, err := e.m.Create("a", 4096); err != nil {
		t.Fatal(err)
	}
	e.close()
	os.Remove(filepath.Join(dir, FileName(0)))
	cat, err := catalog.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer cat.Close()
	if _, err := Open(Options{Catalog: cat, FS: store.Dir{Path: dir}}); err == nil {
		t.Fatal("Open succeeded with a volume's backing file missing")
	}
}

func TestDeviceSemantics(t *testing.T) {
	e := open(t, t.TempDir(), nil)
	const size = 1 << 20
	if _, err := e.m.Create("v", size); err != nil {
		t.Fatal(err)
	}
	dev, _ := e.m.Device("v")
	if dev.Size() != size {
		t.Fatalf("size %d", dev.Size())
	}
	errno := func(err error) syscall.Errno {
		if err == nil {
			return 0
		}
		return blockdev.Errno(err)
	}
	buf := make([]byte, 8192)
	tests := []struct {
		name string
		op   func() error
		want syscall.Errno
	}{
		{"read inside", func() error { return dev.ReadAt(buf, size-8192) }, 0},
		{"read past end", func() error { return dev.ReadAt(buf, size-4096) }, syscall.EINVAL},
		{"read negative", func() error { return dev.ReadAt(buf, -1) }, syscall.EINVAL},
		{"write past end", func() error { return dev.WriteAt(buf, size-4096, false) }, syscall.ENOSPC},
		{"write beyond end", func() error { return dev.WriteAt(buf, size+4096, false) }, syscall.ENOSPC},
		{"write negative", func() error { return dev.WriteAt(buf, -4096, false) }, syscall.EINVAL},
		{"write fua", func() error { return dev.WriteAt(buf, 0, true) }, 0},
		{"trim past end", func() error { return dev.Trim(size-4096, 8192) }, syscall.EINVAL},
		{"zeroes past end", func() error { return dev.WriteZeroes(size, 1, false, false) }, syscall.EINVAL},
		{"flush", dev.Flush, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := errno(tc.op()); got != tc.want {
				t.Fatalf("errno %v, want %v", got, tc.want)
			}
		})
	}

	ones := bytes.Repeat([]byte{0xff}, 3*65536)
	check := func(what string, off, n int64, want byte) {
		t.Helper()
		got := make([]byte, n)
		if err := dev.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, bytes.Repeat([]byte{want}, int(n))) {
			t.Fatalf("%s: [%d, +%d) not all %#x", what, off, n, want)
		}
	}
	for _, tc := range []struct {
		name string
		op   func() error
	}{
		{"trim", func() error { return dev.Trim(65536, 65536) }},
		{"zeroes punch", func() error { return dev.WriteZeroes(65536, 65536, true, false) }},
		{"zeroes no punch", func() error { return dev.WriteZeroes(65536, 65536, false, true) }},
	} {
		if err := dev.WriteAt(ones, 0, false); err != nil {
			t.Fatal(err)
		}
		if err := tc.op(); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		check(tc.name, 0, 65536, 0xff)
		check(tc.name, 65536, 65536, 0)
		check(tc.name, 131072, 65536, 0xff)
	}
}

// slowDevice lets a test hold a request in progress.
type slowDevice struct {
	blockdev.Device
	started chan struct{}
	release chan struct{}
}

func (s *slowDevice) ReadAt(p []byte, off int64) error {
	s.started <- struct{}{}
	<-s.release
	return s.Device.ReadAt(p, off)
}

func TestDeleteWaitsForRequestsAndFailsLaterOnes(t *testing.T) {
	slow := &slowDevice{started: make(chan struct{}), release: make(chan struct{})}
	stack := func(v catalog.Volume, f store.File) (blockdev.Device, error) {
		slow.Device = NewFileDevice(f, v.Capacity)
		return slow, nil
	}
	e := open(t, t.TempDir(), stack)
	if _, err := e.m.Create("v", 65536); err != nil {
		t.Fatal(err)
	}
	ex, ok := e.m.Lookup("v")
	if !ok {
		t.Fatal("no export")
	}
	var wg sync.WaitGroup
	var readErr error
	wg.Go(func() { readErr = ex.Device.ReadAt(make([]byte, 4096), 0) })
	<-slow.started

	deleted := make(chan error)
	go func() { deleted <- e.m.Delete("v", DeleteMode{}) }()
	select {
	case err := <-deleted:
		t.Fatalf("Delete returned (%v) while a request was in progress", err)
	case <-time.After(100 * time.Millisecond):
	}
	if _, ok := e.m.Lookup("v"); ok {
		t.Error("a deleted volume is still an export")
	}
	close(slow.release)
	if err := <-deleted; err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if readErr != nil {
		t.Fatalf("request in progress during delete failed: %v", readErr)
	}
	err := ex.Device.WriteAt(make([]byte, 4096), 0, false)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("write to a deleted volume: %v, want EIO", err)
	}
}
