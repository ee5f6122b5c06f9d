package mappings

import (
	"fmt"

	"fcnbd/internal/fcerr"
)

// Commands take their object arguments as the CLI does: an id or a name in one string. Each
// validates everything before it changes anything; on a refusal it returns an *fcerr.Error and the
// model is exactly as before.

// ---- volumes ----

// AddVolume records a new volume of size bytes (a positive multiple of 4096).
func (m *Model) AddVolume(name string, size int64) (VolumeID, []Effect, error) {
	var id VolumeID
	effs, err := m.run(func(tx *txn) error {
		if name == "" {
			return fcerr.New(fcerr.MissingParameter, "the volume name is not specified")
		}
		if err := checkNewName(name, tx.m.volumeNameTaken(name, NoVolume)); err != nil {
			return err
		}
		if err := checkSize(size); err != nil {
			return err
		}
		id = tx.m.NextVolume
		tx.m.NextVolume++
		tx.m.Volumes[id] = &Volume{ID: id, Name: name, Size: size}
		return nil
	})
	if err != nil {
		return NoVolume, nil, err
	}
	return id, effs, nil
}

func checkSize(size int64) error {
	if size <= 0 || size%VolumeAlign != 0 {
		return fcerr.New(fcerr.BadValue, "the capacity %d is not a positive multiple of %d bytes", size, VolumeAlign)
	}
	return nil
}

// usedBy returns the mappings that have v as source or target, in id order.
func (m *Model) usedBy(v VolumeID) []*Mapping {
	var out []*Mapping
	for _, mp := range m.sortedMappings() {
		if mp.Source == v || mp.Target == v {
			out = append(out, mp)
		}
	}
	return out
}

// hungUnder returns the in-chain mappings whose target a chain's change left reading through v
// (Via v), in id order: they need v though they don't name it.
func (m *Model) hungUnder(v VolumeID) []*Mapping {
	var out []*Mapping
	for _, mp := range m.sortedMappings() {
		if mp.inChain() && mp.Via != nil && *mp.Via == v {
			out = append(out, mp)
		}
	}
	return out
}

// RemoveVolume forgets a volume. It is refused while any mapping uses the volume, or reads
// through it (Via), unless force: then those that use it are first stopped (as stopfcmap -force,
// dependants included) and deleted, and those that read through it stopped likewise.
// The caller deletes the volume's data once the effects are carried out.
func (m *Model) RemoveVolume(ref string, force bool) ([]Effect, error) {
	return m.run(func(tx *txn) error {
		v, err := tx.m.volume(ref)
		if err != nil {
			return err
		}
		used := tx.m.usedBy(v.ID)
		hung := tx.m.hungUnder(v.ID)
		if len(used)+len(hung) > 0 && !force {
			return fcerr.New(fcerr.VolumeMapped, "volume %s is used by %d FlashCopy mapping(s)", v.Name, len(used)+len(hung))
		}
		for _, mp := range hung {
			if mp.inChain() {
				tx.forceStop(mp)
			}
		}
		for _, mp := range used {
			if tx.m.Mappings[mp.ID] == nil {
				continue // autodeleted on the way
			}
			switch mp.State {
			case Copying, Stopping, Suspended:
				tx.forceStop(mp)
			case Preparing, Prepared:
				tx.toStopped(mp)
			}
			if tx.m.Mappings[mp.ID] != nil {
				tx.deleteMapping(mp)
			}
		}
		delete(tx.m.Volumes, v.ID)
		return nil
	})
}

// ResizeVolume changes a volume's capacity; refused while any mapping uses it or reads through it.
func (m *Model) ResizeVolume(ref string, size int64) ([]Effect, error) {
	return m.run(func(tx *txn) error {
		v, err := tx.m.volume(ref)
		if err != nil {
			return err
		}
		if n := len(tx.m.usedBy(v.ID)) + len(tx.m.hungUnder(v.ID)); n > 0 {
			return fcerr.New(fcerr.VolumeMapped, "volume %s can't be resized: it is used by %d FlashCopy mapping(s)", v.Name, n)
		}
		if err := checkSize(size); err != nil {
			return err
		}
		v.Size = size
		return nil
	})
}

