package mappings

import (
	"fmt"
	"strings"
	"time"
)

// Effect is one thing the driver must do. A command or event returns its effects in the order
// they must be carried out; the driver stops at the first that fails (see each type for what it
// then feeds back). Effects are values: they compare with reflect.DeepEqual and print with String.
//
// Every list that changes the catalogue starts with Persist or CommitStart. The driver applies a
// command to a Clone of its model and adopts the clone only once that first effect succeeded, so
// that an unwritable catalogue leaves the daemon as it was (fcerr.MetadataUnwritable).
//
// Within a list the order is always: Persist or CommitStart; Release; volumes going offline or
// write-through; StopWorkers; SplitOut; Relink; InvalidateCache; DropMapping; volumes coming back
// online or write-back; StartBackgroundCopy / StartCleaning; FlushSource; Hold.
type Effect interface {
	fmt.Stringer
	effect()
}

// Persist: write the model, as it is after the call that returned this effect, to the catalogue
// in one atomic commit.
type Persist struct{}

// SetOnline: make the volume's NBD requests fail with EIO (Online false) or succeed again.
type SetOnline struct {
	Vol    VolumeID
	Online bool
}

// SetWriteThrough: switch the volume's cache to write-through (On) or back to write-back.
type SetWriteThrough struct {
	Vol VolumeID
	On  bool
}

// InvalidateCache: drop the volume's cache, clean and dirty blocks alike (prepare of a target).
type InvalidateCache struct{ Vol VolumeID }

// FlushSource: destage every dirty block of Vol's cache down through the copy-on-write layer and
// make it durable; then feed FlushDone{Map} or, on failure, FlushFailed{Map}. It may run in the
// background: the model accepts other commands meanwhile.
type FlushSource struct {
	Map MappingID
	Vol VolumeID
}

// Fence names a start in progress: the mappings to start together and their sources.
type Fence struct {
	Group   GroupID // 0: a stand-alone mapping
	Maps    []MappingID
	Sources []VolumeID
}

// Hold: stop admitting reads and writes to every source of the fence at the cache layer and wait,
// bounded, until every request already below the cache has completed (docs/flashcopy.md §6 steps
// 1–2). Then feed FenceDrained{Fence, Now} or, if the drain did not finish in time,
// FenceTimeout{Fence}. The model answers either with the Release.
type Hold struct{ Fence Fence }

// Release: admit the held requests to the volumes again (§6 step 4).
type Release struct{ Vols []VolumeID }

// StartEntry is one mapping of a CommitStart: how to seed its split bitmap.
//
// split := none; then if FromDifference: every grain not in the difference bitmap counts as
// split; then if RestoreOf != NoMapping: every grain for which Source's view still reads
// through to Target's own data counts as split (with RestoreOf the only target of Target,
// the grains RestoreOf has not split). If ResetDifference, clear the difference bitmap
// afterwards (recording goes on). The model's Split after the commit counts only the
// FromDifference grains; the data path's progress reports bring it up to date.
type StartEntry struct {
	Map             MappingID
	Source, Target  VolumeID
	GrainKiB        int
	FromDifference  bool
	RestoreOf       MappingID
	ResetDifference bool
}

// Link is a volume's place in a dependency chain: the volume it reads through for grains it does
// not hold. Upstream NoVolume: the volume is no longer an active target and reads its own store.
type Link struct {
	Vol      VolumeID
	Upstream VolumeID
}

// CommitStart: in ONE atomic metadata commit (§6 step 3), persist the model (as Persist) and seed
// the split bitmaps of Entries, and apply Links to the copy-on-write layer's chains before any
// held request is released. Nothing of it may be visible if the commit fails; the driver then
// keeps its previous model, releases the sources and reports the start as failed.
type CommitStart struct {
	Group   GroupID
	Time    time.Time
	Entries []StartEntry
	Links   []Link
}

// StopWorkers: stop the background copy or cleaning of the mapping (idempotent).
type StopWorkers struct{ Map MappingID }

// SplitOut: the mapping, at 100 %, leaves its chain at once (stopfcmap -split). Its dependants
// stay under Target, which holds every grain of the image they read through it, so that they
// keep their data (the Relink that follows says so).
type SplitOut struct {
	Map    MappingID
	Target VolumeID
}

