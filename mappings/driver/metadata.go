package driver

import (
	"context"
	"fmt"
	"sort"
	"syscall"
	"time"

	"fcnbd/cow"
	"fcnbd/internal/api"
	"fcnbd/internal/fcerr"
	"fcnbd/mappings"
)

// Metadata faults (docs/flashcopy.md §3 "Bitmap offline"/"Bitmap online", architecture rule 6).
//
// When a split-bit commit fails, the engine fails the host write that needed it (cow.ErrJournal)
// and the mappings whose bits were in the failed commit are suspended: source and target go
// offline, so nothing is read or written that could be wrong. The suspension is applied in
// memory even when the catalogue can't record it: a restart then sees the last durable state,
// which is consistent, since a failed bit commit failed the writes that depended on it. The
// same holds for an engine event whose Persist failed: the mapping it concerns is suspended and
// the event is kept, to be fed again once the catalogue takes commits.
//
// Recovery: every MetadataRetry (and when an operator runs recoverfcmap) the driver writes the
// model to the catalogue; once that commit succeeds, each suspended mapping gets BitmapOnline,
// together with the events kept for it, and returns to the state it had.

// defaultMetadataRetry is how often a suspended driver retries the catalogue.
const defaultMetadataRetry = 2 * time.Second

// watchedJournal is the BitJournal the engine uses: the driver's journal, whose failures
// suspend the mappings concerned.
type watchedJournal struct {
	*journal
	d *Driver
}

func (w watchedJournal) SetBits(updates []cow.BitUpdate) error {
	err := w.journal.SetBits(updates)
	if err == nil {
		return nil
	}
	seen := map[mappings.MappingID]bool{}
	var ids []mappings.MappingID
	for _, u := range updates {
		if id := mappings.MappingID(u.Mapping); !seen[id] {
			seen[id] = true
			ids = append(ids, id)
		}
	}
	// Called by the engine's committer, under grain locks that d.mu holders may wait for:
	// suspend asynchronously. The failed writes already failed; later ones needing a bit fail
	// the same way until the suspension takes the volumes offline.
	go w.d.bitmapOffline(ids, err)
	return fmt.Errorf("%w (bitmap offline): %w", syscall.EIO, err)
}

// MarkFailed records a failed grain copy (cow.FailureJournal); if the catalogue can't take it,
// the mapping's metadata is offline like a failed bit commit: the engine fails the host write
// that needed the copy, and the mapping is suspended until the record can be written.
func (w watchedJournal) MarkFailed(id int) error {
	err := w.journal.MarkFailed(id)
	if err == nil {
		return nil
	}
	go w.d.bitmapOffline([]mappings.MappingID{mappings.MappingID(id)}, err)
	return fmt.Errorf("%w (bitmap offline): %w", syscall.EIO, err)
}

