package mappings

import (
	"encoding/json"
	"math"
	"sort"
	"strconv"
	"time"

	"fcnbd/internal/fcerr"
)

// VolumeID identifies a volume: 0, 1, 2, … in order of creation, never reused.
type VolumeID int

// MappingID identifies a FlashCopy mapping: 0, 1, 2, … in order of creation, never reused, so
// that a late event from the engine can never be mistaken for one about a newer mapping.
type MappingID int

// GroupID identifies a consistency group: 1, 2, …; 0 means "stand-alone".
type GroupID int

// NoVolume and NoMapping stand for "none" where an id is optional.
const (
	NoVolume  VolumeID  = -1
	NoMapping MappingID = -1
)

// State is a mapping's (or a group's) status, spelled as lsfcmap shows it.
type State string

// The states of docs/flashcopy.md §2. Empty is a group's status when it has no members.
const (
	IdleOrCopied State = "idle_or_copied"
	Preparing    State = "preparing"
	Prepared     State = "prepared"
	Copying      State = "copying"
	Stopping     State = "stopping"
	Stopped      State = "stopped"
	Suspended    State = "suspended"
	Empty        State = "empty"
)

// Limits of docs/flashcopy.md §1.
const (
	MaxMappingsPerSource = 256
	MaxMappingsPerGroup  = 512
	MaxConnectedSet      = 256
	MaxNameLen           = 63
	DefaultRate          = 50
	MaxRate              = 150
	DefaultGrainKiB      = 256
	// VolumeAlign is fcnbd's capacity granularity (IBM's is 512).
	VolumeAlign = 4096
)

// Volume is a volume as the control plane sees it. Whether it is online and whether its cache is
// write-through are not stored: they follow from the mappings (Model.VolumeAccess).
type Volume struct {
	ID   VolumeID `json:"id"`
	Name string   `json:"name"`
	Size int64    `json:"size"` // bytes, a multiple of VolumeAlign
}

// Mapping is one FlashCopy mapping. Fields that lsfcmap shows but that follow from other objects
// (partner, restoring of the partner, dependent_mappings, progress, difference) are computed by
// Model.MappingInfo.
type Mapping struct {
	ID         MappingID `json:"id"`
	Name       string    `json:"name"`
	Source     VolumeID  `json:"source"`
	Target     VolumeID  `json:"target"`
	Group      GroupID   `json:"group"`
	State      State     `json:"state"`
	Resume     State     `json:"resume,omitempty"` // while suspended: the state to return to
	CopyRate   int       `json:"copy_rate"`
	CleanRate  int       `json:"clean_rate"`
	GrainKiB   int       `json:"grain_size"` // 64 or 256
	Grains     int64     `json:"grains"`     // ceil(size / grain); volumes can't be resized while mapped
	Autodelete bool      `json:"autodelete"`
	StartTime  time.Time `json:"start_time"`
	// StatusReason says why a stopped mapping stopped on its own (an I/O error, a failed flush,
	// state that could not be restored at daemon start); empty for a stop by command. It goes
	// with the stop: the next prepare clears it.
	StatusReason string `json:"status_reason,omitempty"`

	// Split is the number of grains set in the split bitmap, as last reported by the engine.
	Split int64 `json:"split"`
	// CleanProgress is the engine's last report of cleaning progress, 0–100.
	CleanProgress int `json:"clean_progress"`

	// Incremental is fixed at creation. DiffGrains counts the grains of the difference bitmap
	// as the driver last fed it (DiffCount): it is exact at a start's commit, which seeds from
	// it; lsfcmap reads the data path's live count instead (DifferenceOf). DiffTrusted says
	// that the bitmap exists and may be used to skip grains at the next start (it becomes
	// true when a copy completes, false when a copy is cut short or the record lost).
	Incremental bool  `json:"incremental"`
	DiffGrains  int64 `json:"diff_grains"`
	DiffTrusted bool  `json:"diff_trusted"`

	// Run is the copy work of the mapping's current or last run that the driver has recorded
	// (RunFigures, when the run ends): reset at each start, so that after a run lsfcmap still
	// shows what it did. Total adds up every run since the mapping was created; the metrics
	// export it as counters, which never go down.
	Run   Figures `json:"run"`
	Total Figures `json:"total"`

	// RestoreFlag records -restore from the prepare or start now in progress. Restoring is set
	// when that -restore is real: the target was the source of an active mapping.
	RestoreFlag bool `json:"restore_flag,omitempty"`
	Restoring   bool `json:"restoring,omitempty"`

	// ChainSeq orders the mapping in its source's dependency chain (larger = newer, nearer the
	// source); 0 means the target is not in a chain. Non-zero exactly in copying, stopping and
	// suspended.
	ChainSeq uint64 `json:"chain_seq,omitempty"`
	// Via, when set, is the volume the in-chain target hangs directly under instead of its
	// place in its source's chain: the volume a chain's change left it under (a target it read
	// through left its chain, and it joined that target's upstream, or stayed under a target
	// split out), exactly as the copy-on-write layer keeps it. Unset (nil), the target's
	// upstream follows from ChainSeq (Model.upstreamOf). A new start from Via's volume does
	// not move it, unless Via is its source. Cleared when the mapping leaves its chain.
	// A pointer so that a catalogue without it reads as unset (volume 0 is a volume).
	Via *VolumeID `json:"via,omitempty"`
	// Cleaning says a copying mapping at 100 % was told to clean its dependants.
	Cleaning bool `json:"cleaning,omitempty"`

	// Volatile: an operation in flight that a daemon restart abandons.
	StartAfterPrepare bool `json:"-"` // startfcmap -prep: start once prepared
	Fencing           bool `json:"-"` // a Hold for this mapping's start is outstanding
}