// Relink: set the upstream of each listed volume in the copy-on-write layer's chains.
type Relink struct{ Links []Link }

// DropMapping: the mapping is deleted; free its split and difference bitmaps.
type DropMapping struct{ Map MappingID }

// StartBackgroundCopy: run (or re-rate) the mapping's background copy at Rate (0: none). Feed
// Progress events as grains are split; CopyComplete when all are.
type StartBackgroundCopy struct {
	Map  MappingID
	Rate int
}

// StartCleaning: stop any background copy and run (or re-rate) the mapping's cleaning at Rate
// (0: paused): copy to the mapping's downstream the grains it still reads through the target.
// Feed CleanComplete when nothing reads through it any more.
type StartCleaning struct {
	Map  MappingID
	Rate int
}

func (Persist) effect()             {}
func (SetOnline) effect()           {}
func (SetWriteThrough) effect()     {}
func (InvalidateCache) effect()     {}
func (FlushSource) effect()         {}
func (Hold) effect()                {}
func (Release) effect()             {}
func (CommitStart) effect()         {}
func (StopWorkers) effect()         {}
func (SplitOut) effect()            {}
func (Relink) effect()              {}
func (DropMapping) effect()         {}
func (StartBackgroundCopy) effect() {}
func (StartCleaning) effect()       {}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

func (Persist) String() string     { return "Persist" }
func (e SetOnline) String() string { return fmt.Sprintf("SetOnline v%d %s", e.Vol, onOff(e.Online)) }
func (e SetWriteThrough) String() string {
	return fmt.Sprintf("SetWriteThrough v%d %s", e.Vol, onOff(e.On))
}
func (e InvalidateCache) String() string { return fmt.Sprintf("InvalidateCache v%d", e.Vol) }
func (e FlushSource) String() string     { return fmt.Sprintf("FlushSource m%d v%d", e.Map, e.Vol) }
func (e Hold) String() string            { return "Hold " + e.Fence.String() }
func (e Release) String() string         { return "Release " + vols(e.Vols) }
func (e StopWorkers) String() string     { return fmt.Sprintf("StopWorkers m%d", e.Map) }
func (e SplitOut) String() string        { return fmt.Sprintf("SplitOut m%d v%d", e.Map, e.Target) }
func (e Relink) String() string          { return "Relink " + links(e.Links) }
func (e DropMapping) String() string     { return fmt.Sprintf("DropMapping m%d", e.Map) }
func (e StartBackgroundCopy) String() string {
	return fmt.Sprintf("StartBackgroundCopy m%d rate %d", e.Map, e.Rate)
}
func (e StartCleaning) String() string {
	return fmt.Sprintf("StartCleaning m%d rate %d", e.Map, e.Rate)
}

func (f Fence) String() string {
	ms := make([]string, len(f.Maps))
	for i, id := range f.Maps {
		ms[i] = fmt.Sprintf("m%d", id)
	}
	return fmt.Sprintf("g%d [%s] %s", f.Group, strings.Join(ms, " "), vols(f.Sources))
}

func (e CommitStart) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "CommitStart g%d", e.Group)
	for _, s := range e.Entries {
		fmt.Fprintf(&b, " m%d(v%d->v%d", s.Map, s.Source, s.Target)
		if s.FromDifference {
			b.WriteString(" diff")
		}
		if s.RestoreOf != NoMapping {
			fmt.Fprintf(&b, " restore-of m%d", s.RestoreOf)
		}
		if s.ResetDifference {
			b.WriteString(" reset-diff")
		}
		b.WriteString(")")
	}
	b.WriteString(" " + links(e.Links))
	return b.String()
}

func vols(vs []VolumeID) string {
	s := make([]string, len(vs))
	for i, v := range vs {
		s[i] = fmt.Sprintf("v%d", v)
	}
	return "[" + strings.Join(s, " ") + "]"
}

func links(ls []Link) string {
	s := make([]string, len(ls))
	for i, l := range ls {
		if l.Upstream == NoVolume {
			s[i] = fmt.Sprintf("v%d via none", l.Vol)
		} else {
			s[i] = fmt.Sprintf("v%d via v%d", l.Vol, l.Upstream)
		}
	}
	return "[" + strings.Join(s, " ") + "]"
}
