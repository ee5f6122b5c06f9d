package driver

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"fcnbd/cachelayer"
	"fcnbd/internal/api"
	"fcnbd/internal/blockdev"
	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
	"fcnbd/internal/store"
)

const volSize = 4 << 20

// rig is a driver on real files in a temporary directory.
type rig struct {
	t   *testing.T
	dir string
	cat *catalog.DB
	d   *Driver
	fs  store.FS
	opt Options
	// catOpts opens the catalogue (fault and crash tests set a commit hook).
	catOpts catalog.Options
}

func newRig(t *testing.T, mod func(*Options)) *rig {
	t.Helper()
	r := &rig{t: t, dir: t.TempDir()}
	r.fs = store.Dir{Path: r.dir}
	r.opt = Options{Logger: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel),
		ProgressInterval: 10 * time.Millisecond, FenceTimeout: 2 * time.Second}
	if mod != nil {
		mod(&r.opt)
	}
	r.open()
	t.Cleanup(func() { r.close() })
	return r
}

func (r *rig) open() {
	r.t.Helper()
	cat, err := catalog.OpenWith(r.dir, r.catOpts)
	if err != nil {
		r.t.Fatal(err)
	}
	o := r.opt
	o.Catalog, o.FS = cat, r.fs
	d, err := Open(o)
	if err != nil {
		cat.Close()
		r.t.Fatal(err)
	}
	r.cat, r.d = cat, d
}

func (r *rig) close() {
	if r.d == nil {
		return
	}
	if err := r.d.Close(); err != nil {
		r.t.Errorf("close driver: %v", err)
	}
	r.cat.Close()
	r.d = nil
}

func (r *rig) restart() { r.close(); r.open() }

func (r *rig) vol(name string) blockdev.Device {
	r.t.Helper()
	e, ok := r.d.Lookup(name)
	if !ok {
		r.t.Fatalf("no export %s", name)
	}
	return e.Device
}

func (r *rig) mkvol(names ...string) {
	r.t.Helper()
	for _, n := range names {
		if _, err := r.d.Create(n, volSize); err != nil {
			r.t.Fatal(err)
		}
	}
}

func pattern(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

func (r *rig) write(vol string, off int64, p []byte) {
	r.t.Helper()
	if err := r.vol(vol).WriteAt(p, off, false); err != nil {
		r.t.Fatalf("write %s@%d: %v", vol, off, err)
	}
}

func (r *rig) read(vol string, off int64, n int) ([]byte, error) {
	p := make([]byte, n)
	return p, r.vol(vol).ReadAt(p, off)
}

func (r *rig) expect(vol string, off int64, want []byte) {
	r.t.Helper()
	got, err := r.read(vol, off, len(want))
	if err != nil {
		r.t.Fatalf("read %s@%d: %v", vol, off, err)
	}
	if !bytes.Equal(got, want) {
		r.t.Fatalf("read %s@%d: got %x… want %x…", vol, off, got[:8], want[:8])
	}
}

func (r *rig) expectEIO(vol string) {
	r.t.Helper()
	_, err := r.read(vol, 0, 4096)
	if !errors.Is(err, syscall.EIO) {
		r.t.Fatalf("read %s: %v, want EIO", vol, err)
	}
}

func (r *rig) status(m string) string {
	r.t.Helper()
	f, err := r.d.Fcmap(context.Background(), m)
	if err != nil {
		r.t.Fatal(err)
	}
	return f.Status
}

func (r *rig) waitStatus(m, want string) {
	r.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		f, err := r.d.Fcmap(context.Background(), m)
		if err != nil && want == "gone" {
			return
		}
		if err != nil {
			r.t.Fatal(err)
		}
		if f.Status == want {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	r.t.Fatalf("mapping %s: status %s, want %s", m, r.status(m), want)
}

func ip(v int) *int { return &v }

// TestSnapshotThroughTheStack: flashcopy.md §2/§3 end to end below NBD: a nocopy snapshot shows
// the source as at its start, target writes stay on the target, stop takes the target offline,
// rmfcmap -force brings it back; a copy at rate 150 completes on its own and stays exact.
func TestSnapshotThroughTheStack(t *testing.T) {
	r := newRig(t, nil)
	ctx := context.Background()
	r.mkvol("src", "tgt")
	p1 := pattern(0x11, volSize)
	r.write("src", 0, p1)

	if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "src", Target: "tgt", Name: "snap", CopyRate: ip(0), GrainSize: ip(64)}); err != nil {
		t.Fatal(err)
	}
	if err := r.d.StartFcmap(ctx, "snap", true, false); err != nil {
		t.Fatal(err)
	}
	if s := r.status("snap"); s != "copying" {
		t.Fatalf("after start: %s", s)
	}
	r.write("src", 100_000, pattern(0x22, 300_000))
	r.write("src", 2<<20, pattern(0x22, 64<<10))
	r.expect("tgt", 0, p1)
	r.expect("src", 100_000, pattern(0x22, 300_000))

	r.write("tgt", 1<<20, pattern(0x33, 5000))
	r.expect("tgt", 1<<20, pattern(0x33, 5000))
	r.expect("src", 1<<20, pattern(0x11, 5000))
	r.expect("tgt", 0, pattern(0x11, 100_000))

	// Persisted: after a restart the snapshot is still there, still exact.
	r.restart()
	if s := r.status("snap"); s != "copying" {
		t.Fatalf("after restart: %s", s)
	}
	r.expect("tgt", 0, pattern(0x11, 1<<20))
	r.expect("tgt", 1<<20, pattern(0x33, 5000))

	if err := r.d.StopFcmap(ctx, "snap", false, false); err != nil {
		t.Fatal(err)
	}
	r.waitStatus("snap", "stopped")
	r.expectEIO("tgt")
	if err := r.d.RmFcmap(ctx, "snap", false); fcerr.CodeOf(err) != fcerr.BadState {
		t.Fatalf("rmfcmap of a stopped mapping without -force: %v", err)
	}
	if err := r.d.RmFcmap(ctx, "snap", true); err != nil {
		t.Fatal(err)
	}
	if _, err := r.read("tgt", 0, 4096); err != nil {
		t.Fatalf("target after rmfcmap -force: %v", err)
	}

	// Full copy at the highest rate.
	if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "src", Target: "tgt", Name: "full", CopyRate: ip(150)}); err != nil {
		t.Fatal(err)
	}
	image, _ := r.read("src", 0, volSize)
	if err := r.d.StartFcmap(ctx, "full", true, false); err != nil {
		t.Fatal(err)
	}
	r.waitStatus("full", "idle_or_copied")
	r.write("src", 0, pattern(0x44, volSize))
	r.expect("tgt", 0, image)
	f, _ := r.d.Fcmap(ctx, "full")
	if f.Progress != 100 {
		t.Fatalf("progress %d after copy", f.Progress)
	}
}

