// Package volume is the volume manager: it creates, deletes, lists and finds volumes, keeps
// each one's backing file open while the daemon runs, and serves them to the NBD server as
// exports (it implements nbd.Exports).
//
// A volume's metadata lives in the catalogue, its data in one sparse store file. The per-volume
// device stack (today the file alone; later cache → copy-on-write → file) is built in exactly
// one place, Options.Stack, so the data-path layers are inserted there without touching the
// manager. The manager does not know about mappings: callers that do (the control plane) check
// them before asking for a deletion.
package volume

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"fcnbd/internal/blockdev"
	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
	"fcnbd/internal/store"
	"fcnbd/nbd"
)

// BlockSize is the unit every capacity must be a multiple of (docs/flashcopy.md §1, fcnbd).
const BlockSize = 4096

// MaxCapacity is the largest volume fcnbd creates: 256 TiB, IBM's limit for one volume.
const MaxCapacity = 256 << 40

// MaxNameLen is the longest object name (docs/flashcopy.md §1).
const MaxNameLen = 63

// Status values.
const (
	StatusOnline  = "online"
	StatusOffline = "offline"
)

// Info is what the manager tells about a volume.
type Info struct {
	ID         uint64    `json:"id"`
	Name       string    `json:"name"`
	Capacity   int64     `json:"capacity"`
	Status     string    `json:"status"`
	FCMapCount int       `json:"fc_map_count"`
	Created    time.Time `json:"created"`
}

// StackFunc builds the device that serves volume v over its open backing file f. It is called
// once per volume, when the volume is created or loaded at start, and again by Expand (after
// the previous device's Close, over the same file, with the new capacity). The returned device must
// report v.Capacity as its size. If it implements io.Closer, Close is called after its last
// request and a final Flush, before f is closed; the manager closes f itself.
type StackFunc func(v catalog.Volume, f store.File) (blockdev.Device, error)

// FileStack is the stack of a volume with no layers above its backing file.
func FileStack(v catalog.Volume, f store.File) (blockdev.Device, error) {
	return NewFileDevice(f, v.Capacity), nil
}

// Options configures a Manager.
type Options struct {
	Catalog *catalog.DB
	FS      store.FS
	// Stack builds each volume's device; nil means FileStack.
	Stack  StackFunc
	Logger zerolog.Logger
	// Now is the clock for creation times; nil means time.Now.
	Now func() time.Time
}

// volume is one open volume.
type volume struct {
	rec   catalog.Volume
	file  store.File
	stack blockdev.Device
	gate  *gate
	dev   *gatedDevice
}

// Manager owns every volume of the daemon. It is safe for concurrent use.
type Manager struct {
	opts Options

	opMu sync.Mutex // serialises Create, Delete and Close, which do I/O

	mu     sync.RWMutex // guards the maps below, held only briefly
	byID   map[uint64]*volume
	byName map[string]*volume
	closed bool
}

var _ nbd.Exports = (*Manager)(nil)

// FileName is the backing file name of volume id.
func FileName(id uint64) string { return fmt.Sprintf("vol-%d.img", id) }