// Figures counts the copy work done into a mapping's target (lsfcmap's grains_copied,
// split_on_write and bytes_copied).
type Figures struct {
	GrainsCopied int64 `json:"grains_copied"`  // by background copy, or by the upstream's cleaning
	SplitOnWrite int64 `json:"split_on_write"` // by host writes (copy-on-write, fills)
	BytesCopied  int64 `json:"bytes_copied"`   // by all of those
}

// Plus is f and g added up.
func (f Figures) Plus(g Figures) Figures {
	return Figures{f.GrainsCopied + g.GrainsCopied, f.SplitOnWrite + g.SplitOnWrite, f.BytesCopied + g.BytesCopied}
}

// AddFigures adds f to mapping id's run and lifetime figures, and reports whether there is such
// a mapping. It changes nothing else: the driver also uses it on the stored model at shutdown,
// where the figures are the only change it may make.
func (m *Model) AddFigures(id MappingID, f Figures) bool {
	mp := m.Mappings[id]
	if mp == nil {
		return false
	}
	mp.Run, mp.Total = mp.Run.Plus(f), mp.Total.Plus(f)
	return true
}

// Progress is split grains / all grains in whole percent, rounded down so that 100 means every
// grain is split.
func (mp *Mapping) Progress() int {
	if mp.Grains <= 0 {
		return 100
	}
	return int(mp.Split * 100 / mp.Grains)
}

// Difference is DifferenceOf(DiffGrains): the share as of the count the model was last fed.
func (mp *Mapping) Difference() int { return mp.DifferenceOf(mp.DiffGrains) }

// DifferenceOf is the share of grains that the next start must copy when the difference bitmap
// has grains bits set, in percent, rounded up so that 0 means none: 100 unless the difference
// bitmap of an incremental mapping can be trusted.
func (mp *Mapping) DifferenceOf(grains int64) int {
	if !mp.Incremental || !mp.DiffTrusted || mp.Grains <= 0 {
		return 100
	}
	grains = min(max(grains, 0), mp.Grains)
	return int((grains*100 + mp.Grains - 1) / mp.Grains)
}

func (mp *Mapping) inChain() bool { return mp.ChainSeq != 0 }

// Group is a consistency group. Its status and members follow from its mappings.
type Group struct {
	ID         GroupID   `json:"id"`
	Name       string    `json:"name"`
	Autodelete bool      `json:"autodelete"`
	StartTime  time.Time `json:"start_time"`
}

