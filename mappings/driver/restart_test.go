package driver

import (
	"context"
	"fmt"
	"testing"

	"fcnbd/internal/api"
)

// TestTargetOnlineWhenStartReturns: StartFcmap returns once the start is done (§6 step 4: the
// targets are online), so a read of the target right after it must succeed.
func TestTargetOnlineWhenStartReturns(t *testing.T) {
	r := newRig(t, nil)
	ctx := context.Background()
	r.mkvol("src", "tgt")
	r.write("src", 0, pattern(0x71, 1<<20))
	if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "src", Target: "tgt", Name: "m", CopyRate: ip(0)}); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		if err := r.d.StartFcmap(ctx, "m", true, false); err != nil {
			t.Fatal(err)
		}
		if _, err := r.read("tgt", 0, 4096); err != nil {
			t.Fatalf("start %d: read of the target right after the start returned: %v", i, err)
		}
		if err := r.d.StopFcmap(ctx, "m", true, false); err != nil {
			t.Fatal(err)
		}
	}
}

// TestCleanRestartKeepsMappings: a daemon restart while background copies run and a stopped
// target is offline closes cleanly and leaves every mapping as it was: a grain copy cut short
// by the shutdown must not stop its mapping, and the offline target must not fail the close.
func TestCleanRestartKeepsMappings(t *testing.T) {
	r := newRig(t, nil)
	ctx := context.Background()
	r.mkvol("src", "t1", "t2", "t3", "off")
	r.write("src", 0, pattern(0x72, volSize))
	// A stopped mapping: its target is offline across the restarts.
	if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "src", Target: "off", Name: "stp", CopyRate: ip(0), GrainSize: ip(64)}); err != nil {
		t.Fatal(err)
	}
	if err := r.d.StartFcmap(ctx, "stp", true, false); err != nil {
		t.Fatal(err)
	}
	if err := r.d.StopFcmap(ctx, "stp", true, false); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 3; i++ {
		name := fmt.Sprintf("m%d", i)
		if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "src", Target: fmt.Sprintf("t%d", i), Name: name,
			CopyRate: ip(65), GrainSize: ip(64)}); err != nil {
			t.Fatal(err)
		}
		if err := r.d.StartFcmap(ctx, name, true, false); err != nil {
			t.Fatal(err)
		}
	}
	r.write("src", 0, pattern(0x73, volSize))
	for i := range 5 {
		r.restart() // rig.close fails the test if Close returns an error
		for _, m := range []string{"m1", "m2", "m3"} {
			if s := r.status(m); s != "copying" && s != "idle_or_copied" {
				t.Fatalf("restart %d: mapping %s is %s", i, m, s)
			}
		}
	}
	for _, tg := range []string{"t1", "t2", "t3"} {
		r.expect(tg, 0, pattern(0x72, volSize))
	}
	r.expectEIO("off")
}
