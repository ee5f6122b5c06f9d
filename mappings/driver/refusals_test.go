package driver

import (
	"bytes"
	"context"
	"encoding/json"
	"fcnbd/internal/volume"
	"reflect"
	"testing"

	"fcnbd/internal/api"
	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
)

// TestRefusedCommandsChangeNothing: docs/architecture.md "a refused command changes nothing",
// through the driver: the catalogue's model, the lsfcmap and lsfcconsistgrp views and the volume
// list are the same after each refusal, and after a restart.
func TestRefusedCommandsChangeNothing(t *testing.T) {
	r := newRig(t, nil)
	ctx := context.Background()
	r.mkvol("src", "tgt", "tgt2")
	if _, err := r.d.Create("small", volSize/2); err != nil {
		t.Fatal(err)
	}
	r.write("src", 0, pattern(0x5a, 1<<20))
	if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "src", Target: "tgt", Name: "idle", CopyRate: ip(0)}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "src", Target: "tgt2", Name: "stp", CopyRate: ip(0)}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.d.MkConsistGrp(ctx, api.MkConsistGrp{Name: "g"}); err != nil {
		t.Fatal(err)
	}
	if err := r.d.StartFcmap(ctx, "stp", true, false); err != nil {
		t.Fatal(err)
	}
	if err := r.d.StopFcmap(ctx, "stp", true, false); err != nil {
		t.Fatal(err)
	}
	r.waitStatus("stp", "stopped")

	refusals := []struct {
		name string
		code string
		do   func() error
	}{
		{"start without prepare", fcerr.BadState, func() error { return r.d.StartFcmap(ctx, "idle", false, false) }},
		{"stop of a stopped mapping", fcerr.AlreadyStopped, func() error { return r.d.StopFcmap(ctx, "stp", false, false) }},
		{"stop -force of a stopped mapping", fcerr.AlreadyStopped, func() error { return r.d.StopFcmap(ctx, "stp", true, false) }},
		{"stop -force -split", fcerr.ExclusiveFlags, func() error { return r.d.StopFcmap(ctx, "idle", true, true) }},
		{"mkfcmap size mismatch", fcerr.SizeMismatch, func() error {
			_, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "src", Target: "small", Name: "bad"})
			return err
		}},
		{"mkfcmap onto a used target", fcerr.TargetInUse, func() error {
			_, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "tgt2", Target: "tgt", Name: "bad"})
			return err
		}},
		{"rmvolume of a mapped source", fcerr.VolumeMapped, func() error { return r.d.Delete("src", volume.DeleteMode{}) }},
		{"rmvolume of a mapped target", fcerr.VolumeMapped, func() error { return r.d.Delete("tgt2", volume.DeleteMode{}) }},
		{"rmfcmap of a stopped mapping without -force", fcerr.BadState, func() error { return r.d.RmFcmap(ctx, "stp", false) }},
		{"start of an empty group", "", func() error { return r.d.StartConsistGrp(ctx, "g", false, false) }},
		{"chfcmap bad rate", fcerr.BadValue, func() error { return r.d.ChFcmap(ctx, "idle", api.ChFcmap{CopyRate: ip(151)}) }},
	}
	base := r.snapshot()
	for _, c := range refusals {
		err := c.do()
		if err == nil {
			t.Fatalf("%s: accepted", c.name)
		}
		if c.code != "" && fcerr.CodeOf(err) != c.code {
			t.Fatalf("%s: %v, want %s", c.name, err, c.code)
		}
		r.same(c.name, base, r.snapshot())
	}
	r.restart()
	r.same("after restart", base, r.snapshot())
	r.expectEIO("tgt2")
	r.expect("src", 0, pattern(0x5a, 1<<20))
	if _, err := r.read("tgt", 0, 4096); err != nil {
		t.Fatalf("idle target after the refusals: %v", err)
	}
}

// snapshot is what a refused command must leave as it was: the catalogue's model, the lsfcmap
// and lsfcconsistgrp views and the volume list.
type snapshot struct {
	model  []byte
	maps   []api.Fcmap
	groups []api.ConsistGrp
	vols   string
}

func (r *rig) snapshot() snapshot {
	r.t.Helper()
	ctx := context.Background()
	var s snapshot
	if err := r.cat.View(func(tx *catalog.Tx) error {
		s.model = bytes.Clone(tx.Model())
		return nil
	}); err != nil {
		r.t.Fatal(err)
	}
	s.maps, s.groups = r.d.Fcmaps(ctx), r.d.ConsistGrps(ctx)
	for i := range s.maps {
		s.maps[i].CopyThroughput = 0 // a rate over the last seconds: it decays with no change
	}
	vs, _ := json.Marshal(r.d.Volumes())
	s.vols = string(vs)
	return s
}

// same fails the test unless a and b are equal.
func (r *rig) same(when string, a, b snapshot) {
	r.t.Helper()
	if !bytes.Equal(a.model, b.model) {
		r.t.Fatalf("%s: the catalogue's model changed:\n%s\n%s", when, a.model, b.model)
	}
	if !reflect.DeepEqual(a.maps, b.maps) {
		r.t.Fatalf("%s: lsfcmap changed:\n%+v\n%+v", when, a.maps, b.maps)
	}
	if !reflect.DeepEqual(a.groups, b.groups) {
		r.t.Fatalf("%s: lsfcconsistgrp changed:\n%+v\n%+v", when, a.groups, b.groups)
	}
	if a.vols != b.vols {
		r.t.Fatalf("%s: lsvdisk changed:\n%s\n%s", when, a.vols, b.vols)
	}
}
