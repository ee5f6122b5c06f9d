package driver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"

	"fcnbd/bitmap"
	"fcnbd/cow"
	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
	"fcnbd/mappings"
)

// command applies fn to a clone of the model and carries out the effects it returns. A
// refusal, or a failure of the first effect (the catalogue commit), changes nothing.
func (d *Driver) command(fn func(m *mappings.Model) ([]mappings.Effect, error)) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	next := d.model.Clone()
	effs, err := fn(next)
	if err != nil {
		return err
	}
	return d.apply(next, effs)
}

// eventLocked feeds ev to the state machine; d.mu is held. An event that no longer fits is
// logged and dropped, as the model asks.
func (d *Driver) eventLocked(ev mappings.Event) {
	next := d.model.Clone()
	effs, err := next.Apply(ev)
	if err != nil {
		d.log.Debug().Err(err).Str("event", fmt.Sprintf("%T", ev)).Msg("event ignored")
		return
	}
	if err := d.apply(next, effs); err != nil {
		d.log.Error().Err(err).Str("event", fmt.Sprintf("%T", ev)).Msg("event's effects failed")
		d.eventFailedLocked(ev, err)
	}
}

func (d *Driver) event(ev mappings.Event) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.eventLocked(ev)
}

// apply carries out effs, computed on next, in order, and adopts next once the first effect
// succeeded. d.mu is held.
func (d *Driver) apply(next *mappings.Model, effs []mappings.Effect) error {
	for i, e := range effs {
		if err := d.do(next, e); err != nil {
			if i == 0 {
				return err
			}
			d.log.Error().Err(err).Stringer("effect", e).Msg("effect failed")
		}
		if i == 0 {
			d.model = next
		}
	}
	d.model = next
	d.syncEngine()
	d.syncDiffs()
	// A start's waiters hear of it only now that every effect of the start ran: the sources
	// are released and the targets online (§6 step 4), so the caller sees what it started.
	for _, id := range d.started {
		d.resolve(id, nil)
	}
	d.started = d.started[:0]
	d.settleWaiters()
	// Still under the same hold of d.mu, so no view sees a run that left the engine before
	// its figures are in the model.
	ended := d.ended
	d.ended = nil
	for _, ev := range ended {
		d.eventLocked(ev)
	}
	return nil
}

// figures are the copy work the engine counted for a mapping.
func figures(p cow.Progress) mappings.Figures {
	return mappings.Figures{GrainsCopied: p.GrainsCopied, SplitOnWrite: p.SplitOnWrite, BytesCopied: p.BytesCopied}
}

