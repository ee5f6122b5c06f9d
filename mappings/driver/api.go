package driver

import (
	"context"
	"slices"
	"strconv"

	"fcnbd/internal/api"
	"fcnbd/internal/volume"
	"fcnbd/mappings"
)

var (
	_ api.Volumes   = (*Driver)(nil)
	_ api.FlashCopy = (*Driver)(nil)
)

// ---- volumes ----

// Create makes a volume: the volume manager creates its backing file and record, then the
// model learns it under the same id.
func (d *Driver) Create(name string, size int64) (volume.Info, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	// Validate against the model first, so that a refusal creates nothing.
	if _, _, err := d.model.Clone().AddVolume(name, size); err != nil {
		return volume.Info{}, err
	}
	info, err := d.vols.Create(name, size)
	if err != nil {
		return volume.Info{}, err
	}
	next := d.model.Clone()
	next.NextVolume = mappings.VolumeID(info.ID)
	_, effs, err := next.AddVolume(name, size)
	if err == nil {
		if len(effs) == 0 {
			effs = []mappings.Effect{mappings.Persist{}}
		}
		err = d.apply(next, effs)
	}
	if err != nil {
		// The model could not record it: undo, so that the two stay in step.
		d.vols.Delete(strconv.FormatUint(info.ID, 10), volume.DeleteMode{Force: true})
		return volume.Info{}, err
	}
	return d.volumeInfo(info), nil
}

// Delete removes a volume; refused while a mapping uses it, unless force, which first stops and
// deletes those mappings.
func (d *Driver) Delete(ref string, mode volume.DeleteMode) error {
	info, err := d.vols.Get(ref)
	if err != nil {
		return err
	}
	id := mappings.VolumeID(info.ID)
	// Host mappings first: a refusal must come before the model changes anything.
	if err := d.vols.CheckDelete(strconv.Itoa(int(id)), mode); err != nil {
		return err
	}
	if err := d.command(func(m *mappings.Model) ([]mappings.Effect, error) {
		return m.RemoveVolume(strconv.Itoa(int(id)), mode.Force)
	}); err != nil {
		return err
	}
	// Without d.mu: deleting waits for the volume's requests in progress, and one may be held
	// by a start fence that needs d.mu to finish.
	return d.vols.Delete(strconv.Itoa(int(id)), mode)
}

