package driver

import (
	"bytes"
	"context"
	"encoding/binary"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"fcnbd/internal/api"
	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
)

// engineProgress is the engine's progress of mapping ref (the grains seeded and copied).
func (r *rig) engineProgress(ref string) (split, grains int, copied int64) {
	r.t.Helper()
	f, err := r.d.Fcmap(context.Background(), ref)
	if err != nil {
		r.t.Fatal(err)
	}
	p, err := r.d.eng.Progress(f.ID)
	if err != nil {
		r.t.Fatalf("engine progress of %s: %v", ref, err)
	}
	return p.Split, p.Grains, p.GrainsCopied + p.SplitOnWrite
}

func (r *rig) fcmap(ref string) api.Fcmap {
	r.t.Helper()
	f, err := r.d.Fcmap(context.Background(), ref)
	if err != nil {
		r.t.Fatal(err)
	}
	return f
}

// waitIdleCounting waits for ref to reach idle_or_copied while sampling the engine's count of
// grains copied into its target (background copy and copy-on-write); it returns the last count
// seen before the engine let the mapping go.
func (r *rig) waitIdleCounting(ref string) int64 {
	r.t.Helper()
	id := r.fcmap(ref).ID
	var last int64
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if p, err := r.d.eng.Progress(id); err == nil {
			last = p.GrainsCopied + p.SplitOnWrite
		}
		if r.status(ref) == "idle_or_copied" {
			return last
		}
		time.Sleep(time.Millisecond)
	}
	r.t.Fatalf("mapping %s: status %s, want idle_or_copied", ref, r.status(ref))
	return 0
}

func (r *rig) storedModel() []byte {
	r.t.Helper()
	var m []byte
	if err := r.cat.View(func(tx *catalog.Tx) error { m = tx.Model(); return nil }); err != nil {
		r.t.Fatal(err)
	}
	return m
}

func (r *rig) readAll(vol string, size int64) []byte {
	r.t.Helper()
	p, err := r.read(vol, 0, int(size))
	if err != nil {
		r.t.Fatalf("read %s: %v", vol, err)
	}
	return p
}

