package mappings

import (
	"bytes"
	"sort"
)

// txn is one command or event being applied to a clone of the model. The transitions below
// mutate tx.m and note the effects that are not implied by the difference between the model
// before and after; finish derives the rest (Persist, access changes, Relink) and puts all in
// the order documented on Effect.
type txn struct {
	m           *Model
	before      map[VolumeID]Access
	beforeLinks map[VolumeID]VolumeID
	beforeDur   []byte

	commit     *CommitStart
	release    []VolumeID
	stops      []MappingID
	splits     []Effect
	invalidate []VolumeID
	drops      []MappingID
	workers    []Effect
	async      []Effect
}

// run applies fn to a clone of m and adopts the clone only if fn succeeds, so that a refusal
// changes nothing even if fn had begun to change the clone.
func (m *Model) run(fn func(tx *txn) error) ([]Effect, error) {
	c := m.Clone()
	tx := &txn{m: c, before: c.accessAll(), beforeLinks: c.links(), beforeDur: c.durable()}
	if err := fn(tx); err != nil {
		return nil, err
	}
	tx.settle()
	effs := tx.finish()
	*m = *c
	return effs, nil
}

// settle completes every copying mapping that has split all its grains and has no dependants,
// and starts cleaning for those that still have some (docs/flashcopy.md §5: a mapping reaches
// idle_or_copied only at 100 % with nothing depending on it). Completing one can free another.
func (tx *txn) settle() {
	for again := true; again; {
		again = false
		for _, mp := range tx.m.sortedMappings() {
			if mp.State != Copying || mp.Split < mp.Grains {
				continue
			}
			if len(tx.m.DependentMappings(mp.ID)) == 0 {
				tx.toIdle(mp, false)
				again = true
			} else if !mp.Cleaning {
				mp.Cleaning = true
				tx.workers = append(tx.workers, StartCleaning{Map: mp.ID, Rate: mp.CleanRate})
			}
		}
	}
}

func (tx *txn) finish() []Effect {
	m := tx.m
	var out []Effect
	after := m.accessAll()
	afterLinks := m.links()
	relinks := diffLinks(tx.beforeLinks, afterLinks)

	switch {
	case tx.commit != nil:
		tx.commit.Links = relinks
		relinks = nil
		out = append(out, *tx.commit)
	case !bytes.Equal(tx.beforeDur, m.durable()):
		out = append(out, Persist{})
	}
	if tx.release != nil {
		out = append(out, Release{Vols: tx.release})
	}
	vols := make([]VolumeID, 0, len(after))
	for v := range after {
		if _, ok := tx.before[v]; ok {
			vols = append(vols, v)
		}
	}
	sort.Slice(vols, func(i, j int) bool { return vols[i] < vols[j] })
	for _, v := range vols {
		if tx.before[v].Online && !after[v].Online {
			out = append(out, SetOnline{Vol: v})
		}
	}
	for _, v := range vols {
		if !tx.before[v].WriteThrough && after[v].WriteThrough {
			out = append(out, SetWriteThrough{Vol: v, On: true})
		}
	}
	for _, id := range tx.stops {
		out = append(out, StopWorkers{Map: id})
	}
	out = append(out, tx.splits...)
	if len(relinks) > 0 {
		out = append(out, Relink{Links: relinks})
	}
	for _, v := range tx.invalidate {
		out = append(out, InvalidateCache{Vol: v})
	}
	for _, id := range tx.drops {
		out = append(out, DropMapping{Map: id})
	}
	for _, v := range vols {
		if !tx.before[v].Online && after[v].Online {
			out = append(out, SetOnline{Vol: v, Online: true})
		}
	}
	for _, v := range vols {
		if tx.before[v].WriteThrough && !after[v].WriteThrough {
			out = append(out, SetWriteThrough{Vol: v})
		}
	}
	out = append(out, tx.liveWorkers()...)
	out = append(out, tx.async...)
	return out
}

