package attach

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"fcnbd/internal/api"
	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
	"fcnbd/internal/store"
	"fcnbd/internal/volume"
	"fcnbd/nbd"
)

func TestExportURI(t *testing.T) {
	if got, want := exportURI("/run/fcnbd/nbd.sock", "", "v1"), "nbd+unix:///v1?socket=/run/fcnbd/nbd.sock"; got != want {
		t.Fatalf("%s, want %s", got, want)
	}
	if got, want := exportURI("/run/fcnbd/nbd.sock", "127.0.0.1:10809", "v1"), "nbd://127.0.0.1:10809/v1"; got != want {
		t.Fatalf("%s, want %s", got, want)
	}
	if got := unescape(`/mnt/a\040b`); got != "/mnt/a b" {
		t.Fatalf("unescape: %q", got)
	}
}

// needs skips unless the test runs as root with FUSE, loop devices and the tools it names.
func needs(t *testing.T, tools ...string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (FUSE mount, loop devices)")
	}
	for _, dev := range []string{"/dev/fuse", "/dev/loop-control"} {
		if _, err := os.Stat(dev); err != nil {
			t.Skipf("needs %s", dev)
		}
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (scripts/install-deps.sh installs it)", tool)
		}
	}
}

// serveNBD runs a volume manager with one 64 MiB volume "v" behind a real NBD server on a
// Unix socket and returns the socket.
func serveNBD(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	cat, err := catalog.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	vols, err := volume.Open(volume.Options{Catalog: cat, FS: store.Dir{Path: dir}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := vols.Create("v", 64<<20); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "nbd.sock")
	l, err := api.ListenUnix(sock, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	srv := nbd.NewServer(vols, nbd.Options{Logger: zerolog.Nop()})
	go srv.Serve(l)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		vols.Close()
		cat.Close()
	})
	return sock
}

func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}

// TestFilesystemOverNBDFuse puts ext4 on a volume through nbdfuse + loop, detaches, attaches
// again and checks the filesystem and the file.
func TestFilesystemOverNBDFuse(t *testing.T) {
	needs(t, "nbdfuse", "losetup", "fusermount3", "mkfs.ext4", "e2fsck")
	sock := serveNBD(t)
	opts := Options{Dir: filepath.Join(t.TempDir(), "attach"), Socket: sock, Method: MethodNBDFuse}
	ctx := context.Background()
	mnt := t.TempDir()

	rec, err := Attach(ctx, "v", opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		exec.Command("umount", mnt).Run()
		Detach(ctx, rec.Device, opts)
	})
	if rec.Method != MethodNBDFuse || loopBacking(rec.Device) != rec.Image {
		t.Fatalf("record %+v, loop backing %q", rec, loopBacking(rec.Device))
	}
	sh(t, "mkfs.ext4", "-q", "-F", rec.Device)
	sh(t, "mount", rec.Device, mnt)
	want := make([]byte, 3<<20)
	rand.Read(want)
	if err := os.WriteFile(filepath.Join(mnt, "file"), want, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Detach(ctx, rec.Device, opts); fcerr.CodeOf(err) != fcerr.BadState {
		t.Fatalf("Detach of a mounted device: %v, want BadState", err)
	}
	sh(t, "umount", mnt)
	if err := Detach(ctx, rec.Device, opts); err != nil {
		t.Fatal(err)
	}
	if recs, _ := List(opts.Dir); len(recs) != 0 {
		t.Fatalf("records left after detach: %+v", recs)
	}
	if alive(rec.FusePID) || isMountPoint(rec.Mount) {
		t.Fatal("nbdfuse still running or mounted after detach")
	}
	if err := Detach(ctx, rec.Device, opts); fcerr.CodeOf(err) != fcerr.NoSuchObject {
		t.Fatalf("second Detach: %v, want NoSuchObject", err)
	}

	rec, err = Attach(ctx, "v", opts)
	if err != nil {
		t.Fatal(err)
	}
	sh(t, "e2fsck", "-fn", rec.Device)
	sh(t, "mount", rec.Device, mnt)
	got, err := os.ReadFile(filepath.Join(mnt, "file"))
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("file after re-attach differs (err %v)", err)
	}
	sh(t, "umount", mnt)
	if err := Detach(ctx, rec.Device, opts); err != nil {
		t.Fatal(err)
	}
}

func TestAttachUnknownExportLeavesNothing(t *testing.T) {
	needs(t, "nbdfuse", "losetup", "fusermount3")
	sock := serveNBD(t)
	opts := Options{Dir: filepath.Join(t.TempDir(), "attach"), Socket: sock, Method: MethodNBDFuse, Timeout: 5 * time.Second}
	if _, err := Attach(context.Background(), "missing", opts); err == nil {
		t.Fatal("Attach of an unknown export succeeded")
	}
	ents, _ := os.ReadDir(opts.Dir)
	if len(ents) != 0 {
		t.Fatalf("left behind: %v", ents)
	}
}
