package driver

import (
	"bytes"
	"errors"
	"math"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"fcnbd/internal/api"
	"fcnbd/internal/blockdev"
	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
	"fcnbd/internal/store"
	"fcnbd/internal/store/crashfs"
	"fcnbd/internal/volume"
)

func (r *rig) fileSize(id int) int64 {
	r.t.Helper()
	st, err := os.Stat(filepath.Join(r.dir, volume.FileName(uint64(id))))
	if err != nil {
		r.t.Fatal(err)
	}
	return st.Size()
}

// TestExpandVolume: the new capacity reaches every layer (a device handed out before the
// expansion reports it too), data before it stays, the new range reads zeroes and takes
// writes, the model knows the new size (mkfcmap pairs it with volumes of that size only), and
// a restart keeps all of it.
func TestExpandVolume(t *testing.T) {
	r := newRig(t, nil)
	r.mkvol("a")
	dev := r.vol("a")
	r.write("a", 0, pattern(0xa1, 8192))
	r.write("a", volSize-4096, pattern(0xa2, 4096)) // in the write-back cache, not yet destaged
	info, err := r.d.ExpandVolume("a", volSize)
	if err != nil {
		t.Fatal(err)
	}
	if info.Capacity != 2*volSize || info.Name != "a" {
		t.Fatalf("expand returned %+v", info)
	}
	if got := dev.Size(); got != 2*volSize {
		t.Fatalf("the device handed out before reports %d bytes, want %d", got, 2*volSize)
	}
	if got, _ := r.d.Get("a"); got.Capacity != 2*volSize {
		t.Fatalf("Get says %d", got.Capacity)
	}
	if got := r.fileSize(0); got != 2*volSize {
		t.Fatalf("backing file is %d bytes", got)
	}
	r.expect("a", 0, pattern(0xa1, 8192))
	r.expect("a", volSize-4096, pattern(0xa2, 4096))
	r.expect("a", volSize, make([]byte, volSize))
	r.write("a", 2*volSize-4096, pattern(0xa3, 4096))
	r.write("a", volSize, pattern(0xa4, 4096))
	if err := dev.WriteAt(pattern(0xa5, 4096), volSize+4096, true); err != nil {
		t.Fatalf("write through the old handle into the new range: %v", err)
	}
	// The model has the new size: a mapping needs a partner of the same size.
	if _, err := r.d.Create("small", volSize); err != nil {
		t.Fatal(err)
	}
	if _, err := r.d.Create("big", 2*volSize); err != nil {
		t.Fatal(err)
	}
	if _, err := r.d.MkFcmap(t.Context(), api.MkFcmap{Source: "a", Target: "small", CopyRate: ip(0)}); err == nil {
		t.Error("a mapping between volumes of different sizes was accepted")
	}
	if _, err := r.d.MkFcmap(t.Context(), api.MkFcmap{Source: "a", Target: "big", CopyRate: ip(0)}); err != nil {
		t.Fatalf("mkfcmap with a volume of the new size: %v", err)
	}

	r.restart()
	if got := r.vol("a").Size(); got != 2*volSize {
		t.Fatalf("after restart the volume has %d bytes", got)
	}
	r.expect("a", 0, pattern(0xa1, 8192))
	r.expect("a", volSize-4096, pattern(0xa2, 4096))
	r.expect("a", volSize, pattern(0xa4, 4096))
	r.expect("a", volSize+4096, pattern(0xa5, 4096))
	r.expect("a", volSize+8192, make([]byte, volSize-12288))
	r.expect("a", 2*volSize-4096, pattern(0xa3, 4096))
	// And the mapping works across the restart: the model and the engine agree on the size.
	if err := r.d.StartFcmap(t.Context(), "0", true, false); err != nil {
		t.Fatal(err)
	}
	r.expect("big", 2*volSize-4096, pattern(0xa3, 4096))
}