// liveWorkers keeps, per mapping, the last worker effect noted, and only if it still fits the
// mapping's final state (a mapping started and completed in one step needs no copy).
func (tx *txn) liveWorkers() []Effect {
	last := map[MappingID]int{}
	for i, e := range tx.workers {
		switch e := e.(type) {
		case StartBackgroundCopy:
			last[e.Map] = i
		case StartCleaning:
			last[e.Map] = i
		}
	}
	var out []Effect
	for i, e := range tx.workers {
		switch e := e.(type) {
		case StartBackgroundCopy:
			if mp := tx.m.Mappings[e.Map]; last[e.Map] == i && mp != nil && mp.State == Copying && !mp.Cleaning {
				out = append(out, e)
			}
		case StartCleaning:
			if mp := tx.m.Mappings[e.Map]; last[e.Map] == i && mp != nil && (mp.State == Stopping || mp.State == Copying && mp.Cleaning) {
				out = append(out, e)
			}
		}
	}
	return out
}

func diffLinks(before, after map[VolumeID]VolumeID) []Link {
	var out []Link
	for v, up := range after {
		if b, ok := before[v]; !ok || b != up {
			out = append(out, Link{Vol: v, Upstream: up})
		}
	}
	for v := range before {
		if _, ok := after[v]; !ok {
			out = append(out, Link{Vol: v, Upstream: NoVolume})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Vol < out[j].Vol })
	return out
}

// ---- transitions shared by commands and events ----

// prepare moves an idle_or_copied or stopped mapping to preparing (§3 Prepare, §6).
func (tx *txn) prepare(mp *Mapping, restore, startAfter bool) {
	mp.State = Preparing
	mp.StatusReason = ""
	mp.RestoreFlag = restore
	mp.Restoring = restore && tx.m.activeSource(mp.Target)
	mp.StartAfterPrepare = startAfter
	mp.Fencing = false
	tx.invalidate = append(tx.invalidate, mp.Target)
	tx.async = append(tx.async, FlushSource{Map: mp.ID, Vol: mp.Source})
}

// fence begins the start of prepared mappings (one group, or one stand-alone mapping).
func (tx *txn) fence(g GroupID, ms []*Mapping) {
	f := Fence{Group: g}
	seen := map[VolumeID]bool{}
	for _, mp := range ms {
		mp.Fencing = true
		mp.StartAfterPrepare = false
		f.Maps = append(f.Maps, mp.ID)
		if !seen[mp.Source] {
			seen[mp.Source] = true
			f.Sources = append(f.Sources, mp.Source)
		}
	}
	sort.Slice(f.Sources, func(i, j int) bool { return f.Sources[i] < f.Sources[j] })
	tx.async = append(tx.async, Hold{Fence: f})
}

// leave clears what belongs to an activity that has ended. An in-chain target leaves its chain
// as the copy-on-write layer takes it out (cow unlink): with relink (after cleaning, or with the
// data lost: a stop, a force stop, an I/O error) every target that read directly through it
// joins its upstream, but a restore's partner, which is that upstream (it can't read through
// itself) and stays; without (a split, or a mapping at 100 % leaving with no cleaning) they
// stay under it.
func (tx *txn) leave(mp *Mapping, relink bool) {
	if mp.inChain() || mp.State == Suspended {
		tx.stops = append(tx.stops, mp.ID)
	}
	if mp.inChain() {
		m, t := tx.m, mp.Target
		up := m.upstreamOf(mp)
		deps := m.dependants(t)
		mp.ChainSeq, mp.Via = 0, nil
		for _, x := range deps {
			if x == mp {
				continue
			}
			if relink && x.Target != up {
				m.place(x, up)
			} else {
				m.place(x, t)
			}
		}
	}
	mp.Resume = ""
	mp.Cleaning = false
	mp.RestoreFlag, mp.Restoring = false, false
	mp.StartAfterPrepare, mp.Fencing = false, false
}