// ---- mappings ----

// MkFcmapArgs are mkfcmap's parameters. Nil pointers take the defaults.
type MkFcmapArgs struct {
	Source, Target string // required
	Name           string // default fcmap<id>
	Group          string // "" or "0": stand-alone
	CopyRate       *int   // 0–150, default 50
	CleanRate      *int   // 0–150, default 50
	GrainKiB       *int   // 64 or 256; default: that of the connected set joined (grainRule), else 256
	Autodelete     bool
	Incremental    bool
}

func checkRate(what string, r *int) error {
	if r != nil && (*r < 0 || *r > MaxRate) {
		return fcerr.New(fcerr.BadValue, "the %s %d is not in 0–%d", what, *r, MaxRate)
	}
	return nil
}

func orDefault(p *int, d int) int {
	if p == nil {
		return d
	}
	return *p
}

// groupArg resolves a group argument where "0" means stand-alone.
func (m *Model) groupArg(arg string) (GroupID, error) {
	if arg == "" || arg == "0" {
		return 0, nil
	}
	return m.ResolveGroup(arg)
}

// canChangeMembership reports whether members may join or leave group g now: only while it is
// idle_or_copied, stopped or empty.
func (m *Model) canChangeMembership(g GroupID) error {
	if g == 0 {
		return nil
	}
	switch st := m.GroupStatus(g); st {
	case IdleOrCopied, Stopped, Empty:
		return nil
	default:
		return fcerr.New(fcerr.BadState, "consistency group %s is %s: its membership can't change", m.Groups[g].Name, st)
	}
}

func (m *Model) checkGroupRoom(g GroupID) error {
	if g != 0 && len(m.members(g)) >= MaxMappingsPerGroup {
		return fcerr.New(fcerr.TooManyMappings, "consistency group %s already has %d mappings", m.Groups[g].Name, MaxMappingsPerGroup)
	}
	return nil
}

// MkFcmap creates a mapping in idle_or_copied (docs/flashcopy.md §3 Create, §4).
func (m *Model) MkFcmap(a MkFcmapArgs) (MappingID, []Effect, error) {
	var id MappingID
	effs, err := m.run(func(tx *txn) error {
		m := tx.m
		if a.Source == "" || a.Target == "" {
			return fcerr.New(fcerr.MissingParameter, "mkfcmap needs -source and -target")
		}
		if err := checkRate("copy rate", a.CopyRate); err != nil {
			return err
		}
		if err := checkRate("clean rate", a.CleanRate); err != nil {
			return err
		}
		if a.Name != "" {
			if err := checkNewName(a.Name, m.mappingNameTaken(a.Name, NoMapping)); err != nil {
				return err
			}
		}
		src, err := m.volume(a.Source)
		if err != nil {
			return err
		}
		tgt, err := m.volume(a.Target)
		if err != nil {
			return err
		}
		g, err := m.groupArg(a.Group)
		if err != nil {
			return err
		}
		if src.ID == tgt.ID {
			return fcerr.New(fcerr.SameVolume, "source and target are the same volume %s", src.Name)
		}
		if src.Size != tgt.Size {
			return fcerr.New(fcerr.SizeMismatch, "source %s has %d bytes, target %s has %d", src.Name, src.Size, tgt.Name, tgt.Size)
		}
		nsrc := 0
		for _, x := range m.Mappings {
			if x.Source == src.ID && x.Target == tgt.ID {
				return fcerr.New(fcerr.DuplicateMapping, "mapping %s already maps %s to %s", x.Name, src.Name, tgt.Name)
			}
			if x.Source == src.ID {
				nsrc++
			}
		}
		if x := m.targetMapping(tgt.ID); x != nil {
			return fcerr.New(fcerr.TargetInUse, "volume %s is already the target of mapping %s", tgt.Name, x.Name)
		}
		if nsrc >= MaxMappingsPerSource {
			return fcerr.New(fcerr.TooManyMappings, "volume %s is already the source of %d mappings", src.Name, MaxMappingsPerSource)
		}
		if n := len(m.connected([]VolumeID{src.ID, tgt.ID})); n+1 > MaxConnectedSet {
			return fcerr.New(fcerr.TooManyMappings, "the mapping would join a connected set of %d mappings (limit %d)", n+1, MaxConnectedSet)
		}
		grain, err := m.grainRule(src.ID, tgt.ID, NoMapping, a.GrainKiB)
		if err != nil {
			return err
		}
		if err := m.checkGroupRoom(g); err != nil {
			return err
		}
		if err := m.canChangeMembership(g); err != nil {
			return err
		}

		id = m.NextMapping
		name := a.Name
		if name == "" {
			for m.mappingNameTaken(fmt.Sprintf("fcmap%d", id), NoMapping) {
				id++
			}
			name = fmt.Sprintf("fcmap%d", id)
		}
		m.NextMapping = id + 1
		grainBytes := int64(grain) * 1024
		m.Mappings[id] = &Mapping{
			ID: id, Name: name, Source: src.ID, Target: tgt.ID, Group: g, State: IdleOrCopied,
			CopyRate: orDefault(a.CopyRate, DefaultRate), CleanRate: orDefault(a.CleanRate, DefaultRate),
			GrainKiB: grain, Grains: (src.Size + grainBytes - 1) / grainBytes,
			Autodelete: a.Autodelete, Incremental: a.Incremental,
		}
		return nil
	})
	if err != nil {
		return NoMapping, nil, err
	}
	return id, effs, nil
}

