package mappings

import (
	"fmt"
	"reflect"
	"testing"

	"fcnbd/internal/fcerr"
)

// fill adds n stand-alone mappings straight into the model (fast set-up for the limits), each
// from src (or a fresh volume if src is NoVolume) to a fresh volume, in group g.
func (f *fx) fill(n int, src VolumeID, g GroupID) {
	for i := 0; i < n; i++ {
		s := src
		if s == NoVolume {
			s = f.vol()
		}
		t := f.vol()
		id := f.m.NextMapping
		f.m.NextMapping++
		f.m.Mappings[id] = &Mapping{ID: id, Name: fmt.Sprintf("fcmap%d", id), Source: s, Target: t, Group: g,
			State: IdleOrCopied, CopyRate: 50, CleanRate: 50, GrainKiB: 256, Grains: fullSplit}
	}
}

func (f *fx) vol() VolumeID {
	id := f.m.NextVolume
	f.m.NextVolume++
	f.m.Volumes[id] = &Volume{ID: id, Name: fmt.Sprintf("vol%d", id), Size: mib}
	return id
}

// TestRefusals has one row per refusal of docs/flashcopy.md §4: each asserts the code and that
// the refused command changed nothing.
func TestRefusals(t *testing.T) {
	mkArgs := func(s, t string) MkFcmapArgs { return MkFcmapArgs{Source: s, Target: t} }
	mkErr := func(a MkFcmapArgs) func(*fx) error {
		return func(f *fx) error { _, _, err := f.m.MkFcmap(a); return err }
	}
	tests := []struct {
		name  string
		setup func(*fx)
		act   func(*fx) error
		code  string
	}{
		{"sizes differ", func(f *fx) {
			f.m.Volumes[2].Size = 2 * mib
		}, mkErr(mkArgs("vol0", "vol2")), fcerr.SizeMismatch},
		{"same volume", nil, mkErr(mkArgs("vol0", "0")), fcerr.SameVolume},
		{"identical mapping exists", func(f *fx) { f.mk(0, 1) }, mkErr(mkArgs("vol0", "vol1")), fcerr.DuplicateMapping},
		{"target already a target", func(f *fx) { f.mk(0, 1) }, mkErr(mkArgs("vol2", "vol1")), fcerr.TargetInUse},
		{"source has 256 mappings", func(f *fx) { f.fill(256, 0, 0) }, mkErr(mkArgs("vol0", "vol1")), fcerr.TooManyMappings},
		{"connected set over 256", func(f *fx) {
			// vol3 -> vol4 -> … a cascade of 256 mappings, then one more at its end.
			prev := f.vol()
			for i := 0; i < MaxConnectedSet; i++ {
				f.fill(1, prev, 0)
				prev = f.m.NextVolume - 1
			}
		}, func(f *fx) error {
			_, _, err := f.m.MkFcmap(mkArgs(ref(f.m.NextVolume-1), "vol1"))
			return err
		}, fcerr.TooManyMappings},
		{"group has 512 mappings", func(f *fx) {
			g := f.group(false)
			f.fill(MaxMappingsPerGroup, NoVolume, g)
		}, mkErr(MkFcmapArgs{Source: "vol0", Target: "vol1", Group: "1"}), fcerr.TooManyMappings},
		{"unknown volume id", nil, mkErr(mkArgs("vol0", "77")), fcerr.NoSuchObject},
		{"unknown volume name", nil, mkErr(mkArgs("nosuch", "vol1")), fcerr.NoSuchName},
		{"unknown mapping", nil, func(f *fx) error { _, err := f.m.Prestart("5", false); return err }, fcerr.NoSuchObject},
		{"unknown group", func(f *fx) { f.mk(0, 1) }, mkErr(MkFcmapArgs{Source: "vol0", Target: "vol2", Group: "grp"}), fcerr.NoSuchName},
		{"bad name: starts with a digit", nil, mkErr(MkFcmapArgs{Source: "vol0", Target: "vol1", Name: "1st"}), fcerr.BadName},
		{"bad name: a number", nil, func(f *fx) error { _, _, err := f.m.MkConsistGrp("Inf", false); return err }, fcerr.BadName},
		{"bad name: space", nil, func(f *fx) error { _, _, err := f.m.AddVolume("my vol", mib); return err }, fcerr.BadName},
		{"bad name: 64 characters", nil, mkErr(MkFcmapArgs{Source: "vol0", Target: "vol1", Name: "a" + fmt.Sprintf("%063d", 0)}), fcerr.BadName},
		{"name in use (mapping)", func(f *fx) { f.mk(0, 1) }, mkErr(MkFcmapArgs{Source: "vol0", Target: "vol2", Name: "fcmap0"}), fcerr.NameInUse},
		{"name in use (chfcmap)", func(f *fx) { f.mk(0, 1); f.mk(0, 2) }, func(f *fx) error {
			_, err := f.m.ChFcmap("1", ChFcmapArgs{Name: new("fcmap0"), CopyRate: new(10)})
			return err
		}, fcerr.NameInUse},
		{"name in use (group)", func(f *fx) { f.group(false) }, func(f *fx) error { _, _, err := f.m.MkConsistGrp("fccstgrp1", false); return err }, fcerr.NameInUse},
		{"missing target", nil, mkErr(MkFcmapArgs{Source: "vol0"}), fcerr.MissingParameter},
		{"chfcmap without attributes", func(f *fx) { f.mk(0, 1) }, func(f *fx) error { _, err := f.m.ChFcmap("0", ChFcmapArgs{}); return err }, fcerr.MissingParameter},
		{"-force with -split", func(f *fx) { copiedWithDependant(f) }, func(f *fx) error { _, err := f.m.Stop("1", true, true); return err }, fcerr.ExclusiveFlags},
		{"-force with -split on a group", func(f *fx) { g := f.group(false); f.mk(0, 1, inGroup(g)) }, func(f *fx) error { _, err := f.m.StopGroup("1", true, true); return err }, fcerr.ExclusiveFlags},
		{"bad copy rate", nil, mkErr(MkFcmapArgs{Source: "vol0", Target: "vol1", CopyRate: new(151)}), fcerr.BadValue},
		{"bad clean rate", func(f *fx) { f.mk(0, 1) }, func(f *fx) error { _, err := f.m.ChFcmap("0", ChFcmapArgs{CleanRate: new(-1)}); return err }, fcerr.BadValue},
		{"bad grain size", nil, mkErr(MkFcmapArgs{Source: "vol0", Target: "vol1", GrainKiB: new(128)}), fcerr.BadValue},
		{"grain size differs from the connected set's", func(f *fx) { f.mk(0, 1) }, mkErr(MkFcmapArgs{Source: "vol0", Target: "vol2", GrainKiB: new(64)}), fcerr.GrainMismatch},
		{"bad capacity", nil, func(f *fx) error { _, _, err := f.m.AddVolume("odd", mib+512); return err }, fcerr.BadValue},
		{"prepare while copying", func(f *fx) { copying(f) }, func(f *fx) error { _, err := f.m.Prestart("0", false); return err }, fcerr.BadState},
		{"prepare while prepared", func(f *fx) { prepared(f) }, func(f *fx) error { _, err := f.m.Prestart("0", false); return err }, fcerr.BadState},
		{"delete while copying", func(f *fx) { copying(f) }, func(f *fx) error { _, err := f.m.RmFcmap("0", true); return err }, fcerr.BadState},
		{"delete stopped without -force", func(f *fx) { stopped(f) }, func(f *fx) error { _, err := f.m.RmFcmap("0", false); return err }, fcerr.BadState},
		{"start without prepare", func(f *fx) { f.mk(0, 1) }, func(f *fx) error { _, err := f.m.Start("0", false, false); return err }, fcerr.BadState},
		{"start while the start is fencing", func(f *fx) { prepared(f); f.ok(f.m.Start("0", false, false)) }, func(f *fx) error { _, err := f.m.Start("0", false, false); return err }, fcerr.BadState},
		{"start -prep while prepared", func(f *fx) { prepared(f) }, func(f *fx) error { _, err := f.m.Start("0", true, false); return err }, fcerr.BadState},
		{"start -prep while preparing", func(f *fx) { preparing(f) }, func(f *fx) error { _, err := f.m.Start("0", true, false); return err }, fcerr.BadState},
		{"start while copying", func(f *fx) { copying(f) }, func(f *fx) error { _, err := f.m.Start("0", false, false); return err }, fcerr.AlreadyCopying},
		{"start -prep while copying", func(f *fx) { copying(f) }, func(f *fx) error { _, err := f.m.Start("0", true, false); return err }, fcerr.AlreadyCopying},
		{"stop while stopped", func(f *fx) { stopped(f) }, func(f *fx) error { _, err := f.m.Stop("0", false, false); return err }, fcerr.AlreadyStopped},
		{"stop group while every member is stopped", func(f *fx) {
			g := f.group(false)
			f.mk(0, 1, inGroup(g))
			f.ok(f.m.PrestartGroup("1", false))
			f.ok(f.m.StopGroup("1", false, false))
		}, func(f *fx) error { _, err := f.m.StopGroup("1", false, false); return err }, fcerr.AlreadyStopped},
		{"prepare a group member on its own", func(f *fx) { f.mk(0, 1, inGroup(f.group(false))) }, func(f *fx) error { _, err := f.m.Prestart("0", false); return err }, fcerr.GroupMember},
		{"start a group member on its own", func(f *fx) { f.mk(0, 1, inGroup(f.group(false))) }, func(f *fx) error { _, err := f.m.Start("0", true, false); return err }, fcerr.GroupMember},
		{"stop a group member on its own", func(f *fx) { f.mk(0, 1, inGroup(f.group(false))) }, func(f *fx) error { _, err := f.m.Stop("0", true, false); return err }, fcerr.GroupMember},
		{"prepare a restore without -restore", func(f *fx) { copying(f); f.mk(1, 0) }, func(f *fx) error { _, err := f.m.Prestart("1", false); return err }, fcerr.NeedsRestore},
		{"start -prep a restore without -restore", func(f *fx) { copying(f); f.mk(1, 0) }, func(f *fx) error { _, err := f.m.Start("1", true, false); return err }, fcerr.NeedsRestore},
		{"start a restore that became one after prepare", func(f *fx) {
			r := f.mk(1, 0)
			f.prepare(r)
			f.start(f.mk(0, 1))
		}, func(f *fx) error { _, err := f.m.Start("0", false, false); return err }, fcerr.NeedsRestore},
		{"group prepare with a member that needs -restore", func(f *fx) {
			copying(f)
			g := f.group(false)
			f.mk(1, 0, inGroup(g))
			f.mk(2, 3, inGroup(g))
		}, func(f *fx) error { _, err := f.m.PrestartGroup("1", false); return err }, fcerr.NeedsRestore},
		{"another linked mapping is already restoring", func(f *fx) {
			m0 := copyingHalf(f) // vol0 -> vol1, two grains split: the restore has two to copy
			r := f.mk(1, 0)
			f.ok(f.m.Prestart(ref(r), true))
			f.apply(FlushDone{Map: r})
			f.apply(FenceDrained{Fence: f.holdOf(f.ok(f.m.Start(ref(r), false, false))), Now: t0})
			f.ok(f.m.Stop(ref(m0), true, false)) // vol1 is now the source of the active restore
		}, func(f *fx) error { _, err := f.m.Prestart("0", true); return err }, fcerr.DuplicateRestore},
		{"-split below 100 %", func(f *fx) { copyingHalf(f) }, func(f *fx) error { _, err := f.m.Stop("0", false, true); return err }, fcerr.NotCopied},
		{"-split of a suspended mapping", func(f *fx) { id := copying(f); f.m.Mappings[id].Split = fullSplit; f.apply(BitmapOffline{Map: id}) },
			func(f *fx) error { _, err := f.m.Stop("0", false, true); return err }, fcerr.BadState},
		{"delete a mapped volume", func(f *fx) { f.mk(0, 1) }, func(f *fx) error { _, err := f.m.RemoveVolume("vol1", false); return err }, fcerr.VolumeMapped},
		{"resize a mapped volume", func(f *fx) { f.mk(0, 1) }, func(f *fx) error { _, err := f.m.ResizeVolume("vol0", 2*mib); return err }, fcerr.VolumeMapped},
		{"change group while copying", func(f *fx) { copying(f); f.group(false) }, func(f *fx) error {
			_, err := f.m.ChFcmap("0", ChFcmapArgs{Group: new("1")})
			return err
		}, fcerr.BadState},
		{"join a copying group", func(f *fx) { g := f.group(false); f.mk(0, 1, inGroup(g)); f.startGroup(g) }, mkErr(MkFcmapArgs{Source: "vol0", Target: "vol2", Group: "1"}), fcerr.BadState},
		{"leave a prepared group", func(f *fx) {
			g := f.group(false)
			f.mk(0, 1, inGroup(g))
			f.mk(0, 2, inGroup(g))
			f.ok(f.m.PrestartGroup("1", false))
			f.apply(FlushDone{Map: 0})
		}, func(f *fx) error { _, err := f.m.ChFcmap("0", ChFcmapArgs{Group: new("0")}); return err }, fcerr.BadState},
		{"remove a group with members", func(f *fx) { f.mk(0, 1, inGroup(f.group(false))) }, func(f *fx) error { _, err := f.m.RmConsistGrp("1", false); return err }, fcerr.BadState},
		{"start an empty group", func(f *fx) { f.group(false) }, func(f *fx) error { _, err := f.m.StartGroup("1", true, false); return err }, fcerr.BadState},
		{"stale flush done", func(f *fx) { copying(f) }, func(f *fx) error { _, err := f.m.Apply(FlushDone{Map: 0}); return err }, fcerr.BadState},
		{"event for a deleted mapping", nil, func(f *fx) error { _, err := f.m.Apply(CopyComplete{Map: 9}); return err }, fcerr.NoSuchObject},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFx(t, 4)
			if tc.setup != nil {
				tc.setup(f)
			}
			before := f.m.Clone()
			err := tc.act(f)
			wantCode(t, err, tc.code)
			if !reflect.DeepEqual(before, f.m) {
				t.Errorf("refused command changed the model")
			}
		})
	}
}