// TestIncrementalRestartCopiesOnlyDifferences: a 256 MiB source in 256 KiB grains, copied
// whole by the first start (the first start seeds nothing); then 1 % of the grains rewritten
// on the source and a few on the target; the restart seeds every other grain as split, so it
// copies exactly the grains written (counted distinct), lsfcmap's difference shows their share
// before it, and the target equals the source as of the restart — also after a daemon restart
// between the writes and the start (the difference record is durable).
func TestIncrementalRestartCopiesOnlyDifferences(t *testing.T) {
	const size, grain = 256 << 20, 256 << 10
	const grains = size / grain
	r := newRig(t, nil)
	ctx := context.Background()
	for _, n := range []string{"s", "t"} {
		if _, err := r.d.Create(n, size); err != nil {
			t.Fatal(err)
		}
	}
	rng := rand.New(rand.NewPCG(1, 2))
	chunk := make([]byte, 4<<20)
	for off := int64(0); off < size; off += int64(len(chunk)) {
		for i := 0; i < len(chunk); i += 8 {
			binary.LittleEndian.PutUint64(chunk[i:], uint64(off)+uint64(i)*0x9e3779b97f4a7c15)
		}
		r.write("s", off, chunk)
	}
	if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "s", Target: "t", Name: "inc", Incremental: true,
		CopyRate: ip(0), GrainSize: ip(256)}); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if err := r.d.StartFcmap(ctx, "inc", true, false); err != nil {
		t.Fatal(err)
	}
	if split, n, _ := r.engineProgress("inc"); split != 0 || n != grains {
		t.Fatalf("first start seeded %d of %d grains, want 0 of %d", split, n, grains)
	}
	want := r.readAll("s", size)
	if err := r.d.ChFcmap(ctx, "inc", api.ChFcmap{CopyRate: ip(150)}); err != nil {
		t.Fatal(err)
	}
	if copied := r.waitIdleCounting("inc"); copied > grains {
		t.Fatalf("first copy copied %d grains of %d", copied, grains)
	}
	t.Logf("first full copy of 256 MiB: %v", time.Since(t0))
	if got := r.readAll("t", size); !bytes.Equal(got, want) {
		t.Fatal("target differs from the source after the first copy")
	}

	// 1 % of the grains on the source, a few on the target (two shared with the source's).
	written := map[int]bool{}
	for len(written) < grains/100 {
		g := rng.IntN(grains)
		written[g] = true
		r.write("s", int64(g)*grain+int64(rng.IntN(grain-100)), pattern(byte(g), 100))
	}
	srcGrains := slices.Sorted(func(yield func(int) bool) {
		for g := range written {
			if !yield(g) {
				return
			}
		}
	})
	for _, g := range []int{srcGrains[0], srcGrains[1], 3, grains - 1} {
		written[g] = true
		r.write("t", int64(g)*grain+7, pattern(0xee, 4096))
	}
	// A trim on the target and a write spanning two grains on the source.
	r.vol("t").Trim(int64(grains/2)*grain, 4096)
	written[grains/2] = true
	r.write("s", 11*grain-50, pattern(0x11, 100))
	written[10], written[11] = true, true
	for _, v := range []string{"s", "t"} {
		if err := r.vol(v).Flush(); err != nil {
			t.Fatal(err)
		}
	}
	r.restart() // the record is durable and loaded again

	deadline := time.Now().Add(5 * time.Second)
	wantPct := (len(written)*100 + grains - 1) / grains
	for r.fcmap("inc").Difference != wantPct && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := r.fcmap("inc").Difference; got != wantPct {
		t.Fatalf("lsfcmap difference %d %%, want %d %% (%d of %d grains)", got, wantPct, len(written), grains)
	}
	if err := r.d.ChFcmap(ctx, "inc", api.ChFcmap{CopyRate: ip(0)}); err != nil {
		t.Fatal(err)
	}
	t1 := time.Now()
	if err := r.d.StartFcmap(ctx, "inc", true, false); err != nil {
		t.Fatal(err)
	}
	split, _, _ := r.engineProgress("inc")
	if left := grains - split; left != len(written) {
		t.Fatalf("the restart leaves %d grains to copy, want the %d distinct grains written", left, len(written))
	}
	if d := r.fcmap("inc").Difference; d != 0 {
		t.Fatalf("difference right after the start: %d %%, want 0 (reset by the start)", d)
	}
	want = r.readAll("s", size)
	if err := r.d.ChFcmap(ctx, "inc", api.ChFcmap{CopyRate: ip(150)}); err != nil {
		t.Fatal(err)
	}
	if copied := r.waitIdleCounting("inc"); copied > int64(len(written)) {
		t.Fatalf("the restart copied %d grains, more than the %d written", copied, len(written))
	}
	t.Logf("incremental restart (%d grains): %v", len(written), time.Since(t1))
	if got := r.readAll("t", size); !bytes.Equal(got, want) {
		t.Fatal("target differs from the source as of the restart")
	}
	// Writes after the restart are recorded again.
	r.write("t", 0, pattern(1, 10))
	deadline = time.Now().Add(5 * time.Second)
	for r.fcmap("inc").Difference == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if r.fcmap("inc").Difference == 0 {
		t.Fatal("a write after the restart was not recorded")
	}
}