// TestExpandRefusals: a volume in a FlashCopy mapping (source or target, also once the mapping
// is stopped), sizes that are not positive multiples of 512 bytes, that leave the capacity off
// the 4096-byte unit or past the largest volume, and a missing volume are refused, and a
// refusal changes nothing: capacity, backing file, data, the model.
func TestExpandRefusals(t *testing.T) {
	r := newRig(t, nil)
	r.mkvol("s", "t", "lone")
	r.write("s", 0, pattern(0xb1, 4096))
	r.write("lone", volSize-4096, pattern(0xb2, 4096))
	if _, err := r.d.MkFcmap(t.Context(), api.MkFcmap{Source: "s", Target: "t", CopyRate: ip(0)}); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		vol  string
		add  int64
		code string
	}{
		{"s", volSize, fcerr.ExpandInMapping},
		{"t", volSize, fcerr.ExpandInMapping},
		{"lone", 0, fcerr.BadValue},
		{"lone", -4096, fcerr.BadValue},
		{"lone", 100, fcerr.BadValue},
		{"lone", 512, fcerr.BadValue}, // a multiple of 512, but the capacity must stay a multiple of 4096
		{"lone", math.MaxInt64, fcerr.BadValue},
		{"lone", math.MaxInt64 - 511, fcerr.BadValue},
		{"lone", volume.MaxCapacity, fcerr.BadValue},
		{"nosuch", volSize, fcerr.NoSuchObject},
	}
	check := func() {
		t.Helper()
		for i, n := range []string{"s", "t", "lone"} {
			if got := r.vol(n).Size(); got != volSize {
				t.Fatalf("%s has %d bytes", n, got)
			}
			if got := r.fileSize(i); got != volSize {
				t.Fatalf("%s's file has %d bytes", n, got)
			}
		}
		r.expect("s", 0, pattern(0xb1, 4096))
		r.expect("lone", volSize-4096, pattern(0xb2, 4096))
		if m, err := r.d.Fcmap(t.Context(), "0"); err != nil || m.Status != "idle_or_copied" {
			t.Fatalf("mapping: %+v %v", m, err)
		}
	}
	for _, c := range cases {
		_, err := r.d.ExpandVolume(c.vol, c.add)
		if got := fcerr.CodeOf(err); got != c.code {
			t.Errorf("expand %s by %d: %v, want %s", c.vol, c.add, err, c.code)
		}
		check()
	}
	// Started, then stopped: still in the mapping.
	if err := r.d.StartFcmap(t.Context(), "0", true, false); err != nil {
		t.Fatal(err)
	}
	if _, err := r.d.ExpandVolume("t", volSize); fcerr.CodeOf(err) != fcerr.ExpandInMapping {
		t.Errorf("expanding the target of a copying mapping: %v", err)
	}
	if err := r.d.StopFcmap(t.Context(), "0", false, false); err != nil {
		t.Fatal(err)
	}
	if _, err := r.d.ExpandVolume("s", volSize); fcerr.CodeOf(err) != fcerr.ExpandInMapping {
		t.Errorf("expanding the source of a stopped mapping: %v", err)
	}
	r.restart()
	for _, n := range []string{"s", "t", "lone"} {
		if got := r.vol(n).Size(); got != volSize {
			t.Fatalf("after restart %s has %d bytes", n, got)
		}
	}
	r.expect("lone", volSize-4096, pattern(0xb2, 4096))
	// Once the mapping is gone, the source can grow.
	if err := r.d.RmFcmap(t.Context(), "0", true); err != nil {
		t.Fatal(err)
	}
	if _, err := r.d.ExpandVolume("s", volSize); err != nil {
		t.Fatalf("expand after rmfcmap: %v", err)
	}
}

