package mappings

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

func wantIDs[T comparable](t *testing.T, what string, got []T, want ...T) {
	t.Helper()
	if len(got) == 0 && len(want) == 0 {
		return
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("%s = %v, want %v", what, got, want)
	}
}

// TestMultiTargetChain: start T1, T2, T3 from S gives S←T3←T2←T1; stopping T2 relinks T1 under T3.
func TestMultiTargetChain(t *testing.T) {
	f := newFx(t, 4) // S = v0, T1..T3 = v1..v3
	m1, m2, m3 := f.mk(0, 1), f.mk(0, 2), f.mk(0, 3)
	f.start(m1)
	wantEffects(t, f.start(m2), "CommitStart g0 m1(v0->v2) [v1 via v2 v2 via v0]", "Release [v0]",
		"SetOnline v2 on", "SetWriteThrough v0 off", "StartBackgroundCopy m1 rate 50")
	f.start(m3)
	wantIDs(t, "Chain(S)", f.m.Chain(0), 3, 2, 1)
	for v, want := range map[VolumeID]VolumeID{3: 0, 2: 3, 1: 2} {
		if up, ok := f.m.Upstream(v); !ok || up != want {
			t.Errorf("Upstream(v%d) = v%d, %v; want v%d", v, up, ok, want)
		}
	}
	if _, ok := f.m.Upstream(0); ok {
		t.Errorf("the source has an upstream")
	}
	wantIDs(t, "Downstream(S)", f.m.Downstream(0), 3)
	wantIDs(t, "Downstream(T3)", f.m.Downstream(3), 2)
	wantIDs(t, "DependentMappings(m3)", f.m.DependentMappings(m3), m2)
	wantIDs(t, "DependentMappings(m2)", f.m.DependentMappings(m2), m1)
	wantIDs(t, "DependentMappings(m1)", f.m.DependentMappings(m1))
	wantIDs(t, "LsVdiskDependentMaps(S)", f.m.LsVdiskDependentMaps(0), m1, m2, m3)
	wantIDs(t, "LsVdiskDependentMaps(T2)", f.m.LsVdiskDependentMaps(2), m1)
	wantIDs(t, "ConnectedSet(m1)", f.m.ConnectedSet(m1), m1, m2, m3)
	if info, _ := f.m.MappingInfo(m3); info.DependentMappings != 1 {
		t.Errorf("dependent_mappings of m3 = %d, want 1", info.DependentMappings)
	}

	// Stop T2: it stays in the chain while stopping (cleaning), then leaves it.
	f.apply(SplitProgress{Map: m2, Split: 1})
	wantEffects(t, f.ok(f.m.Stop(ref(m2), false, false)), "Persist", "SetOnline v2 off", "StopWorkers m1", "StartCleaning m1 rate 50")
	wantIDs(t, "Chain(S) while T2 stops", f.m.Chain(0), 3, 2, 1)
	wantEffects(t, f.apply(CleanComplete{Map: m2}), "Persist", "StopWorkers m1", "Relink [v1 via v3 v2 via none]")
	wantIDs(t, "Chain(S) after", f.m.Chain(0), 3, 1)
	f.wantState(m2, Stopped)
	wantIDs(t, "DependentMappings(m3)", f.m.DependentMappings(m3), m1)

	// Restarting T2 puts it directly under S again.
	f.start(m2)
	wantIDs(t, "Chain(S) after restart", f.m.Chain(0), 2, 3, 1)

	// The oldest completes as soon as it is copied; the newest must clean first.
	wantEffects(t, f.apply(CopyComplete{Map: m1}), "Persist", "StopWorkers m0", "Relink [v1 via none]")
	f.wantState(m1, IdleOrCopied)
	wantEffects(t, f.apply(CopyComplete{Map: m2}), "Persist", "StartCleaning m1 rate 50")
	f.wantState(m2, Copying)
	// Once its dependant completes, a copied mapping completes without waiting for cleaning.
	wantEffects(t, f.apply(CopyComplete{Map: m3}), "Persist", "StopWorkers m2", "StopWorkers m1",
		"Relink [v2 via none v3 via none]")
	f.wantState(m2, IdleOrCopied)
	f.wantState(m3, IdleOrCopied)
	wantIDs(t, "LsVdiskFcMapCopies(S)", f.m.LsVdiskFcMapCopies(0), m1, m2, m3)
}