// Open loads every volume of the catalogue, opens its backing file and builds its stack, and
// removes backing files that no catalogued volume owns (left by a crash in the middle of a
// create or a delete). A catalogued volume whose file can't be opened is an error: serving it
// empty would be silently wrong.
func Open(opts Options) (*Manager, error) {
	if opts.Stack == nil {
		opts.Stack = FileStack
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	m := &Manager{opts: opts, byID: map[uint64]*volume{}, byName: map[string]*volume{}}
	var recs []catalog.Volume
	var next uint64
	err := opts.Catalog.View(func(tx *catalog.Tx) error {
		var err error
		if recs, err = tx.Volumes(); err != nil {
			return err
		}
		next, err = tx.PeekID(catalog.SeqVolume)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("load volumes: %w", err)
	}
	owned := map[string]bool{}
	for _, rec := range recs {
		owned[rec.File] = true
	}
	if err := m.removeOrphans(owned, next); err != nil {
		return nil, err
	}
	for _, rec := range recs {
		f, err := opts.FS.Open(rec.File)
		if err != nil {
			m.Close()
			return nil, fmt.Errorf("volume %s (id %d): open %s: %w", rec.Name, rec.ID, rec.File, err)
		}
		v, err := m.build(rec, f)
		if err != nil {
			f.Close()
			m.Close()
			return nil, err
		}
		m.byID[rec.ID], m.byName[rec.Name] = v, v
	}
	return m, nil
}

// Lister is implemented by stores that can list their files; Open uses it to find orphans.
type Lister interface {
	List() ([]string, error)
}

var orphanName = regexp.MustCompile(`^vol-([0-9]+)\.img$`)

// removeOrphans deletes backing files not owned by a catalogued volume. Ids are never reused,
// so an orphan's id is below or equal to next (equal: a create that crashed before its commit).
func (m *Manager) removeOrphans(owned map[string]bool, next uint64) error {
	var names []string
	switch fs := m.opts.FS.(type) {
	case Lister:
		var err error
		if names, err = fs.List(); err != nil {
			return fmt.Errorf("list backing files: %w", err)
		}
	default:
		for id := uint64(0); id <= next; id++ {
			names = append(names, FileName(id))
		}
	}
	for _, name := range names {
		if !orphanName.MatchString(name) || owned[name] {
			continue
		}
		if err := m.opts.FS.Remove(name); err != nil {
			return fmt.Errorf("remove orphan backing file %s: %w", name, err)
		}
		m.opts.Logger.Debug().Str("file", name).Msg("removed orphan backing file")
	}
	return nil
}

func (m *Manager) build(rec catalog.Volume, f store.File) (*volume, error) {
	stack, err := m.opts.Stack(rec, f)
	if err != nil {
		return nil, fmt.Errorf("volume %s (id %d): build device: %w", rec.Name, rec.ID, err)
	}
	if stack.Size() != rec.Capacity {
		return nil, fmt.Errorf("volume %s (id %d): device size %d, capacity %d", rec.Name, rec.ID, stack.Size(), rec.Capacity)
	}
	g := &gate{}
	return &volume{rec: rec, file: f, stack: stack, gate: g,
		dev: newGatedDevice(rec.Name, g, stack)}, nil
}

// ValidateName returns an fcerr refusal (BadName) if name is not a valid object name:
// letters, digits, '_', '-', '.', starting with a letter or '_', at most 63 characters, and not
// a number (ids and names share one argument).
func ValidateName(name string) error {
	bad := func(why string) error {
		return fcerr.New(fcerr.BadName, "the name %q is not valid: %s", name, why)
	}
	switch {
	case name == "":
		return bad("it is empty")
	case len(name) > MaxNameLen:
		return bad(fmt.Sprintf("it is longer than %d characters", MaxNameLen))
	case isNumber(name):
		return bad("it is a number")
	}
	for i, c := range name {
		letter := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
		ok := letter || c == '_' || (i > 0 && (c >= '0' && c <= '9' || c == '-' || c == '.'))
		if !ok {
			if i == 0 {
				return bad("it must start with a letter or '_'")
			}
			return bad(fmt.Sprintf("%q is not a letter, digit, '_', '-' or '.'", c))
		}
	}
	return nil
}

func isNumber(s string) bool {
	_, err := strconv.ParseFloat(s, 64)
	return err == nil
}

// ValidateCapacity returns an fcerr refusal (BadValue) unless size is a positive multiple of
// BlockSize no larger than MaxCapacity.
func ValidateCapacity(size int64) error {
	switch {
	case size <= 0:
		return fcerr.New(fcerr.BadValue, "the size %d is not valid: it must be greater than 0", size)
	case size%BlockSize != 0:
		return fcerr.New(fcerr.BadValue, "the size %d is not valid: it must be a multiple of %d bytes", size, BlockSize)
	case size > MaxCapacity:
		return fcerr.New(fcerr.BadValue, "the size %d is not valid: the largest volume is %d bytes", size, int64(MaxCapacity))
	}
	return nil
}

// Create makes a volume of size bytes called name and returns it. Refusals are fcerr errors
// (BadName, NameInUse, BadValue) and change nothing. The backing file is created first and the
// catalogue commit comes second, so a crash leaves at worst an orphan file, removed at start.
func (m *Manager) Create(name string, size int64) (Info, error) {
	if err := ValidateName(name); err != nil {
		return Info{}, err
	}
	if err := ValidateCapacity(size); err != nil {
		return Info{}, err
	}
	m.opMu.Lock()
	defer m.opMu.Unlock()
	if err := m.checkOpen(); err != nil {
		return Info{}, err
	}
	if m.find(name) != nil {
		return Info{}, fcerr.New(fcerr.NameInUse, "the name %q is already in use", name)
	}
	var id uint64
	if err := m.opts.Catalog.View(func(tx *catalog.Tx) (err error) {
		id, err = tx.PeekID(catalog.SeqVolume)
		return err
	}); err != nil {
		return Info{}, fmt.Errorf("create volume %s: %w", name, err)
	}
	rec := catalog.Volume{ID: id, Name: name, Capacity: size, File: FileName(id), Created: m.opts.Now().UTC()}

	// 1. The backing file, synced with its directory entry.
	f, err := m.opts.FS.Create(rec.File, size)
	if err != nil {
		return Info{}, fmt.Errorf("create volume %s: backing file: %w", name, err)
	}
	v, err := m.build(rec, f)
	if err != nil {
		f.Close()
		m.opts.FS.Remove(rec.File)
		return Info{}, err
	}
	// 2. The catalogue commit: from here on the volume exists.
	err = m.opts.Catalog.Update(func(tx *catalog.Tx) error {
		got, err := tx.NextID(catalog.SeqVolume)
		if err != nil {
			return err
		}
		if got != id {
			return fmt.Errorf("volume id counter moved from %d to %d during create", id, got)
		}
		return tx.PutVolume(rec)
	})
	if err != nil {
		m.closeVolume(v, false)
		m.opts.FS.Remove(rec.File)
		return Info{}, fcerr.Unwritable(err, "create volume %s", name)
	}
	m.mu.Lock()
	m.byID[id], m.byName[name] = v, v
	m.mu.Unlock()
	m.opts.Logger.Debug().Uint64("id", id).Str("name", name).Int64("capacity", size).Msg("volume created")
	return info(v), nil
}

// Delete removes the volume ref (an id if all digits, else a name). The catalogue commit comes
// first: once it is durable the volume is gone, new connections can't find it, requests already
// in progress finish, later requests on devices still held fail with EIO, and then the backing
// file is closed and removed (a crash before the removal leaves an orphan, removed at start).
// A volume mapped to a host is refused (catalog.Tx.CheckVolumeDelete) unless force, which
// removes its host mappings with it.
// DeleteMode says what may go with a deleted volume: rmvdisk's -force and -removehostmappings.
type DeleteMode struct {
	// Force: its FlashCopy mappings are stopped and deleted (the driver's part), and its host
	// mappings are removed.
	Force bool
	// HostMaps: its host mappings are removed; FlashCopy mappings still refuse the deletion.
	HostMaps bool
}

// hostMaps reports whether the volume's host mappings may go with it.
func (d DeleteMode) hostMaps() bool { return d.Force || d.HostMaps }

func (m *Manager) Delete(ref string, mode DeleteMode) error {
	m.opMu.Lock()
	defer m.opMu.Unlock()
	if err := m.checkOpen(); err != nil {
		return err
	}
	v := m.find(ref)
	if v == nil {
		return noSuch(ref)
	}
	err := m.opts.Catalog.Update(func(tx *catalog.Tx) error {
		// A volume mapped to a host is refused unless -force or -removehostmappings; its host
		// mappings then go with it.
		if err := tx.RemoveVolumeHostMaps(v.rec.ID, mode.hostMaps()); err != nil {
			return err
		}
		return tx.DeleteVolume(v.rec.ID)
	})
	if fcerr.CodeOf(err) != "" {
		return err
	}
	if err != nil {
		return fcerr.Unwritable(err, "delete volume %s", v.rec.Name)
	}
	m.mu.Lock()
	delete(m.byID, v.rec.ID)
	delete(m.byName, v.rec.Name)
	m.mu.Unlock()
	if err := m.closeVolume(v, false); err != nil {
		m.opts.Logger.Warn().Err(err).Str("volume", v.rec.Name).Msg("closing a deleted volume")
	}
	if err := m.opts.FS.Remove(v.rec.File); err != nil {
		// The volume is deleted; the file is an orphan that the next start removes.
		m.opts.Logger.Warn().Err(err).Str("file", v.rec.File).Msg("removing a deleted volume's backing file")
	}
	m.opts.Logger.Debug().Uint64("id", v.rec.ID).Str("name", v.rec.Name).Msg("volume deleted")
	return nil
}

// CheckDelete returns the refusal Delete(ref, force) would give for host mappings, changing
// nothing: callers that must change other state first (the FlashCopy control plane) ask it
// before.
func (m *Manager) CheckDelete(ref string, mode DeleteMode) error {
	v := m.find(ref)
	if v == nil {
		return noSuch(ref)
	}
	return m.opts.Catalog.View(func(tx *catalog.Tx) error { return tx.CheckVolumeDelete(v.rec.ID, mode.hostMaps()) })
}

// closeVolume waits for the requests in progress, optionally flushes, closes the stack (if it
// is a Closer) and the file.
func (m *Manager) closeVolume(v *volume, flush bool) error {
	v.gate.close()
	var errs []error
	if flush {
		if err := v.stack.Flush(); err != nil {
			errs = append(errs, fmt.Errorf("flush volume %s: %w", v.rec.Name, err))
		}
	}
	if c, ok := v.stack.(io.Closer); ok {
		if err := c.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close volume %s device: %w", v.rec.Name, err))
		}
	}
	if err := v.file.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close volume %s file: %w", v.rec.Name, err))
	}
	return errors.Join(errs...)
}