// Model is the whole control-plane state: the catalogue that is persisted as one value. Its
// methods never do I/O; commands and events return the effects a driver must carry out. A
// method that returns an error has changed nothing.
type Model struct {
	Volumes     map[VolumeID]*Volume   `json:"volumes"`
	Mappings    map[MappingID]*Mapping `json:"mappings"`
	Groups      map[GroupID]*Group     `json:"groups"`
	NextVolume  VolumeID               `json:"next_volume"`
	NextMapping MappingID              `json:"next_mapping"`
	NextGroup   GroupID                `json:"next_group"`
	NextSeq     uint64                 `json:"next_seq"`
}

// New returns an empty model.
func New() *Model {
	return &Model{
		Volumes:   map[VolumeID]*Volume{},
		Mappings:  map[MappingID]*Mapping{},
		Groups:    map[GroupID]*Group{},
		NextGroup: 1,
		NextSeq:   1,
	}
}

// Clone returns a deep copy that shares nothing with m.
func (m *Model) Clone() *Model {
	c := *m
	c.Volumes = make(map[VolumeID]*Volume, len(m.Volumes))
	for id, v := range m.Volumes {
		v := *v
		c.Volumes[id] = &v
	}
	c.Mappings = make(map[MappingID]*Mapping, len(m.Mappings))
	for id, mp := range m.Mappings {
		mp := *mp
		c.Mappings[id] = &mp
	}
	c.Groups = make(map[GroupID]*Group, len(m.Groups))
	for id, g := range m.Groups {
		g := *g
		c.Groups[id] = &g
	}
	return &c
}

// UnmarshalJSON decodes a model and makes sure its maps are never nil.
func (m *Model) UnmarshalJSON(b []byte) error {
	type plain Model
	p := plain(*New())
	if err := json.Unmarshal(b, &p); err != nil {
		return err
	}
	*m = Model(p)
	if m.Volumes == nil {
		m.Volumes = map[VolumeID]*Volume{}
	}
	if m.Mappings == nil {
		m.Mappings = map[MappingID]*Mapping{}
	}
	if m.Groups == nil {
		m.Groups = map[GroupID]*Group{}
	}
	return nil
}

// durable is what Persist must write: the model without the counters the engine reports, which
// the driver recomputes from the bitmaps when it opens the catalogue.
func (m *Model) durable() []byte {
	c := m.Clone()
	for _, mp := range c.Mappings {
		mp.Split, mp.CleanProgress, mp.DiffGrains = 0, 0, 0
	}
	b, err := json.Marshal(c)
	if err != nil {
		panic("mappings: model does not marshal: " + err.Error())
	}
	return b
}