// ChFcmapArgs are chfcmap's parameters; nil means "leave as is". At least one must be given.
type ChFcmapArgs struct {
	Name       *string
	CopyRate   *int
	CleanRate  *int
	Autodelete *bool
	Group      *string // "0": make stand-alone
}

// ChFcmap modifies a mapping in any state. A group change is allowed only while the mapping and
// both groups are idle_or_copied or stopped (or empty). Autodelete on a finished mapping
// (idle_or_copied at 100 %) deletes it at once.
func (m *Model) ChFcmap(ref string, a ChFcmapArgs) ([]Effect, error) {
	return m.run(func(tx *txn) error {
		m := tx.m
		if a.Name == nil && a.CopyRate == nil && a.CleanRate == nil && a.Autodelete == nil && a.Group == nil {
			return fcerr.New(fcerr.MissingParameter, "chfcmap needs at least one attribute to change")
		}
		mp, err := m.mapping(ref)
		if err != nil {
			return err
		}
		if a.Name != nil {
			if err := checkNewName(*a.Name, m.mappingNameTaken(*a.Name, mp.ID)); err != nil {
				return err
			}
		}
		if err := checkRate("copy rate", a.CopyRate); err != nil {
			return err
		}
		if err := checkRate("clean rate", a.CleanRate); err != nil {
			return err
		}
		g := mp.Group
		if a.Group != nil {
			if *a.Group == "" {
				return fcerr.New(fcerr.MissingParameter, "-consistgrp needs a group")
			}
			if g, err = m.groupArg(*a.Group); err != nil {
				return err
			}
		}
		if g != mp.Group {
			if mp.State != IdleOrCopied && mp.State != Stopped || mp.Fencing || mp.StartAfterPrepare {
				return fcerr.New(fcerr.BadState, "mapping %s is %s: its group can't change", mp.Name, mp.State)
			}
			if err := m.canChangeMembership(mp.Group); err != nil {
				return err
			}
			if err := m.canChangeMembership(g); err != nil {
				return err
			}
			if err := m.checkGroupRoom(g); err != nil {
				return err
			}
		}

		if a.Name != nil {
			mp.Name = *a.Name
		}
		rerate := false
		if a.CopyRate != nil && *a.CopyRate != mp.CopyRate {
			mp.CopyRate, rerate = *a.CopyRate, true
		}
		if a.CleanRate != nil && *a.CleanRate != mp.CleanRate {
			mp.CleanRate, rerate = *a.CleanRate, true
		}
		if rerate {
			tx.workersFor(mp)
		}
		if g != mp.Group {
			old := mp.Group
			mp.Group = g
			tx.leaveGroup(old)
		}
		if a.Autodelete != nil {
			mp.Autodelete = *a.Autodelete
			if mp.Autodelete && mp.State == IdleOrCopied && mp.Progress() == 100 {
				tx.deleteMapping(mp)
			}
		}
		return nil
	})
}

