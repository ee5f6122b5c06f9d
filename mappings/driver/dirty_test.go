package driver

import (
	"context"
	"errors"
	"reflect"
	"syscall"
	"testing"

	"fcnbd/internal/api"
	"fcnbd/internal/blockdev"
	"fcnbd/internal/catalog"
	"fcnbd/internal/store/errorfs"
	"fcnbd/mappings"
)

// dirty returns the dirty extents of bitmap name over the whole of volume vol, as [off, end)
// pairs of its dirty runs.
func (r *rig) dirty(vol, name string) [][2]int64 {
	r.t.Helper()
	dev := r.vol(vol)
	db, ok := dev.(blockdev.DirtyBitmaps)
	if !ok {
		r.t.Fatalf("volume %s offers no dirty bitmaps", vol)
	}
	exts, err := db.DirtyExtents(name, 0, dev.Size())
	if err != nil {
		r.t.Fatalf("dirty extents of %s on %s: %v", name, vol, err)
	}
	var out [][2]int64
	var pos int64
	for _, e := range exts {
		if e.Dirty {
			out = append(out, [2]int64{pos, pos + e.Length})
		}
		pos += e.Length
	}
	if pos != dev.Size() {
		r.t.Fatalf("dirty extents cover %d bytes of %d", pos, dev.Size())
	}
	return out
}

// TestDirtyBitmaps: the driver's rule of which grains an incremental mapping's bitmap reports
// on its source and target (see dirty.go), including writes still in a volume's write-back
// cache, through a restart, and the names offered.
func TestDirtyBitmaps(t *testing.T) {
	const grain = 64 << 10
	r := newRig(t, nil)
	ctx := context.Background()
	r.mkvol("s", "t", "u")
	if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "s", Target: "t", Name: "inc", Incremental: true,
		CopyRate: ip(150), GrainSize: ip(64)}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "s", Target: "u", Name: "plain", CopyRate: ip(0)}); err != nil {
		t.Fatal(err)
	}
	for vol, want := range map[string][]string{"s": {"inc"}, "t": {"inc"}, "u": nil} {
		if got := r.vol(vol).(blockdev.DirtyBitmaps).DirtyBitmapNames(); !reflect.DeepEqual(got, want) {
			t.Errorf("bitmaps of %s: %v, want %v", vol, got, want)
		}
	}
	all := [][2]int64{{0, volSize}}
	check := func(vol string, want [][2]int64, why string) {
		t.Helper()
		if got := r.dirty(vol, "inc"); !reflect.DeepEqual(got, want) {
			t.Errorf("%s: %s reports %v, want %v", why, vol, got, want)
		}
	}
	check("s", all, "never started")
	check("t", all, "never started")
	if err := r.d.StartFcmap(ctx, "inc", true, false); err != nil {
		t.Fatal(err)
	}
	r.waitStatus("inc", "idle_or_copied")
	check("s", nil, "after the first start")
	check("t", all, "the first start copied everything")

	// A write that stays in the source's write-back cache is dirty at once.
	c, err := r.d.Cache("s")
	if err != nil {
		t.Fatal(err)
	}
	c.PauseDestage()
	r.write("s", 3*grain+5, pattern(1, 10))
	r.write("t", 7*grain, pattern(2, grain+1)) // two grains
	g3, g78 := [2]int64{3 * grain, 4 * grain}, [2]int64{7 * grain, 9 * grain}
	check("s", [][2]int64{g3, g78}, "cached source and target writes")
	c.ResumeDestage()

	if err := r.d.StartFcmap(ctx, "inc", true, false); err != nil {
		t.Fatal(err)
	}
	check("s", nil, "after the second start")
	check("t", [][2]int64{g3, g78}, "the second start recopied the difference")
	// Since the start, the source's writes leave the target's image as it is; the target's own
	// writes (still in its cache) change it.
	c.PauseDestage()
	r.write("s", 20*grain, pattern(3, 1))
	g20 := [2]int64{20 * grain, 21 * grain}
	check("s", [][2]int64{g20}, "a source write after the start")
	check("t", [][2]int64{g3, g78}, "a source write after the start")
	tc, err := r.d.Cache("t")
	if err != nil {
		t.Fatal(err)
	}
	tc.PauseDestage()
	if err := r.vol("t").Trim(30*grain-1, 2); err != nil {
		t.Fatal(err)
	}
	g2930 := [2]int64{29 * grain, 31 * grain}
	check("t", [][2]int64{g3, g78, g2930}, "a target trim after the start")
	check("s", [][2]int64{g20, g2930}, "a target trim after the start")
	tc.ResumeDestage()
	c.ResumeDestage()
	r.waitStatus("inc", "idle_or_copied")

	// After a restart the target's own writes are no longer told from the source's: the
	// target reports the live difference in their place.
	r.restart()
	check("s", [][2]int64{g20, g2930}, "after a restart")
	check("t", [][2]int64{g3, g78, g20, g2930}, "after a restart")

	nightly := "nightly"
	if err := r.d.ChFcmap(ctx, "inc", api.ChFcmap{Name: &nightly}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.vol("t").(blockdev.DirtyBitmaps).DirtyExtents("inc", 0, grain); !errors.Is(err, syscall.ENOENT) {
		t.Errorf("the old name after a rename: %v, want ENOENT", err)
	}
	if got := r.dirty("t", "nightly"); !reflect.DeepEqual(got, [][2]int64{g3, g78, g20, g2930}) {
		t.Errorf("renamed: %v", got)
	}
	if _, err := r.vol("u").(blockdev.DirtyBitmaps).DirtyExtents("plain", 0, grain); !errors.Is(err, syscall.ENOENT) {
		t.Errorf("a plain mapping's bitmap: %v, want ENOENT", err)
	}

	// A difference record unreadable at open: every grain is dirty, also once the record
	// reads again, until the next start.
	id := r.fcmap("nightly").ID
	corrupt := func(chunk []byte) {
		t.Helper()
		r.close()
		cat, err := catalog.Open(r.dir)
		if err != nil {
			t.Fatal(err)
		}
		if err := cat.Update(func(tx *catalog.Tx) error {
			return tx.PutBitmapChunk(uint64(id), catalog.DifferenceBitmap, 0, chunk)
		}); err != nil {
			t.Fatal(err)
		}
		cat.Close()
		r.open()
	}
	corrupt([]byte{1, 2, 3})
	for _, v := range []string{"s", "t"} {
		if got := r.dirty(v, "nightly"); !reflect.DeepEqual(got, all) {
			t.Errorf("difference lost: %s reports %v, want all", v, got)
		}
	}
	corrupt(make([]byte, chunkBits/8))
	for _, v := range []string{"s", "t"} {
		if got := r.dirty(v, "nightly"); !reflect.DeepEqual(got, all) {
			t.Errorf("difference readable again: %s reports %v, want all", v, got)
		}
	}
	if err := r.d.StartFcmap(ctx, "nightly", true, false); err != nil {
		t.Fatal(err)
	}
	check = func(vol string, want [][2]int64, why string) {
		t.Helper()
		if got := r.dirty(vol, "nightly"); !reflect.DeepEqual(got, want) {
			t.Errorf("%s: %s reports %v, want %v", why, vol, got, want)
		}
	}
	check("s", nil, "the start after the loss")
	check("t", all, "the start after the loss copies everything")
}

