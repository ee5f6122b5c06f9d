package driver

import (
	"context"
	"encoding/json"
	"fmt"

	"fcnbd/internal/api"
	"fcnbd/internal/catalog"
	"fcnbd/internal/volume"
	"fcnbd/mappings"
)

// Snapshot answers, read-only, for an I/O group this node does not serve: a cluster-mode
// standby's view of the catalogue its group's owner last published. Its listings are the
// Driver's own views over that model; every command that would change something gets the
// refusal it was made with.
//
// When no node serves the group (offline), every volume is offline, and every mapping whose
// bitmaps a serving node must hold (copying, stopping) is shown suspended, with the state it
// will return to, as docs/flashcopy.md §3 "Bitmap offline" has it: the model's own
// BitmapOffline event, applied to the view, not to any catalogue.
type Snapshot struct {
	d      *Driver // the model only: no engine, no volumes, no catalogue
	vols   []volume.Info
	refuse func() error
}

var (
	_ api.Volumes   = (*Snapshot)(nil)
	_ api.FlashCopy = (*Snapshot)(nil)
)

// NewSnapshot builds the view of a catalogue's volumes and FlashCopy model (its JSON as the
// catalogue stores it; nil for none). refuse returns the error of every changing command.
func NewSnapshot(model []byte, vols []catalog.Volume, offline bool, refuse func() error) (*Snapshot, error) {
	m := mappings.New()
	if model != nil {
		if err := json.Unmarshal(model, m); err != nil {
			return nil, fmt.Errorf("the published FlashCopy model: %w", err)
		}
	}
	if offline {
		// The model decides which states the event suspends (it refuses it for the others).
		for id := range m.Mappings {
			m.Apply(mappings.BitmapOffline{Map: id})
		}
	}
	s := &Snapshot{d: &Driver{model: m}, refuse: refuse}
	for _, v := range vols {
		info := volume.InfoOf(v)
		if offline {
			info.Status = volume.StatusOffline
		}
		s.vols = append(s.vols, s.d.volumeInfo(info))
	}
	return s, nil
}

// Create implements api.Volumes: refused.
func (s *Snapshot) Create(string, int64) (volume.Info, error) { return volume.Info{}, s.refuse() }

// Delete implements api.Volumes: refused.
func (s *Snapshot) Delete(string, volume.DeleteMode) error { return s.refuse() }

// Get implements api.Volumes.
func (s *Snapshot) Get(ref string) (volume.Info, error) { return volume.Find(s.vols, ref) }

// Volumes implements api.Volumes.
func (s *Snapshot) Volumes() []volume.Info { return append([]volume.Info(nil), s.vols...) }

// MkFcmap implements api.FlashCopy: refused.
func (s *Snapshot) MkFcmap(context.Context, api.MkFcmap) (int, error) { return 0, s.refuse() }

// ChFcmap implements api.FlashCopy: refused.
func (s *Snapshot) ChFcmap(context.Context, string, api.ChFcmap) error { return s.refuse() }

// PrestartFcmap implements api.FlashCopy: refused.
func (s *Snapshot) PrestartFcmap(context.Context, string, bool) error { return s.refuse() }

// StartFcmap implements api.FlashCopy: refused.
func (s *Snapshot) StartFcmap(context.Context, string, bool, bool) error { return s.refuse() }

// StopFcmap implements api.FlashCopy: refused.
func (s *Snapshot) StopFcmap(context.Context, string, bool, bool) error { return s.refuse() }

// RmFcmap implements api.FlashCopy: refused.
func (s *Snapshot) RmFcmap(context.Context, string, bool) error { return s.refuse() }

// Fcmaps implements api.FlashCopy.
func (s *Snapshot) Fcmaps(ctx context.Context) []api.Fcmap { return s.d.Fcmaps(ctx) }

// Fcmap implements api.FlashCopy.
func (s *Snapshot) Fcmap(ctx context.Context, ref string) (api.Fcmap, error) {
	return s.d.Fcmap(ctx, ref)
}

// FcmapDependentMaps implements api.FlashCopy.
func (s *Snapshot) FcmapDependentMaps(ctx context.Context, ref string) ([]api.Fcmap, error) {
	return s.d.FcmapDependentMaps(ctx, ref)
}

// MkConsistGrp implements api.FlashCopy: refused.
func (s *Snapshot) MkConsistGrp(context.Context, api.MkConsistGrp) (int, error) { return 0, s.refuse() }

// ChConsistGrp implements api.FlashCopy: refused.
func (s *Snapshot) ChConsistGrp(context.Context, string, api.ChConsistGrp) error { return s.refuse() }

// PrestartConsistGrp implements api.FlashCopy: refused.
func (s *Snapshot) PrestartConsistGrp(context.Context, string, bool) error { return s.refuse() }

// StartConsistGrp implements api.FlashCopy: refused.
func (s *Snapshot) StartConsistGrp(context.Context, string, bool, bool) error { return s.refuse() }

// StopConsistGrp implements api.FlashCopy: refused.
func (s *Snapshot) StopConsistGrp(context.Context, string, bool, bool) error { return s.refuse() }

// RmConsistGrp implements api.FlashCopy: refused.
func (s *Snapshot) RmConsistGrp(context.Context, string, bool) error { return s.refuse() }

// ConsistGrps implements api.FlashCopy.
func (s *Snapshot) ConsistGrps(ctx context.Context) []api.ConsistGrp { return s.d.ConsistGrps(ctx) }

// ConsistGrp implements api.FlashCopy.
func (s *Snapshot) ConsistGrp(ctx context.Context, ref string) (api.ConsistGrp, error) {
	return s.d.ConsistGrp(ctx, ref)
}

// VdiskFcmapCopies implements api.FlashCopy.
func (s *Snapshot) VdiskFcmapCopies(ctx context.Context, vol string) ([]api.Fcmap, error) {
	return s.d.VdiskFcmapCopies(ctx, vol)
}

// VdiskDependentMaps implements api.FlashCopy.
func (s *Snapshot) VdiskDependentMaps(ctx context.Context, vol string) ([]api.Fcmap, error) {
	return s.d.VdiskDependentMaps(ctx, vol)
}
