package driver

import (
	"context"
	"testing"
	"time"

	"fcnbd/internal/api"
)

// figGrain is the grain of the figures tests: volSize / figGrain = 64 grains, so every count of
// grains shows as its own difference percentage.
const figGrain = 64 << 10

// noProgressTicks keeps the driver's periodic progress feed out of the way, so that what a
// test reads can only come from the query itself (completion still comes from the engine).
func noProgressTicks(o *Options) { o.ProgressInterval = time.Hour }

// completedIncremental creates s, t and an incremental mapping inc between them in 64 KiB
// grains, and runs its first copy to completion.
func (r *rig) completedIncremental() {
	r.t.Helper()
	ctx := context.Background()
	r.mkvol("s", "t")
	r.write("s", 0, pattern(0x5a, volSize))
	if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "s", Target: "t", Name: "inc", Incremental: true,
		CopyRate: ip(150), GrainSize: ip(figGrain >> 10)}); err != nil {
		r.t.Fatal(err)
	}
	if err := r.d.StartFcmap(ctx, "inc", true, false); err != nil {
		r.t.Fatal(err)
	}
	r.waitStatus("inc", "idle_or_copied")
	if d := r.fcmap("inc").Difference; d != 0 {
		r.t.Fatalf("difference right after the copy completed: %d %%, want 0", d)
	}
}

// diffPct is lsfcmap's difference for n of the volSize/figGrain grains (rounded up).
func diffPct(n int) int {
	const grains = volSize / figGrain
	return (n*100 + grains - 1) / grains
}

// TestDifferenceShownOnceFlushed: issue 13 — once a host's FLUSH (or a FUA write) has been
// acknowledged, lsfcmap's difference counts the grains it made durable, without waiting for
// any periodic feed.
func TestDifferenceShownOnceFlushed(t *testing.T) {
	r := newRig(t, noProgressTicks)
	r.completedIncremental()

	// 13 grains rewritten through the write-back cache, then FLUSH.
	const n = 13
	for g := 0; g < n; g++ {
		r.write("s", int64(g*3)*figGrain+100, pattern(byte(g), 512))
	}
	if err := r.vol("s").Flush(); err != nil {
		t.Fatal(err)
	}
	if got, want := r.fcmap("inc").Difference, diffPct(n); got != want {
		t.Fatalf("difference right after FLUSH: %d %%, want %d %% (%d grains)", got, want, n)
	}

	// FUA writes on the target, to grains not written yet: each is in the difference as soon
	// as it is acknowledged.
	for k := 1; k <= 4; k++ {
		g := int64(3*n + k)
		if err := r.vol("t").WriteAt(pattern(0xfa, 4096), g*figGrain, true); err != nil {
			t.Fatal(err)
		}
		if got, want := r.fcmap("inc").Difference, diffPct(n+k); got != want {
			t.Fatalf("difference right after FUA write %d: %d %%, want %d %% (%d grains)", k, got, want, n+k)
		}
	}
}
