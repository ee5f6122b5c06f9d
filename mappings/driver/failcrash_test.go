package driver

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"fcnbd/cow"
	"fcnbd/internal/store"
	"fcnbd/internal/store/errorfs"
)

// TestCrashAfterFailedCopyKeepsTargetStopped: a copy-on-write into a target fails, the host's
// source write goes ahead (as it must), and the daemon dies before the mapping's stop reached
// the catalogue through the usual event. On restart the mapping must be stopped — not copying
// with a target that reads the overwritten grain through its source, i.e. data from after its
// start. The failure record the engine writes before the source write is what makes it so.
func TestCrashAfterFailedCopyKeepsTargetStopped(t *testing.T) {
	fail := errorfs.NewSwitch(errorfs.And(errorfs.OnFile("vol-1.img"), errorfs.OnOp(errorfs.OpWrite)))
	fr := newFaultRig(t, fail, nil)
	r := fr.rig
	ctx := context.Background()
	r.mkvol("src", "tgt")
	r.write("src", 0, pattern(0x11, volSize))
	if err := r.vol("src").Flush(); err != nil {
		t.Fatal(err)
	}
	r.mkmap("m", "src", "tgt", 0, "")
	if err := r.d.StartFcmap(ctx, "m", true, false); err != nil {
		t.Fatal(err)
	}

	// Hold the engine's unlink (and so the IOError event) until the "crash" is taken.
	release := make(chan struct{})
	hook := func(name string) {
		if name == "cow-fail-before-unlink" {
			<-release
		}
	}
	cow.FailpointHook.Store(&hook)
	defer cow.FailpointHook.Store(nil)
	defer close(release)

	fail.On()
	if err := r.writeFUA("src", 0, pattern(0x22, 4096)); err != nil {
		t.Fatalf("the host write must succeed although its copy-on-write failed: %v", err)
	}
	// The crash: the catalogue as of its last commit, the data files as they are (the FUA
	// write is durable).
	crashDir := t.TempDir()
	f, err := os.Create(filepath.Join(crashDir, "catalog.db"))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.cat.CopyTo(f); err != nil {
		t.Fatal(err)
	}
	f.Close()
	for _, name := range []string{"vol-0.img", "vol-1.img"} {
		data, err := os.ReadFile(filepath.Join(r.dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(crashDir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	fail.Off()

	after := newRigAt(t, crashDir)
	got, err := after.read("tgt", 0, 4096)
	if err == nil && bytes.Equal(got, pattern(0x22, 4096)) {
		t.Fatal("after the crash the target shows data written to its source after its start")
	}
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("target after the crash: %v, want EIO (the mapping stopped)", err)
	}
	if s := after.status("m"); s != "stopped" {
		t.Fatalf("mapping after the crash: %s, want stopped", s)
	}
	after.expect("src", 0, pattern(0x22, 4096))
}

// newRigAt opens a driver on an existing data directory.
func newRigAt(t *testing.T, dir string) *rig {
	t.Helper()
	r := newRig(t, nil)
	r.close()
	r.dir = dir
	r.fs = store.Dir{Path: dir}
	r.open()
	return r
}
