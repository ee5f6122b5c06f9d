package cow

import (
	"errors"
	"math/rand/v2"
	"testing"
)

// TestStartGrainSizePerTree: one grain size per connected set, not per call. A daemon's
// restart starts every active mapping in one StartMappings call; two unrelated trees with
// different grain sizes (or a group start across them) were refused, and the daemon could not
// open its volumes again (found by TestTopologyRace).
func TestStartGrainSizePerTree(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	g := newRig(t, 5, 1<<20, 64*kib, r)
	a := MappingSpec{ID: 1, Source: 0, Target: 1, GrainSize: 64 * kib}
	b := MappingSpec{ID: 2, Source: 2, Target: 3, GrainSize: 256 * kib}
	if err := g.e.StartMappings([]MappingSpec{a, b}); err != nil {
		t.Fatalf("two unrelated trees with different grain sizes in one start: %v", err)
	}
	// A cascade onto 0→1 with another grain size joins that tree: refused.
	c := MappingSpec{ID: 3, Source: 1, Target: 4, GrainSize: 256 * kib}
	if err := g.e.StartMappings([]MappingSpec{c}); !errors.Is(err, ErrBadSpec) {
		t.Fatalf("a cascade with another grain size than its tree: %v, want ErrBadSpec", err)
	}
	c.GrainSize = 64 * kib
	if err := g.e.StartMappings([]MappingSpec{c}); err != nil {
		t.Fatalf("a cascade with its tree's grain size: %v", err)
	}
}
