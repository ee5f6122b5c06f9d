package driver

import (
	"context"
	"os"
	"testing"

	"fcnbd/internal/api"
)

// TestCascadeStopSurvivesRestart: in a cascade T1 → C1 → C2, stopping T1 → C1 (cleaning)
// leaves C2 reading through T1 for the grains C1 never held (docs/flashcopy.md §5: "stopping
// one removes it and joins its downstream to its upstream"). After a restart C2 must still show
// its image, not C1's stale store (found by TestTopologyRace, seed 1796363032637471650: C2 read
// zeroes where T1 had written before C1's start).
//
// Known bug, not fixed yet: the engine relinks C2 under T1 when T1 → C1 leaves its chain
// (cow.unlink), but the model's chains (mappings/chain.go upstreamOf: a cascade target reads
// through its mapping's source) still put C2 under C1, and the reopen rebuilds the engine's
// chains from specs whose upstream is the source (cow.StartMappings): after the restart C2
// reads C1's store, here C1's own later write. FCNBD_KNOWN_BUGS=1 runs it.
func TestCascadeStopSurvivesRestart(t *testing.T) {
	if os.Getenv("FCNBD_KNOWN_BUGS") == "" {
		t.Skip("known bug: a cascade's chain after its middle mapping stopped is not rebuilt at restart (FCNBD_KNOWN_BUGS=1 runs it)")
	}
	r := newRig(t, nil)
	ctx := context.Background()
	r.mkvol("t1", "c1", "c2")
	// T1's data before the cascade starts (T1 needs no mapping of its own for this).
	r.write("t1", 0, pattern(0x5a, volSize))
	for _, m := range []api.MkFcmap{
		{Source: "t1", Target: "c1", Name: "c1", CopyRate: ip(0), GrainSize: ip(64)},
		{Source: "c1", Target: "c2", Name: "c2", CopyRate: ip(0), GrainSize: ip(64)},
	} {
		if _, err := r.d.MkFcmap(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.d.StartFcmap(ctx, "c1", true, false); err != nil {
		t.Fatal(err)
	}
	if err := r.d.StartFcmap(ctx, "c2", true, false); err != nil {
		t.Fatal(err)
	}
	// C1 holds one grain of its own (a write to it), which the stop's cleaning gives to C2.
	r.write("c1", 0, pattern(0x77, 64<<10))
	r.expect("c2", 0, pattern(0x5a, volSize))
	if err := r.d.StopFcmap(ctx, "c1", false, false); err != nil {
		t.Fatal(err)
	}
	r.waitStatus("c1", "stopped")
	r.expect("c2", 0, pattern(0x5a, volSize))
	r.restart()
	if s := r.status("c2"); s != "copying" {
		t.Fatalf("c2 after the restart: %s", s)
	}
	r.expect("c2", 0, pattern(0x5a, volSize))
}
