package cow

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/time/rate"

	"fcnbd/bitmap"
	"fcnbd/internal/blockdev"
	"fcnbd/internal/store"
)

// Sentinel errors callers branch on.
var (
	ErrNoVolume    = errors.New("cow: no such volume")
	ErrNoMapping   = errors.New("cow: no such mapping")
	ErrVolumeInUse = errors.New("cow: volume is in a dependency chain")
	ErrBadSpec     = errors.New("cow: invalid mapping spec")
	ErrState       = errors.New("cow: not valid in the mapping's current phase")
	ErrNotCopied   = errors.New("cow: mapping is not at 100 %")
	errShutdown    = syscall.ESHUTDOWN
)

// Phase is where a mapping is in the engine (the control plane's states are finer).
type Phase int32

const (
	// Copying: the target is in the chain; background copy runs at the copy rate.
	Copying Phase = iota + 1
	// Stopping: cleaning runs at the clean rate; the target is still in the chain.
	Stopping
	// Stopped: the target has left the chain (after cleaning, by force, by split, or by an I/O
	// error). Its store holds whatever it holds.
	Stopped
)

func (p Phase) String() string {
	switch p {
	case Copying:
		return "copying"
	case Stopping:
		return "stopping"
	case Stopped:
		return "stopped"
	}
	return fmt.Sprintf("Phase(%d)", int32(p))
}

// MappingSpec describes a mapping to start.
type MappingSpec struct {
	ID, Source, Target int
	GrainSize          int64
	// Split is the initial split bitmap (the engine owns it from then on); nil means all
	// clear. An incremental restart passes the grains that need no copy already set. The
	// engine adds, for a restore (Source reads through its chain to Target), every grain for
	// which Source's view still comes from Target's own store.
	Split     *bitmap.Bitmap
	CopyRate  int
	CleanRate int
	// Via, when set, rebuilds a chain as it was (daemon start): once every spec of the call
	// is inserted, the target hangs directly under volume *Via instead of where its start put
	// it, as a chain's change had left it (the control plane's Mapping.Via). nil for a start.
	Via *int
}

// EventKind says what an Event reports.
type EventKind int

const (
	// CopyComplete: every grain is split and no downstream volume reads through the target
	// (flashcopy.md §3 "Copy complete"); the control plane moves the mapping to
	// idle_or_copied and calls RemoveMapping.
	CopyComplete EventKind = iota + 1
	// CleanComplete: a stopping mapping finished cleaning and its target left the chain.
	CleanComplete
	// IOError: a grain copy for the mapping failed (Err says why). The target has left the
	// chain without cleaning; Dependants lists the mappings stopped with it for the same
	// reason. Host writes that triggered the copy succeeded.
	IOError
)

func (k EventKind) String() string {
	switch k {
	case CopyComplete:
		return "copy-complete"
	case CleanComplete:
		return "clean-complete"
	case IOError:
		return "io-error"
	}
	return fmt.Sprintf("EventKind(%d)", int(k))
}

// Event is reported on the channel returned by Events.
type Event struct {
	Kind       EventKind
	Mapping    int
	Err        error
	Dependants []int
}

// Options tunes an Engine. Zero values mean the defaults.
type Options struct {
	// BackgroundSlots caps grain copies running at once for background copy and cleaning
	// across the engine (default 4), so that workers share the disks with host I/O.
	BackgroundSlots int
}

// Engine is the copy-on-write layer for every volume of a daemon. Its methods are safe for
// concurrent use.
type Engine struct {
	journal BitJournal
	commit  *committer
	locks   lockTable
	bgSlots chan struct{}
	// hostWrites counts host writes (every volume); the background copy yields while it moves.
	hostWrites atomic.Int64

	// topoMu serialises topology changes (start, stop, split, remove, volume add/remove) and
	// guards vols, maps and nextComp. The links inside volumes are additionally guarded by the
	// volumes' gates: see volume.
	topoMu   sync.Mutex
	vols     map[int]*volume
	maps     map[int]*mapping
	diffs    map[int]*difference // incremental mappings' difference bitmaps, by mapping id
	nextComp uint64

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	events *eventQueue
}

