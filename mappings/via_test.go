package mappings

import (
	"encoding/json"
	"testing"

	"fcnbd/internal/fcerr"
)

// TestVia: where an in-chain target hangs once a chain changed under it is where the
// copy-on-write layer keeps it (cow unlink and StartMappings), so that the model's Links can
// rebuild the engine's chains at daemon start.
func TestVia(t *testing.T) {
	// Volumes: v0 S, v1 T1, v2 C1, v3 C2, v4 and v5 spare. The mappings of a cascade
	// S → T1 → C1 → C2 are made by cascade; a row starts those it needs.
	type links map[VolumeID]VolumeID // active target → upstream; others must not be active
	cleanStop := func(f *fx, id MappingID) {
		f.ok(f.m.Stop(ref(id), false, false))
		f.apply(CleanComplete{Map: id})
	}
	tests := []struct {
		name string
		act  func(f *fx) links
	}{
		{
			name: "middle of a cascade stops after cleaning: the child joins its upstream",
			act: func(f *fx) links {
				c1, c2 := f.mk(1, 2), f.mk(2, 3)
				f.start(c1)
				f.start(c2)
				cleanStop(f, c1)
				f.wantState(c1, Stopped)
				return links{3: 1}
			},
		},
		{
			name: "a newer target of the volume the child hangs under does not move it",
			act: func(f *fx) links {
				c1, c2 := f.mk(1, 2), f.mk(2, 3)
				f.start(c1)
				f.start(c2)
				cleanStop(f, c1)
				f.start(f.mk(1, 4))
				return links{3: 1, 4: 1}
			},
		},
		{
			name: "a new start from the child's own source does not move it",
			act: func(f *fx) links {
				c1, c2 := f.mk(1, 2), f.mk(2, 3)
				f.start(c1)
				f.start(c2)
				cleanStop(f, c1)
				f.start(f.mk(2, 4))
				return links{3: 1, 4: 2}
			},
		},
		{
			name: "two levels: the volume the child hangs under leaves its chain in turn",
			act: func(f *fx) links {
				t1, c1, c2 := f.mk(0, 1), f.mk(1, 2), f.mk(2, 3)
				f.start(t1)
				f.start(c1)
				f.start(c2)
				cleanStop(f, c1)
				cleanStop(f, t1)
				f.start(f.mk(0, 4)) // S's new target does not take C2 with it
				return links{3: 0, 4: 0}
			},
		},
		{
			name: "force stop of the middle stops the child too",
			act: func(f *fx) links {
				c1, c2 := f.mk(1, 2), f.mk(2, 3)
				f.start(c1)
				f.start(c2)
				f.ok(f.m.Stop(ref(c1), true, false))
				f.wantState(c2, Stopped)
				return links{}
			},
		},
		{
			name: "an older target whose newer one stopped rejoins its source's chain",
			act: func(f *fx) links {
				t1, t2 := f.mk(0, 1), f.mk(0, 2)
				f.start(t1)
				f.start(t2)
				cleanStop(f, t2)
				f.start(f.mk(0, 3)) // and a newer target of the source takes it under it
				return links{1: 3, 3: 0}
			},
		},
		{
			name: "an older target of a chain whose newer sibling hangs elsewhere",
			act: func(f *fx) links {
				// C1 ← C2b ← C2a; C1 leaves: C2b under T1; C1 → C2c starts: C2c under C1;
				// C2b leaves: C2a joins T1, not C2c that its chain position names.
				c1 := f.mk(1, 2)
				c2a, c2b := f.mk(2, 3), f.mk(2, 4)
				f.start(c1)
				f.start(c2a)
				f.start(c2b)
				cleanStop(f, c1)
				f.start(f.mk(2, 5))
				cleanStop(f, c2b)
				f.wantState(c2a, Copying)
				return links{3: 1, 5: 2}
			},
		},
		{
			name: "split: the dependants stay under the split target",
			act: func(f *fx) links {
				older := f.mk(0, 2)
				f.start(older)
				id := f.mk(0, 1)
				f.start(id)
				f.apply(CopyComplete{Map: id})
				f.ok(f.m.Stop(ref(id), false, true))
				f.start(f.mk(0, 3)) // and stay there when the source gets a new target
				return links{2: 1, 3: 0}
			},
		},
		{
			name: "a relinked child that leaves and starts again is back in its source's chain",
			act: func(f *fx) links {
				c1, c2 := f.mk(1, 2), f.mk(2, 3)
				f.start(c1)
				f.start(c2)
				cleanStop(f, c1)
				cleanStop(f, c2)
				if f.m.Mappings[c2].Via != nil {
					f.t.Errorf("a stopped mapping keeps Via %d", *f.m.Mappings[c2].Via)
				}
				f.start(c1)
				f.start(c2)
				return links{2: 1, 3: 2}
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFx(t, 6)
			want := tc.act(f)
			for v := range f.m.Volumes {
				up, ok := f.m.Upstream(v)
				w, active := want[v]
				switch {
				case ok != active:
					t.Errorf("v%d: active %v, want %v", v, ok, active)
				case ok && up != w:
					t.Errorf("v%d: upstream v%d, want v%d", v, up, w)
				}
			}
			// The catalogue keeps it.
			var back Model
			if err := json.Unmarshal(f.m.durable(), &back); err != nil {
				t.Fatal(err)
			}
			for v, w := range want {
				if up, _ := back.Upstream(v); up != w {
					t.Errorf("v%d after a reload: upstream v%d, want v%d", v, up, w)
				}
			}
		})
	}
}

