package errorfs_test

import (
	"bytes"
	"errors"
	"strings"
	"sync"
	"syscall"
	"testing"

	"fcnbd/internal/store"
	"fcnbd/internal/store/crashfs"
	"fcnbd/internal/store/errorfs"
)

func op(kind errorfs.OpKind, name string, off, length int64) errorfs.Op {
	return errorfs.Op{Kind: kind, Name: name, Off: off, Len: length}
}

// fired runs ops through inj and returns which of them failed.
func fired(inj errorfs.Injector, ops []errorfs.Op) []bool {
	got := make([]bool, len(ops))
	for i, o := range ops {
		got[i] = inj.MaybeError(o) != nil
	}
	return got
}

func TestInjectors(t *testing.T) {
	ops := []errorfs.Op{
		op(errorfs.OpWrite, "vol-0.img", 0, 4096),   // 0
		op(errorfs.OpSync, "vol-0.img", 0, 0),       // 1
		op(errorfs.OpWrite, "meta.db", 0, 4096),     // 2
		op(errorfs.OpRead, "vol-1.img", 8192, 4096), // 3
		op(errorfs.OpSync, "meta.db", 0, 0),         // 4
		op(errorfs.OpWrite, "vol-1.img", 4096, 512), // 5
		op(errorfs.OpSync, "vol-1.img", 0, 0),       // 6
		op(errorfs.OpCreate, "vol-2.img", 0, 1<<20), // 7
		op(errorfs.OpRemove, "vol-2.img", 0, 0),     // 8
		op(errorfs.OpPunch, "vol-0.img", 0, 8192),   // 9
		op(errorfs.OpOpen, "meta.db", 0, 0),         // 10
	}
	want := func(idx ...int) []bool {
		b := make([]bool, len(ops))
		for _, i := range idx {
			b[i] = true
		}
		return b
	}
	tests := []struct {
		inj  errorfs.Injector
		name string
		want []bool
	}{
		{errorfs.Always(), "Always", want(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)},
		{errorfs.OnOp(errorfs.OpSync), "OnOp(sync)", want(1, 4, 6)},
		{errorfs.OnOp(errorfs.OpCreate, errorfs.OpRemove, errorfs.OpOpen), "OnOp(create,remove,open)", want(7, 8, 10)},
		{errorfs.OnFile("vol-*.img"), `OnFile("vol-*.img")`, want(0, 1, 3, 5, 6, 7, 8, 9)},
		{errorfs.OnFile("[bad"), `OnFile("[bad")`, want()},
		{errorfs.InRange(4096, 4096), "InRange(4096,+4096)", want(5, 9)},
		{errorfs.OnIndex(3), "OnIndex(3)", want(3)},
		{errorfs.And(errorfs.OnOp(errorfs.OpSync), errorfs.OnIndex(1)), "And(OnOp(sync),OnIndex(1))", want(4)},
		{errorfs.And(errorfs.OnFile("meta.db"), errorfs.OnOp(errorfs.OpWrite, errorfs.OpSync)), `And(OnFile("meta.db"),OnOp(write,sync))`, want(2, 4)},
		{errorfs.Or(errorfs.OnIndex(0), errorfs.OnOp(errorfs.OpPunch)), "Or(OnIndex(0),OnOp(punch))", want(0, 9)},
		{errorfs.WithProbability(0, 1), "WithProbability(0,seed=1)", want()},
		{errorfs.WithProbability(1, 1), "WithProbability(1,seed=1)", want(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.inj.String(); got != tc.name {
				t.Errorf("String() = %q, want %q", got, tc.name)
			}
			if got := fired(tc.inj, ops); !slicesEqual(got, tc.want) {
				t.Errorf("fired %v, want %v", got, tc.want)
			}
		})
	}
}

func slicesEqual(a, b []bool) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestWithProbabilityIsSeeded(t *testing.T) {
	ops := make([]errorfs.Op, 2000)
	for i := range ops {
		ops[i] = op(errorfs.OpWrite, "f", int64(i)*512, 512)
	}
	a := fired(errorfs.WithProbability(0.25, 7), ops)
	b := fired(errorfs.WithProbability(0.25, 7), ops)
	c := fired(errorfs.WithProbability(0.25, 8), ops)
	if !slicesEqual(a, b) {
		t.Fatal("same seed, different failures")
	}
	if slicesEqual(a, c) {
		t.Fatal("different seeds, same failures")
	}
	n := 0
	for _, f := range a {
		if f {
			n++
		}
	}
	if n < 400 || n > 600 {
		t.Fatalf("%d of 2000 failed with p=0.25", n)
	}
}

func TestOrNamesTheOperandThatFired(t *testing.T) {
	inj := errorfs.Or(errorfs.OnFile("a"), errorfs.OnOp(errorfs.OpSync))
	err := inj.MaybeError(op(errorfs.OpSync, "b", 0, 0))
	var e *errorfs.Error
	if !errors.As(err, &e) || e.By != "OnOp(sync)" {
		t.Fatalf("error %v, want one by OnOp(sync)", err)
	}
}

func TestSwitch(t *testing.T) {
	sw := errorfs.NewSwitch(errorfs.OnFile("meta"))
	w := op(errorfs.OpWrite, "meta", 0, 1)
	other := op(errorfs.OpWrite, "data", 0, 1)
	if sw.Enabled() || sw.MaybeError(w) != nil {
		t.Fatal("new switch is on")
	}
	sw.On()
	if sw.MaybeError(w) == nil || sw.MaybeError(other) != nil {
		t.Fatal("switch on: inner injector not applied")
	}
	sw.Off()
	if sw.MaybeError(w) != nil {
		t.Fatal("switch off still fails")
	}
	var zero errorfs.Switch
	zero.Set(true)
	if err := zero.MaybeError(other); err == nil || !strings.Contains(err.Error(), "by Switch on") {
		t.Fatalf("zero switch on: %v", err)
	}
}

