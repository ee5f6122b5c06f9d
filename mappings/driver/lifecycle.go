package driver

import (
	"sort"
	"strconv"
	"sync"
	"time"

	"fcnbd/cow"
	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
	"fcnbd/mappings"
)

// reopen brings the freshly built data path in line with the loaded model: the volumes the
// model knows and the manager has are reconciled, active mappings re-enter the engine's chains
// with their durable split bitmaps (oldest first, so every chain is rebuilt in order), and the
// model's Reopen effects set availability, cache modes, workers and redo interrupted prepares.
func (d *Driver) reopen(diffLost []mappings.MappingID) error {
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
	specs := make([]cow.MappingSpec, 0, len(active))
	for _, mp := range active {
		size := d.model.Volumes[mp.Source].Size
		grain := int64(mp.GrainKiB) << 10
		specs = append(specs, cow.MappingSpec{
			ID: int(mp.ID), Source: int(mp.Source), Target: int(mp.Target), GrainSize: grain,
			Split: d.journal.bitmap(int(mp.ID), size, grain),
		})
	}
	if len(specs) > 0 {
		if err := d.eng.StartMappings(specs); err != nil {
			return fcerr.New(fcerr.Internal, "restore the dependency chains: %v", err)
		}
		for _, mp := range active {
			d.active[mp.ID] = true
			d.rates[mp.ID] = &throughput{}
		}
	}
	// A mapping whose grain copy failed, and whose stop did not reach the catalogue before the
	// daemon died, stops now: its target may lack grains its source has since overwritten.
	var failed []mappings.MappingID
	if err := d.cat.View(func(tx *catalog.Tx) error {
		for _, mp := range active {
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
	if len(active) > 0 {
		d.log.Info().Int("mappings", len(active)).Msg("active FlashCopy mappings resumed")
	}
	return nil
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