// volume is one registered volume.
//
// The links (target, upstream, downstream, comp, removed) change only with topoMu held and the
// gate of every volume of the affected components held exclusively; I/O holds its own volume's
// gate shared for the whole request, which is enough to read the links of every volume in its
// component (they are all locked by a change). An I/O path never holds two gates.
type volume struct {
	id     int
	size   int64
	file   store.File
	online atomic.Bool
	gate   sync.RWMutex

	removed    bool
	target     *mapping // the active mapping (copying or stopping) whose target this is
	upstream   *volume
	downstream []*volume
	comp       uint64
	// diffs are the difference bitmaps a write to this volume records in; changed with topoMu
	// and this gate held exclusively (TrackDifference).
	diffs []*difference
}

// linked reports whether any copy-on-write concern applies; the caller holds the gate.
func (v *volume) linked() bool { return v.target != nil || len(v.downstream) > 0 }

// mapping is one started mapping.
type mapping struct {
	id             int
	source, target *volume
	split          *bitmap.Bitmap
	grain          int64

	phase  atomic.Int32
	failed atomic.Bool
	// failOnce runs the first fail; failMarked says the failure is durable in the journal
	// (FailureJournal), so the chain may change without a crash undoing the stop.
	failOnce   sync.Once
	failMarked atomic.Bool
	copyRate   atomic.Int32
	cleanRate  atomic.Int32
	lim        *rate.Limiter
	wake       chan struct{} // rate changed, or the bitmap became full

	mu     sync.Mutex // guards cancel
	cancel context.CancelFunc

	grainsCopied atomic.Int64
	splitOnWrite atomic.Int64
	cleaned      atomic.Int64
	bytesCopied  atomic.Int64
	cleanTotal   atomic.Int64
}

func (m *mapping) getPhase() Phase { return Phase(m.phase.Load()) }