// TestCascade: S→T then T→U; U reads through T; stopping S→T -force stops T→U too.
func TestCascade(t *testing.T) {
	f := newFx(t, 3)
	st, tu := f.mk(0, 1), f.mk(1, 2)
	f.start(st)
	f.start(tu)
	if up, _ := f.m.Upstream(2); up != 1 {
		t.Errorf("Upstream(U) = v%d, want v1", up)
	}
	wantIDs(t, "DependentMappings(S→T)", f.m.DependentMappings(st), tu)
	wantIDs(t, "LsVdiskDependentMaps(S)", f.m.LsVdiskDependentMaps(0), st, tu)
	wantEffects(t, f.ok(f.m.Stop(ref(st), true, false)), "Persist", "SetOnline v1 off", "SetOnline v2 off",
		"StopWorkers m0", "StopWorkers m1", "Relink [v1 via none v2 via none]")
	f.wantState(st, Stopped)
	f.wantState(tu, Stopped)
}

// TestIOErrorStopsDependants: an I/O error stops the mapping and what reads through its target.
func TestIOErrorStopsDependants(t *testing.T) {
	f := newFx(t, 3)
	older, newer := f.mk(0, 2), f.mk(0, 1)
	f.start(older)
	f.start(newer)
	wantEffects(t, f.apply(IOError{Map: newer}), "Persist", "SetOnline v1 off", "SetOnline v2 off",
		"StopWorkers m1", "StopWorkers m0", "Relink [v1 via none v2 via none]")
	f.wantState(older, Stopped)
}

func TestGroup(t *testing.T) {
	f := newFx(t, 4)
	g := f.group(false)
	a, b := f.mk(0, 1, inGroup(g)), f.mk(2, 3, inGroup(g))
	if st := f.m.GroupStatus(g); st != IdleOrCopied {
		t.Errorf("status %s", st)
	}
	wantEffects(t, f.ok(f.m.StartGroup(ref(g), true, false)), "Persist", "SetOnline v1 off", "SetOnline v3 off",
		"SetWriteThrough v0 on", "SetWriteThrough v2 on", "InvalidateCache v1", "InvalidateCache v3",
		"FlushSource m0 v0", "FlushSource m1 v2")
	wantEffects(t, f.apply(FlushDone{Map: a}), "Persist")
	if st := f.m.GroupStatus(g); st != Preparing {
		t.Errorf("status %s while one member still prepares", st)
	}
	effs := f.apply(FlushDone{Map: b})
	wantEffects(t, effs, "Persist", "Hold g1 [m0 m1] [v0 v2]")
	wantEffects(t, f.apply(FenceDrained{Fence: f.holdOf(effs), Now: t0}),
		"CommitStart g1 m0(v0->v1) m1(v2->v3) [v1 via v0 v3 via v2]", "Release [v0 v2]",
		"SetOnline v1 on", "SetOnline v3 on", "SetWriteThrough v0 off", "SetWriteThrough v2 off",
		"StartBackgroundCopy m0 rate 50", "StartBackgroundCopy m1 rate 50")
	if gi, _ := f.m.GroupInfo(g); gi.Status != Copying || !gi.StartTime.Equal(t0) || !reflect.DeepEqual(gi.Members, []MappingID{a, b}) {
		t.Errorf("group info %+v", gi)
	}
	// One member stopped by an I/O error: the group shows stopped; stopping the group stops
	// the rest.
	f.apply(IOError{Map: a})
	if st := f.m.GroupStatus(g); st != Stopped {
		t.Errorf("status %s after a member's I/O error", st)
	}
	wantEffects(t, f.ok(f.m.StopGroup(ref(g), false, false)), "Persist", "SetOnline v3 off", "StopWorkers m1", "StartCleaning m1 rate 50")
	f.apply(CleanComplete{Map: b})
	f.wantState(b, Stopped)

	// rmfcconsistgrp -force makes the members stand-alone and keeps them.
	wantEffects(t, f.ok(f.m.RmConsistGrp(ref(g), true)), "Persist")
	if len(f.m.Groups) != 0 || f.m.Mappings[a].Group != 0 || f.m.Mappings[b].Group != 0 {
		t.Errorf("rmfcconsistgrp -force: groups %v, members %d %d", f.m.Groups, f.m.Mappings[a].Group, f.m.Mappings[b].Group)
	}
}

