package driver

import (
	"context"
	"fcnbd/internal/volume"
	"fmt"
	"maps"
	"testing"
	"time"

	"fcnbd/internal/api"
	"fcnbd/internal/fcerr"
)

// linksDisagree returns how the model's chains (Links) and the engine's (Upstreams) differ, or
// "". The engine takes a target out of its chain (cleaning done, a failed grain copy) before
// the model hears of it, so a difference is reported only if it lasts for wait.
func linksDisagree(d *Driver, wait time.Duration) string {
	deadline := time.Now().Add(wait)
	for {
		d.mu.Lock()
		model := map[int]int{}
		for _, l := range d.model.Links() {
			model[int(l.Vol)] = int(l.Upstream)
		}
		eng := d.eng.Upstreams()
		d.mu.Unlock()
		if maps.Equal(model, eng) {
			return ""
		}
		if time.Now().After(deadline) {
			return fmt.Sprintf("the model's chains (target: upstream) %v differ from the engine's %v", model, eng)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (r *rig) linksAgree(when string) {
	r.t.Helper()
	if msg := linksDisagree(r.d, 2*time.Second); msg != "" {
		r.t.Fatalf("%s: %s", when, msg)
	}
}

// TestCascadeStopSurvivesRestart: in a cascade T1 → C1 → C2, stopping T1 → C1 (cleaning)
// leaves C2 reading through T1 for the grains C1 never held (docs/flashcopy.md §5: "stopping
// one removes it and joins its downstream to its upstream"). After a restart C2 must still show
// its image, not C1's stale store (found by TestTopologyRace, seed 1796363032637471650: C2 read
// zeroes where T1 had written before C1's start): the model records where C2 hangs
// (mappings.Mapping.Via) and the reopen rebuilds it there (cow.MappingSpec.Via).
func TestCascadeStopSurvivesRestart(t *testing.T) {
	ctx := context.Background()
	const grain = 64 << 10
	tests := []struct {
		name string
		// vols and maps beyond t1, c1, c2 and the mappings c1 (t1 → c1), c2 (c1 → c2).
		vols []string
		maps []api.MkFcmap
		// after stops c1 (and more); it returns what each volume must read as and, for
		// mappings, the status they must have.
		after func(r *rig) (map[string][]byte, map[string]string)
	}{
		{
			name: "middle stops after cleaning",
			after: func(r *rig) (map[string][]byte, map[string]string) {
				r.stopClean("c1")
				return map[string][]byte{"c2": pattern(0x5a, volSize)}, map[string]string{"c1": "stopped", "c2": "copying"}
			},
		},
		{
			name: "middle stops by force: the child stops with it",
			after: func(r *rig) (map[string][]byte, map[string]string) {
				if err := r.d.StopFcmap(ctx, "c1", true, false); err != nil {
					r.t.Fatal(err)
				}
				return nil, map[string]string{"c1": "stopped", "c2": "stopped"}
			},
		},
		{
			name: "a new start from the volume the child hangs under",
			vols: []string{"x"},
			maps: []api.MkFcmap{{Source: "t1", Target: "x", Name: "x", CopyRate: ip(0), GrainSize: ip(64)}},
			after: func(r *rig) (map[string][]byte, map[string]string) {
				r.stopClean("c1")
				r.start("x")
				// C2 hangs directly under T1, beside X: the write copies into both.
				r.write("t1", 3*grain, pattern(0x33, grain))
				return map[string][]byte{"c2": pattern(0x5a, volSize), "x": pattern(0x5a, volSize)},
					map[string]string{"c2": "copying", "x": "copying"}
			},
		},
		{
			name: "the volume the child hangs under is in use",
			after: func(r *rig) (map[string][]byte, map[string]string) {
				r.stopClean("c1")
				if err := r.d.RmFcmap(ctx, "c1", true); err != nil {
					r.t.Fatal(err)
				}
				if err := r.d.Delete("t1", volume.DeleteMode{}); fcerr.CodeOf(err) != fcerr.VolumeMapped {
					r.t.Fatalf("rmvolume t1 while c2 reads through it: %v", err)
				}
				r.linksAgree("after the refused rmvolume")
				if err := r.d.Delete("t1", volume.DeleteMode{Force: true}); err != nil {
					r.t.Fatal(err)
				}
				return nil, map[string]string{"c2": "stopped"}
			},
		},
		{
			name: "two levels: S → T1 → C1 → C2, C1 then T1 stop",
			vols: []string{"s"},
			maps: []api.MkFcmap{{Source: "s", Target: "t1", Name: "t1", CopyRate: ip(0), GrainSize: ip(64)}},
			after: func(r *rig) (map[string][]byte, map[string]string) {
				r.stopClean("c1")
				// T1, written whole, is at 100 %: its cleaning ends it idle_or_copied, and C2
				// now hangs under S.
				r.stopClean("t1")
				r.write("s", 0, pattern(0x66, 2*grain))
				return map[string][]byte{"c2": pattern(0x5a, volSize)},
					map[string]string{"t1": "idle_or_copied", "c1": "stopped", "c2": "copying"}
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, nil)
			r.mkvol(append([]string{"t1", "c1", "c2"}, tc.vols...)...)
			ms := append([]api.MkFcmap{
				{Source: "t1", Target: "c1", Name: "c1", CopyRate: ip(0), GrainSize: ip(64)},
				{Source: "c1", Target: "c2", Name: "c2", CopyRate: ip(0), GrainSize: ip(64)},
			}, tc.maps...)
			for _, m := range ms {
				if _, err := r.d.MkFcmap(ctx, m); err != nil {
					t.Fatal(err)
				}
			}
			var first []string
			for _, m := range tc.maps {
				if m.Target == "t1" {
					first = append(first, m.Name)
				}
			}
			for _, m := range first {
				r.start(m)
			}
			// T1's data before the cascade starts.
			r.write("t1", 0, pattern(0x5a, volSize))
			r.start("c1")
			r.start("c2")
			// C1 holds one grain of its own (a write to it), which the stop's cleaning gives
			// to C2.
			r.write("c1", 0, pattern(0x77, grain))
			r.expect("c2", 0, pattern(0x5a, volSize))
			data, status := tc.after(r)
			check := func(when string) {
				t.Helper()
				for m, s := range status {
					if got := r.status(m); got != s {
						t.Fatalf("%s: %s is %s, want %s", when, m, got, s)
					}
				}
				for v, p := range data {
					r.expect(v, 0, p)
				}
				r.linksAgree(when)
			}
			check("before the restart")
			r.restart()
			check("after the restart")
			if _, ok := r.d.Lookup("t1"); ok {
				r.write("t1", 2*grain, pattern(0x99, grain)) // the chains still protect every image
				for v, p := range data {
					if v != "t1" {
						r.expect(v, 0, p)
					}
				}
			}
			r.restart()
			check("after a second restart")
		})
	}
}

// stopClean stops mapping m without force and waits for its cleaning to end.
func (r *rig) stopClean(m string) {
	r.t.Helper()
	if err := r.d.StopFcmap(context.Background(), m, false, false); err != nil {
		r.t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for s := r.status(m); s != "stopped" && s != "idle_or_copied"; s = r.status(m) {
		if time.Now().After(deadline) {
			r.t.Fatalf("mapping %s still %s", m, s)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
