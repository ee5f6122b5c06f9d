package driver

import (
	"strconv"

	"fcnbd/mappings"
)

// RenameVolume gives volume ref a new name (chvdisk -name). It is checked against the model
// first, so a refusal changes nothing; then the volume's catalogue record is renamed (the
// truth for volumes: reopen takes the model's names from it after a crash in between), then
// the model. The manager's step runs without d.mu, as Delete's does: it waits on the
// manager's lock, which a delete holds while requests that may need d.mu drain.
func (d *Driver) RenameVolume(ref, name string) error {
	info, err := d.vols.Get(ref)
	if err != nil {
		return err
	}
	id := strconv.FormatUint(info.ID, 10)
	d.mu.Lock()
	_, err = d.model.Clone().RenameVolume(id, name)
	d.mu.Unlock()
	if err != nil {
		return err
	}
	if err := d.vols.Rename(id, name); err != nil {
		return err
	}
	if err := d.command(func(m *mappings.Model) ([]mappings.Effect, error) { return m.RenameVolume(id, name) }); err != nil {
		d.log.Error().Err(err).Uint64("volume", info.ID).Str("name", name).
			Msg("volume renamed in the catalogue but not in the FlashCopy model; the next start reconciles them")
		return err
	}
	return nil
}

// adoptNames gives next's volumes the names the manager's catalogue records have: a crash
// between RenameVolume's two commits leaves them apart.
func (d *Driver) adoptNames(next *mappings.Model) {
	for _, v := range d.vols.Volumes() {
		if mv := next.Volumes[mappings.VolumeID(v.ID)]; mv != nil && mv.Name != v.Name {
			d.log.Info().Uint64("volume", v.ID).Str("from", mv.Name).Str("to", v.Name).Msg("volume name taken from the catalogue")
			mv.Name = v.Name
		}
	}
}
