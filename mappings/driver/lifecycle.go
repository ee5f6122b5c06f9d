package driver

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"fcnbd/cow"
	"fcnbd/internal/catalog"
	"fcnbd/mappings"
)

// reopen brings the freshly built data path in line with the loaded model: the volumes the
// model knows and the manager has are reconciled, active mappings re-enter the engine's chains
// with their durable split bitmaps (restoreChains), and the model's Reopen effects set
// availability, cache modes, workers and redo interrupted prepares. An active mapping whose
// chain can't be restored (splitLost: its split bitmap could not be read) is stopped through
// the state machine; only an error of the catalogue itself fails reopen.
func (d *Driver) reopen(diffLost []mappings.MappingID, splitLost map[mappings.MappingID]error) error {
	d.mu.Lock()
	defer d.mu.Unlock()

	// A crash between a volume's creation (or deletion) and the model's commit leaves the two
	// out of step; the manager's catalogue record is the truth for volumes.
	next := d.model.Clone()
	have := map[mappings.VolumeID]bool{}
	for _, v := range d.vols.Volumes() {
		id := mappings.VolumeID(v.ID)
		have[id] = true
		if _, ok := next.Volumes[id]; !ok {
			next.NextVolume = id
			if _, _, err := next.AddVolume(v.Name, v.Capacity); err != nil {
				return err
			}
		}
	}
	var effs []mappings.Effect
	for id, v := range next.Volumes {
		if !have[id] {
			d.log.Warn().Int("volume", int(id)).Str("name", v.Name).Msg("volume in the FlashCopy model has no backing volume; forgetting it and its mappings")
			e, err := next.RemoveVolume(strconv.Itoa(int(id)), true)
			if err != nil {
				return err
			}
			effs = append(effs, e...)
		}
	}
	next.NextVolume = max(next.NextVolume, d.nextVolumeID())
	d.adoptNames(next)
	if err := d.persist(next); err != nil {
		return err
	}
	d.model = next
	for _, e := range effs {
		if _, ok := e.(mappings.Persist); !ok {
			d.do(next, e)
		}
	}

	var active []*mappings.Mapping
	for _, mp := range d.model.Mappings {
		if mp.ChainSeq != 0 {
			active = append(active, mp)
		}
	}
	sort.Slice(active, func(i, j int) bool { return active[i].ChainSeq < active[j].ChainSeq })
	lost := d.restoreChains(active, splitLost)
	var restored []*mappings.Mapping
	for _, mp := range active {
		if _, ok := lost[mp.ID]; !ok {
			restored = append(restored, mp)
		}
	}
	if len(lost) > 0 {
		d.loseChains(active, lost)
	}
	// A mapping whose grain copy failed, and whose stop did not reach the catalogue before the
	// daemon died, stops now: its target may lack grains its source has since overwritten.
	var failed []mappings.MappingID
	if err := d.cat.View(func(tx *catalog.Tx) error {
		for _, mp := range restored {
			f, err := failedRecord(tx, int(mp.ID))
			if err != nil {
				return err
			}
			if f {
				failed = append(failed, mp.ID)
			}
		}
		return nil
	}); err != nil {
		return err
	}
	for _, id := range failed {
		d.log.Warn().Int("fcmap", int(id)).Msg("a grain copy had failed before the restart: the mapping is stopped")
		d.eventLocked(mappings.IOError{Map: id})
	}
	for _, e := range d.model.Reopen() {
		if err := d.do(d.model, e); err != nil {
			d.log.Error().Err(err).Stringer("effect", e).Msg("reopen")
		}
	}
	d.syncEngine()
	d.syncDiffs()
	for _, id := range diffLost {
		d.eventLocked(mappings.DiffLost{Map: id})
	}
	d.feedDiffCounts()
	resumed := 0
	for _, mp := range d.model.Mappings {
		if mp.ChainSeq != 0 {
			resumed++
		}
	}
	if resumed > 0 {
		d.log.Info().Int("mappings", resumed).Msg("active FlashCopy mappings resumed")
	}
	return nil
}