// sortedMappings returns the mappings in id order, so that effects come out deterministic.
func (m *Model) sortedMappings() []*Mapping {
	ids := make([]MappingID, 0, len(m.Mappings))
	for id := range m.Mappings {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	out := make([]*Mapping, len(ids))
	for i, id := range ids {
		out[i] = m.Mappings[id]
	}
	return out
}

// Members returns the mappings of group g in id order.
func (m *Model) Members(g GroupID) []MappingID {
	var out []MappingID
	for _, mp := range m.sortedMappings() {
		if mp.Group == g {
			out = append(out, mp.ID)
		}
	}
	return out
}

func (m *Model) members(g GroupID) []*Mapping {
	var out []*Mapping
	for _, mp := range m.sortedMappings() {
		if mp.Group == g {
			out = append(out, mp)
		}
	}
	return out
}

// statusRank orders the states for a group whose members differ (members finish their copies
// one by one): the least advanced activity shows.
var statusRank = map[State]int{
	Stopped: 7, Suspended: 6, Stopping: 5, Copying: 4, Preparing: 3, Prepared: 2, IdleOrCopied: 1,
}

// GroupStatus is the members' common status; empty with no members; stopped as soon as any
// member is stopped. Members that differ otherwise (one finished copying before another) show
// the status of the one still busiest.
func (m *Model) GroupStatus(g GroupID) State {
	st, best := Empty, 0
	for _, mp := range m.members(g) {
		if r := statusRank[mp.State]; r > best {
			st, best = mp.State, r
		}
	}
	return st
}

// ---- names and references ----

// CheckName returns nil if name is a valid object name (docs/flashcopy.md §1), else a BadName
// refusal.
func CheckName(name string) error {
	if name == "" || len(name) > MaxNameLen {
		return fcerr.New(fcerr.BadName, "the name %q is not valid: it must have 1 to %d characters", name, MaxNameLen)
	}
	if _, err := strconv.ParseFloat(name, 64); err == nil {
		return fcerr.New(fcerr.BadName, "the name %q is not valid: it parses as a number", name)
	}
	c := name[0]
	if !(c == '_' || isLetter(c)) {
		return fcerr.New(fcerr.BadName, "the name %q is not valid: it must start with a letter or _", name)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !(isLetter(c) || c >= '0' && c <= '9' || c == '_' || c == '-' || c == '.') {
			return fcerr.New(fcerr.BadName, "the name %q is not valid: only letters, digits, _, - and . are allowed", name)
		}
	}
	return nil
}

func isLetter(c byte) bool { return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' }

// parseID reports whether arg is an id (all digits) and its value.
func parseID(arg string) (int, bool) {
	if arg == "" {
		return 0, false
	}
	for i := 0; i < len(arg); i++ {
		if arg[i] < '0' || arg[i] > '9' {
			return 0, false
		}
	}
	n, err := strconv.Atoi(arg)
	if err != nil {
		return math.MaxInt, true // too large to be any id
	}
	return n, true
}

func resolve[ID ~int, T any](kind, arg string, objs map[ID]*T, name func(*T) string) (*T, error) {
	if arg == "" {
		return nil, fcerr.New(fcerr.MissingParameter, "the %s is not specified", kind)
	}
	if n, ok := parseID(arg); ok {
		if o, ok := objs[ID(n)]; ok && n >= 0 {
			return o, nil
		}
		return nil, fcerr.New(fcerr.NoSuchObject, "the %s with id %s does not exist", kind, arg)
	}
	for _, o := range objs {
		if name(o) == arg {
			return o, nil
		}
	}
	return nil, fcerr.New(fcerr.NoSuchName, "the %s %q does not exist", kind, arg)
}

// ResolveVolume finds a volume by id or name.
func (m *Model) ResolveVolume(arg string) (VolumeID, error) {
	v, err := m.volume(arg)
	if err != nil {
		return NoVolume, err
	}
	return v.ID, nil
}

// ResolveMapping finds a mapping by id or name.
func (m *Model) ResolveMapping(arg string) (MappingID, error) {
	mp, err := m.mapping(arg)
	if err != nil {
		return NoMapping, err
	}
	return mp.ID, nil
}

// ResolveGroup finds a consistency group by id or name. "0" is not a group.
func (m *Model) ResolveGroup(arg string) (GroupID, error) {
	g, err := m.group(arg)
	if err != nil {
		return 0, err
	}
	return g.ID, nil
}

func (m *Model) volume(arg string) (*Volume, error) {
	return resolve("volume", arg, m.Volumes, func(v *Volume) string { return v.Name })
}

func (m *Model) mapping(arg string) (*Mapping, error) {
	return resolve("FlashCopy mapping", arg, m.Mappings, func(mp *Mapping) string { return mp.Name })
}

func (m *Model) group(arg string) (*Group, error) {
	return resolve("consistency group", arg, m.Groups, func(g *Group) string { return g.Name })
}

func nameTaken[ID comparable, T any](objs map[ID]*T, name string, self ID, nameOf func(*T) string) bool {
	for id, o := range objs {
		if id != self && nameOf(o) == name {
			return true
		}
	}
	return false
}

func (m *Model) mappingNameTaken(name string, self MappingID) bool {
	return nameTaken(m.Mappings, name, self, func(mp *Mapping) string { return mp.Name })
}

func (m *Model) groupNameTaken(name string, self GroupID) bool {
	return nameTaken(m.Groups, name, self, func(g *Group) string { return g.Name })
}

func (m *Model) volumeNameTaken(name string, self VolumeID) bool {
	return nameTaken(m.Volumes, name, self, func(v *Volume) string { return v.Name })
}

// checkNewName validates a user-supplied name for one kind of object.
func checkNewName(name string, taken bool) error {
	if err := CheckName(name); err != nil {
		return err
	}
	if taken {
		return fcerr.New(fcerr.NameInUse, "the name %q is already in use", name)
	}
	return nil
}
