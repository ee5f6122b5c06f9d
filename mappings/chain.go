package mappings

import (
	"slices"
	"sort"

	"fcnbd/internal/fcerr"
)

// The dependency chains of docs/flashcopy.md §5 are not stored as lists: a mapping's ChainSeq
// says when its target was inserted, and the chain of source S is S's in-chain mappings, newest
// first: S ← Tn ← … ← T1. A target whose mapping's source is itself a target reads through that
// volume (a cascade). Only a chain's change under a target can put it elsewhere (a target it
// read through left with its downstream joining its upstream, or was split out keeping it):
// Mapping.Via records that place, as the copy-on-write layer has it.

// chainOf returns the in-chain mappings of source s, newest (directly under s) first.
func (m *Model) chainOf(s VolumeID) []*Mapping {
	var c []*Mapping
	for _, mp := range m.Mappings {
		if mp.Source == s && mp.inChain() {
			c = append(c, mp)
		}
	}
	sort.Slice(c, func(i, j int) bool { return c[i].ChainSeq > c[j].ChainSeq })
	return c
}

// Chain returns the targets of source s's dependency chain, newest first: Chain(S) = [Tn … T1]
// for S ← Tn ← … ← T1.
func (m *Model) Chain(s VolumeID) []VolumeID {
	var out []VolumeID
	for _, mp := range m.chainOf(s) {
		out = append(out, mp.Target)
	}
	return out
}

// upstreamOf returns the volume mp's target reads through; mp must be in a chain: its Via if
// set, else its place in its source's chain.
func (m *Model) upstreamOf(mp *Mapping) VolumeID {
	if mp.Via != nil {
		return *mp.Via
	}
	return m.chainUpstream(mp)
}

// chainUpstream is mp's upstream by its place in its source's chain alone: the next newer
// in-chain target of the same source, else the source.
func (m *Model) chainUpstream(mp *Mapping) VolumeID {
	up := mp.Source
	var best uint64
	for _, x := range m.Mappings {
		if x.Source == mp.Source && x.inChain() && x.ChainSeq > mp.ChainSeq && (best == 0 || x.ChainSeq < best) {
			up, best = x.Target, x.ChainSeq
		}
	}
	return up
}

// place puts in-chain mapping mp's target directly under volume up, as the copy-on-write layer
// did: by its chain position when that says up, else by Via.
func (m *Model) place(mp *Mapping, up VolumeID) {
	mp.Via = nil
	if m.chainUpstream(mp) != up {
		mp.Via = &up
	}
}

// targetMapping returns the mapping whose target is v, or nil.
func (m *Model) targetMapping(v VolumeID) *Mapping {
	for _, mp := range m.Mappings {
		if mp.Target == v {
			return mp
		}
	}
	return nil
}

// Upstream returns the volume that v reads through for grains it does not hold, and false if v
// is not an active target.
func (m *Model) Upstream(v VolumeID) (VolumeID, bool) {
	mp := m.targetMapping(v)
	if mp == nil || !mp.inChain() {
		return NoVolume, false
	}
	return m.upstreamOf(mp), true
}

// links returns every active target's upstream.
func (m *Model) links() map[VolumeID]VolumeID {
	l := map[VolumeID]VolumeID{}
	for _, mp := range m.Mappings {
		if mp.inChain() {
			l[mp.Target] = m.upstreamOf(mp)
		}
	}
	return l
}

// Links returns every active target's upstream, in volume order: what the copy-on-write layer's
// chains must say.
func (m *Model) Links() []Link {
	l := m.links()
	out := make([]Link, 0, len(l))
	for v, up := range l {
		out = append(out, Link{Vol: v, Upstream: up})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Vol < out[j].Vol })
	return out
}

// dependants returns the in-chain mappings whose target reads directly through v, in id order.
func (m *Model) dependants(v VolumeID) []*Mapping {
	var out []*Mapping
	for _, x := range m.sortedMappings() {
		if x.inChain() && m.upstreamOf(x) == v {
			out = append(out, x)
		}
	}
	return out
}

