package mappings

import (
	"time"

	"fcnbd/internal/fcerr"
)

// Event is what the driver feeds back: the outcome of an effect, or news from the copy-on-write
// engine. Apply returns an error, and changes nothing, for an event that no longer fits (the
// mapping was deleted or left the state the event is about); the driver logs it and goes on.
type Event interface{ event() }

// FlushDone: the FlushSource of Map completed and the target's cache was discarded.
type FlushDone struct{ Map MappingID }

// FlushFailed: the FlushSource of Map failed. Map (and its whole group) is stopped.
type FlushFailed struct{ Map MappingID }

// FenceDrained: the Hold of Fence drained in time. Now becomes the start_time.
type FenceDrained struct {
	Fence Fence
	Now   time.Time
}

// FenceTimeout: the Hold of Fence did not drain in time; the start is abandoned and the
// mappings stay prepared. The driver reports fcerr.FenceTimeout to whoever started them.
type FenceTimeout struct{ Fence Fence }

// SplitProgress: Map's split bitmap now has Split grains set.
type SplitProgress struct {
	Map   MappingID
	Split int64
}

// CopyComplete: every grain of Map is split (the same as SplitProgress with all grains).
type CopyComplete struct{ Map MappingID }

// CleanProgress: Map's cleaning is Percent (0–100) done.
type CleanProgress struct {
	Map     MappingID
	Percent int
}

// CleanComplete: nothing reads through Map's target any more.
type CleanComplete struct{ Map MappingID }

// DiffCount: Map's difference bitmap now has Grains grains set.
type DiffCount struct {
	Map    MappingID
	Grains int64
}

// DiffLost: Map's difference bitmap can't be trusted (lost in a crash, unreadable): the next
// start copies everything.
type DiffLost struct{ Map MappingID }

// RunFigures: the engine let Map go at the end of a run (or of the part of it since the daemon
// started), having copied Figures into its target; they are added to the run's and the
// lifetime's figures.
type RunFigures struct {
	Map     MappingID
	Figures Figures
}

// IOError: a grain copy of Map failed (read or write, source or target).
type IOError struct{ Map MappingID }

// RestoreFailed: at daemon start, Map (copying, stopping or suspended when the daemon stopped)
// could not be put back in its dependency chain: its split bitmap is unreadable, or the
// copy-on-write layer refused it. Reason says why, for the operator. Its target's image is lost
// as with an I/O error: Map is stopped, and so is every mapping that read through its target.
type RestoreFailed struct {
	Map    MappingID
	Reason string
}

// BitmapOffline: Map's metadata can't be read or written.
type BitmapOffline struct{ Map MappingID }

// BitmapOnline: Map's metadata is available again.
type BitmapOnline struct{ Map MappingID }

func (FlushDone) event()     {}
func (FlushFailed) event()   {}
func (FenceDrained) event()  {}
func (FenceTimeout) event()  {}
func (SplitProgress) event() {}
func (CopyComplete) event()  {}
func (CleanProgress) event() {}
func (CleanComplete) event() {}
func (DiffCount) event()     {}
func (DiffLost) event()      {}
func (RunFigures) event()    {}
func (IOError) event()       {}
func (RestoreFailed) event() {}
func (BitmapOffline) event() {}
func (BitmapOnline) event()  {}

func stale(mp *Mapping, what string) error {
	return fcerr.New(fcerr.BadState, "%s for mapping %s in state %s ignored", what, mp.Name, mp.State)
}