// TestViaVolumeInUse: a volume that a target hangs under (Via) is in use though no mapping
// names it: rmvolume and resizing refuse it; rmvolume -force stops the mapping, keeping it.
func TestViaVolumeInUse(t *testing.T) {
	f := newFx(t, 3)
	c1, c2 := f.mk(0, 1), f.mk(1, 2)
	f.start(c1)
	f.start(c2)
	f.ok(f.m.Stop(ref(c1), false, false))
	f.apply(CleanComplete{Map: c1})
	f.ok(f.m.RmFcmap(ref(c1), true))
	_, err := f.m.RemoveVolume("0", false)
	wantCode(t, err, fcerr.VolumeMapped)
	_, err = f.m.ResizeVolume("0", 2*mib)
	wantCode(t, err, fcerr.VolumeMapped)
	f.ok(f.m.RemoveVolume("0", true))
	f.wantState(c2, Stopped)
	if _, ok := f.m.Upstream(2); ok {
		t.Error("v2 still reads through the removed volume")
	}
}

// TestViaJoinsConnectedSet: a target hanging under a volume (Via) is in that volume's connected
// set, so the grain rule holds across it, as the engine's lock keys need.
func TestViaJoinsConnectedSet(t *testing.T) {
	f := newFx(t, 4)
	c1 := f.mk(0, 1, func(a *MkFcmapArgs) { g := SmallGrainKiB; a.GrainKiB = &g })
	c2 := f.mk(1, 2)
	f.start(c1)
	f.start(c2)
	f.ok(f.m.Stop(ref(c1), false, false))
	f.apply(CleanComplete{Map: c1})
	f.ok(f.m.RmFcmap(ref(c1), true))
	big := LargeGrainKiB
	_, _, err := f.m.MkFcmap(MkFcmapArgs{Source: "0", Target: "3", GrainKiB: &big})
	wantCode(t, err, fcerr.GrainMismatch)
	x := f.mk(0, 3)
	if g := f.m.Mappings[x].GrainKiB; g != SmallGrainKiB {
		t.Errorf("a mapping joining v2's tree by its Via: grain %d KiB, want %d", g, SmallGrainKiB)
	}
	if got := f.m.ConnectedSet(x); len(got) != 2 {
		t.Errorf("connected set of %d: %v, want it and %d", x, got, c2)
	}
}
