package driver

import (
	"context"
	"errors"
	"testing"

	"fcnbd/internal/api"
	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
	"fcnbd/internal/volume"
)

// TestSnapshotView: a standby's view of a catalogue shows what the driver that wrote it shows;
// with no node serving the group, every volume is offline and the copying mapping suspended
// (with the state it returns to), the idle one unchanged; every change is refused and the
// catalogue is left as it was.
func TestSnapshotView(t *testing.T) {
	r := newRig(t, nil)
	ctx := context.Background()
	r.mkvol("src", "tgt", "a", "b")
	for _, m := range []api.MkFcmap{
		{Source: "src", Target: "tgt", Name: "copying", CopyRate: ip(0), GrainSize: ip(64)},
		{Source: "a", Target: "b", Name: "idle", CopyRate: ip(0), GrainSize: ip(64)},
	} {
		if _, err := r.d.MkFcmap(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.d.StartFcmap(ctx, "copying", true, false); err != nil {
		t.Fatal(err)
	}
	live := r.d.Fcmaps(ctx)
	liveVols := r.d.Volumes()
	var (
		model []byte
		vols  []catalog.Volume
	)
	if err := r.cat.View(func(tx *catalog.Tx) error {
		model = tx.Model()
		var err error
		vols, err = tx.Volumes()
		return err
	}); err != nil {
		t.Fatal(err)
	}
	refusal := fcerr.New(fcerr.NotServing, "a standby")
	refuse := func() error { return refusal }

	online, err := NewSnapshot(model, vols, false, refuse)
	if err != nil {
		t.Fatal(err)
	}
	for i, f := range online.Fcmaps(ctx) {
		if f.Name != live[i].Name || f.Status != live[i].Status || f.SourceName != live[i].SourceName {
			t.Errorf("served group: fcmap %d is %s %s (from %s), the driver shows %s %s (from %s)",
				i, f.Name, f.Status, f.SourceName, live[i].Name, live[i].Status, live[i].SourceName)
		}
	}
	for i, v := range online.Volumes() {
		if v != liveVols[i] {
			t.Errorf("served group: volume %+v, the driver shows %+v", v, liveVols[i])
		}
	}

	offline, err := NewSnapshot(model, vols, true, refuse)
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]string{"copying": "suspended", "idle": "idle_or_copied"} {
		f, err := offline.Fcmap(ctx, name)
		if err != nil || f.Status != want {
			t.Errorf("no node serving: %s is %q (%v), want %q", name, f.Status, err, want)
		}
	}
	for _, v := range offline.Volumes() {
		if v.Status != "offline" {
			t.Errorf("no node serving: volume %s is %s", v.Name, v.Status)
		}
	}
	if v, err := offline.Get("1"); err != nil || v.Name != "tgt" {
		t.Errorf("Get(1): %+v %v", v, err)
	}
	if _, err := offline.Get("nosuch"); fcerr.CodeOf(err) != fcerr.NoSuchObject {
		t.Errorf("Get(nosuch): %v", err)
	}
	changes := map[string]error{
		"stopfcmap":  offline.StopFcmap(ctx, "copying", true, false),
		"rmfcmap":    offline.RmFcmap(ctx, "idle", true),
		"startfcmap": offline.StartFcmap(ctx, "idle", true, false),
		"rmvdisk":    offline.Delete("a", volume.DeleteMode{}),
	}
	_, changes["mkvdisk"] = offline.Create("x", volSize)
	_, changes["mkfcconsistgrp"] = offline.MkConsistGrp(ctx, api.MkConsistGrp{Name: "g"})
	for cmd, err := range changes {
		if !errors.Is(err, refusal) {
			t.Errorf("%s on the view: %v, want the refusal", cmd, err)
		}
	}
	var after []byte
	r.cat.View(func(tx *catalog.Tx) error { after = tx.Model(); return nil })
	if string(after) != string(model) {
		t.Error("the catalogue's model changed under the views")
	}
	if s := r.status("copying"); s != "copying" {
		t.Errorf("the driver's mapping is %s after the views", s)
	}
}