// TestIncrementalStopCopiesEverything: a stop below 100 % leaves the record untrusted, so the
// next start copies every grain; the same for a difference bitmap that can't be read at open.
func TestIncrementalStopCopiesEverything(t *testing.T) {
	r := newRig(t, nil)
	ctx := context.Background()
	r.mkvol("s", "t")
	r.write("s", 0, pattern(7, volSize))
	if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "s", Target: "t", Name: "inc", Incremental: true,
		CopyRate: ip(150), GrainSize: ip(64)}); err != nil {
		t.Fatal(err)
	}
	if err := r.d.StartFcmap(ctx, "inc", true, false); err != nil {
		t.Fatal(err)
	}
	r.waitStatus("inc", "idle_or_copied")
	if err := r.d.ChFcmap(ctx, "inc", api.ChFcmap{CopyRate: ip(0)}); err != nil {
		t.Fatal(err)
	}
	r.write("s", 0, pattern(8, 4096))
	if err := r.d.StartFcmap(ctx, "inc", true, false); err != nil {
		t.Fatal(err)
	}
	if split, n, _ := r.engineProgress("inc"); split != n-1 {
		t.Fatalf("restart seeded %d of %d", split, n)
	}
	r.write("s", 5*64<<10, pattern(9, 4096)) // split on write: progress above 0 %, below 100
	if err := r.d.StopFcmap(ctx, "inc", true, false); err != nil {
		t.Fatal(err)
	}
	r.waitStatus("inc", "stopped")
	if err := r.d.StartFcmap(ctx, "inc", true, false); err != nil {
		t.Fatal(err)
	}
	if split, n, _ := r.engineProgress("inc"); split != 0 {
		t.Fatalf("start after a stop below 100 %% seeded %d of %d grains, want 0", split, n)
	}
	if err := r.d.ChFcmap(ctx, "inc", api.ChFcmap{CopyRate: ip(150)}); err != nil {
		t.Fatal(err)
	}
	r.waitStatus("inc", "idle_or_copied")
	r.expect("t", 0, r.readAll("s", volSize))

	// A difference bitmap whose chunk is corrupt at open: DiffLost, the next start copies all.
	r.write("s", 0, pattern(10, 4096))
	id := r.fcmap("inc").ID
	r.close()
	cat, err := catalog.Open(r.dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := cat.Update(func(tx *catalog.Tx) error {
		return tx.PutBitmapChunk(uint64(id), catalog.DifferenceBitmap, 0, []byte{1, 2, 3})
	}); err != nil {
		t.Fatal(err)
	}
	cat.Close()
	r.open()
	if f := r.fcmap("inc"); f.Difference != 100 {
		t.Fatalf("difference with an unreadable record: %d %%, want 100", f.Difference)
	}
	if err := r.d.ChFcmap(ctx, "inc", api.ChFcmap{CopyRate: ip(0)}); err != nil {
		t.Fatal(err)
	}
	if err := r.d.StartFcmap(ctx, "inc", true, false); err != nil {
		t.Fatal(err)
	}
	if split, _, _ := r.engineProgress("inc"); split != 0 {
		t.Fatalf("start after a lost record seeded %d grains, want 0", split)
	}
}