func TestGroupFlushFailedStopsAll(t *testing.T) {
	f := newFx(t, 4)
	g := f.group(false)
	a, b := f.mk(0, 1, inGroup(g)), f.mk(2, 3, inGroup(g))
	f.ok(f.m.StartGroup(ref(g), true, false))
	f.apply(FlushDone{Map: a})
	wantEffects(t, f.apply(FlushFailed{Map: b}), "Persist", "SetWriteThrough v0 off", "SetWriteThrough v2 off")
	f.wantState(a, Stopped)
	f.wantState(b, Stopped)
}

func TestFenceAbandonedWhenAMemberStops(t *testing.T) {
	f := newFx(t, 2)
	id := prepared(f)
	fence := f.holdOf(f.ok(f.m.Start(ref(id), false, false)))
	f.ok(f.m.Stop(ref(id), false, false))
	wantEffects(t, f.apply(FenceDrained{Fence: fence, Now: t0}), "Release [v0]")
	f.wantState(id, Stopped)
}

func TestAutodeleteGroup(t *testing.T) {
	f := newFx(t, 3)
	g := f.group(true)
	a := f.mk(0, 1, inGroup(g), autodelete)
	b := f.mk(0, 2, inGroup(g))
	f.ok(f.m.RmFcmap(ref(b), false))
	if f.m.Groups[g] == nil {
		t.Fatal("group deleted while a member is left")
	}
	f.startGroup(g)
	wantEffects(t, f.apply(CopyComplete{Map: a}), "Persist", "StopWorkers m0", "Relink [v1 via none]", "DropMapping m0")
	if len(f.m.Groups) != 0 || len(f.m.Mappings) != 0 {
		t.Errorf("left: groups %v mappings %v", f.m.Groups, f.m.Mappings)
	}
	// Leaving by chfcmap deletes an autodelete group too.
	g2 := f.group(true)
	c := f.mk(0, 1, inGroup(g2))
	f.ok(f.m.ChFcmap(ref(c), ChFcmapArgs{Group: new("0")}))
	if f.m.Groups[g2] != nil {
		t.Errorf("autodelete group kept after its last member left")
	}
}

func TestIncremental(t *testing.T) {
	f := newFx(t, 2)
	id := f.mk(0, 1, incremental)
	info, _ := f.m.MappingInfo(id)
	if info.Difference != 100 || !info.Incremental {
		t.Errorf("new incremental: %+v", info)
	}
	wantEffects(t, f.start(id)[:1], "CommitStart g0 m0(v0->v1 reset-diff) [v1 via v0]")
	f.apply(CopyComplete{Map: id})
	f.apply(DiffCount{Map: id, Grains: 1})
	if info, _ = f.m.MappingInfo(id); info.Difference != 25 {
		t.Errorf("difference %d, want 25", info.Difference)
	}
	wantEffects(t, f.start(id)[:1], "CommitStart g0 m0(v0->v1 diff reset-diff) [v1 via v0]")
	if p := f.m.Mappings[id].Progress(); p != 75 {
		t.Errorf("restart progress %d, want 75 (only the differing grain to copy)", p)
	}
	// Stopped below 100 %: the next start copies everything.
	f.ok(f.m.Stop(ref(id), true, false))
	if info, _ = f.m.MappingInfo(id); info.Difference != 100 {
		t.Errorf("difference after a cut-short copy %d, want 100", info.Difference)
	}
	wantEffects(t, f.start(id)[:1], "CommitStart g0 m0(v0->v1 reset-diff) [v1 via v0]")
	f.apply(CopyComplete{Map: id})
	// A stop from prepared keeps the record; a lost record is not trusted.
	f.prepare(id)
	f.ok(f.m.Stop(ref(id), false, false))
	if !f.m.Mappings[id].DiffTrusted {
		t.Errorf("stop from prepared dropped the difference record")
	}
	f.apply(DiffLost{Map: id})
	wantEffects(t, f.start(id)[:1], "CommitStart g0 m0(v0->v1 reset-diff) [v1 via v0]")
}