// checkPrepare validates the prepare of one mapping (prestart, or start -prep when prep).
func (m *Model) checkPrepare(mp *Mapping, restore, prep bool) error {
	switch mp.State {
	case IdleOrCopied, Stopped:
	case Copying:
		if prep {
			return fcerr.New(fcerr.AlreadyCopying, "mapping %s is already copying", mp.Name)
		}
		return fcerr.New(fcerr.BadState, "mapping %s is copying: it can't be prepared", mp.Name)
	default:
		return fcerr.New(fcerr.BadState, "mapping %s is %s: it can't be prepared", mp.Name, mp.State)
	}
	if err := m.checkGrain(mp); err != nil {
		return err
	}
	return m.checkRestore(mp, restore)
}

// checkRestore: a mapping whose target is the source of an active mapping may be prepared or
// started only with -restore, and not while another linked mapping is restoring.
func (m *Model) checkRestore(mp *Mapping, restore bool) error {
	if !m.activeSource(mp.Target) {
		return nil
	}
	if !restore {
		return fcerr.New(fcerr.NeedsRestore, "the target of mapping %s is the source of an active mapping: use -restore", mp.Name)
	}
	for id := range m.connected([]VolumeID{mp.Source, mp.Target}) {
		if x := m.Mappings[id]; id != mp.ID && x.Restoring {
			return fcerr.New(fcerr.DuplicateRestore, "linked mapping %s is already restoring", x.Name)
		}
	}
	return nil
}

// checkStart validates the start (without -prep) of one mapping.
func (m *Model) checkStart(mp *Mapping, restore bool) error {
	switch {
	case mp.State == Copying:
		return fcerr.New(fcerr.AlreadyCopying, "mapping %s is already copying", mp.Name)
	case mp.State != Prepared || mp.Fencing:
		return fcerr.New(fcerr.BadState, "mapping %s is %s: only a prepared mapping can be started", mp.Name, mp.describeState())
	}
	if err := m.checkGrain(mp); err != nil {
		return err
	}
	return m.checkRestore(mp, restore || mp.RestoreFlag)
}

func (mp *Mapping) describeState() State {
	if mp.Fencing {
		return "starting"
	}
	return mp.State
}

// standalone resolves a mapping for a command that a group member can't take on its own.
func (m *Model) standalone(ref, verb string) (*Mapping, error) {
	mp, err := m.mapping(ref)
	if err != nil {
		return nil, err
	}
	if mp.Group != 0 {
		return nil, fcerr.New(fcerr.GroupMember, "mapping %s belongs to consistency group %s: %s the group instead", mp.Name, m.Groups[mp.Group].Name, verb)
	}
	return mp, nil
}

// Prestart prepares a stand-alone mapping (prestartfcmap).
func (m *Model) Prestart(ref string, restore bool) ([]Effect, error) {
	return m.run(func(tx *txn) error {
		mp, err := tx.m.standalone(ref, "prepare")
		if err != nil {
			return err
		}
		if err := tx.m.checkPrepare(mp, restore, false); err != nil {
			return err
		}
		tx.prepare(mp, restore, false)
		return nil
	})
}

// Start starts a prepared stand-alone mapping (startfcmap), or with prep prepares it and starts
// it once prepared.
func (m *Model) Start(ref string, prep, restore bool) ([]Effect, error) {
	return m.run(func(tx *txn) error {
		mp, err := tx.m.standalone(ref, "start")
		if err != nil {
			return err
		}
		if prep {
			if err := tx.m.checkPrepare(mp, restore, true); err != nil {
				return err
			}
			tx.prepare(mp, restore, true)
			return nil
		}
		if err := tx.m.checkStart(mp, restore); err != nil {
			return err
		}
		mp.RestoreFlag = mp.RestoreFlag || restore
		tx.fence(0, []*Mapping{mp})
		return nil
	})
}