// TestRestoreThroughDriver: S → T started at t1 (no background copy, so it stays copying), S →
// U at t2, S damaged; startfcmap -prep -restore T → S. At the restore's start S reads as T
// did (t1's image plus T's own writes), T still shows t1, U still shows t2, and the grains
// that neither T nor U ever split are seeded, not copied; the same after the restore completes
// and after a daemon restart. lsvdiskfcmapcopies and lsvdiskdependentmaps answer as expected.
func TestRestoreThroughDriver(t *testing.T) {
	const g64 = 64 << 10
	r := newRig(t, nil)
	ctx := context.Background()
	r.mkvol("s", "t", "u")
	for i := range volSize / g64 {
		r.write("s", int64(i)*g64, pattern(byte(i), g64))
	}
	mk := func(name, src, tgt string, rate int) {
		t.Helper()
		if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: src, Target: tgt, Name: name, CopyRate: ip(rate), GrainSize: ip(64)}); err != nil {
			t.Fatal(err)
		}
	}
	mk("st", "s", "t", 0)
	mk("su", "s", "u", 0)
	mk("ts", "t", "s", 0)
	if err := r.d.StartFcmap(ctx, "st", true, false); err != nil {
		t.Fatal(err)
	}
	imgT := r.readAll("s", volSize)
	r.write("s", 0, pattern(0xa1, 3*g64)) // t1 → t2: grains 0-2 move into T
	r.write("t", 20*g64, pattern(0xb1, 100))
	imgT = slices.Clone(imgT)
	copy(imgT[20*g64:], pattern(0xb1, 100))
	if err := r.d.StartFcmap(ctx, "su", true, false); err != nil {
		t.Fatal(err)
	}
	imgU := r.readAll("s", volSize)
	r.write("s", g64, pattern(0xa2, 4*g64)) // damage: grains 1-4, now held by U (and T for 1-2)
	r.write("s", 40*g64+5, pattern(0xa3, 10))
	r.write("u", 50*g64, pattern(0xc1, 10)) // U's own
	copy(imgU[50*g64:], pattern(0xc1, 10))
	// Flushed, so the damage has reached S's store (a prepare drops its target's cache).
	for _, v := range []string{"s", "t", "u"} {
		if err := r.vol(v).Flush(); err != nil {
			t.Fatal(err)
		}
	}

	// The restore needs -restore while st is active.
	if err := r.d.StartFcmap(ctx, "ts", true, false); fcerr.CodeOf(err) != fcerr.NeedsRestore {
		t.Fatalf("restore without -restore: %v, want %s", err, fcerr.NeedsRestore)
	}
	if err := r.d.StartFcmap(ctx, "ts", true, true); err != nil {
		t.Fatal(err)
	}
	if f := r.fcmap("ts"); !f.Restoring || r.fcmap("st").Restoring != true {
		t.Fatalf("restoring: ts %v st %v", f.Restoring, r.fcmap("st").Restoring)
	}
	check := func(when string) {
		t.Helper()
		for _, c := range []struct {
			vol  string
			want []byte
		}{{"s", imgT}, {"t", imgT}, {"u", imgU}} {
			if got := r.readAll(c.vol, volSize); !bytes.Equal(got, c.want) {
				i := 0
				for got[i] == c.want[i] {
					i++
				}
				t.Fatalf("%s: %s differs at byte %d (grain %d)", when, c.vol, i, i/g64)
			}
		}
	}
	check("at the restore's start")
	// Held by T: 0-2, 20 (own write); by U: 1-4, 40, 50. Neither: every other grain.
	held := map[int]bool{0: true, 1: true, 2: true, 3: true, 4: true, 20: true, 40: true, 50: true}
	if split, n, _ := r.engineProgress("ts"); split != n-len(held) {
		t.Fatalf("restore seeded %d of %d grains, want %d (never split by T or U)", split, n, n-len(held))
	}
	names := func(fs []api.Fcmap) []string {
		var out []string
		for _, f := range fs {
			out = append(out, f.Name)
		}
		slices.Sort(out)
		return out
	}
	copies, err := r.d.VdiskFcmapCopies(ctx, "s")
	if err != nil || !slices.Equal(names(copies), []string{"st", "su"}) {
		t.Fatalf("lsvdiskfcmapcopies s: %v %v, want [st su]", names(copies), err)
	}
	deps, err := r.d.VdiskDependentMaps(ctx, "s")
	if err != nil || len(deps) == 0 {
		t.Fatalf("lsvdiskdependentmaps s: %v %v, want the mappings that depend on s", names(deps), err)
	}
	t.Logf("lsvdiskdependentmaps s: %v", names(deps))
	if err := r.d.ChFcmap(ctx, "ts", api.ChFcmap{CopyRate: ip(150)}); err != nil {
		t.Fatal(err)
	}
	if copied := r.waitIdleCounting("ts"); copied > int64(len(held)) {
		t.Fatalf("the restore copied %d grains, more than the %d it had to", copied, len(held))
	}
	check("after the restore completed")
	// Writes to S go on; T and U keep their points in time.
	imgS := slices.Clone(imgT)
	r.write("s", 30*g64, pattern(0xd1, 100))
	copy(imgS[30*g64:], pattern(0xd1, 100))
	check = func(when string) {
		t.Helper()
		for _, c := range []struct {
			vol  string
			want []byte
		}{{"s", imgS}, {"t", imgT}, {"u", imgU}} {
			if got := r.readAll(c.vol, volSize); !bytes.Equal(got, c.want) {
				t.Fatalf("%s: %s differs", when, c.vol)
			}
		}
	}
	check("after a write to S")
	r.restart()
	check("after a daemon restart")
}