func (m *mapping) poke() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// New returns an engine that commits split bits to journal.
func New(journal BitJournal, opts Options) *Engine {
	if opts.BackgroundSlots <= 0 {
		opts.BackgroundSlots = 4
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Engine{
		journal: journal,
		commit:  newCommitter(journal),
		bgSlots: make(chan struct{}, opts.BackgroundSlots),
		vols:    map[int]*volume{},
		maps:    map[int]*mapping{},
		diffs:   map[int]*difference{},
		ctx:     ctx,
		cancel:  cancel,
		events:  newEventQueue(),
	}
}

// Close stops background work and the committer. In-flight I/O must have finished; Devices
// fail with ESHUTDOWN afterwards. It does not close the volumes' files.
func (e *Engine) Close() error {
	e.cancel()
	e.wg.Wait()
	e.commit.close()
	e.events.close()
	return nil
}

// Events returns the channel on which the engine reports events. It is closed by Close. The
// engine never blocks on it: events queue until read.
func (e *Engine) Events() <-chan Event { return e.events.out }

// AddVolume registers volume id of size bytes stored in file. The volume starts online.
func (e *Engine) AddVolume(id int, size int64, file store.File) error {
	e.topoMu.Lock()
	defer e.topoMu.Unlock()
	if _, ok := e.vols[id]; ok {
		return fmt.Errorf("add volume %d: already registered", id)
	}
	v := &volume{id: id, size: size, file: file}
	v.online.Store(true)
	e.vols[id] = v
	return nil
}

// RemoveVolume unregisters volume id; its Devices fail with ESHUTDOWN from then on. A volume
// in a dependency chain (a target of, or something reading through, an active mapping) is
// refused with ErrVolumeInUse.
func (e *Engine) RemoveVolume(id int) error {
	e.topoMu.Lock()
	defer e.topoMu.Unlock()
	v := e.vols[id]
	if v == nil {
		return fmt.Errorf("remove volume %d: %w", id, ErrNoVolume)
	}
	v.gate.Lock()
	defer v.gate.Unlock()
	if v.linked() {
		return fmt.Errorf("remove volume %d: %w", id, ErrVolumeInUse)
	}
	v.removed = true
	delete(e.vols, id)
	return nil
}

// SetOnline opens or closes volume id to I/O. Offline, every request of its Devices fails with
// EIO without touching the store; the control plane applies flashcopy.md §2 with it.
func (e *Engine) SetOnline(id int, online bool) error {
	e.topoMu.Lock()
	defer e.topoMu.Unlock()
	v := e.vols[id]
	if v == nil {
		return fmt.Errorf("set online %d: %w", id, ErrNoVolume)
	}
	v.online.Store(online)
	return nil
}

// Device returns volume id as a block device.
func (e *Engine) Device(id int) (blockdev.Device, error) {
	e.topoMu.Lock()
	defer e.topoMu.Unlock()
	v := e.vols[id]
	if v == nil {
		return nil, fmt.Errorf("device %d: %w", id, ErrNoVolume)
	}
	return &device{e: e, v: v}, nil
}

// ---- topology ----

// component returns every volume linked to any of roots, directly or not, sorted by id.
func component(roots ...*volume) []*volume {
	seen := map[*volume]bool{}
	var out []*volume
	var visit func(v *volume)
	visit = func(v *volume) {
		if v == nil || seen[v] {
			return
		}
		seen[v] = true
		out = append(out, v)
		visit(v.upstream)
		for _, d := range v.downstream {
			visit(d)
		}
	}
	for _, r := range roots {
		visit(r)
	}
	slices.SortFunc(out, func(a, b *volume) int { return a.id - b.id })
	return out
}

// lockGates takes the gates of vols (sorted by id) exclusively: it waits for their in-flight
// I/O and holds off new I/O until the returned function is called.
func lockGates(vols []*volume) func() {
	for _, v := range vols {
		v.gate.Lock()
	}
	return func() {
		for _, v := range vols {
			v.gate.Unlock()
		}
	}
}

// renumber gives each component among vols a fresh id for grain lock keys. Called with the
// gates held.
func (e *Engine) renumber(vols []*volume) {
	seen := map[*volume]bool{}
	for _, v := range vols {
		if seen[v] {
			continue
		}
		c := component(v)
		id := uint64(0)
		if len(c) > 1 {
			e.nextComp++
			id = e.nextComp
		}
		for _, w := range c {
			seen[w] = true
			w.comp = id
		}
	}
}

func removeVol(list []*volume, v *volume) []*volume {
	return slices.DeleteFunc(list, func(w *volume) bool { return w == v })
}

// StartMappings inserts every spec's target into its chain in one step, in slice order (a later
// target of the same source is newer), and starts background copy. It is called under the
// start fence: no host I/O on these volumes runs meanwhile (the engine still waits for any).
// Either every mapping starts or none does. A spec with Via (a daemon start rebuilding chains,
// in the order they were built) is inserted the same way first, then hung under its Via.
//
// Its refusals of a spec are consistency guards: the control plane refuses first every command
// that could lead to one (mappings/driver TestEngineStartRefusalsAreRefusedFirst lists them),
// so a start fails only for what arises at the start (I/O while preserving a dependant's image).
func (e *Engine) StartMappings(specs []MappingSpec) error {
	e.topoMu.Lock()
	defer e.topoMu.Unlock()

	var roots []*volume
	targets := map[int]bool{}
	for i, s := range specs {
		src, tgt := e.vols[s.Source], e.vols[s.Target]
		switch {
		case src == nil || tgt == nil:
			return fmt.Errorf("start mapping %d: %w", s.ID, ErrNoVolume)
		case src == tgt || src.size != tgt.size:
			return fmt.Errorf("start mapping %d: %w: source %d and target %d", s.ID, ErrBadSpec, s.Source, s.Target)
		case s.GrainSize <= 0:
			return fmt.Errorf("start mapping %d: %w: grain size %d", s.ID, ErrBadSpec, s.GrainSize)
		case s.Split != nil && (s.Split.VolumeSize() != tgt.size || s.Split.GrainSize() != s.GrainSize):
			return fmt.Errorf("start mapping %d: %w: split bitmap geometry", s.ID, ErrBadSpec)
		case s.CopyRate < 0 || s.CopyRate > 150 || s.CleanRate < 0 || s.CleanRate > 150:
			return fmt.Errorf("start mapping %d: %w: rates %d/%d", s.ID, ErrBadSpec, s.CopyRate, s.CleanRate)
		case tgt.target != nil || targets[s.Target]:
			return fmt.Errorf("start mapping %d: %w: volume %d is already a target", s.ID, ErrBadSpec, s.Target)
		}
		if s.Via != nil {
			via := e.vols[*s.Via]
			switch {
			case via == nil:
				return fmt.Errorf("start mapping %d: %w", s.ID, ErrNoVolume)
			case via == tgt || via.size != tgt.size:
				return fmt.Errorf("start mapping %d: %w: via volume %d", s.ID, ErrBadSpec, *s.Via)
			}
			roots = append(roots, via)
		}
		if m := e.maps[s.ID]; m != nil && m.getPhase() != Stopped {
			return fmt.Errorf("start mapping %d: %w: already active", s.ID, ErrState)
		}
		for j := range i {
			if specs[j].ID == s.ID {
				return fmt.Errorf("start mapping %d: %w: listed twice", s.ID, ErrBadSpec)
			}
		}
		targets[s.Target] = true
		roots = append(roots, src, tgt)
	}
	vols := component(roots...)
	if err := e.checkGrains(specs, vols); err != nil {
		return err
	}

	unlock := lockGates(vols)
	defer unlock()
	// Whatever reads through a target must keep reading the same data once the target reads
	// through its source (a restore, or the start of a mapping onto another one's source).
	seeds := make([]*bitmap.Bitmap, len(specs))
	for i, s := range specs {
		src, tgt := e.vols[s.Source], e.vols[s.Target]
		seeds[i] = s.Split
		if seeds[i] == nil {
			seeds[i] = bitmap.New(tgt.size, s.GrainSize)
		}
		sameView(src, tgt, seeds[i])
		if err := e.preserveDownstream(tgt, seeds[i]); err != nil {
			return fmt.Errorf("start mapping %d: %w", s.ID, err)
		}
	}
	var started []*mapping
	for i, s := range specs {
		src, tgt := e.vols[s.Source], e.vols[s.Target]
		split := seeds[i]
		m := &mapping{
			id: s.ID, source: src, target: tgt, split: split, grain: s.GrainSize,
			lim:  rate.NewLimiter(0, int(s.GrainSize)),
			wake: make(chan struct{}, 1),
		}
		m.phase.Store(int32(Copying))
		m.copyRate.Store(int32(s.CopyRate))
		m.cleanRate.Store(int32(s.CleanRate))

		// flashcopy.md §5: the new target goes directly under its source; the previous newest
		// target of that source (and any other of its targets directly below it) now reads
		// through the new one.
		for _, d := range slices.Clone(src.downstream) {
			if d.target.source == src {
				src.downstream = removeVol(src.downstream, d)
				d.upstream = tgt
				tgt.downstream = append(tgt.downstream, d)
			}
		}
		tgt.upstream = src
		tgt.target = m
		src.downstream = append(src.downstream, tgt)
		e.maps[s.ID] = m
		started = append(started, m)
	}
	for _, s := range specs {
		if s.Via == nil {
			continue
		}
		tgt, via := e.vols[s.Target], e.vols[*s.Via]
		tgt.upstream.downstream = removeVol(tgt.upstream.downstream, tgt)
		tgt.upstream = via
		via.downstream = append(via.downstream, tgt)
	}
	e.renumber(vols)
	for _, m := range started {
		e.startWorker(m, e.copyWorker)
	}
	return nil
}

// Upstreams returns, for every volume that is an active target, the volume it reads through:
// the engine's dependency chains, to compare with the control plane's (mappings.Model.Links).
func (e *Engine) Upstreams() map[int]int {
	e.topoMu.Lock()
	defer e.topoMu.Unlock()
	out := map[int]int{}
	for id, v := range e.vols {
		v.gate.RLock()
		if v.target != nil && v.upstream != nil {
			out[id] = v.upstream.id
		}
		v.gate.RUnlock()
	}
	return out
}

// checkGrains refuses specs that would give one connected set two grain sizes: a grain lock
// covers the same bytes on every volume of a set (lockKey), so each set as it will be once the
// specs are inserted — the components of vols, joined by every spec's source–target link — has
// one grain size. Sets that stay apart may differ, whether they start in one call (the restore
// of every chain at daemon start) or in several. The caller holds topoMu.
func (e *Engine) checkGrains(specs []MappingSpec, vols []*volume) error {
	parent := map[*volume]*volume{}
	var find func(v *volume) *volume
	find = func(v *volume) *volume {
		p, ok := parent[v]
		if !ok || p == v {
			return v
		}
		r := find(p)
		parent[v] = r
		return r
	}
	union := func(a, b *volume) {
		if ra, rb := find(a), find(b); ra != rb {
			parent[ra] = rb
		}
	}
	for _, v := range vols {
		if v.upstream != nil {
			union(v, v.upstream)
		}
	}
	for _, s := range specs {
		union(e.vols[s.Source], e.vols[s.Target])
		if s.Via != nil {
			union(e.vols[*s.Via], e.vols[s.Target])
		}
	}
	type setGrain struct {
		size    int64
		mapping int
	}
	grain := map[*volume]setGrain{}
	for _, v := range vols {
		if m := v.target; m != nil {
			grain[find(v)] = setGrain{m.grain, m.id}
		}
	}
	for _, s := range specs {
		root := find(e.vols[s.Target])
		if g, ok := grain[root]; ok && g.size != s.GrainSize {
			return fmt.Errorf("start mapping %d: %w: grain size %d differs from %d of mapping %d in the same dependency tree",
				s.ID, ErrBadSpec, s.GrainSize, g.size, g.mapping)
		}
		grain[root] = setGrain{s.GrainSize, s.ID}
	}
	return nil
}

// sameView sets in seed every grain for which src's view reads through its chain to tgt's
// own store, so that tgt already holds src's data for it: a restore (src a target whose chain
// leads to tgt) need not copy those. The caller holds the gates of both volumes' component.
func sameView(src, tgt *volume, seed *bitmap.Bitmap) {
	onChain := false
	for v, i := src, 0; v != nil && i < maxDepth; v, i = v.upstream, i+1 {
		if v == tgt {
			onChain = true
			break
		}
	}
	if !onChain {
		return
	}
	for g := range seed.Len() {
		v := src
		for range maxDepth {
			if v == tgt {
				seed.Set(g)
				break
			}
			if m := v.target; m == nil || m.split.Test(g) {
				break
			}
			v = v.upstream
		}
	}
}

// preserveDownstream runs before tgt becomes a target whose initial split bitmap is seed (nil:
// all clear). Every volume reading through tgt keeps its image: for each grain it does not hold
// and the start changes (seed clear), it gets tgt's current data (tgt is no target yet, so that
// is its store) — written, synced and its split bit committed, one group commit per volume —
// before the chain changes. A restore, whose seed covers every grain its partner has not split,
// copies only the grains that the partner has split and another target of the same source
// still reads through it. The caller holds the gates of tgt's component exclusively, so no
// I/O or worker runs meanwhile. After an error nothing has changed that matters: the bits
// committed are of grains the volumes now hold with the right data.
func (e *Engine) preserveDownstream(tgt *volume, seed *bitmap.Bitmap) error {
	for _, d := range tgt.downstream {
		dm := d.target
		if dm == nil || dm.failed.Load() {
			continue
		}
		var gs []int
		var copied int64
		for g := dm.split.NextClear(0); g >= 0; g = dm.split.NextClear(g + 1) {
			if seed != nil && seed.Test(g) {
				continue
			}
			off, n := dm.split.Extent(g)
			buf := getBuf(dm.grain)
			data := (*buf)[:n]
			err := readFull(tgt, data, off)
			if err == nil {
				err = writeFull(d, data, off)
			}
			putBuf(buf)
			if err != nil {
				return fmt.Errorf("preserve the image of volume %d: %w", d.id, err)
			}
			gs = append(gs, g)
			copied += n
		}
		if len(gs) == 0 {
			continue
		}
		failpoint("cow-after-preserve-write")
		if err := e.commit.commit(d, []BitUpdate{{Mapping: dm.id, Grains: gs}}); err != nil {
			return fmt.Errorf("preserve the image of volume %d: %w", d.id, err)
		}
		for _, g := range gs {
			if dm.split.Set(g) {
				dm.grainsCopied.Add(1)
			}
		}
		dm.bytesCopied.Add(copied)
		dm.poke()
	}
	return nil
}

// unlink removes m's target from its chain; the caller holds topoMu and the component's gates.
// With relink, the target's downstream joins its upstream (after cleaning, or with the data
// lost by force); without, the downstream stays under the target, which becomes a root (the
// cleaning-free re-link of a mapping at 100 %, whose target holds every grain).
func (e *Engine) unlink(m *mapping, relink bool) {
	t := m.target
	up := t.upstream
	up.downstream = removeVol(up.downstream, t)
	if relink {
		for _, d := range slices.Clone(t.downstream) {
			if d == up {
				// A restore pair (S→T and T→S): T cannot read through itself; it stays under S.
				continue
			}
			t.downstream = removeVol(t.downstream, d)
			d.upstream = up
			up.downstream = append(up.downstream, d)
		}
	}
	t.upstream = nil
	t.target = nil
	m.phase.Store(int32(Stopped))
}

// topoChange runs f with topoMu held and every gate of the component of vols held.
func (e *Engine) topoChange(vols []*volume, f func()) {
	c := component(vols...)
	unlock := lockGates(c)
	defer unlock()
	f()
	e.renumber(c)
	// Workers waiting for dependants to go (a clean rate of 0 at 100 %) look again.
	for _, v := range c {
		if v.target != nil {
			v.target.poke()
		}
	}
}

// StopMapping stops mapping id. Without force the mapping enters Stopping: background copy
// ends, cleaning copies to the downstream the grains it still reads through the target (highest
// first, at the clean rate, 0 meaning 50), then the target leaves the chain and CleanComplete is
// reported; StopMapping itself returns at once. With force the target leaves the chain at once
// with no cleaning, and every mapping that read data only this target held is stopped the same
// way; their ids are returned.
func (e *Engine) StopMapping(id int, force bool) ([]int, error) {
	e.topoMu.Lock()
	defer e.topoMu.Unlock()
	m := e.maps[id]
	if m == nil {
		return nil, fmt.Errorf("stop mapping %d: %w", id, ErrNoMapping)
	}
	switch m.getPhase() {
	case Stopped:
		return nil, fmt.Errorf("stop mapping %d: %w: stopped", id, ErrState)
	case Stopping:
		if !force {
			return nil, nil
		}
	}
	if force {
		var deps []int
		e.topoChange([]*volume{m.target}, func() { deps = e.forceUnlink(m) })
		return deps, nil
	}
	m.phase.Store(int32(Stopping))
	m.cleanTotal.Store(int64(e.cleanWork(m)))
	e.startWorker(m, e.cleanWorker)
	return nil, nil
}

// forceUnlink takes m's target out of its chain without cleaning and stops, likewise, every
// mapping downstream that read grains whose only copy is lost with it. It returns those
// mappings' ids. The caller holds topoMu and the gates.
func (e *Engine) forceUnlink(m *mapping) []int {
	var deps []int
	var stop func(m *mapping, lost *bitmap.Bitmap)
	stop = func(m *mapping, lost *bitmap.Bitmap) {
		e.stopWorker(m)
		down := slices.Clone(m.target.downstream)
		e.unlink(m, true)
		for _, d := range down {
			dm := d.target
			if dm == nil || dm.getPhase() == Stopped {
				continue
			}
			// d loses every lost grain it does not hold; its own grains are lost to its
			// downstream in turn if it goes.
			hit := false
			for g := lost.NextSet(0); g >= 0; g = lost.NextSet(g + 1) {
				if !dm.split.Test(g) {
					hit = true
					break
				}
			}
			if !hit {
				continue
			}
			deps = append(deps, dm.id)
			next := lost.Clone()
			for g := dm.split.NextSet(0); g >= 0; g = dm.split.NextSet(g + 1) {
				next.Set(g)
			}
			stop(dm, next)
		}
	}
	stop(m, m.split.Clone())
	return deps
}

// cleanWork counts the grains cleaning must copy: for every downstream volume, those m's target
// holds and it does not.
func (e *Engine) cleanWork(m *mapping) int {
	t := m.target
	t.gate.RLock()
	defer t.gate.RUnlock()
	n := 0
	if t.target != m {
		return 0
	}
	for _, d := range t.downstream {
		if d.target == nil {
			continue
		}
		for g := d.target.split.NextClear(0); g >= 0; g = d.target.split.NextClear(g + 1) {
			if m.split.Test(g) {
				n++
			}
		}
	}
	return n
}

// Split takes a mapping at 100 % out of its chain at once (stopfcmap -split): its target keeps
// every dependant under it, as their upstream, and no longer reads through its source.
func (e *Engine) Split(id int) error {
	e.topoMu.Lock()
	defer e.topoMu.Unlock()
	m := e.maps[id]
	if m == nil {
		return fmt.Errorf("split mapping %d: %w", id, ErrNoMapping)
	}
	if m.getPhase() == Stopped {
		return fmt.Errorf("split mapping %d: %w: stopped", id, ErrState)
	}
	if !m.split.Full() {
		return fmt.Errorf("split mapping %d: %w", id, ErrNotCopied)
	}
	e.stopWorker(m)
	e.topoChange([]*volume{m.target}, func() { e.unlink(m, false) })
	return nil
}

// RemoveMapping forgets mapping id. A stopped mapping just goes; an active one must be at 100 %
// and leaves its chain as with Split (its dependants, if any arrived since CopyComplete, stay
// under its target); otherwise ErrNotCopied.
func (e *Engine) RemoveMapping(id int) error {
	e.topoMu.Lock()
	defer e.topoMu.Unlock()
	m := e.maps[id]
	if m == nil {
		return fmt.Errorf("remove mapping %d: %w", id, ErrNoMapping)
	}
	if m.getPhase() != Stopped {
		if !m.split.Full() {
			return fmt.Errorf("remove mapping %d: %w", id, ErrNotCopied)
		}
		e.stopWorker(m)
		e.topoChange([]*volume{m.target}, func() { e.unlink(m, false) })
	}
	delete(e.maps, id)
	return nil
}

// SetRates changes a mapping's copy and clean rates (0–150, flashcopy.md §3); a worker waiting
// for its next grain re-plans at once.
func (e *Engine) SetRates(id, copyRate, cleanRate int) error {
	if copyRate < 0 || copyRate > 150 || cleanRate < 0 || cleanRate > 150 {
		return fmt.Errorf("set rates of mapping %d: %w: %d/%d", id, ErrBadSpec, copyRate, cleanRate)
	}
	e.topoMu.Lock()
	defer e.topoMu.Unlock()
	m := e.maps[id]
	if m == nil {
		return fmt.Errorf("set rates of mapping %d: %w", id, ErrNoMapping)
	}
	m.copyRate.Store(int32(copyRate))
	m.cleanRate.Store(int32(cleanRate))
	m.poke()
	return nil
}

// Progress is what lsfcmap and the metrics show for a mapping.
type Progress struct {
	Phase  Phase
	Grains int // all grains
	Split  int // grains the target holds
	// Percent is Split/Grains rounded down, so 100 means every grain is split.
	Percent int
	// CleanPercent is how much of the cleaning work found at stop is done (100 when there was
	// none, or when not stopping).
	CleanPercent int
	GrainsCopied int64 // by background copy, or by the upstream's cleaning
	SplitOnWrite int64 // by host writes: copy-on-write into this target, fills and whole-grain writes
	Cleaned      int64 // grains cleaning copied out of this target
	BytesCopied  int64 // by background copy, copy-on-write and cleaning
	Failed       bool  // stopped by an I/O error
}

// Progress reports mapping id's progress.
func (e *Engine) Progress(id int) (Progress, error) {
	e.topoMu.Lock()
	m := e.maps[id]
	e.topoMu.Unlock()
	if m == nil {
		return Progress{}, fmt.Errorf("progress of mapping %d: %w", id, ErrNoMapping)
	}
	p := Progress{
		Phase:        m.getPhase(),
		Grains:       m.split.Len(),
		Split:        m.split.Count(),
		CleanPercent: 100,
		GrainsCopied: m.grainsCopied.Load(),
		SplitOnWrite: m.splitOnWrite.Load(),
		Cleaned:      m.cleaned.Load(),
		BytesCopied:  m.bytesCopied.Load(),
		Failed:       m.failed.Load(),
	}
	p.Percent = 100
	if p.Grains > 0 {
		p.Percent = p.Split * 100 / p.Grains
	}
	if p.Phase == Stopping {
		if total := m.cleanTotal.Load(); total > 0 {
			left := int64(e.cleanWork(m))
			p.CleanPercent = int(max(0, total-left) * 100 / total)
		}
	}
	return p, nil
}

// fail stops m after a failed grain copy: from now on nothing is copied into its target (its
// dependants are protected directly), and a background goroutine takes it out of the chain and
// reports IOError. Safe to call with a gate and a grain lock held.
//
// Before anything relies on the stop — a host write going ahead without copying into the
// target, the target leaving its chain — the failure is made durable (FailureJournal): were it
// not, a crash could bring the mapping back as copying, its target reading through a source
// that has moved on. fail returns an error wrapping ErrJournal while that record is missing;
// the write that needed the copy must then fail.
func (e *Engine) fail(m *mapping, err error) error {
	m.failOnce.Do(func() {
		closing := e.ctx.Err() != nil
		if closing || e.markFailed(m.id) == nil {
			m.failMarked.Store(true)
		}
		m.failed.Store(true)
		if closing {
			return // nobody is left to hear it
		}
		e.wg.Go(func() {
			failpoint("cow-fail-before-unlink")
			for !m.failMarked.Load() {
				select {
				case <-e.ctx.Done():
					return
				case <-time.After(time.Second):
				}
				if e.markFailed(m.id) == nil {
					m.failMarked.Store(true)
				}
			}
			e.topoMu.Lock()
			var deps []int
			if m.getPhase() != Stopped {
				e.topoChange([]*volume{m.target}, func() { deps = e.forceUnlink(m) })
			}
			e.topoMu.Unlock()
			e.events.push(Event{Kind: IOError, Mapping: m.id, Err: err, Dependants: deps})
		})
	})
	return m.failure()
}

// failure is nil unless m failed and the failure is not yet durable.
func (m *mapping) failure() error {
	if m.failed.Load() && !m.failMarked.Load() {
		return fmt.Errorf("mapping %d: the stop after a failed grain copy could not be recorded: %w (%w)", m.id, ErrJournal, syscall.EIO)
	}
	return nil
}

func (e *Engine) markFailed(id int) error {
	if fj, ok := e.journal.(FailureJournal); ok {
		return fj.MarkFailed(id)
	}
	return nil
}

// eventQueue is an unbounded queue feeding a channel, so no engine path blocks on a slow reader.
type eventQueue struct {
	mu     sync.Mutex
	cond   *sync.Cond
	q      []Event
	closed bool
	out    chan Event
	done   chan struct{}
}

func newEventQueue() *eventQueue {
	q := &eventQueue{out: make(chan Event), done: make(chan struct{})}
	q.cond = sync.NewCond(&q.mu)
	go q.pump()
	return q
}

func (q *eventQueue) push(ev Event) {
	q.mu.Lock()
	if !q.closed {
		q.q = append(q.q, ev)
		q.cond.Signal()
	}
	q.mu.Unlock()
}

func (q *eventQueue) pump() {
	defer close(q.out)
	for {
		q.mu.Lock()
		for len(q.q) == 0 && !q.closed {
			q.cond.Wait()
		}
		if q.closed {
			q.mu.Unlock()
			return
		}
		ev := q.q[0]
		q.q = q.q[1:]
		q.mu.Unlock()
		select {
		case q.out <- ev:
		case <-q.done:
			return
		}
	}
}

func (q *eventQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.cond.Signal()
	q.mu.Unlock()
	close(q.done)
}