// checkStop validates the stop of one mapping.
func (m *Model) checkStop(mp *Mapping, split bool) error {
	if mp.State == Stopped {
		return fcerr.New(fcerr.AlreadyStopped, "mapping %s is already stopped", mp.Name)
	}
	if split && mp.State != IdleOrCopied {
		if mp.State == Suspended {
			return fcerr.New(fcerr.BadState, "mapping %s is suspended: it can't be split", mp.Name)
		}
		if mp.Progress() < 100 {
			return fcerr.New(fcerr.NotCopied, "mapping %s is at %d %%: -split needs 100 %%", mp.Name, mp.Progress())
		}
	}
	return nil
}

// stop applies a validated stop to one mapping (§3 Stop).
func (tx *txn) stop(mp *Mapping, force, split bool) {
	switch mp.State {
	case Preparing, Prepared:
		tx.toStopped(mp)
	case Copying, Stopping:
		switch {
		case split:
			tx.splits = append(tx.splits, SplitOut{Map: mp.ID, Target: mp.Target})
			tx.toIdle(mp, false)
		case force:
			tx.forceStop(mp)
		case mp.State == Copying:
			mp.State = Stopping
			mp.Cleaning = false
			tx.stops = append(tx.stops, mp.ID)
			tx.workersFor(mp)
		}
	case Suspended:
		if force {
			tx.forceStop(mp)
		} else {
			mp.Resume = Stopping
		}
	}
}

func checkStopFlags(force, split bool) error {
	if force && split {
		return fcerr.New(fcerr.ExclusiveFlags, "-force and -split are mutually exclusive")
	}
	return nil
}

// Stop stops a stand-alone mapping (stopfcmap). Idle_or_copied: no effect.
func (m *Model) Stop(ref string, force, split bool) ([]Effect, error) {
	return m.run(func(tx *txn) error {
		if err := checkStopFlags(force, split); err != nil {
			return err
		}
		mp, err := tx.m.standalone(ref, "stop")
		if err != nil {
			return err
		}
		if err := tx.m.checkStop(mp, split); err != nil {
			return err
		}
		tx.stop(mp, force, split)
		return nil
	})
}

// RmFcmap deletes a mapping: idle_or_copied, or stopped with force (the target comes online
// again with its contents as they are). Any other state is refused: stop first.
func (m *Model) RmFcmap(ref string, force bool) ([]Effect, error) {
	return m.run(func(tx *txn) error {
		mp, err := tx.m.mapping(ref)
		if err != nil {
			return err
		}
		switch {
		case mp.State == IdleOrCopied:
		case mp.State == Stopped && force:
		case mp.State == Stopped:
			return fcerr.New(fcerr.BadState, "mapping %s is stopped: delete it with -force", mp.Name)
		default:
			return fcerr.New(fcerr.BadState, "mapping %s is %s: stop it first", mp.Name, mp.State)
		}
		tx.deleteMapping(mp)
		return nil
	})
}

// ---- consistency groups ----

// MkConsistGrp creates an empty consistency group (mkfcconsistgrp).
func (m *Model) MkConsistGrp(name string, autodelete bool) (GroupID, []Effect, error) {
	var id GroupID
	effs, err := m.run(func(tx *txn) error {
		m := tx.m
		if name != "" {
			if err := checkNewName(name, m.groupNameTaken(name, 0)); err != nil {
				return err
			}
		}
		id = m.NextGroup
		if name == "" {
			for m.groupNameTaken(fmt.Sprintf("fccstgrp%d", id), 0) {
				id++
			}
			name = fmt.Sprintf("fccstgrp%d", id)
		}
		m.NextGroup = id + 1
		m.Groups[id] = &Group{ID: id, Name: name, Autodelete: autodelete}
		return nil
	})
	if err != nil {
		return 0, nil, err
	}
	return id, effs, nil
}

// ChConsistGrpArgs are chfcconsistgrp's parameters; at least one must be given.
type ChConsistGrpArgs struct {
	Name       *string
	Autodelete *bool
}

// ChConsistGrp renames a group or changes its autodelete.
func (m *Model) ChConsistGrp(ref string, a ChConsistGrpArgs) ([]Effect, error) {
	return m.run(func(tx *txn) error {
		if a.Name == nil && a.Autodelete == nil {
			return fcerr.New(fcerr.MissingParameter, "chfcconsistgrp needs -name or -autodelete")
		}
		g, err := tx.m.group(ref)
		if err != nil {
			return err
		}
		if a.Name != nil {
			if err := checkNewName(*a.Name, tx.m.groupNameTaken(*a.Name, g.ID)); err != nil {
				return err
			}
			g.Name = *a.Name
		}
		if a.Autodelete != nil {
			g.Autodelete = *a.Autodelete
		}
		return nil
	})
}