func TestErrorWrapsEIO(t *testing.T) {
	err := errorfs.OnIndex(0).MaybeError(op(errorfs.OpWrite, "vol-3.img", 4096, 512))
	if !errors.Is(err, syscall.EIO) || !errors.Is(err, errorfs.ErrInjected) {
		t.Fatalf("%v does not wrap EIO and ErrInjected", err)
	}
	const want = "injected error by OnIndex(0) on write vol-3.img [4096, +512): input/output error"
	if err.Error() != want {
		t.Fatalf("message %q, want %q", err.Error(), want)
	}
}

// TestWrappedFS drives a real store through the decorator: failures reach the caller with
// nothing done, and the same calls succeed once the fault is switched off.
func TestWrappedFS(t *testing.T) {
	for _, tc := range []struct {
		name  string
		inner store.FS
	}{
		{"dir", store.Dir{Path: t.TempDir()}},
		{"crashfs", crashfs.New()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sw := errorfs.NewSwitch(nil)
			fs := errorfs.Wrap(tc.inner, sw)
			f, err := fs.Create("vol-0.img", 1<<20)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			data := bytes.Repeat([]byte{0xab}, 4096)

			sw.On()
			if _, err := f.WriteAt(data, 8192); !errors.Is(err, syscall.EIO) {
				t.Fatalf("write with switch on: %v", err)
			}
			if err := f.Sync(); !errors.Is(err, syscall.EIO) {
				t.Fatalf("sync with switch on: %v", err)
			}
			if err := f.Punch(0, 4096); !errors.Is(err, syscall.EIO) {
				t.Fatalf("punch with switch on: %v", err)
			}
			buf := make([]byte, 4096)
			if _, err := f.ReadAt(buf, 8192); !errors.Is(err, syscall.EIO) {
				t.Fatalf("read with switch on: %v", err)
			}
			if _, err := fs.Create("vol-1.img", 4096); !errors.Is(err, syscall.EIO) {
				t.Fatalf("create with switch on: %v", err)
			}
			if _, err := fs.Open("vol-0.img"); !errors.Is(err, syscall.EIO) {
				t.Fatalf("open with switch on: %v", err)
			}
			if err := fs.Remove("vol-0.img"); !errors.Is(err, syscall.EIO) {
				t.Fatalf("remove with switch on: %v", err)
			}
			sw.Off()

			// The failed write did nothing; the failed create made nothing.
			if _, err := f.ReadAt(buf, 8192); err != nil || !bytes.Equal(buf, make([]byte, 4096)) {
				t.Fatalf("failed write changed the file (err %v)", err)
			}
			if names, err := fs.List(); err != nil || len(names) != 1 || names[0] != "vol-0.img" {
				t.Fatalf("List = %v, %v", names, err)
			}
			if _, err := f.WriteAt(data, 8192); err != nil {
				t.Fatal(err)
			}
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
			if _, err := f.ReadAt(buf, 8192); err != nil || !bytes.Equal(buf, data) {
				t.Fatalf("read back: %v", err)
			}
		})
	}
}

// TestMetadataUnwritableThenWritable is the shape of a test of the metadata path: syncs of one
// file fail while the switch is on, everything else goes on.
func TestMetadataUnwritableThenWritable(t *testing.T) {
	mem := crashfs.New()
	sw := errorfs.NewSwitch(errorfs.And(errorfs.OnFile("journal"), errorfs.OnOp(errorfs.OpSync)))
	fs := errorfs.Wrap(mem, sw)
	j, _ := fs.Create("journal", 0)
	v, _ := fs.Create("vol-0.img", 1<<20)
	j.WriteAt([]byte("rec1"), 0)
	sw.On()
	if err := j.Sync(); err == nil || !strings.Contains(err.Error(), `And(OnFile("journal"),OnOp(sync))`) {
		t.Fatalf("journal sync: %v", err)
	}
	if _, err := v.WriteAt([]byte{1}, 0); err != nil {
		t.Fatalf("data write while journal unwritable: %v", err)
	}
	if err := v.Sync(); err != nil {
		t.Fatalf("data sync while journal unwritable: %v", err)
	}
	// A crash now loses the journal record: the failed sync made nothing durable.
	after, _ := mem.CrashClone(crashfs.CrashConfig{}).Open("journal")
	if n, _ := after.ReadAt(make([]byte, 4), 0); n != 0 {
		t.Fatalf("record survived a failed sync")
	}
	sw.Off()
	if err := j.Sync(); err != nil {
		t.Fatal(err)
	}
	after, _ = mem.CrashClone(crashfs.CrashConfig{}).Open("journal")
	buf := make([]byte, 4)
	if _, err := after.ReadAt(buf, 0); err != nil || string(buf) != "rec1" {
		t.Fatalf("record after a good sync: %q %v", buf, err)
	}
}

func TestConcurrentUse(t *testing.T) {
	fs := errorfs.Wrap(crashfs.New(), errorfs.WithProbability(0.1, 3))
	var f store.File
	for {
		var err error
		if f, err = fs.Create("v", 1<<20); err == nil {
			break
		}
	}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			buf := make([]byte, 512)
			for i := range 200 {
				f.WriteAt(buf, int64((g*200+i)%2048)*512)
				f.ReadAt(buf, int64(i)*512)
				f.Sync()
			}
		})
	}
	wg.Wait()
}