// Apply feeds one event to the state machine and returns the effects it requires.
func (m *Model) Apply(ev Event) ([]Effect, error) {
	switch ev := ev.(type) {
	case FenceDrained:
		return m.run(func(tx *txn) error { tx.fenceDrained(ev.Fence, ev.Now); return nil })
	case FenceTimeout:
		return m.run(func(tx *txn) error { tx.fenceAbandon(ev.Fence); return nil })
	}
	return m.run(func(tx *txn) error {
		id, ok := mappingOf(ev)
		if !ok {
			return fcerr.New(fcerr.Internal, "unknown event %T", ev)
		}
		mp := tx.m.Mappings[id]
		if mp == nil {
			return fcerr.New(fcerr.NoSuchObject, "event %T for mapping %d, which no longer exists", ev, id)
		}
		switch ev := ev.(type) {
		case FlushDone:
			if mp.State != Preparing {
				return stale(mp, "flush done")
			}
			mp.State = Prepared
			tx.startIfPrepared(mp)
		case FlushFailed:
			if mp.State != Preparing {
				return stale(mp, "flush failed")
			}
			for _, x := range tx.set(mp) {
				if x.State == Preparing || x.State == Prepared {
					tx.toStopped(x)
					x.StatusReason = "flushing the cache of the source of mapping " + mp.Name + " failed"
				}
			}
		case SplitProgress:
			mp.Split = min(max(ev.Split, 0), mp.Grains)
		case CopyComplete:
			mp.Split = mp.Grains
		case CleanProgress:
			mp.CleanProgress = min(max(ev.Percent, 0), 100)
		case CleanComplete:
			switch {
			case mp.State == Stopping && mp.Progress() == 100:
				tx.toIdle(mp, true)
			case mp.State == Stopping:
				tx.toStopped(mp)
			case mp.State == Copying && mp.Split == mp.Grains:
				tx.toIdle(mp, true)
			default:
				return stale(mp, "clean complete")
			}
		case DiffCount:
			mp.DiffGrains = min(max(ev.Grains, 0), mp.Grains)
		case DiffLost:
			mp.DiffTrusted = false
		case RunFigures:
			tx.m.AddFigures(id, ev.Figures)
		case IOError:
			if mp.State != Copying && mp.State != Stopping {
				return stale(mp, "I/O error")
			}
			tx.lose(mp, "a grain copy failed", "stopped by a failed grain copy")
		case RestoreFailed:
			if !mp.inChain() {
				return stale(mp, "restore failed")
			}
			tx.lose(mp, "its state could not be restored at daemon start: "+ev.Reason, "whose state could not be restored")
		case BitmapOffline:
			switch mp.State {
			case Suspended:
			case Copying, Stopping:
				mp.Resume, mp.State = mp.State, Suspended
				tx.stops = append(tx.stops, mp.ID)
			default:
				return stale(mp, "bitmap offline")
			}
		case BitmapOnline:
			if mp.State != Suspended {
				return stale(mp, "bitmap online")
			}
			mp.State, mp.Resume = mp.Resume, ""
			tx.workersFor(mp)
		}
		return nil
	})
}

func mappingOf(ev Event) (MappingID, bool) {
	switch ev := ev.(type) {
	case FlushDone:
		return ev.Map, true
	case FlushFailed:
		return ev.Map, true
	case SplitProgress:
		return ev.Map, true
	case CopyComplete:
		return ev.Map, true
	case CleanProgress:
		return ev.Map, true
	case CleanComplete:
		return ev.Map, true
	case DiffCount:
		return ev.Map, true
	case DiffLost:
		return ev.Map, true
	case RunFigures:
		return ev.Map, true
	case IOError:
		return ev.Map, true
	case RestoreFailed:
		return ev.Map, true
	case BitmapOffline:
		return ev.Map, true
	case BitmapOnline:
		return ev.Map, true
	}
	return NoMapping, false
}

// lose stops mp, whose target's image is lost (reason: why), and every mapping that read
// through that target: those at 100 % hold every grain and end idle_or_copied, the others are
// stopped too (their reason names mp; why says what happened to it).
func (tx *txn) lose(mp *Mapping, reason, why string) {
	deps := tx.m.downstreamClosure(mp)
	tx.toStopped(mp)
	mp.StatusReason = reason
	for _, x := range deps {
		if x.Progress() == 100 {
			tx.toIdle(x, false)
		} else {
			tx.toStopped(x)
			x.StatusReason = "it read through the target of mapping " + mp.Name + ", " + why
		}
	}
}

// set returns the mappings that move together with mp: its group, or mp alone.
func (tx *txn) set(mp *Mapping) []*Mapping {
	if mp.Group == 0 {
		return []*Mapping{mp}
	}
	return tx.m.members(mp.Group)
}

// startIfPrepared begins the fence of a -prep start once every mapping of the set is prepared.
func (tx *txn) startIfPrepared(mp *Mapping) {
	if !mp.StartAfterPrepare {
		return
	}
	set := tx.set(mp)
	for _, x := range set {
		if x.State != Prepared || !x.StartAfterPrepare {
			if x.State != Preparing {
				// A member left the prepare (stopped): the -prep start can't happen.
				for _, y := range set {
					y.StartAfterPrepare = false
				}
			}
			return
		}
	}
	tx.fence(mp.Group, set)
}

