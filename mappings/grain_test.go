package mappings

import (
	"reflect"
	"testing"

	"fcnbd/internal/fcerr"
)

func grainKiB(k int) func(*MkFcmapArgs) { return func(a *MkFcmapArgs) { a.GrainKiB = &k } }

// TestGrainSizeRule: mkfcmap without -grainsize takes the grain size of the connected set it
// joins (multi-target, cascade, either volume), an explicit different one is refused, and so is a
// mapping that would join two sets of different grain sizes. A refusal changes nothing.
func TestGrainSizeRule(t *testing.T) {
	mkfcmap := func(src, tgt VolumeID, opts ...func(*MkFcmapArgs)) func(*fx) (MappingID, error) {
		return func(f *fx) (MappingID, error) {
			a := MkFcmapArgs{Source: ref(src), Target: ref(tgt)}
			for _, o := range opts {
				o(&a)
			}
			id, _, err := f.m.MkFcmap(a)
			return id, err
		}
	}
	tests := []struct {
		name      string
		setup     func(*fx)
		act       func(*fx) (MappingID, error)
		wantGrain int    // the new mapping's grain size, if accepted
		code      string // the refusal, if refused
	}{
		{"first mapping: default", nil, mkfcmap(0, 1), 256, ""},
		{"first mapping: explicit 64", nil, mkfcmap(0, 1, grainKiB(64)), 64, ""},
		{"multi-target inherits 256", func(f *fx) { f.mk(0, 1) }, mkfcmap(0, 4), 256, ""},
		{"multi-target inherits 64, not the default", func(f *fx) { f.mk(0, 1, grainKiB(64)) }, mkfcmap(0, 4), 64, ""},
		{"multi-target: the same size given", func(f *fx) { f.mk(0, 1, grainKiB(64)) }, mkfcmap(0, 4, grainKiB(64)), 64, ""},
		{"multi-target: -grainsize 64 beside 256 refused", func(f *fx) { f.mk(0, 1) }, mkfcmap(0, 4, grainKiB(64)), 0, fcerr.GrainMismatch},
		{"cascade inherits 64", func(f *fx) { f.mk(0, 1, grainKiB(64)) }, mkfcmap(1, 2), 64, ""},
		{"cascade: -grainsize 256 below 64 refused", func(f *fx) { f.mk(0, 1, grainKiB(64)) }, mkfcmap(1, 2, grainKiB(256)), 0, fcerr.GrainMismatch},
		{"new source above a set inherits its size", func(f *fx) { f.mk(1, 2, grainKiB(64)) }, mkfcmap(0, 1), 64, ""},
		{"restore mapping inherits", func(f *fx) { f.mk(0, 1, grainKiB(64)) }, mkfcmap(1, 0), 64, ""},
		{"the whole set counts, not only the two volumes", func(f *fx) {
			f.mk(0, 1, grainKiB(64))
			f.mk(1, 2)
		}, mkfcmap(2, 3, grainKiB(256)), 0, fcerr.GrainMismatch},
		{"an unconnected set's size does not count", func(f *fx) { f.mk(0, 1, grainKiB(64)) }, mkfcmap(2, 3), 256, ""},
		{"a deleted mapping's size does not count", func(f *fx) {
			f.ok(f.m.RmFcmap(ref(f.mk(0, 1, grainKiB(64))), false))
		}, mkfcmap(0, 4), 256, ""},
		{"joining two sets of one size", func(f *fx) {
			f.mk(0, 1, grainKiB(64))
			f.mk(2, 3, grainKiB(64))
		}, mkfcmap(1, 2), 64, ""},
		{"joining two sets of different sizes refused", func(f *fx) {
			f.mk(0, 1, grainKiB(64))
			f.mk(2, 3)
		}, mkfcmap(1, 2), 0, fcerr.GrainMismatch},
		{"joining two sets of different sizes refused, size given", func(f *fx) {
			f.mk(0, 1, grainKiB(64))
			f.mk(2, 3)
		}, mkfcmap(1, 2, grainKiB(64)), 0, fcerr.GrainMismatch},
		{"joining a set that already mixes sizes refused", func(f *fx) {
			f.mk(0, 1)
			f.mk(0, 2)
			f.m.Mappings[1].GrainKiB = 64 // a catalogue from before the rule
		}, mkfcmap(0, 3), 0, fcerr.GrainMismatch},
		{"a size that is not 64 or 256", nil, mkfcmap(0, 1, grainKiB(128)), 0, fcerr.BadValue},
		{"a size that is not 64 or 256, beside a set", func(f *fx) { f.mk(0, 1) }, mkfcmap(0, 2, grainKiB(0)), 0, fcerr.BadValue},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFx(t, 5)
			if tc.setup != nil {
				tc.setup(f)
			}
			before := f.m.Clone()
			id, err := tc.act(f)
			if tc.code != "" {
				wantCode(t, err, tc.code)
				t.Log(err)
				if !reflect.DeepEqual(before, f.m) {
					t.Errorf("refused mkfcmap changed the model")
				}
				return
			}
			if err != nil {
				t.Fatalf("refused: %v", err)
			}
			mp := f.m.Mappings[id]
			if mp.GrainKiB != tc.wantGrain {
				t.Errorf("grain size %d KiB, want %d", mp.GrainKiB, tc.wantGrain)
			}
			if want := int64(mib / (tc.wantGrain << 10)); mp.Grains != want {
				t.Errorf("%d grains, want %d", mp.Grains, want)
			}
		})
	}
}