func TestRestore(t *testing.T) {
	f := newFx(t, 3)
	m := copyingHalf(f) // S=v0 -> T=v1, 2 of 4 grains split
	r := f.mk(1, 0)
	wantEffects(t, f.ok(f.m.Prestart(ref(r), true)), "Persist", "SetOnline v0 off", "SetWriteThrough v1 on", "InvalidateCache v0", "FlushSource m1 v1")
	for _, id := range []MappingID{m, r} {
		info, _ := f.m.MappingInfo(id)
		if !info.Restoring || info.Partner != m+r-id {
			t.Errorf("m%d: restoring %v partner %d", id, info.Restoring, info.Partner)
		}
	}
	f.apply(FlushDone{Map: r})
	effs := f.apply(FenceDrained{Fence: f.holdOf(f.ok(f.m.Start(ref(r), false, false))), Now: t0})
	wantEffects(t, effs[:1], "CommitStart g0 m1(v1->v0 restore-of m0) [v0 via v1]")
	// The grains needing no copy are the data path's to count (another target of the source
	// may hold some that m0 never split): the model never counts more than it reports.
	if p := f.m.Mappings[r].Progress(); p != 0 {
		t.Errorf("restore starts at %d %% in the model before any report, want 0", p)
	}
	f.apply(SplitProgress{Map: r, Split: 2})
	if p := f.m.Mappings[r].Progress(); p != 50 {
		t.Errorf("restore at %d %% after the report, want 50 (grains m0 never split)", p)
	}
	wantIDs(t, "DependentMappings(m)", f.m.DependentMappings(m))
	wantIDs(t, "DependentMappings(r)", f.m.DependentMappings(r))
	f.apply(CopyComplete{Map: r})
	f.wantState(r, IdleOrCopied)
	if info, _ := f.m.MappingInfo(m); info.Restoring {
		t.Errorf("still restoring after the restore completed")
	}
}

// TestSplitLetsStartWithoutRestore: stopfcmap -split on a finished mapping lets the reverse
// mapping start without -restore.
func TestSplitLetsStartWithoutRestore(t *testing.T) {
	f := newFx(t, 3)
	m := f.mk(0, 1)
	f.start(m)
	f.start(f.mk(1, 2)) // a cascade reads through v1
	f.apply(CopyComplete{Map: m})
	f.wantState(m, Copying) // at 100 %, cleaning for its dependant
	r := f.mk(1, 0)
	_, err := f.m.Prestart(ref(r), false)
	wantCode(t, err, "CMMVC6298E")
	f.ok(f.m.Stop(ref(m), false, true))
	f.ok(f.m.Prestart(ref(r), false))
}