// fenceDrained is §6 step 3 and 4: one atomic commit for every mapping of the fence, then the
// release. If the fence no longer fits the model (a member was stopped, moved, or the start would
// now need -restore or close a loop), the start is abandoned instead and the sources are released.
func (tx *txn) fenceDrained(f Fence, now time.Time) {
	m := tx.m
	ms, ok := tx.fenceMembers(f)
	for _, mp := range ms {
		if ok && m.checkRestore(mp, mp.RestoreFlag) != nil {
			ok = false
		}
	}
	if ok && m.checkStartLoop(ms) != nil {
		ok = false
	}
	if !ok {
		tx.fenceAbandon(f)
		return
	}
	now = now.Round(0).UTC()
	c := &CommitStart{Group: f.Group, Time: now}
	// Decide restore partners before any target joins a chain: the decision is about the
	// instant before the commit.
	partner := map[MappingID]*Mapping{}
	for _, mp := range ms {
		mp.Restoring = mp.RestoreFlag && m.activeSource(mp.Target)
		if mp.Restoring {
			partner[mp.ID] = m.reverseActive(mp)
		}
	}
	for _, mp := range ms {
		e := StartEntry{Map: mp.ID, Source: mp.Source, Target: mp.Target, GrainKiB: mp.GrainKiB, RestoreOf: NoMapping}
		split := int64(0)
		if mp.Incremental {
			e.ResetDifference = true
			if mp.DiffTrusted {
				e.FromDifference = true
				split = mp.Grains - mp.DiffGrains
			}
			mp.DiffGrains = 0
		}
		if p := partner[mp.ID]; p != nil {
			// The grains that need no copy are known only to the data path (those the
			// target still reads through to the source, which another target of the
			// source may hold instead of the partner): leave the count to its progress
			// reports, never above the truth, so the restore can't complete before it has.
			e.RestoreOf = p.ID
		}
		c.Entries = append(c.Entries, e)
		// §5: the target goes directly under its source; what hung there from the
		// source's own chain now reads through it (the copy-on-write layer moves exactly
		// these: targets of the source directly under it, wherever their chains put them).
		var moved []*Mapping
		for _, x := range m.sortedMappings() {
			if x.inChain() && x.Source == mp.Source && m.upstreamOf(x) == mp.Source {
				moved = append(moved, x)
			}
		}
		mp.State = Copying
		mp.Via = nil
		mp.ChainSeq = m.NextSeq
		m.NextSeq++
		mp.StartTime = now
		mp.Split = split
		mp.CleanProgress = 0
		mp.Run = Figures{}
		mp.Cleaning, mp.Fencing = false, false
		for _, x := range moved {
			m.place(x, mp.Target)
		}
		tx.workersFor(mp)
	}
	if g := m.Groups[f.Group]; g != nil {
		g.StartTime = now
	}
	tx.commit = c
	tx.release = f.Sources
}

// fenceMembers returns the mappings of f and whether they are still exactly a set that is
// waiting for this fence.
func (tx *txn) fenceMembers(f Fence) ([]*Mapping, bool) {
	ok := len(f.Maps) > 0
	var ms []*Mapping
	for _, id := range f.Maps {
		mp := tx.m.Mappings[id]
		if mp == nil {
			ok = false
			continue
		}
		ms = append(ms, mp)
		if mp.State != Prepared || !mp.Fencing || mp.Group != f.Group {
			ok = false
		}
	}
	if f.Group != 0 && ok && len(tx.m.members(f.Group)) != len(ms) {
		ok = false
	}
	return ms, ok
}

// fenceAbandon ends a fence without starting: the mappings stay as they are (prepared), the
// sources are released.
func (tx *txn) fenceAbandon(f Fence) {
	for _, id := range f.Maps {
		if mp := tx.m.Mappings[id]; mp != nil {
			mp.Fencing = false
		}
	}
	tx.release = f.Sources
	if tx.release == nil {
		tx.release = []VolumeID{}
	}
}

// Reopen returns the effects that bring a freshly started data path in line with a model just
// loaded from the catalogue (volumes start online and write-back, with no chains and no
// workers). A prepare in progress is restarted (its flush is redone); a start in progress was
// not committed and so did not happen. Reopen does not change the model.
func (m *Model) Reopen() []Effect {
	tx := &txn{m: m}
	var out []Effect
	var vols []VolumeID
	for id := range m.Volumes {
		vols = append(vols, id)
	}
	sortVols(vols)
	for _, v := range vols {
		if !m.access(v).Online {
			out = append(out, SetOnline{Vol: v})
		}
	}
	for _, v := range vols {
		if m.access(v).WriteThrough {
			out = append(out, SetWriteThrough{Vol: v, On: true})
		}
	}
	if l := m.Links(); len(l) > 0 {
		out = append(out, Relink{Links: l})
	}
	for _, mp := range m.sortedMappings() {
		tx.workersFor(mp)
		if mp.State == Preparing {
			tx.invalidate = append(tx.invalidate, mp.Target)
			tx.async = append(tx.async, FlushSource{Map: mp.ID, Vol: mp.Source})
		}
	}
	for _, v := range tx.invalidate {
		out = append(out, InvalidateCache{Vol: v})
	}
	out = append(out, tx.workers...)
	return append(out, tx.async...)
}
