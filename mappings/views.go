package mappings

import (
	"sort"
	"time"
)

// MappingInfo is one mapping as lsfcmap shows it, computed fields included.
type MappingInfo struct {
	ID                MappingID
	Name              string
	Source, Target    VolumeID
	Group             GroupID
	Status            State
	StatusReason      string // why a stopped mapping stopped on its own; empty otherwise
	Progress          int
	CopyRate          int
	CleanRate         int
	CleanProgress     int
	GrainKiB          int
	Incremental       bool
	Difference        int
	Autodelete        bool
	StartTime         time.Time
	Restoring         bool // this mapping, or its partner, is restoring
	Partner           MappingID
	DependentMappings int
}

// MappingInfo returns what lsfcmap shows of mapping id, and false if there is none.
func (m *Model) MappingInfo(id MappingID) (MappingInfo, bool) {
	mp := m.Mappings[id]
	if mp == nil {
		return MappingInfo{}, false
	}
	partner := m.Partner(id)
	restoring := mp.Restoring
	if p := m.Mappings[partner]; p != nil && p.Restoring {
		restoring = true
	}
	return MappingInfo{
		ID: mp.ID, Name: mp.Name, Source: mp.Source, Target: mp.Target, Group: mp.Group,
		Status: mp.State, StatusReason: mp.StatusReason, Progress: mp.Progress(), CopyRate: mp.CopyRate, CleanRate: mp.CleanRate,
		CleanProgress: mp.CleanProgress, GrainKiB: mp.GrainKiB, Incremental: mp.Incremental,
		Difference: mp.Difference(), Autodelete: mp.Autodelete, StartTime: mp.StartTime,
		Restoring: restoring, Partner: partner, DependentMappings: len(m.DependentMappings(id)),
	}, true
}

// GroupInfo is one consistency group as lsfcconsistgrp shows it.
type GroupInfo struct {
	ID         GroupID
	Name       string
	Status     State
	Autodelete bool
	StartTime  time.Time
	Members    []MappingID
}

// GroupInfo returns what lsfcconsistgrp shows of group id, and false if there is none.
func (m *Model) GroupInfo(id GroupID) (GroupInfo, bool) {
	g := m.Groups[id]
	if g == nil {
		return GroupInfo{}, false
	}
	return GroupInfo{
		ID: g.ID, Name: g.Name, Status: m.GroupStatus(id), Autodelete: g.Autodelete,
		StartTime: g.StartTime, Members: m.Members(id),
	}, true
}

// VolumeInfo is one volume as lsvdisk shows it.
type VolumeInfo struct {
	ID           VolumeID
	Name         string
	Size         int64
	Online       bool
	WriteThrough bool
	FcMapCount   int
}

// VolumeInfo returns what lsvdisk shows of volume id, and false if there is none.
func (m *Model) VolumeInfo(id VolumeID) (VolumeInfo, bool) {
	v := m.Volumes[id]
	if v == nil {
		return VolumeInfo{}, false
	}
	a := m.access(id)
	return VolumeInfo{
		ID: v.ID, Name: v.Name, Size: v.Size, Online: a.Online, WriteThrough: a.WriteThrough,
		FcMapCount: len(m.usedBy(id)),
	}, true
}

func sortVols(vs []VolumeID) { sort.Slice(vs, func(i, j int) bool { return vs[i] < vs[j] }) }
