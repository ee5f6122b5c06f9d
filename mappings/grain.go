package mappings

import (
	"sort"

	"fcnbd/internal/fcerr"
)

// The grain-size rule lives here and nowhere else in the control plane. Every mapping of a
// connected set (mappings linked through shared volumes, docs/flashcopy.md §1) has one grain
// size: the copy-on-write layer locks and copies grain by grain through a whole dependency tree,
// so a grain must cover the same bytes on every volume of it (cow.StartMappings refuses a start
// that would mix sizes). As on SVC, mkfcmap without -grainsize takes the grain size of the
// mappings it joins, and refuses one that differs. Prepare and start check the rule again, so a
// catalogue written before it was enforced is refused before anything changes instead of
// failing in the engine after the prepare.

// Grain sizes mkfcmap accepts, in KiB.
const (
	SmallGrainKiB = 64
	LargeGrainKiB = 256
)

// grainRule returns the grain size, in KiB, that a mapping from src to tgt must have: want if
// given, else that of the mappings already connected to either volume, else DefaultGrainKiB.
// self is the mapping being checked (NoMapping for a new one); it is not compared with itself.
// A want that is not 64 or 256 is refused with BadValue; any mapping connected to src or tgt
// whose grain size differs from the result, with GrainMismatch.
func (m *Model) grainRule(src, tgt VolumeID, self MappingID, want *int) (int, error) {
	if want != nil && *want != SmallGrainKiB && *want != LargeGrainKiB {
		return 0, fcerr.New(fcerr.BadValue, "the grain size %d KiB is not %d or %d", *want, SmallGrainKiB, LargeGrainKiB)
	}
	var others []*Mapping
	for id := range m.connected([]VolumeID{src, tgt}) {
		if id != self {
			others = append(others, m.Mappings[id])
		}
	}
	sort.Slice(others, func(i, j int) bool { return others[i].ID < others[j].ID })

	grain := DefaultGrainKiB
	switch {
	case want != nil:
		grain = *want
	case len(others) > 0:
		grain = others[0].GrainKiB // the oldest mapping of the set
	}
	for _, x := range others {
		if x.GrainKiB == grain {
			continue
		}
		switch {
		case self != NoMapping:
			return 0, fcerr.New(fcerr.GrainMismatch, "mapping %s has %d KiB grains but mapping %s, in the same connected set, has %d KiB: "+
				"a connected set needs one grain size; delete one of them and create it again without -grainsize",
				m.Mappings[self].Name, grain, x.Name, x.GrainKiB)
		case want != nil:
			return 0, fcerr.New(fcerr.GrainMismatch, "the grain size %d KiB differs from the %d KiB of mapping %s, to which a mapping from %s to %s would be connected: "+
				"a connected set needs one grain size; omit -grainsize to take it", grain, x.GrainKiB, x.Name, m.Volumes[src].Name, m.Volumes[tgt].Name)
		default:
			return 0, fcerr.New(fcerr.GrainMismatch, "a mapping from %s to %s would join mappings of different grain sizes (%s: %d KiB, %s: %d KiB) in one connected set",
				m.Volumes[src].Name, m.Volumes[tgt].Name, others[0].Name, grain, x.Name, x.GrainKiB)
		}
	}
	return grain, nil
}

// checkGrain is the rule at prepare and start: mp's grain size is valid and every mapping of its
// connected set shares it.
func (m *Model) checkGrain(mp *Mapping) error {
	g := mp.GrainKiB
	if g != SmallGrainKiB && g != LargeGrainKiB {
		return fcerr.New(fcerr.BadValue, "mapping %s has a grain size of %d KiB in the catalogue, not %d or %d: delete it and create it again",
			mp.Name, g, SmallGrainKiB, LargeGrainKiB)
	}
	_, err := m.grainRule(mp.Source, mp.Target, mp.ID, &g)
	return err
}