// TestDirtyBitmapFailedStartCommit: a start whose commit fails leaves the target without its
// own record of writes (which the start had replaced with an empty one), so the target's
// bitmap falls back to the live difference and keeps the writes since the previous start.
func TestDirtyBitmapFailedStartCommit(t *testing.T) {
	const grain = 64 << 10
	fr := newFaultRig(t, errorfs.NewSwitch(errorfs.OnOp(errorfs.OpWrite)), nil)
	r := fr.rig
	ctx := context.Background()
	r.mkvol("s", "t")
	if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "s", Target: "t", Name: "inc", Incremental: true,
		CopyRate: ip(150), GrainSize: ip(64)}); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := r.d.StartFcmap(ctx, "inc", true, false); err != nil {
			t.Fatal(err)
		}
		r.waitStatus("inc", "idle_or_copied")
	}
	r.write("t", 9*grain, pattern(1, 1))
	g9 := [][2]int64{{9 * grain, 10 * grain}}
	if got := r.dirty("t", "inc"); !reflect.DeepEqual(got, g9) {
		t.Fatalf("target write: %v, want %v", got, g9)
	}
	tid := mappings.VolumeID(r.fcmap("inc").TargetID)
	if tw := r.d.stackOf(tid).tw.Load(); tw == nil || !tw.bm.Test(9) {
		t.Fatalf("the target's own record of writes: %+v", tw)
	}
	if err := r.d.PrestartFcmap(ctx, "inc", false); err != nil {
		t.Fatal(err)
	}
	r.waitStatus("inc", "prepared")
	fr.metaDown.Store(true)
	if err := r.d.StartFcmap(ctx, "inc", false, false); err == nil {
		t.Fatal("start with the catalogue down succeeded")
	} else {
		t.Logf("start: %v", err)
	}
	if tw := r.d.stackOf(tid).tw.Load(); tw != nil {
		t.Fatalf("after a failed start commit the target keeps a record of writes: %+v (grain 9: %v)", tw, tw.bm.Test(9))
	}
	fr.metaDown.Store(false)
}