func TestVolumeAccess(t *testing.T) {
	type acc struct{ srcOn, srcWT, tgtOn bool }
	tests := []struct {
		name  string
		setup func(*fx) MappingID
		want  acc
	}{
		{"idle_or_copied", idle, acc{true, false, true}},
		{"preparing", preparing, acc{true, true, false}},
		{"prepared", prepared, acc{true, true, false}},
		{"copying", copying, acc{true, false, true}},
		{"stopping below 100", stopping, acc{true, false, false}},
		{"stopping at 100", func(f *fx) MappingID {
			id := copiedWithDependant(f)
			f.ok(f.m.Stop(ref(id), false, false))
			return id
		}, acc{true, false, true}},
		{"stopped", stopped, acc{true, false, false}},
		{"suspended", suspendedCopying, acc{false, false, false}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFx(t, 3)
			id := tc.setup(f)
			mp := f.m.Mappings[id]
			var got acc
			got.srcOn, got.srcWT = f.m.VolumeAccess(mp.Source)
			got.tgtOn, _ = f.m.VolumeAccess(mp.Target)
			if got != tc.want {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestRemoveVolumeForce(t *testing.T) {
	f := newFx(t, 3)
	a := f.mk(0, 1)
	f.start(a)
	f.mk(2, 0)
	// The target is stopped, then its mapping deleted: online before and after.
	wantEffects(t, f.ok(f.m.RemoveVolume("vol0", true)), "Persist", "StopWorkers m0",
		"Relink [v1 via none]", "DropMapping m0", "DropMapping m1")
	if len(f.m.Mappings) != 0 || f.m.Volumes[0] != nil {
		t.Errorf("left: %v %v", f.m.Mappings, f.m.Volumes)
	}
}

func TestNames(t *testing.T) {
	for name, ok := range map[string]bool{
		"a": true, "_x": true, "vol-1.b_2": true, "A" + string(make([]byte, 0)): true,
		"": false, "1a": false, "-a": false, ".a": false, "a b": false, "a/b": false, "NaN": false,
		"inf": false, "ünï": false,
	} {
		if err := CheckName(name); (err == nil) != ok {
			t.Errorf("CheckName(%q) = %v, want ok=%v", name, err, ok)
		}
	}
	f := newFx(t, 4)
	f.mk(0, 1, func(a *MkFcmapArgs) { a.Name = "fcmap1" }) // id 0, takes id 1's default name
	id := f.mk(0, 2)
	if mp := f.m.Mappings[id]; id != 2 || mp.Name != "fcmap2" {
		t.Errorf("default name: id %d name %q", id, mp.Name)
	}
	if got, err := f.m.ResolveMapping("fcmap1"); err != nil || got != 0 {
		t.Errorf("resolve by name: %d %v", got, err)
	}
	if got, err := f.m.ResolveMapping("2"); err != nil || got != 2 {
		t.Errorf("resolve by id: %d %v", got, err)
	}
}

// TestJSONRoundTrip: the catalogue survives marshal/unmarshal unchanged in every state.
func TestJSONRoundTrip(t *testing.T) {
	f := newFx(t, 8)
	g := f.group(true)
	f.mk(0, 1, inGroup(g), incremental)
	st := f.mk(2, 3, copyRate(0))
	f.start(st)
	f.apply(SplitProgress{Map: st, Split: 1})
	f.ok(f.m.Stop(ref(st), false, false))
	su := f.mk(4, 5)
	f.start(su)
	f.apply(BitmapOffline{Map: su})
	f.prepare(f.mk(6, 7))
	b, err := json.Marshal(f.m)
	if err != nil {
		t.Fatal(err)
	}
	var back Model
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(f.m, &back) {
		t.Errorf("round trip differs:\n%s", b)
	}
	empty := New()
	b, _ = json.Marshal(empty)
	var back2 Model
	if err := json.Unmarshal(b, &back2); err != nil || !reflect.DeepEqual(empty, &back2) {
		t.Errorf("empty model round trip: %v", err)
	}
}

// TestReopen: the effects that rebuild the data path from a loaded catalogue.
func TestReopen(t *testing.T) {
	f := newFx(t, 4)
	a := f.mk(0, 1)
	f.start(a)
	f.apply(SplitProgress{Map: a, Split: 2})
	b := f.mk(2, 3)
	f.ok(f.m.Prestart(ref(b), false))
	before := f.m.Clone()
	wantEffects(t, f.m.Reopen(), "SetOnline v3 off", "SetWriteThrough v2 on", "Relink [v1 via v0]",
		"InvalidateCache v3", "StartBackgroundCopy m0 rate 50", "FlushSource m1 v2")
	if !reflect.DeepEqual(before, f.m) {
		t.Errorf("Reopen changed the model")
	}
}

// TestStopDistrustsNeighbours: a mapping stopped below 100 % leaves its target with whatever
// its store holds, so an incremental mapping with that volume as source or target no longer
// trusts its difference record; one on other volumes still does.
func TestStopDistrustsNeighbours(t *testing.T) {
	f := newFx(t, 6)
	inc := f.mk(0, 1, incremental) // v0 -> v1
	far := f.mk(4, 5, incremental)
	for _, id := range []MappingID{inc, far} {
		f.start(id)
		f.apply(CopyComplete{Map: id})
	}
	x := f.mk(2, 0, copyRate(0)) // onto inc's source
	f.start(x)
	f.ok(f.m.Stop(ref(x), true, false))
	f.wantState(x, Stopped)
	if f.m.Mappings[inc].DiffTrusted {
		t.Errorf("m%d still trusts its difference record after its source was left stopped", inc)
	}
	if !f.m.Mappings[far].DiffTrusted {
		t.Errorf("m%d lost its difference record for a stop elsewhere", far)
	}
}

// TestRestoreFailed: a mapping whose chain can't be restored at daemon start is stopped with the
// reason in its lsfcmap view, like an I/O error: every mapping that read through its target is
// stopped too (naming it), one at 100 % ends idle_or_copied, one elsewhere is untouched; the
// reason survives the catalogue and goes with the next prepare. The event is stale for a
// mapping that is not in a chain.
func TestRestoreFailed(t *testing.T) {
	f := newFx(t, 6)
	older, done, lost, other := f.mk(0, 1), f.mk(0, 2), f.mk(0, 3), f.mk(4, 5)
	for _, id := range []MappingID{older, done, lost, other} {
		f.start(id)
	}
	f.apply(SplitProgress{Map: done, Split: fullSplit}) // at 100 % but older reads through it
	f.wantState(done, Copying)

	f.apply(RestoreFailed{Map: lost, Reason: "split bitmap unreadable"})
	f.wantState(lost, Stopped)
	f.wantState(done, IdleOrCopied)
	f.wantState(older, Stopped)
	f.wantState(other, Copying)
	info, _ := f.m.MappingInfo(lost)
	if want := "its state could not be restored at daemon start: split bitmap unreadable"; info.StatusReason != want {
		t.Errorf("status_reason of the lost mapping = %q, want %q", info.StatusReason, want)
	}
	info, _ = f.m.MappingInfo(older)
	if !strings.Contains(info.StatusReason, "fcmap2") || !strings.Contains(info.StatusReason, "could not be restored") {
		t.Errorf("status_reason of a dependant = %q, want it to name fcmap2", info.StatusReason)
	}
	for _, id := range []MappingID{done, other} {
		if info, _ := f.m.MappingInfo(id); info.StatusReason != "" {
			t.Errorf("status_reason of m%d = %q, want none", id, info.StatusReason)
		}
	}
	if online, _ := f.m.VolumeAccess(3); online {
		t.Error("the lost mapping's target is online")
	}

	var back Model
	if err := json.Unmarshal(f.m.durable(), &back); err != nil {
		t.Fatal(err)
	}
	if back.Mappings[lost].StatusReason != f.m.Mappings[lost].StatusReason {
		t.Errorf("status_reason after the catalogue: %q", back.Mappings[lost].StatusReason)
	}
	if _, err := f.m.Apply(RestoreFailed{Map: lost, Reason: "again"}); err == nil {
		t.Error("RestoreFailed of a stopped mapping was applied")
	}
	f.ok(f.m.Prestart(ref(lost), false))
	if info, _ := f.m.MappingInfo(lost); info.StatusReason != "" {
		t.Errorf("status_reason after prepare = %q", info.StatusReason)
	}
}