// restoreChains puts the active mappings (in ChainSeq order) back in the engine's chains with
// their durable split bitmaps, through StartMappings, as a live start does: one call per
// connected set, oldest mapping first, so that every chain is rebuilt in order; a target that
// a chain's change had left elsewhere (Mapping.Via) is hung there again, so that the engine's
// chains are the model's Links. If the engine
// refuses a set, its mappings go in one by one, in the same order, so that one mapping's state
// keeps no other from being served. It returns, for each mapping left out, why; the others are
// active in the engine. d.mu is held.
func (d *Driver) restoreChains(active []*mappings.Mapping, splitLost map[mappings.MappingID]error) map[mappings.MappingID]string {
	lost := map[mappings.MappingID]string{}
	for _, set := range connectedSets(active) {
		var specs []cow.MappingSpec
		for _, mp := range set {
			if err := splitLost[mp.ID]; err != nil {
				lost[mp.ID] = "its split bitmap could not be read: " + err.Error()
				continue
			}
			src, tgt := d.model.Volumes[mp.Source], d.model.Volumes[mp.Target]
			grain := int64(mp.GrainKiB) << 10
			switch {
			case src == nil || tgt == nil:
				lost[mp.ID] = fmt.Sprintf("the catalogue has no volume %d or %d", mp.Source, mp.Target)
				continue
			case grain <= 0 || src.Size < 0:
				lost[mp.ID] = fmt.Sprintf("impossible geometry: volume size %d, grain size %d KiB", src.Size, mp.GrainKiB)
				continue
			}
			size := src.Size
			spec := cow.MappingSpec{
				ID: int(mp.ID), Source: int(mp.Source), Target: int(mp.Target), GrainSize: grain,
				Split: d.journal.bitmap(int(mp.ID), size, grain),
			}
			if mp.Via != nil {
				// A chain's change left the target outside its source's chain.
				via := int(*mp.Via)
				spec.Via = &via
			}
			specs = append(specs, spec)
		}
		if len(specs) == 0 {
			continue
		}
		if err := d.eng.StartMappings(specs); err != nil {
			d.log.Warn().Err(err).Int("mappings", len(specs)).Msg("restore a dependency tree: refused as a whole; restoring its mappings one by one")
			for _, s := range specs {
				if err := d.eng.StartMappings([]cow.MappingSpec{s}); err != nil {
					lost[mappings.MappingID(s.ID)] = err.Error()
				}
			}
		}
		for _, s := range specs {
			if _, ok := lost[mappings.MappingID(s.ID)]; !ok {
				d.active[mappings.MappingID(s.ID)] = true
				d.rates[mappings.MappingID(s.ID)] = &throughput{}
			}
		}
	}
	for id := range lost {
		d.journal.drop(int(id))
	}
	return lost
}

func (d *Driver) nextVolumeID() mappings.VolumeID {
	n := mappings.VolumeID(0)
	for _, v := range d.vols.Volumes() {
		n = max(n, mappings.VolumeID(v.ID)+1)
	}
	return n
}

// engineEvents feeds the engine's reports to the state machine.
func (d *Driver) engineEvents() {
	defer d.wg.Done()
	for ev := range d.eng.Events() {
		id := mappings.MappingID(ev.Mapping)
		if ev.Kind == cow.IOError && d.closing.Load() {
			// Volumes close one by one at shutdown, after every cache was destaged: a
			// background grain copy that meets a closed file set no bit, and is redone after
			// the restart. Stopping the mapping for it would lose the target for nothing.
			d.log.Info().Err(ev.Err).Int("fcmap", ev.Mapping).Msg("grain copy cut short by shutdown")
			continue
		}
		d.mu.Lock()
		switch ev.Kind {
		case cow.CopyComplete:
			d.eventLocked(mappings.CopyComplete{Map: id})
		case cow.CleanComplete:
			if p, err := d.eng.Progress(ev.Mapping); err == nil {
				d.eventLocked(mappings.SplitProgress{Map: id, Split: int64(p.Split)})
			}
			d.eventLocked(mappings.CleanProgress{Map: id, Percent: 100})
			d.eventLocked(mappings.CleanComplete{Map: id})
		case cow.IOError:
			d.log.Error().Err(ev.Err).Int("fcmap", ev.Mapping).Ints("dependants", ev.Dependants).
				Msg("a grain copy failed; the mapping is stopped and its target is offline")
			d.eventLocked(mappings.IOError{Map: id})
		}
		d.mu.Unlock()
	}
}

// progressLoop feeds the engine's progress to the model, which decides completion, and keeps
// the copy throughput figures. Difference counts are not fed: lsfcmap reads them at query time.
func (d *Driver) progressLoop() {
	defer d.wg.Done()
	t := time.NewTicker(d.opts.ProgressInterval)
	defer t.Stop()
	for {
		select {
		case <-d.stop:
			return
		case <-t.C:
		}
		d.mu.Lock()
		for id := range d.active {
			p, err := d.eng.Progress(int(id))
			mp := d.model.Mappings[id]
			if err != nil || mp == nil {
				continue
			}
			if r := d.rates[id]; r != nil {
				r.add(time.Now(), p.BytesCopied)
			}
			if int64(p.Split) != mp.Split {
				d.eventLocked(mappings.SplitProgress{Map: id, Split: int64(p.Split)})
			}
			if mp.State == mappings.Stopping && p.CleanPercent != mp.CleanProgress {
				d.eventLocked(mappings.CleanProgress{Map: id, Percent: p.CleanPercent})
			}
		}
		d.mu.Unlock()
	}
}

