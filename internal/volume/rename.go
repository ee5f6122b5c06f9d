package volume

import (
	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
)

// Rename gives volume ref the name name: the catalogue record first, then the maps, so new
// NBD connections find the volume under its new name; connections already open keep going.
// Refusals (NoSuchObject, BadName, NameInUse) change nothing.
func (m *Manager) Rename(ref, name string) error {
	if err := ValidateName(name); err != nil {
		return err
	}
	m.opMu.Lock()
	defer m.opMu.Unlock()
	if err := m.checkOpen(); err != nil {
		return err
	}
	v := m.find(ref)
	if v == nil {
		return noSuch(ref)
	}
	if o := m.find(name); o != nil && o != v {
		return fcerr.New(fcerr.NameInUse, "the name %q is already in use", name)
	}
	rec := v.rec
	rec.Name = name
	if err := m.opts.Catalog.Update(func(tx *catalog.Tx) error { return tx.PutVolume(rec) }); err != nil {
		return fcerr.Unwritable(err, "rename volume %s", v.rec.Name)
	}
	m.mu.Lock()
	delete(m.byName, v.rec.Name)
	v.rec.Name = name
	m.byName[name] = v
	m.mu.Unlock()
	m.opts.Logger.Debug().Uint64("id", rec.ID).Str("name", name).Msg("volume renamed")
	return nil
}