func (d *Driver) bitmapOffline(ids []mappings.MappingID, why error) {
	if d.closing.Load() {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.log.Error().Err(why).Ints("fcmaps", intsOf(ids)).Msg("bitmap offline: split bits could not be committed; the mappings are suspended")
	d.suspendLocked(ids)
}

// suspendLocked feeds BitmapOffline for ids and adopts the result whether or not the
// catalogue recorded it. d.mu is held.
func (d *Driver) suspendLocked(ids []mappings.MappingID) {
	next := d.model.Clone()
	var effs []mappings.Effect
	for _, id := range ids {
		e, err := next.Apply(mappings.BitmapOffline{Map: id})
		if err != nil {
			d.log.Debug().Err(err).Int("fcmap", int(id)).Msg("bitmap offline ignored")
			continue
		}
		effs = append(effs, e...)
	}
	if len(effs) == 0 {
		return
	}
	persisted := false
	for _, e := range effs {
		if _, ok := e.(mappings.Persist); ok {
			if persisted {
				continue // next already holds every suspension
			}
			persisted = true
		}
		if err := d.do(next, e); err != nil {
			d.log.Warn().Err(err).Stringer("effect", e).Msg("suspension: effect failed (a restart sees the last durable state)")
		}
	}
	d.model = next
	d.syncEngine()
	d.settleWaiters()
	d.kickRecovery()
}

// eventFailedLocked handles an event whose first effect (the catalogue commit) failed. d.mu
// is held.
func (d *Driver) eventFailedLocked(ev mappings.Event, err error) {
	if c := fcerr.CodeOf(err); c != fcerr.MetadataUnwritable && c != fcerr.ClusterUnavailable {
		return
	}
	id, ok := eventMap(ev)
	if !ok {
		return
	}
	d.deferred = append(d.deferred, ev)
	if mp := d.model.Mappings[id]; mp != nil && (mp.State == mappings.Copying || mp.State == mappings.Stopping) {
		d.suspendLocked([]mappings.MappingID{id})
	}
	d.kickRecovery()
}

// eventMap is the mapping an event that must not be lost concerns.
func eventMap(ev mappings.Event) (mappings.MappingID, bool) {
	switch ev := ev.(type) {
	case mappings.IOError:
		return ev.Map, true
	case mappings.RestoreFailed:
		return ev.Map, true
	case mappings.CopyComplete:
		return ev.Map, true
	case mappings.CleanComplete:
		return ev.Map, true
	case mappings.FlushDone:
		return ev.Map, true
	case mappings.FlushFailed:
		return ev.Map, true
	case mappings.RunFigures:
		return ev.Map, true
	}
	return mappings.NoMapping, false
}

func (d *Driver) kickRecovery() {
	select {
	case d.metaKick <- struct{}{}:
	default:
	}
}

// recoveryLoop retries the catalogue while anything waits for it.
func (d *Driver) recoveryLoop() {
	defer d.wg.Done()
	t := time.NewTicker(d.opts.MetadataRetry)
	defer t.Stop()
	for {
		select {
		case <-d.stop:
			return
		case <-t.C:
		case <-d.metaKick:
			continue // the ticker paces the retries; a kick only says there is work
		}
		d.mu.Lock()
		if d.needsRecoveryLocked() {
			if _, err := d.recoverLocked(); err != nil {
				d.log.Warn().Err(err).Msg("metadata still unwritable; mappings stay suspended")
			}
		}
		d.mu.Unlock()
	}
}

func (d *Driver) needsRecoveryLocked() bool {
	if len(d.deferred) > 0 {
		return true
	}
	for _, mp := range d.model.Mappings {
		if mp.State == mappings.Suspended {
			return true
		}
	}
	return false
}

// RecoverFcmaps retries the catalogue now (the recoverfcmap command).
func (d *Driver) RecoverFcmaps(context.Context) (api.RecoverResult, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.recoverLocked()
}

// recoverLocked writes the model; if that works, every suspended mapping goes back online
// with the events kept for it. d.mu is held.
func (d *Driver) recoverLocked() (api.RecoverResult, error) {
	var res api.RecoverResult
	var suspended []mappings.MappingID
	for id, mp := range d.model.Mappings {
		if mp.State == mappings.Suspended {
			suspended = append(suspended, id)
		}
	}
	sort.Slice(suspended, func(i, j int) bool { return suspended[i] < suspended[j] })
	if err := d.persist(d.model); err != nil {
		for _, id := range suspended {
			res.Suspended = append(res.Suspended, d.model.Mappings[id].Name)
		}
		return res, err
	}
	kept := map[mappings.MappingID][]mappings.Event{}
	var order []mappings.MappingID
	for _, ev := range d.deferred {
		id, _ := eventMap(ev)
		if kept[id] == nil {
			order = append(order, id)
		}
		kept[id] = append(kept[id], ev)
	}
	d.deferred = nil
	for _, id := range suspended {
		evs := append([]mappings.Event{mappings.BitmapOnline{Map: id}}, kept[id]...)
		delete(kept, id)
		if d.batchLocked(evs) {
			res.Resumed = append(res.Resumed, d.model.Mappings[id].Name)
		} else {
			res.Suspended = append(res.Suspended, d.model.Mappings[id].Name)
		}
	}
	for _, id := range order {
		if evs := kept[id]; evs != nil {
			d.batchLocked(evs)
		}
	}
	if len(res.Suspended) > 0 {
		return res, fcerr.New(fcerr.MetadataUnwritable, "mappings still suspended: %v", res.Suspended)
	}
	if len(res.Resumed) > 0 {
		d.log.Info().Strs("fcmaps", res.Resumed).Msg("bitmap online: metadata writable again; the mappings resume")
	}
	return res, nil
}

// batchLocked feeds evs to one clone of the model and carries out their effects as one step,
// so that a volume that goes online by one event and offline by the next never shows in
// between (BitmapOnline followed by a kept IOError). A failed commit keeps the events (except
// BitmapOnline) for the next retry. d.mu is held.
func (d *Driver) batchLocked(evs []mappings.Event) bool {
	next := d.model.Clone()
	var effs []mappings.Effect
	var fed []mappings.Event
	for _, ev := range evs {
		e, err := next.Apply(ev)
		if err != nil {
			d.log.Debug().Err(err).Str("event", fmt.Sprintf("%T", ev)).Msg("event ignored")
			continue
		}
		effs = append(effs, e...)
		fed = append(fed, ev)
	}
	if len(effs) == 0 {
		return true
	}
	if err := d.apply(next, netOnline(effs)); err != nil {
		for _, ev := range fed {
			if _, ok := ev.(mappings.BitmapOnline); !ok {
				d.deferred = append(d.deferred, ev)
			}
		}
		return false
	}
	return true
}

// netOnline merges the Persist and SetOnline effects of several events' lists: one Persist
// first (of the final model), and per volume only its final availability, offline where it
// first went offline, online where it last came online.
func netOnline(effs []mappings.Effect) []mappings.Effect {
	final := map[mappings.VolumeID]bool{}
	last := map[mappings.VolumeID]int{}
	for i, e := range effs {
		if s, ok := e.(mappings.SetOnline); ok {
			final[s.Vol] = s.Online
			last[s.Vol] = i
		}
	}
	out := []mappings.Effect{mappings.Persist{}}
	offDone := map[mappings.VolumeID]bool{}
	for i, e := range effs {
		switch s := e.(type) {
		case mappings.Persist:
			continue
		case mappings.SetOnline:
			if s.Online != final[s.Vol] {
				continue
			}
			if !s.Online {
				if offDone[s.Vol] {
					continue
				}
				offDone[s.Vol] = true
			} else if last[s.Vol] != i {
				continue
			}
		}
		out = append(out, e)
	}
	return out
}

func intsOf(ids []mappings.MappingID) []int {
	out := make([]int, len(ids))
	for i, id := range ids {
		out[i] = int(id)
	}
	return out
}
