package mappings

import (
	"encoding/json"
	"testing"
)

// TestRunFigures: RunFigures adds to the run's and the lifetime's figures and is persisted;
// a start resets the run's, never the lifetime's.
func TestRunFigures(t *testing.T) {
	f := newFx(t, 2)
	id := f.mk(0, 1)
	f.start(id)
	f.apply(CopyComplete{Map: id})
	a := Figures{GrainsCopied: 3, SplitOnWrite: 1, BytesCopied: 4 * grain}
	wantEffects(t, f.apply(RunFigures{Map: id, Figures: a}), "Persist")
	f.start(id)
	if mp := f.m.Mappings[id]; mp.Run != (Figures{}) || mp.Total != a {
		t.Fatalf("after the next start: run %+v total %+v, want zero and %+v", mp.Run, mp.Total, a)
	}
	b := Figures{GrainsCopied: 2, BytesCopied: 2 * grain}
	f.apply(RunFigures{Map: id, Figures: b})
	f.apply(RunFigures{Map: id, Figures: b}) // a run that went on after a daemon restart
	var stored Model
	if err := json.Unmarshal(f.m.durable(), &stored); err != nil {
		t.Fatal(err)
	}
	mp := stored.Mappings[id]
	if want := b.Plus(b); mp.Run != want || mp.Total != a.Plus(want) {
		t.Errorf("stored: run %+v total %+v, want %+v and %+v", mp.Run, mp.Total, want, a.Plus(want))
	}
	if mp.State != Copying {
		t.Errorf("figures changed the state: %s", mp.State)
	}
}
