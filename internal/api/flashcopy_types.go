package api

import (
	"context"
	"time"
)

// FlashCopy is what the control API needs of the FlashCopy control plane (mappings/driver).
// Object arguments are ids or names in one string, as on the IBM CLI. Refusals are
// *fcerr.Error values; a refused call changes nothing.
type FlashCopy interface {
	MkFcmap(ctx context.Context, req MkFcmap) (id int, err error)
	ChFcmap(ctx context.Context, ref string, req ChFcmap) error
	// PrestartFcmap starts preparing and returns; the mapping becomes prepared on its own once
	// the source is flushed and the target's cache discarded.
	PrestartFcmap(ctx context.Context, ref string, restore bool) error
	// StartFcmap returns once the mapping is copying (the start's fence and commit are done), or
	// with the reason it is not. With prep, it prepares first and waits for prepared.
	StartFcmap(ctx context.Context, ref string, prep, restore bool) error
	StopFcmap(ctx context.Context, ref string, force, split bool) error
	RmFcmap(ctx context.Context, ref string, force bool) error
	Fcmaps(ctx context.Context) []Fcmap
	Fcmap(ctx context.Context, ref string) (Fcmap, error)
	// FcmapDependentMaps lists the mappings that depend on ref (lsfcmapdependentmaps).
	FcmapDependentMaps(ctx context.Context, ref string) ([]Fcmap, error)

	MkConsistGrp(ctx context.Context, req MkConsistGrp) (id int, err error)
	ChConsistGrp(ctx context.Context, ref string, req ChConsistGrp) error
	PrestartConsistGrp(ctx context.Context, ref string, restore bool) error
	StartConsistGrp(ctx context.Context, ref string, prep, restore bool) error
	StopConsistGrp(ctx context.Context, ref string, force, split bool) error
	RmConsistGrp(ctx context.Context, ref string, force bool) error
	ConsistGrps(ctx context.Context) []ConsistGrp
	ConsistGrp(ctx context.Context, ref string) (ConsistGrp, error)

	// VdiskFcmapCopies: mappings whose targets hold a full copy of the volume.
	VdiskFcmapCopies(ctx context.Context, vol string) ([]Fcmap, error)
	// VdiskDependentMaps: mappings that depend on the volume.
	VdiskDependentMaps(ctx context.Context, vol string) ([]Fcmap, error)
}

// MkFcmap is the body of a mkfcmap request. Source and Target are required; nil means the
// default (copy and clean rate 50; grain size that of the mappings linked to either volume, else
// 256 KiB).
type MkFcmap struct {
	Source      string `json:"source"`
	Target      string `json:"target"`
	Name        string `json:"name,omitempty"`
	ConsistGrp  string `json:"consistgrp,omitempty"`
	CopyRate    *int   `json:"copyrate,omitempty"`
	CleanRate   *int   `json:"cleanrate,omitempty"`
	GrainSize   *int   `json:"grainsize,omitempty"` // KiB: 64 or 256
	Autodelete  bool   `json:"autodelete,omitempty"`
	Incremental bool   `json:"incremental,omitempty"`
}

// ChFcmap is the body of a chfcmap request: nil fields are left as they are. ConsistGrp "0"
// makes the mapping stand-alone.
type ChFcmap struct {
	Name       *string `json:"name,omitempty"`
	CopyRate   *int    `json:"copyrate,omitempty"`
	CleanRate  *int    `json:"cleanrate,omitempty"`
	Autodelete *bool   `json:"autodelete,omitempty"`
	ConsistGrp *string `json:"consistgrp,omitempty"`
}

// MkConsistGrp is the body of a mkfcconsistgrp request.
type MkConsistGrp struct {
	Name       string `json:"name,omitempty"`
	Autodelete bool   `json:"autodelete,omitempty"`
}

// ChConsistGrp is the body of a chfcconsistgrp request.
type ChConsistGrp struct {
	Name       *string `json:"name,omitempty"`
	Autodelete *bool   `json:"autodelete,omitempty"`
}

// Fcmap is one mapping as lsfcmap shows it, with the engine's counters.
type Fcmap struct {
	ID                int       `json:"id"`
	Name              string    `json:"name"`
	SourceID          int       `json:"source_vdisk_id"`
	SourceName        string    `json:"source_vdisk_name"`
	TargetID          int       `json:"target_vdisk_id"`
	TargetName        string    `json:"target_vdisk_name"`
	GroupID           int       `json:"group_id"` // 0: stand-alone
	GroupName         string    `json:"group_name"`
	Status            string    `json:"status"`
	StatusReason      string    `json:"status_reason"` // why a stopped mapping stopped on its own
	Progress          int       `json:"progress"`
	CopyRate          int       `json:"copy_rate"`
	CleanProgress     int       `json:"clean_progress"`
	CleanRate         int       `json:"clean_rate"`
	GrainSize         int       `json:"grain_size"` // KiB
	Incremental       bool      `json:"incremental"`
	Difference        int       `json:"difference"`
	Autodelete        bool      `json:"autodelete"`
	StartTime         time.Time `json:"start_time"` // zero: never started
	Restoring         bool      `json:"restoring"`
	PartnerID         int       `json:"partner_FC_id"` // -1: none
	PartnerName       string    `json:"partner_FC_name"`
	RestoreProgress   int       `json:"restore_progress"`
	DependentMappings int       `json:"dependent_mappings"`

	// The copy work of the current run, or of the last one until the next start; kept across
	// daemon restarts (a crash loses what a run in progress counted since the daemon started).
	GrainsCopied   int64 `json:"grains_copied"`
	SplitOnWrite   int64 `json:"split_on_write"`
	BytesCopied    int64 `json:"bytes_copied"`
	CopyThroughput int64 `json:"copy_throughput"` // bytes/s over the last few seconds

	// The same, added up over every run since the mapping was created: never smaller than at
	// any earlier query while the daemon runs (the metrics' counters).
	GrainsCopiedTotal int64 `json:"grains_copied_total"`
	SplitOnWriteTotal int64 `json:"split_on_write_total"`
	BytesCopiedTotal  int64 `json:"bytes_copied_total"`
}

// ConsistGrp is one consistency group as lsfcconsistgrp shows it.
type ConsistGrp struct {
	ID         int         `json:"id"`
	Name       string      `json:"name"`
	Status     string      `json:"status"`
	Autodelete bool        `json:"autodelete"`
	StartTime  time.Time   `json:"start_time"`
	Members    []FcmapName `json:"members"`
	// LastHold is how long the last start held the sources' I/O (0: never started here).
	LastHold time.Duration `json:"last_hold_ns"`
}

// FcmapName names a member mapping.
type FcmapName struct {
	ID   int    `json:"id"`
	Name string `json:"name"`
}