// Get returns one volume.
func (d *Driver) Get(ref string) (volume.Info, error) {
	info, err := d.vols.Get(ref)
	if err != nil {
		return info, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.volumeInfo(info), nil
}

// Volumes lists every volume.
func (d *Driver) Volumes() []volume.Info {
	vs := d.vols.Volumes()
	d.mu.Lock()
	defer d.mu.Unlock()
	for i := range vs {
		vs[i] = d.volumeInfo(vs[i])
	}
	return vs
}

func (d *Driver) volumeInfo(info volume.Info) volume.Info {
	if vi, ok := d.model.VolumeInfo(mappings.VolumeID(info.ID)); ok {
		info.FCMapCount = vi.FcMapCount
		if !vi.Online {
			info.Status = "offline"
		}
	}
	return info
}

// ---- mappings ----

// MkFcmap implements api.FlashCopy.
func (d *Driver) MkFcmap(_ context.Context, req api.MkFcmap) (int, error) {
	var id mappings.MappingID
	err := d.command(func(m *mappings.Model) ([]mappings.Effect, error) {
		var effs []mappings.Effect
		var err error
		id, effs, err = m.MkFcmap(mappings.MkFcmapArgs{
			Source: req.Source, Target: req.Target, Name: req.Name, Group: req.ConsistGrp,
			CopyRate: req.CopyRate, CleanRate: req.CleanRate, GrainKiB: req.GrainSize,
			Autodelete: req.Autodelete, Incremental: req.Incremental,
		})
		return effs, err
	})
	return int(id), err
}

// ChFcmap implements api.FlashCopy.
func (d *Driver) ChFcmap(_ context.Context, ref string, req api.ChFcmap) error {
	return d.command(func(m *mappings.Model) ([]mappings.Effect, error) {
		return m.ChFcmap(ref, mappings.ChFcmapArgs{
			Name: req.Name, CopyRate: req.CopyRate, CleanRate: req.CleanRate,
			Autodelete: req.Autodelete, Group: req.ConsistGrp,
		})
	})
}

// PrestartFcmap implements api.FlashCopy.
func (d *Driver) PrestartFcmap(_ context.Context, ref string, restore bool) error {
	return d.command(func(m *mappings.Model) ([]mappings.Effect, error) { return m.Prestart(ref, restore) })
}

// StartFcmap implements api.FlashCopy: it returns once the mapping is copying.
func (d *Driver) StartFcmap(ctx context.Context, ref string, prep, restore bool) error {
	return d.startAndWait(ctx, func(m *mappings.Model) ([]mappings.Effect, []mappings.MappingID, error) {
		effs, err := m.Start(ref, prep, restore)
		id, _ := m.ResolveMapping(ref)
		return effs, []mappings.MappingID{id}, err
	})
}

// startAndWait runs a start command and waits until every mapping it names is copying, or
// until the start has failed.
func (d *Driver) startAndWait(ctx context.Context, start func(*mappings.Model) ([]mappings.Effect, []mappings.MappingID, error)) error {
	var waits []chan error
	err := d.command(func(m *mappings.Model) ([]mappings.Effect, error) {
		effs, ids, err := start(m)
		if err == nil {
			for _, id := range ids {
				waits = append(waits, d.addWaiter(id))
			}
		}
		return effs, err
	})
	if err != nil {
		d.dropWaiters(waits)
		return err
	}
	return d.wait(ctx, waits)
}

// StopFcmap implements api.FlashCopy.
func (d *Driver) StopFcmap(_ context.Context, ref string, force, split bool) error {
	return d.command(func(m *mappings.Model) ([]mappings.Effect, error) { return m.Stop(ref, force, split) })
}

// RmFcmap implements api.FlashCopy.
func (d *Driver) RmFcmap(_ context.Context, ref string, force bool) error {
	return d.command(func(m *mappings.Model) ([]mappings.Effect, error) { return m.RmFcmap(ref, force) })
}

// Fcmaps implements api.FlashCopy.
func (d *Driver) Fcmaps(context.Context) []api.Fcmap {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]api.Fcmap, 0, len(d.model.Mappings))
	for _, id := range d.mappingIDs() {
		out = append(out, d.fcmapView(id))
	}
	return out
}

// Fcmap implements api.FlashCopy.
func (d *Driver) Fcmap(_ context.Context, ref string) (api.Fcmap, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	id, err := d.model.ResolveMapping(ref)
	if err != nil {
		return api.Fcmap{}, err
	}
	return d.fcmapView(id), nil
}

// FcmapDependentMaps implements api.FlashCopy.
func (d *Driver) FcmapDependentMaps(_ context.Context, ref string) ([]api.Fcmap, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	id, err := d.model.ResolveMapping(ref)
	if err != nil {
		return nil, err
	}
	return d.fcmapViews(d.model.DependentMappings(id)), nil
}

// ---- groups ----

// MkConsistGrp implements api.FlashCopy.
func (d *Driver) MkConsistGrp(_ context.Context, req api.MkConsistGrp) (int, error) {
	var id mappings.GroupID
	err := d.command(func(m *mappings.Model) ([]mappings.Effect, error) {
		var effs []mappings.Effect
		var err error
		id, effs, err = m.MkConsistGrp(req.Name, req.Autodelete)
		return effs, err
	})
	return int(id), err
}

