package mappings

// RenameVolume gives volume ref a new name (chvdisk -name). Refusals (no such volume, a bad
// or taken name) change nothing.
func (m *Model) RenameVolume(ref, name string) ([]Effect, error) {
	return m.run(func(tx *txn) error {
		v, err := tx.m.volume(ref)
		if err != nil {
			return err
		}
		if err := checkNewName(name, tx.m.volumeNameTaken(name, v.ID)); err != nil {
			return err
		}
		v.Name = name
		return nil
	})
}