// TestExpandCommitFails: if the catalogue commit fails, the old stack is rebuilt: the capacity
// is unchanged (in memory, in the catalogue and in the model), the data and I/O work, and the
// longer file a failed expansion leaves is cut back by the next one, whose new range reads
// zeroes.
func TestExpandCommitFails(t *testing.T) {
	var down atomic.Bool
	r := &rig{t: t, dir: t.TempDir()}
	r.fs = store.Dir{Path: r.dir}
	r.opt = Options{Logger: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel),
		ProgressInterval: 10 * time.Millisecond, FenceTimeout: 2 * time.Second, MetadataRetry: time.Hour}
	r.catOpts = catalog.Options{CommitHook: func(commit func() error) error {
		if down.Load() {
			return errors.New("injected: catalogue commit refused")
		}
		return commit()
	}}
	r.open()
	t.Cleanup(func() { down.Store(false); r.close() })
	r.mkvol("a")
	r.write("a", 0, pattern(0xc1, 4096))
	down.Store(true)
	if _, err := r.d.ExpandVolume("a", volSize); fcerr.CodeOf(err) != fcerr.MetadataUnwritable {
		t.Fatalf("expand with the catalogue down: %v", err)
	}
	if got := r.vol("a").Size(); got != volSize {
		t.Fatalf("after a failed expansion the volume has %d bytes", got)
	}
	r.expect("a", 0, pattern(0xc1, 4096))
	r.write("a", 4096, pattern(0xc2, 4096))
	// The crash's leftover: data past the capacity in a longer file.
	if got := r.fileSize(0); got < volSize {
		t.Fatalf("file has %d bytes", got)
	}
	f, err := os.OpenFile(filepath.Join(r.dir, volume.FileName(0)), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(pattern(0xee, 4096), volSize+8192); err != nil {
		t.Fatal(err)
	}
	f.Close()
	down.Store(false)
	r.restart()
	if got := r.vol("a").Size(); got != volSize {
		t.Fatalf("after restart the volume has %d bytes", got)
	}
	r.expect("a", 4096, pattern(0xc2, 4096))
	if _, err := r.d.ExpandVolume("a", volSize); err != nil {
		t.Fatal(err)
	}
	r.expect("a", volSize, make([]byte, volSize))
	r.expect("a", 0, pattern(0xc1, 4096))
}

// TestExpandUnderIO: requests in progress on the volume (through a device handed out before)
// while it is expanded again and again neither fail nor lose a write: each writer reads back
// what it wrote, before and after every expansion.
func TestExpandUnderIO(t *testing.T) {
	r := newRig(t, nil)
	r.mkvol("a")
	dev := r.vol("a")
	stop := make(chan struct{})
	errs := make(chan error, 4)
	for w := range 4 {
		go func() {
			off := int64(w) * (volSize / 4)
			for i := 0; ; i++ {
				select {
				case <-stop:
					errs <- nil
					return
				default:
				}
				p := pattern(byte(w*50+i%50), 4096)
				o := off + int64(i%64)*4096
				if err := dev.WriteAt(p, o, i%7 == 0); err != nil {
					errs <- err
					return
				}
				q := make([]byte, 4096)
				if err := dev.ReadAt(q, o); err != nil {
					errs <- err
					return
				}
				if q[0] != p[0] || q[4095] != p[4095] {
					errs <- errors.New("read back differs")
					return
				}
			}
		}()
	}
	for i := range 4 {
		time.Sleep(20 * time.Millisecond)
		if _, err := r.d.ExpandVolume("a", 1<<20); err != nil {
			t.Fatalf("expansion %d: %v", i, err)
		}
	}
	close(stop)
	for range 4 {
		if err := <-errs; err != nil {
			t.Fatalf("I/O during the expansions: %v", err)
		}
	}
	if got := dev.Size(); got != volSize+4<<20 {
		t.Fatalf("size %d", got)
	}
}

