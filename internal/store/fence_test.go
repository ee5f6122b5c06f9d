package store

import (
	"errors"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
)

// Two owners of one directory, as two nodes of an I/O group see it: the old one's writes stop
// at the new one's claim, and the claim waits for a write that had already passed its check.
func TestFenceClaimWaitsAndRefusesTheOldOwner(t *testing.T) {
	dir := t.TempDir()
	var fenced atomic.Uint64
	oldF, err := OpenFence(dir, func(theirs uint64) { fenced.Store(theirs) })
	if err != nil {
		t.Fatal(err)
	}
	defer oldF.Close()
	if err := oldF.Claim(5); err != nil {
		t.Fatal(err)
	}
	old := Dir{Path: dir, Fence: oldF}
	f, err := old.Create("vol-0.img", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte("old"), 0); err != nil {
		t.Fatalf("the owner's write: %v", err)
	}

	// The old owner is inside a write (past its check) when the new one claims.
	leave, err := oldF.Enter()
	if err != nil {
		t.Fatal(err)
	}
	newF, err := OpenFence(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer newF.Close()
	claimed := make(chan error, 1)
	go func() { claimed <- newF.Claim(9) }()
	select {
	case err := <-claimed:
		t.Fatalf("the claim returned (%v) while a write of the old epoch was still running", err)
	case <-time.After(200 * time.Millisecond):
	}
	leave()
	select {
	case err := <-claimed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the claim did not return once the old write ended")
	}

	// Every kind of change by the old owner is refused now, and the file is untouched.
	checks := map[string]error{}
	_, checks["write"] = f.WriteAt([]byte("OLD"), 0)
	checks["punch"] = f.Punch(0, 4096)
	checks["zero"] = ZeroFast(f, 0, 4096, true)
	checks["truncate"] = f.(interface{ Truncate(int64) error }).Truncate(2 << 20)
	_, checks["create"] = old.Create("vol-1.img", 4096)
	checks["remove"] = old.Remove("vol-0.img")
	for op, err := range checks {
		if !errors.Is(err, ErrFenced) {
			t.Errorf("old owner's %s after the claim: %v, want ErrFenced", op, err)
		}
	}
	if fenced.Load() != 9 {
		t.Errorf("onFenced saw epoch %d, want 9", fenced.Load())
	}
	data, err := os.ReadFile(filepath.Join(dir, "vol-0.img"))
	if err != nil || string(data[:3]) != "old" || len(data) != 1<<20 {
		t.Fatalf("file after refused changes: %q… (%d bytes, %v)", data[:3], len(data), err)
	}
	if _, err := os.Stat(filepath.Join(dir, "vol-1.img")); !os.IsNotExist(err) {
		t.Errorf("a refused create left a file: %v", err)
	}

	// The new owner writes; an old epoch can't be claimed again.
	nf, err := Dir{Path: dir, Fence: newF}.Open("vol-0.img")
	if err != nil {
		t.Fatal(err)
	}
	defer nf.Close()
	if _, err := nf.WriteAt([]byte("new"), 0); err != nil {
		t.Fatalf("the new owner's write: %v", err)
	}
	if err := oldF.Claim(7); !errors.Is(err, ErrFenced) {
		t.Errorf("claim of epoch 7 after 9: %v, want ErrFenced", err)
	}
}

// A fence that was never claimed admits nothing.
func TestFenceUnclaimedRefuses(t *testing.T) {
	f, err := OpenFence(t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Guard(func() error { return nil }); !errors.Is(err, ErrFenced) {
		t.Fatalf("unclaimed fence: %v, want ErrFenced", err)
	}
}
