package driver

import (
	"errors"
	"math"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"fcnbd/internal/api"
	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
	"fcnbd/internal/store"
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