// Close flushes and closes every volume; requests still arriving afterwards fail with EIO.
// Call it after the NBD server has shut down. The catalogue is the caller's to close.
func (m *Manager) Close() error {
	m.opMu.Lock()
	defer m.opMu.Unlock()
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	vols := make([]*volume, 0, len(m.byID))
	for _, v := range m.byID {
		vols = append(vols, v)
	}
	m.mu.Unlock()
	var errs []error
	for _, v := range vols {
		errs = append(errs, m.closeVolume(v, true))
	}
	return errors.Join(errs...)
}

func (m *Manager) checkOpen() error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		return fcerr.New(fcerr.BadState, "the daemon is stopping")
	}
	return nil
}

// IsID reports whether ref names an object by id: ids and names share one argument, and an
// argument of digits only is an id.
func IsID(ref string) bool {
	if ref == "" {
		return false
	}
	for _, c := range ref {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

func (m *Manager) find(ref string) *volume {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if IsID(ref) {
		id, err := strconv.ParseUint(ref, 10, 64)
		if err != nil {
			return nil
		}
		return m.byID[id]
	}
	return m.byName[ref]
}

func noSuch(ref string) error {
	return fcerr.New(fcerr.NoSuchObject, "the volume %q does not exist", ref)
}

func info(v *volume) Info { return InfoOf(v.rec) }

// InfoOf is what a volume's record says of it, online.
func InfoOf(rec catalog.Volume) Info {
	return Info{ID: rec.ID, Name: rec.Name, Capacity: rec.Capacity, Status: StatusOnline, Created: rec.Created}
}

// Find returns the volume ref (an id if all digits, else a name) among vols, or the
// NoSuchObject refusal Get gives.
func Find(vols []Info, ref string) (Info, error) {
	byID := IsID(ref)
	id, err := strconv.ParseUint(ref, 10, 64)
	for _, v := range vols {
		if byID && err == nil && v.ID == id || !byID && v.Name == ref {
			return v, nil
		}
	}
	return Info{}, noSuch(ref)
}

// Get returns the volume ref (an id if all digits, else a name), or a NoSuchObject refusal.
func (m *Manager) Get(ref string) (Info, error) {
	v := m.find(ref)
	if v == nil {
		return Info{}, noSuch(ref)
	}
	m.mu.RLock() // Rename changes v.rec.Name under m.mu
	defer m.mu.RUnlock()
	return info(v), nil
}

// Volumes returns every volume in id order.
func (m *Manager) Volumes() []Info {
	m.mu.RLock()
	out := make([]Info, 0, len(m.byID))
	for _, v := range m.byID {
		out = append(out, info(v))
	}
	m.mu.RUnlock()
	sortByID(out)
	return out
}

// Device returns the device that serves volume ref (the one the NBD server is handed).
func (m *Manager) Device(ref string) (blockdev.Device, error) {
	v := m.find(ref)
	if v == nil {
		return nil, noSuch(ref)
	}
	return v.dev, nil
}

// Lookup implements nbd.Exports: the export name is the volume's name.
func (m *Manager) Lookup(name string) (nbd.Export, bool) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	v, ok := m.byName[name]
	if !ok || m.closed {
		return nbd.Export{}, false
	}
	return export(v), true
}

// List implements nbd.Exports: every volume, in id order.
func (m *Manager) List() []nbd.Export {
	vols := m.Volumes()
	m.mu.RLock()
	defer m.mu.RUnlock()
	out := make([]nbd.Export, 0, len(vols))
	for _, vi := range vols {
		if v, ok := m.byID[vi.ID]; ok {
			out = append(out, export(v))
		}
	}
	return out
}

func export(v *volume) nbd.Export {
	return nbd.Export{Name: v.rec.Name, Description: fmt.Sprintf("fcnbd volume %s, id %d", v.rec.Name, v.rec.ID), Device: v.dev}
}

func sortByID(vs []Info) {
	slices.SortFunc(vs, func(a, b Info) int { return cmp.Compare(a.ID, b.ID) })
}