func (d *Driver) do(next *mappings.Model, e mappings.Effect) error {
	d.log.Debug().Stringer("effect", e).Msg("effect")
	switch e := e.(type) {
	case mappings.Persist:
		return d.persist(next)
	case mappings.CommitStart:
		return d.commitStart(next, e)
	case mappings.SetOnline:
		if s := d.stackOf(e.Vol); s != nil {
			s.online.Store(e.Online)
		}
	case mappings.SetWriteThrough:
		if s := d.stackOf(e.Vol); s != nil {
			s.cache.SetWriteThrough(e.On || d.opts.WriteThrough)
		}
	case mappings.InvalidateCache:
		if s := d.stackOf(e.Vol); s != nil {
			s.cache.Invalidate()
		}
	case mappings.FlushSource:
		s := d.stackOf(e.Vol)
		go func() {
			// Write-through is already on (an earlier effect of the same list), so nothing can
			// slip into the cache behind this flush.
			var err error
			if s == nil {
				err = fmt.Errorf("volume %d has no data path", e.Vol)
			} else {
				err = s.cache.Flush()
			}
			if err != nil {
				d.log.Error().Err(err).Int("fcmap", int(e.Map)).Msg("prepare: flushing the source failed; the mapping is stopped")
				d.event(mappings.FlushFailed{Map: e.Map})
				return
			}
			d.event(mappings.FlushDone{Map: e.Map})
		}()
	case mappings.Hold:
		go d.fence(e.Fence)
	case mappings.Release:
		d.release(e.Vols)
	case mappings.SplitOut:
		if err := d.eng.Split(int(e.Map)); err != nil && !errors.Is(err, cow.ErrNoMapping) {
			return fmt.Errorf("split fcmap %d: %w", e.Map, err)
		}
	case mappings.DropMapping:
		failpoint("delete-before-drop-bitmaps")
		// No write records for the mapping once this returns; only then may its image go.
		d.eng.UntrackDifference(int(e.Map))
		delete(d.diffs, e.Map)
		d.journal.drop(int(e.Map))
		d.journal.dropKind(diffKey(int(e.Map)))
		d.journal.dropKind(startKey(int(e.Map)))
		d.forgetTargetWrites(e.Map)
		if err := d.cat.Update(func(tx *catalog.Tx) error {
			for _, k := range []catalog.BitmapKind{catalog.SplitBitmap, catalog.DifferenceBitmap, catalog.StartDifferenceBitmap, catalog.FailureRecord} {
				if err := tx.DeleteBitmap(uint64(e.Map), k); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			// Harmless: a later start of the same id can't happen (ids are not reused) and
			// the next start of any mapping rewrites its own bitmap whole.
			d.log.Warn().Err(err).Int("fcmap", int(e.Map)).Msg("could not delete the bitmaps of a deleted mapping")
		}
	case mappings.StopWorkers, mappings.Relink, mappings.StartBackgroundCopy, mappings.StartCleaning:
		// The engine's topology and workers follow the adopted model in syncEngine.
	default:
		return fmt.Errorf("unknown effect %T", e)
	}
	return nil
}

func (d *Driver) persist(m *mappings.Model) error {
	data, err := json.Marshal(m)
	if err != nil {
		return fcerr.New(fcerr.Internal, "encode the FlashCopy model: %v", err)
	}
	failpoint("before-persist")
	if err := d.cat.Update(func(tx *catalog.Tx) error { return tx.PutModel(data) }); err != nil {
		return fcerr.Unwritable(err, "persist the FlashCopy state")
	}
	failpoint("after-persist")
	return nil
}

// commitStart is §6 step 3 for the mappings of e: the engine takes the targets into their
// chains (with background copy still off), then one catalogue commit records the model and
// every split bitmap. If the commit fails the engine forgets the mappings again; the sources
// are still held, so no host I/O has seen the new chains.
func (d *Driver) commitStart(next *mappings.Model, e mappings.CommitStart) error {
	specs := make([]cow.MappingSpec, 0, len(e.Entries))
	ids := make([]int, 0, len(e.Entries))
	for _, en := range e.Entries {
		size := next.Volumes[en.Source].Size
		grain := int64(en.GrainKiB) << 10
		bm := bitmap.New(size, grain)
		if en.FromDifference {
			// Every grain written on neither volume since the last start holds the same
			// data on both (the model trusts the record only after a complete copy).
			diff := d.journal.bitmapKind(diffKey(int(en.Map)), size, grain)
			for g := diff.NextClear(0); g >= 0; g = diff.NextClear(g + 1) {
				bm.Set(g)
			}
		}
		// RestoreOf: the engine adds the grains the restore's source still reads through to
		// its target (those the partner, or another target of the same source, never split).
		specs = append(specs, cow.MappingSpec{
			ID: int(en.Map), Source: int(en.Source), Target: int(en.Target), GrainSize: grain, Split: bm,
		})
		ids = append(ids, int(en.Map))
		d.journal.install(int(en.Map), image(bm))
	}
	undoImages := func() {
		for _, id := range ids {
			d.journal.drop(id)
		}
	}
	if err := d.eng.StartMappings(specs); err != nil {
		undoImages()
		return fcerr.New(fcerr.BadState, "the copy-on-write engine refused the start: %v", err)
	}
	for _, s := range specs {
		d.journal.merge(s.ID, s.Split)
	}
	data, err := json.Marshal(next)
	if err != nil {
		return fcerr.New(fcerr.Internal, "encode the FlashCopy model: %v", err)
	}
	imgs := d.startDifferences(next, e, specs)
	imgs.splits = ids
	d.startMu.Lock()
	d.startTargetWrites(next, e)
	failpoint("start-before-commit")
	diffs, err := d.journal.commitStart(imgs, func(tx *catalog.Tx) error { return tx.PutModel(data) })
	if err != nil {
		d.dropTargetWrites(e)
	}
	d.startMu.Unlock()
	if err != nil {
		for _, id := range ids {
			d.eng.StopMapping(id, true)
			d.eng.RemoveMapping(id)
		}
		undoImages()
		return fcerr.Unwritable(err, "start")
	}
	failpoint("start-after-commit")
	d.adoptDifferences(next, e, diffs)
	for _, id := range ids {
		d.active[mappings.MappingID(id)] = true
		d.rates[mappings.MappingID(id)] = &throughput{}
		d.started = append(d.started, mappings.MappingID(id))
	}
	return nil
}

// startDifferences is what a start does to difference bitmaps, for the start commit: an
// incremental mapping that starts has its bitmap cleared (ResetDifference); any other
// incremental mapping with the target of a starting mapping as its source or target gets a bit
// for every grain whose view that start changes (those not seeded as split), since the grain
// may now differ between its two volumes.
func (d *Driver) startDifferences(next *mappings.Model, e mappings.CommitStart, specs []cow.MappingSpec) startImages {
	imgs := startImages{diffs: map[int]func(*bitmap.Bitmap) *bitmap.Bitmap{}, geom: map[int][2]int64{}, starts: map[int]bool{}}
	reset := map[mappings.MappingID]bool{}
	for _, en := range e.Entries {
		if en.ResetDifference {
			// Untracked (the engine refused it): the start difference is every grain.
			imgs.starts[int(en.Map)] = en.FromDifference && d.diffs[en.Map]
		}
		if en.ResetDifference && d.diffs[en.Map] {
			reset[en.Map] = true
			imgs.diffs[int(en.Map)] = func(old *bitmap.Bitmap) *bitmap.Bitmap {
				return bitmap.New(old.VolumeSize(), old.GrainSize())
			}
		}
	}
	for i, en := range e.Entries {
		seed := specs[i].Split
		for id, mp := range next.Mappings {
			if id == en.Map || reset[id] || !d.diffs[id] || (mp.Source != en.Target && mp.Target != en.Target) {
				continue
			}
			prev := imgs.diffs[int(id)]
			imgs.diffs[int(id)] = func(old *bitmap.Bitmap) *bitmap.Bitmap {
				if prev != nil {
					old = prev(old)
				}
				if old.GrainSize() != seed.GrainSize() {
					old.Fill() // another grain size: every grain may differ
					return old
				}
				for g := seed.NextClear(0); g >= 0; g = seed.NextClear(g + 1) {
					old.Set(g)
				}
				return old
			}
		}
	}
	geom := func(id int) {
		mp := next.Mappings[mappings.MappingID(id)]
		imgs.geom[id] = [2]int64{next.Volumes[mp.Source].Size, int64(mp.GrainKiB) << 10}
	}
	for id := range imgs.diffs {
		geom(id)
	}
	for id := range imgs.starts {
		geom(id)
	}
	return imgs
}

// adoptDifferences gives the engine the difference bitmaps the start commit wrote: fresh ones
// for the mappings that started, the added bits for the others.
func (d *Driver) adoptDifferences(next *mappings.Model, e mappings.CommitStart, diffs map[int]*bitmap.Bitmap) {
	starting := map[int]bool{}
	for _, en := range e.Entries {
		starting[int(en.Map)] = true
	}
	for id, bm := range diffs {
		mp := next.Mappings[mappings.MappingID(id)]
		var err error
		if starting[id] {
			err = d.eng.TrackDifference(id, int(mp.Source), int(mp.Target), bm)
		} else {
			err = d.eng.AddDifference(id, bm)
		}
		if err != nil {
			d.log.Error().Err(err).Int("fcmap", id).Msg("engine: difference bitmap after a start")
		}
	}
}

// syncDiffs makes the engine record differences for every incremental mapping of the model
// (created since the last call, or loaded at open); deleted ones are dropped by DropMapping.
func (d *Driver) syncDiffs() {
	for id, mp := range d.model.Mappings {
		if !mp.Incremental || d.diffs[id] {
			continue
		}
		size, grain := d.model.Volumes[mp.Source].Size, int64(mp.GrainKiB)<<10
		if !d.journal.has(diffKey(int(id))) {
			d.journal.installKind(diffKey(int(id)), chunks{})
		}
		bm := d.journal.bitmapKind(diffKey(int(id)), size, grain)
		if err := d.eng.TrackDifference(int(id), int(mp.Source), int(mp.Target), bm); err != nil {
			d.log.Error().Err(err).Int("fcmap", int(id)).Msg("engine: track the difference bitmap")
			continue
		}
		d.diffs[id] = true
	}
}

// beforeStartCommit feeds, just before FenceDrained, what the model's seeding decisions need
// to match the data path exactly: each incremental member's difference count as it is now
// (the sources are held and the targets offline, so it stays), and DiffLost for a member whose
// volume is the target of another member (that start changes grains its record does not show).
func (d *Driver) beforeStartCommit(f mappings.Fence) {
	targets := map[mappings.VolumeID]mappings.MappingID{}
	for _, id := range f.Maps {
		if mp := d.model.Mappings[id]; mp != nil {
			targets[mp.Target] = id
		}
	}
	for _, id := range f.Maps {
		mp := d.model.Mappings[id]
		if mp == nil || !mp.Incremental {
			continue
		}
		x, crossS := targets[mp.Source]
		y, crossT := targets[mp.Target]
		if !d.diffs[id] || (crossS && x != id) || (crossT && y != id) {
			d.eventLocked(mappings.DiffLost{Map: id})
			continue
		}
		if n, err := d.eng.DifferenceCount(int(id)); err == nil {
			d.eventLocked(mappings.DiffCount{Map: id, Grains: int64(n)})
		}
	}
}

// fence is §6 steps 1–2 and hands over to the state machine for 3–4: hold every source at its
// cache, wait (bounded) for everything admitted earlier to finish below the caches, then feed
// FenceDrained, whose effects commit and release while the sources are still held.
func (d *Driver) fence(f mappings.Fence) {
	ctx, cancel := context.WithTimeout(context.Background(), d.opts.FenceTimeout)
	defer cancel()
	start := time.Now()
	vols := append([]mappings.VolumeID(nil), f.Sources...)
	sort.Slice(vols, func(i, j int) bool { return vols[i] < vols[j] })
	vols = dedupe(vols)
	held := map[mappings.VolumeID]bool{}
	var err error
	for _, v := range vols {
		s := d.stackOf(v)
		if s == nil {
			err = fmt.Errorf("volume %d has no data path", v)
			break
		}
		held[v] = true
		if err = s.cache.Hold(ctx); err != nil {
			break
		}
	}
	drained := time.Now()

	d.mu.Lock()
	defer d.mu.Unlock()
	d.held = held
	if err == nil {
		d.beforeStartCommit(f)
		d.eventLocked(mappings.FenceDrained{Fence: f, Now: drained.UTC()})
		// If the commit failed, the model still has the start in progress: abandon it.
		for _, id := range f.Maps {
			if mp := d.model.Mappings[id]; mp != nil && mp.Fencing {
				d.eventLocked(mappings.FenceTimeout{Fence: f})
				break
			}
		}
	} else {
		ferr := fcerr.New(fcerr.FenceTimeout, "the start was abandoned: I/O in flight to the sources did not drain within %s (%v); the mappings stay prepared", d.opts.FenceTimeout, err)
		for _, id := range f.Maps {
			d.fenceEr[id] = ferr
		}
		d.eventLocked(mappings.FenceTimeout{Fence: f})
	}
	// Whatever the model said, nothing stays held.
	var rest []mappings.VolumeID
	for v := range d.held {
		rest = append(rest, v)
	}
	d.release(rest)
	hold := time.Since(start)
	d.holds[f.Group] = hold
	d.log.Info().Int("group", int(f.Group)).Dur("hold", hold).Dur("drain", drained.Sub(start)).
		Bool("started", err == nil).Msg("start fence released")
	d.settleWaiters()
}

// release ends the hold of the listed volumes that the current fence holds.
func (d *Driver) release(vols []mappings.VolumeID) {
	for _, v := range vols {
		if !d.held[v] {
			continue
		}
		delete(d.held, v)
		if s := d.stackOf(v); s != nil {
			s.cache.Release()
		}
	}
}

func dedupe(vs []mappings.VolumeID) []mappings.VolumeID {
	out := vs[:0]
	for i, v := range vs {
		if i == 0 || v != vs[i-1] {
			out = append(out, v)
		}
	}
	return out
}

// syncEngine brings the engine's mappings and rates in line with the adopted model: mappings
// that left their chain in the model leave the engine; stopping ones clean; rates follow.
func (d *Driver) syncEngine() {
	for id := range d.active {
		mp := d.model.Mappings[id]
		p, err := d.eng.Progress(int(id))
		if errors.Is(err, cow.ErrNoMapping) {
			delete(d.active, id)
			continue
		}
		if mp == nil || mp.ChainSeq == 0 {
			if p.Phase != cow.Stopped {
				finished := mp == nil || mp.State == mappings.IdleOrCopied
				if !(finished && p.Percent == 100) {
					d.eng.StopMapping(int(id), true)
				}
			}
			failpoint("before-engine-remove")
			// Out of its chain or at 100 %, the mapping takes no more copies: these are its
			// run's final figures.
			last, _ := d.eng.Progress(int(id))
			if err := d.eng.RemoveMapping(int(id)); err != nil {
				d.log.Error().Err(err).Int("fcmap", int(id)).Msg("engine: remove mapping")
				continue
			}
			d.ended = append(d.ended, mappings.RunFigures{Map: id, Figures: figures(last)})
			delete(d.active, id)
			delete(d.applied, id)
			d.journal.drop(int(id))
			continue
		}
		copyRate, cleanRate := mp.CopyRate, mp.CleanRate
		switch mp.State {
		case mappings.Stopping:
			if p.Phase == cow.Copying {
				if _, err := d.eng.StopMapping(int(id), false); err != nil {
					d.log.Error().Err(err).Int("fcmap", int(id)).Msg("engine: stop mapping")
				}
			}
		case mappings.Suspended:
			copyRate, cleanRate = 0, 0
		}
		want := [2]int{copyRate, cleanRate}
		if d.applied[id] != want {
			if err := d.eng.SetRates(int(id), copyRate, cleanRate); err == nil {
				d.applied[id] = want
			}
		}
	}
}

// addWaiter registers interest in the outcome of mapping id's start. d.mu is held.
func (d *Driver) addWaiter(id mappings.MappingID) chan error {
	ch := make(chan error, 1)
	d.waiters[id] = append(d.waiters[id], ch)
	delete(d.fenceEr, id)
	return ch
}

func (d *Driver) resolve(id mappings.MappingID, err error) {
	for _, ch := range d.waiters[id] {
		ch <- err
	}
	delete(d.waiters, id)
}

// settleWaiters fails the waits of starts that can no longer happen. d.mu is held.
func (d *Driver) settleWaiters() {
	for id := range d.waiters {
		mp := d.model.Mappings[id]
		switch {
		case mp == nil:
			d.resolve(id, fcerr.New(fcerr.NoSuchObject, "the mapping was deleted before it started"))
		case mp.State == mappings.Preparing && mp.StartAfterPrepare,
			mp.State == mappings.Prepared && (mp.Fencing || mp.StartAfterPrepare):
			// still on its way
		case d.fenceEr[id] != nil:
			d.resolve(id, d.fenceEr[id])
		default:
			d.resolve(id, fcerr.New(fcerr.BadState, "mapping %s did not start: it is %s", mp.Name, mp.State))
		}
	}
}
