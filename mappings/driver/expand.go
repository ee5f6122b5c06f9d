package driver

import (
	"encoding/json"

	"strconv"

	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
	"fcnbd/internal/volume"
	"fcnbd/mappings"
)

// ExpandVolume grows volume ref by add bytes (expandvdisksize). The volume manager quiesces
// the volume first; then, under d.mu, the model is asked (a volume in a FlashCopy mapping is
// refused), the volume's stack is rebuilt at the new capacity, and one catalogue commit records
// the volume's capacity and the model together, so a crash leaves both old or both new.
//
// d.mu is taken only once the volume is quiesced: a request of the volume in progress may wait
// for a start fence, which needs d.mu to finish (as Delete's comment says).
func (d *Driver) ExpandVolume(ref string, add int64) (volume.Info, error) {
	info, err := d.vols.Get(ref)
	if err != nil {
		return volume.Info{}, err
	}
	id := strconv.FormatUint(info.ID, 10)
	// A quick refusal without quiescing; checked again under d.mu below.
	d.mu.Lock()
	_, err = d.model.Clone().ExpandVolume(id, info.Capacity+add)
	d.mu.Unlock()
	if err != nil {
		if fcerr.CodeOf(err) == fcerr.ExpandInMapping {
			return volume.Info{}, err
		}
		if verr := volume.ValidateExpansion(info.Capacity, add); verr != nil {
			return volume.Info{}, verr
		}
		return volume.Info{}, err
	}
	var next *mappings.Model
	var data []byte
	out, err := d.vols.Expand(id, add, volume.ExpandHooks{
		Check: func(rec catalog.Volume, capacity int64) error {
			d.mu.Lock()
			next = d.model.Clone()
			effs, err := next.ExpandVolume(id, capacity)
			if err != nil {
				return err
			}
			for _, e := range effs {
				if _, ok := e.(mappings.Persist); !ok {
					return fcerr.New(fcerr.Internal, "expanding volume %s would need the effect %s", rec.Name, e)
				}
			}
			if data, err = json.Marshal(next); err != nil {
				return fcerr.New(fcerr.Internal, "encode the FlashCopy model: %v", err)
			}
			return nil
		},
		Commit: func(tx *catalog.Tx) error { return tx.PutModel(data) },
		Done: func(committed bool) {
			if committed {
				d.model = next
			}
			d.mu.Unlock()
		},
	})
	if err != nil {
		return volume.Info{}, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.volumeInfo(out), nil
}