// TestSplitThroughDriver: stopfcmap -split is refused below 100 % and with -force (nothing
// changes); at 100 % with a dependant the mapping leaves the chain at once (idle_or_copied),
// the dependant keeps its image, and the reverse mapping starts without -restore. The group
// form behaves the same.
func TestSplitThroughDriver(t *testing.T) {
	r := newRig(t, nil)
	ctx := context.Background()
	r.mkvol("s", "t", "w", "x", "xt")
	r.write("s", 0, pattern(1, volSize))
	r.write("x", 0, pattern(2, volSize))
	for _, m := range []api.MkFcmap{
		{Source: "s", Target: "t", Name: "st", CopyRate: ip(0), CleanRate: ip(0)},
		{Source: "t", Target: "w", Name: "tw", CopyRate: ip(0)},
		{Source: "t", Target: "s", Name: "ts", CopyRate: ip(150)},
		{Source: "x", Target: "xt", Name: "gx", CopyRate: ip(0), ConsistGrp: "g"},
	} {
		if m.ConsistGrp != "" {
			if _, err := r.d.MkConsistGrp(ctx, api.MkConsistGrp{Name: m.ConsistGrp}); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := r.d.MkFcmap(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.d.StartFcmap(ctx, "st", true, false); err != nil {
		t.Fatal(err)
	}
	r.write("s", 0, pattern(3, 4096)) // st: grain 0 split, far below 100 %
	if err := r.d.StartFcmap(ctx, "tw", true, false); err != nil {
		t.Fatal(err)
	}
	if err := r.d.StartConsistGrp(ctx, "g", true, false); err != nil {
		t.Fatal(err)
	}
	before, beforeModel := r.d.Fcmaps(ctx), r.storedModel()
	for _, c := range []struct {
		name string
		code string
		do   func() error
	}{
		{"-split below 100 %", fcerr.NotCopied, func() error { return r.d.StopFcmap(ctx, "st", false, true) }},
		{"-force -split", fcerr.ExclusiveFlags, func() error { return r.d.StopFcmap(ctx, "st", true, true) }},
		{"group -split below 100 %", fcerr.NotCopied, func() error { return r.d.StopConsistGrp(ctx, "g", false, true) }},
		{"group -force -split", fcerr.ExclusiveFlags, func() error { return r.d.StopConsistGrp(ctx, "g", true, true) }},
		{"reverse start without -restore", fcerr.NeedsRestore, func() error { return r.d.StartFcmap(ctx, "ts", true, false) }},
	} {
		err := c.do()
		if fcerr.CodeOf(err) != c.code {
			t.Fatalf("%s: %v, want %s", c.name, err, c.code)
		}
		if !bytes.Equal(beforeModel, r.storedModel()) {
			t.Fatalf("%s changed the catalogue's model", c.name)
		}
		after := r.d.Fcmaps(ctx)
		for i := range before {
			if before[i].Status != after[i].Status || before[i].Restoring != after[i].Restoring {
				t.Fatalf("%s changed %s: %s → %s", c.name, before[i].Name, before[i].Status, after[i].Status)
			}
		}
	}
	r.expect("t", 0, pattern(1, 4096))
	r.expect("w", 0, pattern(1, 4096))

	// Bring st to 100 %; its dependant w (clean rate 0) keeps it copying.
	if err := r.d.ChFcmap(ctx, "st", api.ChFcmap{CopyRate: ip(150)}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for r.fcmap("st").Progress < 100 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if f := r.fcmap("st"); f.Progress != 100 || f.Status != "copying" {
		t.Fatalf("st: %s %d %%, want copying at 100 %%", f.Status, f.Progress)
	}
	// lsfcmap shows the engine's progress; the model hears of it at its next progress report.
	for err := r.d.StopFcmap(ctx, "st", false, true); err != nil; err = r.d.StopFcmap(ctx, "st", false, true) {
		if fcerr.CodeOf(err) != fcerr.NotCopied || time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if s := r.status("st"); s != "idle_or_copied" {
		t.Fatalf("after -split st is %s, want idle_or_copied at once", s)
	}
	if deps, _ := r.d.VdiskDependentMaps(ctx, "s"); len(deps) != 0 {
		t.Fatalf("s still has dependent mappings after the split: %v", deps)
	}
	r.write("t", 4096, pattern(4, 4096))
	r.expect("w", 0, pattern(1, 8192))
	r.expect("t", 0, append(pattern(1, 4096), pattern(4, 4096)...))
	if err := r.d.StartFcmap(ctx, "ts", true, false); err != nil {
		t.Fatalf("reverse start after the split: %v", err)
	}
	r.expect("s", 0, append(pattern(1, 4096), pattern(4, 4096)...))
	r.expect("w", 0, pattern(1, 8192))

	// Group -split at 100 %.
	if err := r.d.ChFcmap(ctx, "gx", api.ChFcmap{CopyRate: ip(150)}); err != nil {
		t.Fatal(err)
	}
	r.waitStatus("gx", "idle_or_copied")
	if err := r.d.StopConsistGrp(ctx, "g", false, true); err != nil {
		t.Fatalf("stopfcconsistgrp -split of a finished group: %v", err)
	}
	r.expect("xt", 0, pattern(2, 4096))
}