// toIdle ends an activity at 100 %: the target holds a complete copy. An autodelete mapping is
// deleted at once. relink: the target left its chain after cleaning (see leave).
func (tx *txn) toIdle(mp *Mapping, relink bool) {
	wasActive := mp.inChain()
	tx.leave(mp, relink)
	mp.State = IdleOrCopied
	mp.StatusReason = ""
	if wasActive && mp.Incremental {
		mp.DiffTrusted = true
	}
	if mp.Autodelete {
		tx.deleteMapping(mp)
	}
}

// toStopped ends an activity without a usable copy. A copy cut short leaves the difference
// bitmap untrusted: the next start copies everything.
func (tx *txn) toStopped(mp *Mapping) {
	if mp.inChain() {
		mp.DiffTrusted = false
		// The target's data becomes whatever its store holds, unlike the view it showed:
		// every incremental mapping with that volume as source or target can no longer
		// tell which grains differ.
		for _, x := range tx.m.Mappings {
			if x != mp && x.Incremental && (x.Source == mp.Target || x.Target == mp.Target) {
				x.DiffTrusted = false
			}
		}
	}
	tx.leave(mp, true)
	mp.State = Stopped
}

// forceStop stops mp and every mapping downstream of it without cleaning; each ends stopped, or
// idle_or_copied if it had already split every grain.
func (tx *txn) forceStop(mp *Mapping) {
	all := append([]*Mapping{mp}, tx.m.downstreamClosure(mp)...)
	for _, x := range all {
		if x.Progress() == 100 {
			tx.toIdle(x, false)
		} else {
			tx.toStopped(x)
		}
	}
}

// deleteMapping removes mp, and its group if that is autodelete and now empty.
func (tx *txn) deleteMapping(mp *Mapping) {
	delete(tx.m.Mappings, mp.ID)
	tx.drops = append(tx.drops, mp.ID)
	tx.leaveGroup(mp.Group)
}

// leaveGroup deletes group g if it is autodelete and has no members left.
func (tx *txn) leaveGroup(g GroupID) {
	if grp := tx.m.Groups[g]; grp != nil && grp.Autodelete && len(tx.m.members(g)) == 0 {
		delete(tx.m.Groups, g)
	}
}

// workersFor notes the worker an active mapping must run.
func (tx *txn) workersFor(mp *Mapping) {
	switch {
	case mp.State == Copying && mp.Cleaning:
		tx.workers = append(tx.workers, StartCleaning{Map: mp.ID, Rate: mp.CleanRate})
	case mp.State == Copying:
		tx.workers = append(tx.workers, StartBackgroundCopy{Map: mp.ID, Rate: mp.CopyRate})
	case mp.State == Stopping:
		tx.workers = append(tx.workers, StartCleaning{Map: mp.ID, Rate: stoppingCleanRate(mp)})
	}
}

// stoppingCleanRate: a clean rate of 0 is treated as 50 while a mapping is stopping.
func stoppingCleanRate(mp *Mapping) int {
	if mp.CleanRate == 0 {
		return DefaultRate
	}
	return mp.CleanRate
}

// activeSource reports whether v is the source of an active (copying, stopping, suspended)
// mapping.
func (m *Model) activeSource(v VolumeID) bool {
	for _, mp := range m.Mappings {
		if mp.Source == v && mp.inChain() {
			return true
		}
	}
	return false
}

// reverseActive returns the active mapping that copies mp's target to mp's source (the one a
// restore by mp undoes), or nil.
func (m *Model) reverseActive(mp *Mapping) *Mapping {
	for _, x := range m.sortedMappings() {
		if x.Source == mp.Target && x.Target == mp.Source && x.inChain() {
			return x
		}
	}
	return nil
}

// Partner returns the mapping that copies in the opposite direction between the same two
// volumes (S→T and T→S), or NoMapping.
func (m *Model) Partner(id MappingID) MappingID {
	mp := m.Mappings[id]
	if mp == nil {
		return NoMapping
	}
	for _, x := range m.sortedMappings() {
		if x.Source == mp.Target && x.Target == mp.Source {
			return x.ID
		}
	}
	return NoMapping
}