// TestPrepareFlushesAndDiscards: a write acknowledged but still dirty in the source's cache is
// in the target (prepare flushed it); a target write never flushed is gone (prepare discarded
// it); while prepared, a source write is in the store before its reply.
func TestPrepareFlushesAndDiscards(t *testing.T) {
	r := newRig(t, func(o *Options) { o.Cache = cachelayer.Options{DestagePaused: true} })
	ctx := context.Background()
	r.mkvol("src", "tgt")
	r.write("src", 0, pattern(0x01, volSize))
	if err := r.vol("src").Flush(); err != nil {
		t.Fatal(err)
	}
	// P2 over P1 and P3 on the target, acknowledged, never flushed; in pieces small enough to
	// be cached (larger writes go through the cache).
	for off := int64(0); off < 1<<20; off += 64 << 10 {
		r.write("src", off, pattern(0x02, 64<<10))
		r.write("tgt", off, pattern(0x03, 64<<10))
	}
	if got := fileBytes(t, r.dir, 0, 0, 4096); bytes.Equal(got, pattern(0x02, 4096)) {
		t.Fatal("test hook failed: P2 reached the store before prepare")
	}
	if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "src", Target: "tgt", Name: "m", CopyRate: ip(0)}); err != nil {
		t.Fatal(err)
	}
	if err := r.d.PrestartFcmap(ctx, "m", false); err != nil {
		t.Fatal(err)
	}
	r.waitStatus("m", "prepared")
	r.expectEIO("tgt")

	// Write-through: the reply comes after the data is in the backing store.
	r.write("src", 3<<20, pattern(0x05, 8192))
	if got := fileBytes(t, r.dir, 0, 3<<20, 8192); !bytes.Equal(got, pattern(0x05, 8192)) {
		t.Fatal("a source write acknowledged while prepared is not in the backing store")
	}

	if err := r.d.StartFcmap(ctx, "m", false, false); err != nil {
		t.Fatal(err)
	}
	r.expect("tgt", 0, pattern(0x02, 1<<20))
	r.expect("tgt", 1<<20, pattern(0x01, 1<<20))
	r.expect("tgt", 3<<20, pattern(0x05, 8192))
}

func fileBytes(t *testing.T, dir string, vol int, off int64, n int) []byte {
	t.Helper()
	f, err := os.Open(filepath.Join(dir, "vol-"+itoa(vol)+".img"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := make([]byte, n)
	if _, err := f.ReadAt(p, off); err != nil {
		t.Fatal(err)
	}
	return p
}

func itoa(i int) string { return string(rune('0' + i)) }

// TestWriteThroughOption: with Options.WriteThrough (serve --cache-size 0) every acknowledged
// write is in the backing store, also after a start, which switches caches back to write-back.
func TestWriteThroughOption(t *testing.T) {
	r := newRig(t, func(o *Options) { o.WriteThrough = true; o.Cache = cachelayer.Options{DestagePaused: true} })
	ctx := context.Background()
	r.mkvol("src", "tgt")
	r.write("src", 0, pattern(0x07, 8192))
	if got := fileBytes(t, r.dir, 0, 0, 8192); !bytes.Equal(got, pattern(0x07, 8192)) {
		t.Fatal("write acknowledged in write-through mode is not in the backing store")
	}
	if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "src", Target: "tgt", CopyRate: ip(0)}); err != nil {
		t.Fatal(err)
	}
	if err := r.d.StartFcmap(ctx, "0", true, false); err != nil {
		t.Fatal(err)
	}
	r.write("src", 65536, pattern(0x08, 4096))
	if got := fileBytes(t, r.dir, 0, 65536, 4096); !bytes.Equal(got, pattern(0x08, 4096)) {
		t.Fatal("after a start, a write acknowledged in write-through mode is not in the backing store")
	}
	r.expect("tgt", 65536, pattern(0, 4096))
}