// ChConsistGrp implements api.FlashCopy.
func (d *Driver) ChConsistGrp(_ context.Context, ref string, req api.ChConsistGrp) error {
	return d.command(func(m *mappings.Model) ([]mappings.Effect, error) {
		return m.ChConsistGrp(ref, mappings.ChConsistGrpArgs{Name: req.Name, Autodelete: req.Autodelete})
	})
}

// PrestartConsistGrp implements api.FlashCopy.
func (d *Driver) PrestartConsistGrp(_ context.Context, ref string, restore bool) error {
	return d.command(func(m *mappings.Model) ([]mappings.Effect, error) { return m.PrestartGroup(ref, restore) })
}

// StartConsistGrp implements api.FlashCopy: it returns once every member is copying.
func (d *Driver) StartConsistGrp(ctx context.Context, ref string, prep, restore bool) error {
	return d.startAndWait(ctx, func(m *mappings.Model) ([]mappings.Effect, []mappings.MappingID, error) {
		effs, err := m.StartGroup(ref, prep, restore)
		g, _ := m.ResolveGroup(ref)
		return effs, m.Members(g), err
	})
}

// StopConsistGrp implements api.FlashCopy.
func (d *Driver) StopConsistGrp(_ context.Context, ref string, force, split bool) error {
	return d.command(func(m *mappings.Model) ([]mappings.Effect, error) { return m.StopGroup(ref, force, split) })
}

// RmConsistGrp implements api.FlashCopy.
func (d *Driver) RmConsistGrp(_ context.Context, ref string, force bool) error {
	return d.command(func(m *mappings.Model) ([]mappings.Effect, error) { return m.RmConsistGrp(ref, force) })
}

// ConsistGrps implements api.FlashCopy.
func (d *Driver) ConsistGrps(context.Context) []api.ConsistGrp {
	d.mu.Lock()
	defer d.mu.Unlock()
	ids := make([]int, 0, len(d.model.Groups))
	for id := range d.model.Groups {
		ids = append(ids, int(id))
	}
	slices.Sort(ids)
	out := make([]api.ConsistGrp, 0, len(ids))
	for _, id := range ids {
		out = append(out, d.groupView(mappings.GroupID(id)))
	}
	return out
}

// ConsistGrp implements api.FlashCopy.
func (d *Driver) ConsistGrp(_ context.Context, ref string) (api.ConsistGrp, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	id, err := d.model.ResolveGroup(ref)
	if err != nil {
		return api.ConsistGrp{}, err
	}
	return d.groupView(id), nil
}

// VdiskFcmapCopies implements api.FlashCopy.
func (d *Driver) VdiskFcmapCopies(_ context.Context, vol string) ([]api.Fcmap, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	v, err := d.model.ResolveVolume(vol)
	if err != nil {
		return nil, err
	}
	return d.fcmapViews(d.model.LsVdiskFcMapCopies(v)), nil
}

// VdiskDependentMaps implements api.FlashCopy.
func (d *Driver) VdiskDependentMaps(_ context.Context, vol string) ([]api.Fcmap, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	v, err := d.model.ResolveVolume(vol)
	if err != nil {
		return nil, err
	}
	return d.fcmapViews(d.model.LsVdiskDependentMaps(v)), nil
}

// ---- helpers ----

func (d *Driver) wait(ctx context.Context, waits []chan error) error {
	var first error
	for _, ch := range waits {
		if err := d.waitCtx(ctx, ch); err != nil && first == nil {
			first = err
		}
	}
	return first
}

