package integration

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestAttachExt4: a volume attached as a kernel block device with `fcnbd attach` (the kernel
// NBD driver where there is one, else nbdfuse + loop), ext4 made and mounted, files written,
// unmounted, detached, attached again, e2fsck clean and every checksum equal.
func TestAttachExt4(t *testing.T) {
	needRoot(t)
	needTools(t, "mkfs.ext4", "e2fsck", "mount", "umount")
	_, fuseErr := os.Stat("/dev/fuse")
	_, nbdErr := os.Stat("/dev/nbd0")
	need(t, "neither /dev/fuse nor /dev/nbd0 exists", fuseErr == nil || nbdErr == nil)
	d := startDaemon(t)
	d.cli("mkvolume", "-name", "fs", "-size", "128M")

	dev := attach(t, d, "fs")
	sh(t, "mkfs.ext4", "-q", "-F", dev)
	mnt := t.TempDir()
	sh(t, "mount", dev, mnt)
	want := map[string]string{}
	for i := range 12 {
		data := make([]byte, (i+1)*317*1024)
		rand.Read(data)
		name := fmt.Sprintf("file%02d", i)
		if err := os.WriteFile(filepath.Join(mnt, name), data, 0o644); err != nil {
			sh(t, "umount", mnt)
			t.Fatal(err)
		}
		want[name] = sum(data)
	}
	sh(t, "umount", mnt)
	detach(t, d, dev)

	dev = attach(t, d, "fs")
	sh(t, "e2fsck", "-fn", dev)
	sh(t, "mount", "-o", "ro", dev, mnt)
	t.Cleanup(func() { sh(t, "umount", mnt) })
	for name, s := range want {
		data, err := os.ReadFile(filepath.Join(mnt, name))
		if err != nil {
			t.Fatal(err)
		}
		if got := sum(data); got != s {
			t.Errorf("%s: checksum %s after reattach, want %s", name, got, s)
		}
	}
}

// attach runs `fcnbd attach VOL` and returns the device; the device is detached when the test
// ends if the test has not done it.
func attach(t *testing.T, d *daemon, vol string) string {
	t.Helper()
	dev := strings.TrimSpace(d.cli("attach", "--nbd-unix", d.nbdSock, vol))
	if !strings.HasPrefix(dev, "/dev/") {
		t.Fatalf("fcnbd attach printed %q, want a /dev/ path", dev)
	}
	attached[dev] = true
	t.Cleanup(func() {
		// Only what this test still holds: loop devices are reused, and detaching one that
		// another test attached since would pull its disk away.
		if attached[dev] {
			d.run("detach", dev)
			delete(attached, dev)
		}
	})
	return dev
}

// attached records the devices a test attached and has not detached (tests in this file run
// one at a time).
var attached = map[string]bool{}

func detach(t *testing.T, d *daemon, dev string) {
	t.Helper()
	d.cli("detach", dev)
	delete(attached, dev)
}

func sum(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}
