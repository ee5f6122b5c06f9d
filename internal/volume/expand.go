package volume

import (
	"fmt"
	"io"

	"fcnbd/internal/blockdev"
	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
)

// SectorSize is the unit of an expansion's amount, as on SVC (-unit b takes multiples of 512).
const SectorSize = 512

// Truncater is implemented by backing files whose size can change (store.Dir's): Truncate
// sets the size and makes it durable.
type Truncater interface {
	Truncate(size int64) error
}

// ExpandHooks let the caller (the FlashCopy control plane) take part in an expansion. Every
// field may be nil.
type ExpandHooks struct {
	// Check runs with the volume quiesced (no request in progress, none admitted) and before
	// anything changes; an error refuses the expansion, which then changes nothing. If Check
	// is called, Done is called after it, whatever happens.
	Check func(rec catalog.Volume, capacity int64) error
	// Commit runs inside the one catalogue transaction that records the new capacity.
	Commit func(tx *catalog.Tx) error
	// Done ends what Check began; committed says whether the new capacity was recorded.
	Done func(committed bool)
}

// ValidateExpansion returns an fcerr refusal (BadValue) unless add is a positive multiple of
// SectorSize that keeps a volume of capacity bytes a valid capacity (a multiple of BlockSize,
// at most MaxCapacity).
func ValidateExpansion(capacity, add int64) error {
	switch {
	case add <= 0:
		return fcerr.New(fcerr.BadValue, "the size to add, %d bytes, is not valid: it must be greater than 0", add)
	case add%SectorSize != 0:
		return fcerr.New(fcerr.BadValue, "the size to add, %d bytes, is not valid: it must be a multiple of %d bytes", add, SectorSize)
	case add > MaxCapacity || capacity+add > MaxCapacity:
		return fcerr.New(fcerr.BadValue, "the size to add, %d bytes, is not valid: the largest volume is %d bytes", add, int64(MaxCapacity))
	case (capacity+add)%BlockSize != 0:
		return fcerr.New(fcerr.BadValue, "the size to add, %d bytes, is not valid: the new capacity %d must be a multiple of %d bytes", add, capacity+add, BlockSize)
	}
	return nil
}

// Expand grows volume ref by add bytes. The volume is quiesced (its gate held: requests in
// progress finish, later ones wait), hooks.Check may refuse, the stack is flushed and closed,
// the backing file is grown (the new range a hole, reading zeroes), a stack of the new size is
// built over the same file, one catalogue commit records the new capacity (with hooks.Commit),
// and the new stack replaces the old behind the same device, so connections already open keep
// going (with the size they negotiated) and new ones see the new size.
//
// Refusals (NoSuchObject, BadValue, Unsupported, and Check's) change nothing. If anything fails
// after the old stack closed, the old capacity's stack is built again; a crash at any point
// leaves the old capacity with a file at least that large, or the new one: the capacity is the
// catalogue's, and Open serves that much of the file.
func (m *Manager) Expand(ref string, add int64, hooks ExpandHooks) (Info, error) {
	if add <= 0 || add%SectorSize != 0 || add > MaxCapacity {
		return Info{}, ValidateExpansion(0, add)
	}
	m.opMu.Lock()
	defer m.opMu.Unlock()
	if err := m.checkOpen(); err != nil {
		return Info{}, err
	}
	v := m.find(ref)
	if v == nil {
		return Info{}, noSuch(ref)
	}
	old := v.rec
	if err := ValidateExpansion(old.Capacity, add); err != nil {
		return Info{}, err
	}
	tr, ok := v.file.(Truncater)
	if !ok {
		return Info{}, fcerr.New(fcerr.Unsupported, "volume %s: its backing store can't change size", old.Name)
	}
	next := old
	next.Capacity = old.Capacity + add

	v.gate.mu.Lock() // quiesce: every request in progress has finished, later ones wait
	defer v.gate.mu.Unlock()
	committed := false
	if hooks.Check != nil {
		if hooks.Done != nil {
			defer func() { hooks.Done(committed) }()
		}
		if err := hooks.Check(old, next.Capacity); err != nil {
			return Info{}, err
		}
	}
	// Everything acknowledged so far reaches the file before the stack goes: a later FLUSH on
	// the new stack covers it too.
	if err := v.stack.Flush(); err != nil {
		return Info{}, fcerr.New(fcerr.Internal, "expand volume %s: the volume could not be flushed, nothing changed: %v", old.Name, err)
	}
	if err := closeStack(v.stack); err != nil {
		m.reinstate(v, old)
		return Info{}, fcerr.New(fcerr.Internal, "expand volume %s: the volume's device could not be closed, nothing changed: %v", old.Name, err)
	}
	stack, err := m.grow(v, tr, next)
	if err == nil {
		err = m.opts.Catalog.Update(func(tx *catalog.Tx) error {
			if err := tx.PutVolume(next); err != nil {
				return err
			}
			if hooks.Commit != nil {
				return hooks.Commit(tx)
			}
			return nil
		})
		if err != nil {
			closeStack(stack)
			err = fcerr.Unwritable(err, "expand volume %s (the capacity is unchanged)", old.Name)
		}
	}
	if err != nil {
		m.reinstate(v, old)
		return Info{}, err
	}
	committed = true
	v.stack = stack
	v.dev.inner = stack // the gate is held: no request reads it now
	v.dev.size.Store(next.Capacity)
	m.mu.Lock()
	v.rec.Capacity = next.Capacity
	out := info(v)
	m.mu.Unlock()
	m.opts.Logger.Debug().Uint64("id", next.ID).Str("name", next.Name).Int64("from", old.Capacity).
		Int64("capacity", next.Capacity).Msg("volume expanded")
	return out, nil
}

