package driver

import (
	"context"
	"testing"

	"github.com/rs/zerolog"

	"fcnbd/internal/api"
	"fcnbd/internal/fcerr"
	"fcnbd/internal/hosts"
	"fcnbd/internal/volume"
)

// TestDeleteHostMapped: a volume mapped to a host is refused deletion (CMMVC5840E) before the
// FlashCopy model changes anything, even with a mapping that -force would have removed; with
// force, the FlashCopy mapping and the host mapping go with it.
func TestDeleteHostMapped(t *testing.T) {
	r := newRig(t, nil)
	ctx := context.Background()
	r.mkvol("src", "tgt", "lone", "lone2")
	if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "src", Target: "tgt", Name: "m"}); err != nil {
		t.Fatal(err)
	}
	hm, err := hosts.New(r.cat, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := hm.MkHost(api.MkHost{Name: "h", HostPorts: api.HostPorts{NBDNames: []string{"h"}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := hm.MkHostMap(api.MkHostMap{Host: "h", Volume: "src"}); err != nil {
		t.Fatal(err)
	}
	// A volume with no FlashCopy mapping: the model would let it go; the host mapping must not.
	if _, err := hm.MkHostMap(api.MkHostMap{Host: "h", Volume: "lone"}); err != nil {
		t.Fatal(err)
	}
	if err := r.d.Delete("lone", volume.DeleteMode{}); fcerr.CodeOf(err) != fcerr.VolumeMapped {
		t.Fatalf("rmvolume of a host-mapped volume: %v", err)
	}
	if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "lone", Target: "lone2", Name: "after"}); err != nil {
		t.Fatalf("the refused rmvolume changed the FlashCopy model: %v", err)
	}
	if err := r.d.Delete("src", volume.DeleteMode{}); fcerr.CodeOf(err) != fcerr.VolumeMapped {
		t.Fatalf("rmvolume of a host-mapped volume: %v", err)
	}
	if _, err := r.d.Fcmap(ctx, "m"); err != nil {
		t.Fatalf("the refused rmvolume changed the FlashCopy mapping: %v", err)
	}
	// -removehostmappings lets the host mappings go, not the FlashCopy mapping: still refused,
	// and the host mapping is still there.
	if err := r.d.Delete("src", volume.DeleteMode{HostMaps: true}); fcerr.CodeOf(err) != fcerr.VolumeMapped {
		t.Fatalf("rmvolume -removehostmappings of a volume in a FlashCopy mapping: %v", err)
	}
	if maps, err := hm.HostMaps("", ""); err != nil || len(maps) != 2 {
		t.Fatalf("host mappings after a refused rmvolume -removehostmappings: %v %v", maps, err)
	}
	if err := r.d.Delete("src", volume.DeleteMode{Force: true}); err != nil {
		t.Fatal(err)
	}
	if maps, err := hm.HostMaps("", ""); err != nil || len(maps) != 1 || maps[0].VolumeName != "lone" {
		t.Fatalf("host mappings after rmvolume -force: %v %v", maps, err)
	}
	if _, err := r.d.Fcmap(ctx, "m"); fcerr.CodeOf(err) == "" {
		t.Fatalf("the FlashCopy mapping survived rmvolume -force: %v", err)
	}
	// A volume in no FlashCopy mapping goes with -removehostmappings, its host mapping with it.
	if err := r.d.Delete("lone2", volume.DeleteMode{HostMaps: true}); fcerr.CodeOf(err) != fcerr.VolumeMapped {
		t.Fatalf("rmvolume -removehostmappings of a volume in a FlashCopy mapping: %v", err)
	}
	if err := r.d.RmFcmap(ctx, "after", true); err != nil {
		t.Fatal(err)
	}
	if err := r.d.Delete("lone", volume.DeleteMode{HostMaps: true}); err != nil {
		t.Fatalf("rmvolume -removehostmappings: %v", err)
	}
	if maps, err := hm.HostMaps("", ""); err != nil || len(maps) != 0 {
		t.Fatalf("host mappings after rmvolume -removehostmappings: %v %v", maps, err)
	}
}