// TestGrainSizeRuleAtPrepare: a catalogue written before the rule may hold a connected set with
// two grain sizes; its mappings are refused at every prepare and start with the mkfcmap code,
// before anything changes (the engine would refuse the start only after the prepare). Mappings
// outside that set are not affected.
func TestGrainSizeRuleAtPrepare(t *testing.T) {
	// mixed: vol0 -> vol1 (256 KiB), vol0 -> vol2 (64 KiB, as an older version allowed), and an
	// unrelated vol3 -> vol4.
	mixed := func(f *fx) {
		f.mk(0, 1)
		f.mk(0, 2)
		f.mk(3, 4)
		f.m.Mappings[1].GrainKiB, f.m.Mappings[1].Grains = 64, mib/(64<<10)
	}
	inGroupMixed := func(f *fx) {
		g := f.group(false)
		f.mk(0, 1, inGroup(g))
		f.mk(3, 4, inGroup(g))
		f.mk(0, 2)
		f.m.Mappings[2].GrainKiB = 64
	}
	tests := []struct {
		name  string
		setup func(*fx)
		act   func(*fx) error
		code  string
	}{
		{"prestartfcmap of the odd one", mixed, func(f *fx) error { _, err := f.m.Prestart("1", false); return err }, fcerr.GrainMismatch},
		{"prestartfcmap of the other", mixed, func(f *fx) error { _, err := f.m.Prestart("0", false); return err }, fcerr.GrainMismatch},
		{"startfcmap -prep", mixed, func(f *fx) error { _, err := f.m.Start("1", true, false); return err }, fcerr.GrainMismatch},
		{"startfcmap of a mapping prepared before the set mixed", func(f *fx) {
			f.mk(0, 1)
			f.prepare(0)
			f.mk(0, 2)
			f.m.Mappings[1].GrainKiB = 64
		}, func(f *fx) error { _, err := f.m.Start("0", false, false); return err }, fcerr.GrainMismatch},
		{"prestartfcconsistgrp", inGroupMixed, func(f *fx) error { _, err := f.m.PrestartGroup("1", false); return err }, fcerr.GrainMismatch},
		{"startfcconsistgrp -prep", inGroupMixed, func(f *fx) error { _, err := f.m.StartGroup("1", true, false); return err }, fcerr.GrainMismatch},
		{"startfcconsistgrp of a group prepared before the set mixed", func(f *fx) {
			g := f.group(false)
			f.mk(0, 1, inGroup(g))
			f.ok(f.m.PrestartGroup(ref(g), false))
			f.apply(FlushDone{Map: 0})
			f.mk(0, 2)
			f.m.Mappings[1].GrainKiB = 64
		}, func(f *fx) error { _, err := f.m.StartGroup("1", false, false); return err }, fcerr.GrainMismatch},
		{"a grain size that is no size", func(f *fx) { f.mk(0, 1); f.m.Mappings[0].GrainKiB = 0 },
			func(f *fx) error { _, err := f.m.Prestart("0", false); return err }, fcerr.BadValue},
		{"a state refusal comes first", func(f *fx) { mixed(f); f.m.Mappings[1].State = Copying; f.m.Mappings[1].ChainSeq = 1 },
			func(f *fx) error { _, err := f.m.Prestart("1", false); return err }, fcerr.BadState},
		{"an unrelated mapping still prepares", mixed, func(f *fx) error { _, err := f.m.Prestart("2", false); return err }, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFx(t, 5)
			tc.setup(f)
			before := f.m.Clone()
			err := tc.act(f)
			if tc.code == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			wantCode(t, err, tc.code)
			t.Log(err)
			if !reflect.DeepEqual(before, f.m) {
				t.Errorf("refused command changed the model")
			}
		})
	}
}