// grow sets v's file to rec.Capacity bytes, the range beyond the old capacity a hole (the file
// is first cut back to the old capacity, in case an expansion that crashed before its commit
// left it longer), and builds the stack of the new capacity over it.
func (m *Manager) grow(v *volume, tr Truncater, rec catalog.Volume) (blockdev.Device, error) {
	if err := tr.Truncate(v.rec.Capacity); err != nil {
		return nil, fcerr.New(fcerr.Internal, "expand volume %s: backing file: %v", rec.Name, err)
	}
	if err := tr.Truncate(rec.Capacity); err != nil {
		return nil, fcerr.New(fcerr.Internal, "expand volume %s: backing file: %v", rec.Name, err)
	}
	stack, err := m.opts.Stack(rec, v.file)
	if err != nil {
		return nil, fcerr.New(fcerr.Internal, "expand volume %s: build device: %v", rec.Name, err)
	}
	if stack.Size() != rec.Capacity {
		closeStack(stack)
		return nil, fcerr.New(fcerr.Internal, "expand volume %s: device size %d, capacity %d", rec.Name, stack.Size(), rec.Capacity)
	}
	return stack, nil
}

// reinstate builds v's stack again at its recorded capacity after an expansion failed with the
// old stack closed. If even that fails, the volume's requests fail with EIO until the daemon
// restarts (which builds it from the catalogue).
func (m *Manager) reinstate(v *volume, rec catalog.Volume) {
	stack, err := m.opts.Stack(rec, v.file)
	if err == nil && stack.Size() != rec.Capacity {
		closeStack(stack)
		err = fmt.Errorf("device size %d, capacity %d", stack.Size(), rec.Capacity)
	}
	if err != nil {
		v.gate.closed = true // the caller holds v.gate.mu
		m.opts.Logger.Error().Err(err).Str("volume", rec.Name).
			Msg("after a failed expansion the volume's device could not be rebuilt: its I/O fails until the daemon restarts")
		return
	}
	v.stack = stack
	v.dev.inner = stack
	v.dev.size.Store(rec.Capacity)
}

// closeStack closes a stack that no request uses any more (its gate held, its data flushed).
func closeStack(d blockdev.Device) error {
	if c, ok := d.(io.Closer); ok {
		return c.Close()
	}
	return nil
}
