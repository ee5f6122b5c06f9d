package mappings

import "fcnbd/internal/fcerr"

// ExpandVolume gives volume ref the capacity size (expandvdisksize), which must be larger than
// its capacity and a multiple of VolumeAlign. A volume that a FlashCopy mapping names, or that
// an active mapping's target reads through, is refused (ExpandInMapping): a mapping's two
// volumes keep one size (Cinder's driver deletes a volume's mappings before it extends it).
// Refusals change nothing.
func (m *Model) ExpandVolume(ref string, size int64) ([]Effect, error) {
	return m.run(func(tx *txn) error {
		v, err := tx.m.volume(ref)
		if err != nil {
			return err
		}
		if n := len(tx.m.usedBy(v.ID)) + len(tx.m.hungUnder(v.ID)); n > 0 {
			return fcerr.New(fcerr.ExpandInMapping, "the volume %s can't be expanded: it is in %d FlashCopy mapping(s); delete them first", v.Name, n)
		}
		if err := checkSize(size); err != nil {
			return err
		}
		if size <= v.Size {
			return fcerr.New(fcerr.BadValue, "the capacity %d is not larger than the volume's %d", size, v.Size)
		}
		v.Size = size
		return nil
	})
}