// RmConsistGrp deletes a group. With members it is refused unless force, which makes them
// stand-alone (it never deletes mappings) and abandons a -prep start or a fence in progress.
func (m *Model) RmConsistGrp(ref string, force bool) ([]Effect, error) {
	return m.run(func(tx *txn) error {
		g, err := tx.m.group(ref)
		if err != nil {
			return err
		}
		ms := tx.m.members(g.ID)
		if len(ms) > 0 && !force {
			return fcerr.New(fcerr.BadState, "consistency group %s has %d members: use -force", g.Name, len(ms))
		}
		for _, mp := range ms {
			mp.Group = 0
			mp.StartAfterPrepare, mp.Fencing = false, false
		}
		delete(tx.m.Groups, g.ID)
		return nil
	})
}

// groupMembers resolves a group for a prepare, start or stop: it must have members.
func (m *Model) groupMembers(ref string) (*Group, []*Mapping, error) {
	g, err := m.group(ref)
	if err != nil {
		return nil, nil, err
	}
	ms := m.members(g.ID)
	if len(ms) == 0 {
		return nil, nil, fcerr.New(fcerr.BadState, "consistency group %s is empty", g.Name)
	}
	return g, ms, nil
}

// PrestartGroup prepares every member of a group (prestartfcconsistgrp).
func (m *Model) PrestartGroup(ref string, restore bool) ([]Effect, error) {
	return m.run(func(tx *txn) error {
		_, ms, err := tx.m.groupMembers(ref)
		if err != nil {
			return err
		}
		for _, mp := range ms {
			if err := tx.m.checkPrepare(mp, restore, false); err != nil {
				return err
			}
		}
		if err := tx.m.checkStartLoop(ms); err != nil {
			return err
		}
		for _, mp := range ms {
			tx.prepare(mp, restore, false)
		}
		return nil
	})
}

// StartGroup starts every member of a prepared group in one fence (startfcconsistgrp), or with
// prep prepares them all and starts the group once every member is prepared.
func (m *Model) StartGroup(ref string, prep, restore bool) ([]Effect, error) {
	return m.run(func(tx *txn) error {
		g, ms, err := tx.m.groupMembers(ref)
		if err != nil {
			return err
		}
		for _, mp := range ms {
			if prep {
				err = tx.m.checkPrepare(mp, restore, true)
			} else {
				err = tx.m.checkStart(mp, restore)
			}
			if err != nil {
				return err
			}
		}
		if err := tx.m.checkStartLoop(ms); err != nil {
			return err
		}
		if prep {
			for _, mp := range ms {
				tx.prepare(mp, restore, true)
			}
			return nil
		}
		for _, mp := range ms {
			mp.RestoreFlag = mp.RestoreFlag || restore
		}
		tx.fence(g.ID, ms)
		return nil
	})
}

// StopGroup stops every member of a group (stopfcconsistgrp). It is refused as AlreadyStopped
// only if every member is stopped; members already stopped by an error are left as they are.
func (m *Model) StopGroup(ref string, force, split bool) ([]Effect, error) {
	return m.run(func(tx *txn) error {
		if err := checkStopFlags(force, split); err != nil {
			return err
		}
		g, ms, err := tx.m.groupMembers(ref)
		if err != nil {
			return err
		}
		var live []*Mapping
		for _, mp := range ms {
			if mp.State != Stopped {
				live = append(live, mp)
			}
		}
		if len(live) == 0 {
			return fcerr.New(fcerr.AlreadyStopped, "consistency group %s is already stopped", g.Name)
		}
		for _, mp := range live {
			if err := tx.m.checkStop(mp, split); err != nil {
				return err
			}
		}
		for _, mp := range live {
			if tx.m.Mappings[mp.ID] != nil { // a forced stop may have autodeleted a dependant
				tx.stop(mp, force, split)
			}
		}
		return nil
	})
}
