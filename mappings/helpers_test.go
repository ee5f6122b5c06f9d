package mappings

import (
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	"fcnbd/internal/fcerr"
)

const (
	mib   = 1 << 20
	grain = 256 << 10
	// Volumes are 1 MiB: 4 grains of 256 KiB.
	fullSplit = mib / grain
)

var t0 = time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)

// fx is a model under test with volumes v0, v1, … named vol0, vol1, …, all 1 MiB.
type fx struct {
	t *testing.T
	m *Model
}

func newFx(t *testing.T, vols int) *fx {
	t.Helper()
	f := &fx{t: t, m: New()}
	for i := 0; i < vols; i++ {
		if _, _, err := f.m.AddVolume(fmt.Sprintf("vol%d", i), mib); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

func (f *fx) ok(effs []Effect, err error) []Effect {
	f.t.Helper()
	if err != nil {
		f.t.Fatalf("unexpected refusal: %v", err)
	}
	return effs
}

// mk creates a stand-alone mapping between volume ids with the defaults, optionally changed.
func (f *fx) mk(src, tgt VolumeID, opts ...func(*MkFcmapArgs)) MappingID {
	f.t.Helper()
	a := MkFcmapArgs{Source: fmt.Sprint(src), Target: fmt.Sprint(tgt)}
	for _, o := range opts {
		o(&a)
	}
	id, _, err := f.m.MkFcmap(a)
	if err != nil {
		f.t.Fatalf("mkfcmap %d->%d: %v", src, tgt, err)
	}
	return id
}

func incremental(a *MkFcmapArgs) { a.Incremental = true }
func autodelete(a *MkFcmapArgs)  { a.Autodelete = true }
func inGroup(g GroupID) func(*MkFcmapArgs) {
	return func(a *MkFcmapArgs) { a.Group = fmt.Sprint(g) }
}
func copyRate(r int) func(*MkFcmapArgs) { return func(a *MkFcmapArgs) { a.CopyRate = &r } }

func (f *fx) group(autodel bool) GroupID {
	f.t.Helper()
	id, _, err := f.m.MkConsistGrp("", autodel)
	if err != nil {
		f.t.Fatal(err)
	}
	return id
}

func ref[T ~int](id T) string { return fmt.Sprint(int(id)) }

func (f *fx) apply(ev Event) []Effect {
	f.t.Helper()
	return f.ok(f.m.Apply(ev))
}

// holdOf returns the fence of the Hold in effs.
func (f *fx) holdOf(effs []Effect) Fence {
	f.t.Helper()
	for _, e := range effs {
		if h, ok := e.(Hold); ok {
			return h.Fence
		}
	}
	f.t.Fatalf("no Hold in %v", strs(effs))
	return Fence{}
}

func (f *fx) prepare(id MappingID) {
	f.t.Helper()
	f.ok(f.m.Prestart(ref(id), false))
	f.apply(FlushDone{Map: id})
}

// start takes a stand-alone mapping from idle_or_copied or stopped to copying.
func (f *fx) start(id MappingID) []Effect {
	f.t.Helper()
	f.prepare(id)
	return f.apply(FenceDrained{Fence: f.holdOf(f.ok(f.m.Start(ref(id), false, false))), Now: t0})
}

func (f *fx) startGroup(g GroupID) []Effect {
	f.t.Helper()
	f.ok(f.m.PrestartGroup(ref(g), false))
	for _, id := range f.m.Members(g) {
		f.apply(FlushDone{Map: id})
	}
	return f.apply(FenceDrained{Fence: f.holdOf(f.ok(f.m.StartGroup(ref(g), false, false))), Now: t0})
}

func (f *fx) state(id MappingID) State {
	if mp := f.m.Mappings[id]; mp != nil {
		return mp.State
	}
	return "gone"
}

func (f *fx) wantState(id MappingID, want State) {
	f.t.Helper()
	if got := f.state(id); got != want {
		f.t.Errorf("mapping %d: state %s, want %s", id, got, want)
	}
}

func strs(effs []Effect) []string {
	out := make([]string, len(effs))
	for i, e := range effs {
		out[i] = e.String()
	}
	return out
}

func wantEffects(t *testing.T, got []Effect, want ...string) {
	t.Helper()
	if g := strs(got); !reflect.DeepEqual(g, append([]string{}, want...)) {
		t.Errorf("effects:\n  got  %s\n  want %s", strings.Join(g, "\n       "), strings.Join(want, "\n       "))
	}
}

func wantCode(t *testing.T, err error, code string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no refusal, want %s", code)
	}
	if got := fcerr.CodeOf(err); got != code {
		t.Fatalf("refused with %q (%v), want %s", got, err, code)
	}
}