// feedDiffCounts brings every incremental mapping's difference count in the model up to date
// with the engine. lsfcmap does not depend on it (it reads the engine's count when asked), nor
// does a start (beforeStartCommit feeds its members' counts). d.mu is held.
func (d *Driver) feedDiffCounts() {
	for id := range d.diffs {
		mp := d.model.Mappings[id]
		if mp == nil {
			continue
		}
		if n, err := d.eng.DifferenceCount(int(id)); err == nil && int64(n) != mp.DiffGrains {
			d.eventLocked(mappings.DiffCount{Map: id, Grains: int64(n)})
		}
	}
}

// throughput is a copy rate over a sliding window of samples.
type throughput struct {
	mu      sync.Mutex
	samples []sample
}

type sample struct {
	t     time.Time
	bytes int64
}

const window = 5 * time.Second

func (r *throughput) add(t time.Time, bytes int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.samples = append(r.samples, sample{t, bytes})
	for len(r.samples) > 2 && t.Sub(r.samples[0].t) > window {
		r.samples = r.samples[1:]
	}
}

// rate is bytes per second over the window.
func (r *throughput) rate() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.samples) < 2 {
		return 0
	}
	a, b := r.samples[0], r.samples[len(r.samples)-1]
	if dt := b.t.Sub(a.t).Seconds(); dt > 0 {
		return int64(float64(b.bytes-a.bytes) / dt)
	}
	return 0
}

// connectedSets splits mappings (in ChainSeq order) into the sets linked through shared
// volumes, or through a target's Via, each in ChainSeq order, the sets in the order of their
// oldest mapping. A Via volume that is itself a target is then inserted in the same call, before
// anything hangs under it.
func connectedSets(ms []*mappings.Mapping) [][]*mappings.Mapping {
	parent := map[mappings.VolumeID]mappings.VolumeID{}
	var find func(v mappings.VolumeID) mappings.VolumeID
	find = func(v mappings.VolumeID) mappings.VolumeID {
		p, ok := parent[v]
		if !ok || p == v {
			return v
		}
		r := find(p)
		parent[v] = r
		return r
	}
	for _, mp := range ms {
		if a, b := find(mp.Source), find(mp.Target); a != b {
			parent[a] = b
		}
		if mp.Via != nil {
			if a, b := find(*mp.Via), find(mp.Target); a != b {
				parent[a] = b
			}
		}
	}
	index := map[mappings.VolumeID]int{}
	var sets [][]*mappings.Mapping
	for _, mp := range ms {
		root := find(mp.Source)
		i, ok := index[root]
		if !ok {
			i = len(sets)
			index[root] = i
			sets = append(sets, nil)
		}
		sets[i] = append(sets[i], mp)
	}
	return sets
}

// loseChains stops, through the state machine, each mapping of lost, whose chain could not be
// restored, and with it every mapping that read through its target; then logs each active
// mapping that ended stopped, with its reason. The result is adopted and its effects carried
// out even if the catalogue can't record it (a restart finds the same and does the same): the
// data path must not serve a target whose image can't be restored. d.mu is held.
func (d *Driver) loseChains(active []*mappings.Mapping, lost map[mappings.MappingID]string) {
	next := d.model.Clone()
	var effs []mappings.Effect
	feed := func(ev mappings.Event) {
		e, err := next.Apply(ev)
		if err != nil {
			d.log.Debug().Err(err).Str("event", fmt.Sprintf("%T", ev)).Msg("event ignored")
			return
		}
		effs = append(effs, e...)
	}
	// First the model learns how far each restored mapping got, so that one at 100 % that
	// read through a lost target ends idle_or_copied rather than stopped.
	for _, mp := range active {
		if !d.active[mp.ID] {
			continue
		}
		if p, err := d.eng.Progress(int(mp.ID)); err == nil {
			feed(mappings.SplitProgress{Map: mp.ID, Split: int64(p.Split)})
		}
	}
	for _, mp := range active {
		if reason, ok := lost[mp.ID]; ok {
			feed(mappings.RestoreFailed{Map: mp.ID, Reason: reason})
		}
	}
	for _, e := range netOnline(effs) {
		if err := d.do(next, e); err != nil {
			d.log.Error().Err(err).Stringer("effect", e).Msg("stopping the mappings that could not be restored")
		}
	}
	// The engine follows (the mappings stopped leave it) in reopen's syncEngine, before any
	// background copy runs: none was given a rate yet.
	d.model = next
	for _, mp := range active {
		now := d.model.Mappings[mp.ID]
		if now == nil || now.State != mappings.Stopped {
			continue
		}
		ev := d.log.Error().Int("fcmap", int(mp.ID)).Str("name", now.Name).Str("reason", now.StatusReason)
		if why, ok := lost[mp.ID]; ok && !strings.Contains(now.StatusReason, why) {
			ev = ev.Str("restore_error", why)
		}
		ev.Msg("a dependency chain could not be restored at daemon start: the mapping is stopped and its target offline")
	}
}