// Downstream returns the volumes that read directly through v, in volume order: the next older
// target in v's own chain and the newest target of each cascade from v.
func (m *Model) Downstream(v VolumeID) []VolumeID {
	var out []VolumeID
	for _, x := range m.dependants(v) {
		out = append(out, x.Target)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// DependentMappings returns the mappings that depend on mapping id: those whose target reads
// directly through id's target while id is in a chain. lsfcmap's dependent_mappings is their
// count. A mapping completes only when it has none (or has cleaned them).
func (m *Model) DependentMappings(id MappingID) []MappingID {
	mp := m.Mappings[id]
	if mp == nil || !mp.inChain() {
		return nil
	}
	var out []MappingID
	for _, x := range m.dependants(mp.Target) {
		if !reverse(mp, x) {
			out = append(out, x.ID)
		}
	}
	return out
}

// reverse reports whether x copies back the way mp copies (a restore and the mapping it
// undoes). x reads through mp's target only for grains mp has split and the target holds (the
// restore starts with every other grain counted as split), so x does not depend on mp; counting
// it would make each wait for the other forever.
func reverse(mp, x *Mapping) bool { return x.Source == mp.Target && x.Target == mp.Source }

// downstreamClosure returns every in-chain mapping that reads through mp's target, directly or
// through others, breadth first.
func (m *Model) downstreamClosure(mp *Mapping) []*Mapping {
	if !mp.inChain() {
		return nil
	}
	seen := map[MappingID]bool{mp.ID: true}
	var out []*Mapping
	queue := []VolumeID{mp.Target}
	for len(queue) > 0 {
		v := queue[0]
		queue = queue[1:]
		for _, x := range m.dependants(v) {
			if !seen[x.ID] && !reverse(mp, x) {
				seen[x.ID] = true
				out = append(out, x)
				queue = append(queue, x.Target)
			}
		}
	}
	return out
}

// LsVdiskDependentMaps returns the mappings whose targets depend on data held on volume v: every
// active target that reads through v, directly or through other targets, in id order.
func (m *Model) LsVdiskDependentMaps(v VolumeID) []MappingID {
	seen := map[MappingID]bool{}
	queue := []VolumeID{v}
	for len(queue) > 0 {
		u := queue[0]
		queue = queue[1:]
		for _, x := range m.dependants(u) {
			if !seen[x.ID] {
				seen[x.ID] = true
				queue = append(queue, x.Target)
			}
		}
	}
	return sortedIDs(seen)
}

// LsVdiskFcMapCopies returns the mappings from source v whose target holds a valid point-in-time
// copy of v: copying, or at 100 % in idle_or_copied or stopping. In id order.
func (m *Model) LsVdiskFcMapCopies(v VolumeID) []MappingID {
	var out []MappingID
	for _, mp := range m.sortedMappings() {
		if mp.Source != v {
			continue
		}
		if mp.State == Copying || (mp.State == IdleOrCopied || mp.State == Stopping) && mp.Progress() == 100 {
			out = append(out, mp.ID)
		}
	}
	return out
}

// ConnectedSet returns every mapping linked to mapping id through shared volumes, id included, in
// id order.
func (m *Model) ConnectedSet(id MappingID) []MappingID {
	mp := m.Mappings[id]
	if mp == nil {
		return nil
	}
	return sortedIDs(m.connected([]VolumeID{mp.Source, mp.Target}))
}

// linkedVolumes returns the volumes mapping x links: its source and target, and the volume its
// target hangs under if a chain's change left it there (Via), which joins x's dependency tree
// as much as its source does.
func (x *Mapping) linkedVolumes() []VolumeID {
	if x.inChain() && x.Via != nil {
		return []VolumeID{x.Source, x.Target, *x.Via}
	}
	return []VolumeID{x.Source, x.Target}
}

// connected returns the mappings reachable from the given volumes through shared volumes.
func (m *Model) connected(start []VolumeID) map[MappingID]bool {
	seenVol := map[VolumeID]bool{}
	set := map[MappingID]bool{}
	queue := append([]VolumeID(nil), start...)
	for _, v := range start {
		seenVol[v] = true
	}
	for len(queue) > 0 {
		v := queue[0]
		queue = queue[1:]
		for _, x := range m.Mappings {
			vs := x.linkedVolumes()
			if set[x.ID] || !slices.Contains(vs, v) {
				continue
			}
			set[x.ID] = true
			for _, u := range vs {
				if !seenVol[u] {
					seenVol[u] = true
					queue = append(queue, u)
				}
			}
		}
	}
	return set
}

func sortedIDs(set map[MappingID]bool) []MappingID {
	out := make([]MappingID, 0, len(set))
	for id := range set {
		out = append(out, id)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// Access is what hosts see of a volume (docs/flashcopy.md §2).
type Access struct {
	Online       bool // false: every NBD request fails with EIO
	WriteThrough bool // the cache must not hold dirty data
}

// VolumeAccess returns whether volume v is online and whether its cache is write-through, as the
// states of its mappings require: a source is write-through while preparing or prepared; a target
// fails I/O while preparing, prepared, stopped, and stopping below 100 %; source and target of a
// suspended mapping both fail.
func (m *Model) VolumeAccess(v VolumeID) (online, writeThrough bool) {
	a := m.access(v)
	return a.Online, a.WriteThrough
}

func (m *Model) access(v VolumeID) Access {
	a := Access{Online: true}
	for _, mp := range m.Mappings {
		if mp.Source != v && mp.Target != v {
			continue
		}
		isT := mp.Target == v
		switch mp.State {
		case Preparing, Prepared:
			if isT {
				a.Online = false
			} else {
				a.WriteThrough = true
			}
		case Stopped:
			if isT {
				a.Online = false
			}
		case Stopping:
			if isT && mp.Progress() < 100 {
				a.Online = false
			}
		case Suspended:
			a.Online = false
		}
	}
	return a
}

// accessAll returns the access of every volume.
func (m *Model) accessAll() map[VolumeID]Access {
	out := make(map[VolumeID]Access, len(m.Volumes))
	for id := range m.Volumes {
		out[id] = m.access(id)
	}
	return out
}

// checkStartLoop refuses the start of ms (the members of one group) if it would make a volume
// read through itself by way of two or more of them (S→T and T→S in one group, say). A volume
// is the target of at most one mapping, so walking up from a member's source through the
// mappings that are in a chain or start with it follows one path; a loop closed through active
// mappings alone is a restore, which the engine seeds at start (checkRestore governs it), but it
// can't see a loop closed by several mappings that join their chains in the same instant: every
// read of a grain none of them holds would go round it (the engine's walk gives up at maxDepth,
// with EIO).
func (m *Model) checkStartLoop(ms []*Mapping) error {
	starting := map[MappingID]bool{}
	for _, mp := range ms {
		starting[mp.ID] = true
	}
	for _, mp := range ms {
		var other *Mapping // the first other member on the way
		seen := map[VolumeID]bool{}
		for v := mp.Source; !seen[v]; {
			seen[v] = true
			x := m.targetMapping(v)
			if x == nil || x == mp || !x.inChain() && !starting[x.ID] {
				break
			}
			if starting[x.ID] && other == nil {
				other = x
			}
			v = x.Source
			if v == mp.Target && other != nil {
				return fcerr.New(fcerr.ChainLoop, "mappings %s and %s can't start together: volume %s would read through itself; "+
					"start them one after the other (the later one with -restore)", mp.Name, other.Name, m.Volumes[mp.Target].Name)
			}
		}
	}
	return nil
}
