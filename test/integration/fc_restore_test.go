package integration

import (
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestFCRestoreExt4: the restore issue's end-to-end check through a kernel block device.
// S holds an ext4 filesystem; S → T is copied at t1; S changes (t2) and a second target U of S
// is taken; then S is damaged (its files deleted, through the block device); the reverse
// mapping T → S is refused without -restore and started with it; S then mounts with the content
// of t1, U still shows t2, and e2fsck is clean on all three.
func TestFCRestoreExt4(t *testing.T) {
	needRoot(t)
	needTools(t, "mkfs.ext4", "e2fsck", "mount", "umount")
	_, fuseErr := os.Stat("/dev/fuse")
	need(t, "no /dev/fuse for nbdfuse", fuseErr == nil)
	d := startDaemon(t)
	for _, v := range []string{"S", "T", "U"} {
		d.cli("mkvolume", "-name", v, "-size", "64M")
	}
	k := newFCKernel(t, d)
	mnt := t.TempDir()

	writeFiles := func(dir, prefix string, n int) map[string]string {
		sums := map[string]string{}
		for i := range n {
			data := make([]byte, 40<<10+i*1000)
			rand.Read(data)
			name := fmt.Sprintf("%s%02d", prefix, i)
			if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
				t.Fatal(err)
			}
			sums[name] = sum(data)
		}
		return sums
	}
	// check asserts that dir holds exactly the files of want, with their checksums.
	check := func(what, dir string, want map[string]string) {
		t.Helper()
		ents, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]bool{}
		for _, e := range ents {
			if e.Name() == "lost+found" {
				continue
			}
			got[e.Name()] = true
			data, err := os.ReadFile(filepath.Join(dir, e.Name()))
			if err != nil {
				t.Fatal(err)
			}
			if s, ok := want[e.Name()]; !ok || s != sum(data) {
				t.Errorf("%s: %s is not as it was (present in the expected image: %v)", what, e.Name(), ok)
			}
		}
		for name := range want {
			if !got[name] {
				t.Errorf("%s: %s is missing", what, name)
			}
		}
	}
	// withFS attaches vol, checks the filesystem, mounts it, runs fn, and undoes it all.
	withFS := func(vol string, fn func(dir string)) {
		t.Helper()
		dev := k.attach(vol)
		sh(t, "e2fsck", "-fn", dev)
		k.mount(dev, mnt)
		fn(mnt)
		k.umount(mnt)
		k.detach(dev)
	}

	// t1: the filesystem with its first files, copied whole to T.
	dev := k.attach("S")
	sh(t, "mkfs.ext4", "-q", "-F", dev)
	k.detach(dev)
	var t1 map[string]string
	withFS("S", func(dir string) { t1 = writeFiles(dir, "t1-", 8) })
	d.cli("mkfcmap", "-source", "S", "-target", "T", "-name", "st", "-copyrate", "150")
	d.cli("startfcmap", "-prep", "st")
	d.cli("wait", "-timeout", "120s", "st")

	// t2: more files on S, and a nocopy snapshot U of S.
	t2 := map[string]string{}
	withFS("S", func(dir string) {
		for n, s := range writeFiles(dir, "t2-", 5) {
			t2[n] = s
		}
	})
	for n, s := range t1 {
		t2[n] = s
	}
	d.cli("mkfcmap", "-source", "S", "-target", "U", "-name", "su", "-copyrate", "0")
	d.cli("startfcmap", "-prep", "su")

	// The damage: every file deleted on S, through the block device.
	withFS("S", func(dir string) {
		for name := range t2 {
			if err := os.Remove(filepath.Join(dir, name)); err != nil {
				t.Fatal(err)
			}
		}
	})

	// The restore: T back onto S. S is the source of an active mapping (su), so -restore is
	// needed.
	// Rate 0 until restoring is checked: a sparse-aware copy of this little data at rate 100
	// can finish before lsfcmap looks.
	d.cli("mkfcmap", "-source", "T", "-target", "S", "-name", "ts", "-copyrate", "0")
	if _, errs, err := d.run("startfcmap", "-prep", "ts"); err == nil || !strings.Contains(errs, "CMMVC6298E") {
		t.Fatalf("restore without -restore: %v %q, want refusal CMMVC6298E", err, errs)
	}
	if s := field(t, d, "lsfcmap", "ts", "status"); s != "idle_or_copied" {
		t.Fatalf("the refused start changed the mapping: %s", s)
	}
	d.cli("startfcmap", "-prep", "-restore", "ts")
	if r := field(t, d, "lsfcmap", "ts", "restoring"); r != "yes" {
		t.Errorf("restoring = %q while the restore copies, want yes", r)
	}
	d.cli("chfcmap", "-copyrate", "100", "ts")

	withFS("S", func(dir string) { check("S after the restore", dir, t1) })
	withFS("U", func(dir string) { check("U (taken at t2)", dir, t2) })
	withFS("T", func(dir string) { check("T (taken at t1)", dir, t1) })
	d.cli("wait", "-timeout", "120s", "ts")
	withFS("S", func(dir string) { check("S once the restore completed", dir, t1) })
	withFS("U", func(dir string) { check("U once the restore completed", dir, t2) })
}
