package mappings

import (
	"reflect"
	"testing"

	"fcnbd/internal/fcerr"
)

// TestStartLoop: a group start that would make a volume read through itself by way of two or
// more of its members is refused at prepare and start, changing nothing (the engine accepted it,
// and every read of the volumes in the loop then failed); a cascade or a restore in a group is
// not such a loop.
func TestStartLoop(t *testing.T) {
	const S, T, U = 0, 1, 2
	prestart := func(restore bool) func(*fx) error {
		return func(f *fx) error { _, err := f.m.PrestartGroup("1", restore); return err }
	}
	startPrep := func(f *fx) error { _, err := f.m.StartGroup("1", true, false); return err }
	tests := []struct {
		name  string
		setup func(f *fx, g GroupID)
		act   func(*fx) error
		code  string // "" for accepted
	}{
		{"S→T and T→S: prestartfcconsistgrp", func(f *fx, g GroupID) {
			f.mk(S, T, inGroup(g))
			f.mk(T, S, inGroup(g))
		}, prestart(false), fcerr.ChainLoop},
		{"S→T and T→S: startfcconsistgrp -prep", func(f *fx, g GroupID) {
			f.mk(S, T, inGroup(g))
			f.mk(T, S, inGroup(g))
		}, startPrep, fcerr.ChainLoop},
		{"S→T, T→U and U→S", func(f *fx, g GroupID) {
			f.mk(S, T, inGroup(g))
			f.mk(T, U, inGroup(g))
			f.mk(U, S, inGroup(g))
		}, prestart(false), fcerr.ChainLoop},
		{"two members and an active mapping, with -restore", func(f *fx, g GroupID) {
			f.start(f.mk(S, T))
			f.mk(T, U, inGroup(g))
			f.mk(U, S, inGroup(g))
		}, prestart(true), fcerr.ChainLoop},
		{"a cascade in one group", func(f *fx, g GroupID) {
			f.mk(S, T, inGroup(g))
			f.mk(T, U, inGroup(g))
		}, startPrep, ""},
		{"a restore in a group", func(f *fx, g GroupID) {
			f.start(f.mk(S, T))
			f.mk(T, S, inGroup(g))
		}, prestart(true), ""},
		{"a restore and a cascade from its partner's target", func(f *fx, g GroupID) {
			f.start(f.mk(S, T))
			f.mk(T, S, inGroup(g))
			f.mk(T, U, inGroup(g))
		}, prestart(true), ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFx(t, 3)
			tc.setup(f, f.group(false))
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

// TestStartLoopAtFenceDrained: the loop may close between a group's start and its fence
// draining (another start drained first); the group's start is then abandoned, its members stay
// prepared and their sources are released.
func TestStartLoopAtFenceDrained(t *testing.T) {
	const S, T, U = 0, 1, 2
	f := newFx(t, 3)
	st := f.mk(S, T)
	g := f.group(false)
	tu, us := f.mk(T, U, inGroup(g)), f.mk(U, S, inGroup(g))
	f.prepare(st)
	f.ok(f.m.PrestartGroup(ref(g), true))
	f.apply(FlushDone{Map: tu})
	f.apply(FlushDone{Map: us})
	first := f.holdOf(f.ok(f.m.Start(ref(st), false, false)))
	second := f.holdOf(f.ok(f.m.StartGroup(ref(g), false, true)))
	f.apply(FenceDrained{Fence: first, Now: t0})
	f.wantState(st, Copying)
	effs := f.apply(FenceDrained{Fence: second, Now: t0})
	for _, id := range []MappingID{tu, us} {
		f.wantState(id, Prepared)
		if f.m.Mappings[id].Fencing {
			t.Errorf("mapping %d still fencing", id)
		}
	}
	released := false
	for _, e := range effs {
		if _, ok := e.(Release); ok {
			released = true
		}
		if _, ok := e.(CommitStart); ok {
			t.Errorf("the loop was committed: %v", strs(effs))
		}
	}
	if !released {
		t.Errorf("sources not released: %v", strs(effs))
	}
}