func (d *Driver) dropWaiters(waits []chan error) {
	if len(waits) == 0 {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for id, chs := range d.waiters {
		for _, w := range waits {
			for i, ch := range chs {
				if ch == w {
					chs = append(chs[:i], chs[i+1:]...)
					break
				}
			}
		}
		if len(chs) == 0 {
			delete(d.waiters, id)
		} else {
			d.waiters[id] = chs
		}
	}
}

func (d *Driver) mappingIDs() []mappings.MappingID {
	ids := make([]int, 0, len(d.model.Mappings))
	for id := range d.model.Mappings {
		ids = append(ids, int(id))
	}
	slices.Sort(ids)
	out := make([]mappings.MappingID, len(ids))
	for i, id := range ids {
		out[i] = mappings.MappingID(id)
	}
	return out
}

func (d *Driver) fcmapViews(ids []mappings.MappingID) []api.Fcmap {
	out := make([]api.Fcmap, 0, len(ids))
	for _, id := range ids {
		out = append(out, d.fcmapView(id))
	}
	return out
}

func (d *Driver) fcmapView(id mappings.MappingID) api.Fcmap {
	mi, ok := d.model.MappingInfo(id)
	if !ok {
		return api.Fcmap{ID: int(id), PartnerID: -1}
	}
	f := api.Fcmap{
		ID: int(mi.ID), Name: mi.Name,
		SourceID: int(mi.Source), SourceName: d.volName(mi.Source),
		TargetID: int(mi.Target), TargetName: d.volName(mi.Target),
		GroupID: int(mi.Group), Status: string(mi.Status), StatusReason: mi.StatusReason, Progress: mi.Progress,
		CopyRate: mi.CopyRate, CleanProgress: mi.CleanProgress, CleanRate: mi.CleanRate,
		GrainSize: mi.GrainKiB, Incremental: mi.Incremental, Difference: mi.Difference,
		Autodelete: mi.Autodelete, StartTime: mi.StartTime, Restoring: mi.Restoring,
		PartnerID: int(mi.Partner), DependentMappings: mi.DependentMappings,
	}
	if g := d.model.Groups[mi.Group]; g != nil {
		f.GroupName = g.Name
	}
	if p := d.model.Mappings[mi.Partner]; p != nil {
		f.PartnerName = p.Name
	} else {
		f.PartnerID = -1
	}
	mp := d.model.Mappings[id]
	if mp.Restoring {
		f.RestoreProgress = mi.Progress
	}
	if d.diffs[id] {
		// The data path's count rather than the model's last feed: a bit is set before the
		// write it records is acknowledged, so the grains of every FLUSH or FUA write the host
		// has seen complete are counted here.
		if n, err := d.eng.DifferenceCount(int(id)); err == nil {
			f.Difference = mp.DifferenceOf(int64(n))
		}
	}
	run, total := mp.Run, mp.Total
	if d.active[id] {
		if p, err := d.eng.Progress(int(id)); err == nil {
			run, total = run.Plus(figures(p)), total.Plus(figures(p))
			f.Progress = p.Percent
			if mi.Status == mappings.Stopping {
				f.CleanProgress = p.CleanPercent
			}
		}
		if r := d.rates[id]; r != nil {
			f.CopyThroughput = r.rate()
		}
	}
	f.GrainsCopied, f.SplitOnWrite, f.BytesCopied = run.GrainsCopied, run.SplitOnWrite, run.BytesCopied
	f.GrainsCopiedTotal, f.SplitOnWriteTotal, f.BytesCopiedTotal = total.GrainsCopied, total.SplitOnWrite, total.BytesCopied
	return f
}

func (d *Driver) groupView(id mappings.GroupID) api.ConsistGrp {
	gi, _ := d.model.GroupInfo(id)
	g := api.ConsistGrp{
		ID: int(gi.ID), Name: gi.Name, Status: string(gi.Status), Autodelete: gi.Autodelete,
		StartTime: gi.StartTime, LastHold: d.holds[id],
	}
	for _, m := range gi.Members {
		name := ""
		if mp := d.model.Mappings[m]; mp != nil {
			name = mp.Name
		}
		g.Members = append(g.Members, api.FcmapName{ID: int(m), Name: name})
	}
	return g
}

func (d *Driver) volName(id mappings.VolumeID) string {
	if v := d.model.Volumes[id]; v != nil {
		return v.Name
	}
	return ""
}