// TestExpandCrash: a crash just before the expansion's catalogue commit (the backing file
// already grown) leaves the old capacity, and one just after leaves the new one; either way
// every write acknowledged before the expansion is there (the expansion flushed it, even the
// ones without FUA), the new range reads zeroes and the volume takes writes. Each crash copies
// the catalogue as of its last commit and clones the files with half of what was not synced
// lost (crashfs).
func TestExpandCrash(t *testing.T) {
	logger := zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.ErrorLevel + 1)
	opts := Options{Logger: logger, ProgressInterval: 5 * time.Millisecond, FenceTimeout: 2 * time.Second}
	cfs := crashfs.New()
	dir := t.TempDir()
	var cat *catalog.DB
	type world struct {
		dir string
		fs  *crashfs.FS
	}
	crash := func() world {
		w := world{dir: t.TempDir()}
		f, err := os.Create(filepath.Join(w.dir, catalog.FileName))
		if err == nil {
			err = cat.CopyTo(f)
			f.Close()
		}
		if err != nil {
			t.Fatalf("copy the catalogue: %v", err)
		}
		w.fs = cfs.CrashClone(crashfs.CrashConfig{UnsyncedPercent: 50, Seed: 7})
		return w
	}
	var armed atomic.Bool
	var before world
	cat, err := catalog.OpenWith(dir, catalog.Options{CommitHook: func(commit func() error) error {
		if armed.CompareAndSwap(true, false) {
			before = crash()
		}
		return commit()
	}})
	if err != nil {
		t.Fatal(err)
	}
	o := opts
	o.Catalog, o.FS = cat, cfs
	d, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"a", "b"} {
		if _, err := d.Create(n, volSize); err != nil {
			t.Fatal(err)
		}
	}
	lookup := func(d *Driver, n string) blockdev.Device {
		e, ok := d.Lookup(n)
		if !ok {
			t.Fatalf("no volume %s", n)
		}
		return e.Device
	}
	a := lookup(d, "a")
	for i := range 16 {
		if err := a.WriteAt(pattern(byte(0x40+i), 4096), int64(i)*65536, i%4 == 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := lookup(d, "b").WriteAt(pattern(0x99, 4096), 0, true); err != nil {
		t.Fatal(err)
	}
	armed.Store(true)
	if _, err := d.ExpandVolume("a", volSize); err != nil {
		t.Fatal(err)
	}
	if armed.Load() {
		t.Fatal("the expansion made no catalogue commit")
	}
	after := crash()
	d.Close()
	cat.Close()

	for _, c := range []struct {
		name string
		w    world
		size int64
	}{{"before the commit", before, volSize}, {"after the commit", after, 2 * volSize}} {
		t.Run(c.name, func(t *testing.T) {
			cat2, err := catalog.Open(c.w.dir)
			if err != nil {
				t.Fatal(err)
			}
			defer cat2.Close()
			o := opts
			o.Catalog, o.FS = cat2, c.w.fs
			d2, err := Open(o)
			if err != nil {
				t.Fatal(err)
			}
			defer d2.Close()
			a := lookup(d2, "a")
			if got := a.Size(); got != c.size {
				t.Fatalf("capacity %d, want %d", got, c.size)
			}
			if vi, err := d2.Get("a"); err != nil || vi.Capacity != c.size {
				t.Fatalf("Get: %+v %v", vi, err)
			}
			p := make([]byte, 4096)
			for i := range 16 {
				if err := a.ReadAt(p, int64(i)*65536); err != nil || !bytes.Equal(p, pattern(byte(0x40+i), 4096)) {
					t.Fatalf("write %d acknowledged before the expansion: %v, got %x…", i, err, p[:4])
				}
			}
			q := make([]byte, c.size-volSize+4096)
			if err := a.ReadAt(q, volSize-4096); err != nil || !bytes.Equal(q, make([]byte, len(q))) {
				t.Fatalf("the end of the volume is not zero: %v", err)
			}
			if err := lookup(d2, "b").ReadAt(p, 0); err != nil || !bytes.Equal(p, pattern(0x99, 4096)) {
				t.Fatalf("b: %v", err)
			}
			if err := a.WriteAt(pattern(0x77, 4096), c.size-4096, true); err != nil {
				t.Fatal(err)
			}
			// The model agrees with the capacity: a partner of that size is accepted.
			if _, err := d2.Create("p", c.size); err != nil {
				t.Fatal(err)
			}
			if _, err := d2.MkFcmap(t.Context(), api.MkFcmap{Source: "a", Target: "p", CopyRate: ip(0)}); err != nil {
				t.Fatalf("mkfcmap with a partner of the capacity: %v", err)
			}
			// And a new expansion after the crash reads zeroes in its new range.
			if err := d2.RmFcmap(t.Context(), "0", true); err != nil {
				t.Fatal(err)
			}
			if _, err := d2.ExpandVolume("a", volSize); err != nil {
				t.Fatal(err)
			}
			q = make([]byte, volSize)
			if err := a.ReadAt(q, c.size); err != nil || !bytes.Equal(q, make([]byte, volSize)) {
				t.Fatalf("the range of an expansion after the crash is not zero: %v", err)
			}
		})
	}
}
