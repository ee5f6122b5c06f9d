// Package driver carries out the FlashCopy control plane's effects on the data path. It owns
// the model of package mappings, applies each command to a clone, executes the effects the
// clone returned in order (catalogue commits, cache modes, the start fence, the copy-on-write
// engine's topology) and adopts the clone once its first effect succeeded; outcomes of
// asynchronous effects (flushes, fences, engine events) are fed back as events the same way.
//
// Each volume's device stack is built here: availability gate → write-back cache → copy-on-
// write engine → backing file.
package driver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"fcnbd/cachelayer"
	"fcnbd/cow"
	"fcnbd/internal/blockdev"
	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
	"fcnbd/internal/store"
	"fcnbd/internal/volume"
	"fcnbd/mappings"
	"fcnbd/nbd"
)

// Options configures a Driver.
type Options struct {
	Catalog *catalog.DB
	FS      store.FS
	Logger  zerolog.Logger
	// CacheSize is the write-back cache budget shared by all volumes (default 256 MiB).
	CacheSize int64
	// WriteThrough keeps every volume's cache in write-through mode at all times: no write is
	// acknowledged before it is below the cache (copy-on-write is then paid by the host).
	WriteThrough bool
	// FenceTimeout bounds the hold of a start (default 5 s).
	FenceTimeout time.Duration
	// Cache tunes each volume's cache (tests pause destage with it).
	Cache cachelayer.Options
	// ProgressInterval is how often engine progress is fed to the model (default 500 ms).
	ProgressInterval time.Duration
	// MetadataRetry is how often the catalogue is retried while mappings are suspended
	// because it could not be written (default 2 s).
	MetadataRetry time.Duration
}

// Driver is the FlashCopy control plane with its data path. It implements the control API's
// Volumes and FlashCopy interfaces and the NBD server's Exports.
type Driver struct {
	opts    Options
	log     zerolog.Logger
	cat     *catalog.DB
	eng     *cow.Engine
	journal *journal
	pool    *cachelayer.Pool
	vols    *volume.Manager

	stacksMu sync.Mutex
	stacks   map[mappings.VolumeID]*stack

	// mu serialises every change of the model and the execution of its effects.
	mu       sync.Mutex
	model    *mappings.Model
	active   map[mappings.MappingID]bool // mappings the engine has
	waiters  map[mappings.MappingID][]chan error
	fenceEr  map[mappings.MappingID]error // why the last start of a mapping was abandoned
	holds    map[mappings.GroupID]time.Duration
	rates    map[mappings.MappingID]*throughput
	applied  map[mappings.MappingID][2]int // copy and clean rate last given to the engine
	held     map[mappings.VolumeID]bool    // sources the fence in progress holds
	started  []mappings.MappingID          // committed by the effects being applied; resolved after them
	diffs    map[mappings.MappingID]bool   // incremental mappings whose difference the engine records
	deferred []mappings.Event              // events whose commit failed, fed again on recovery (metadata.go)
	ended    []mappings.RunFigures         // runs the engine let go of in this apply, recorded at its end
	metaKick chan struct{}

	stop    chan struct{}
	closing atomic.Bool
	wg      sync.WaitGroup
}

// stack is one volume's data path above the engine.
type stack struct {
	id     mappings.VolumeID
	online atomic.Bool
	cache  *cachelayer.Cache
	d      *Driver
}

// Open loads the model and every volume, brings the data path in line with the model (chains,
// background copy, cache modes, availability) and starts the driver's background work.
func Open(opts Options) (*Driver, error) {
	if opts.CacheSize <= 0 {
		opts.CacheSize = cachelayer.DefaultBudget
	}
	if opts.FenceTimeout <= 0 {
		opts.FenceTimeout = 5 * time.Second
	}
	if opts.Cache.DestageConcurrency <= 0 {
		// Destage of a FlashCopy source pays the copy-on-write: enough destages in flight that
		// the engine's group commit batches their target syncs and bit commits (at 4, each
		// batch had at most 4 grains and a first-split workload flushed at 0.09× of no mapping).
		opts.Cache.DestageConcurrency = 32
	}
	if opts.ProgressInterval <= 0 {
		opts.ProgressInterval = 500 * time.Millisecond
	}
	if opts.MetadataRetry <= 0 {
		opts.MetadataRetry = defaultMetadataRetry
	}
	d := &Driver{
		opts: opts, log: opts.Logger, cat: opts.Catalog,
		journal:  newJournal(opts.Catalog),
		pool:     cachelayer.NewPool(opts.CacheSize),
		stacks:   map[mappings.VolumeID]*stack{},
		active:   map[mappings.MappingID]bool{},
		waiters:  map[mappings.MappingID][]chan error{},
		fenceEr:  map[mappings.MappingID]error{},
		holds:    map[mappings.GroupID]time.Duration{},
		rates:    map[mappings.MappingID]*throughput{},
		applied:  map[mappings.MappingID][2]int{},
		held:     map[mappings.VolumeID]bool{},
		stop:     make(chan struct{}),
		metaKick: make(chan struct{}, 1),
		diffs:    map[mappings.MappingID]bool{},
	}
	d.eng = cow.New(watchedJournal{d.journal, d}, cow.Options{})

	model := mappings.New()
	var diffLost []mappings.MappingID
	// A split bitmap that can't be read costs its mapping (reopen stops it), never the daemon.
	splitLost := map[mappings.MappingID]error{}
	if err := d.cat.View(func(tx *catalog.Tx) error {
		if data := tx.Model(); data != nil {
			if err := json.Unmarshal(data, model); err != nil {
				return fmt.Errorf("%s: the FlashCopy model: %w: %v", d.cat.Path(), catalog.ErrCorrupt, err)
			}
		}
		for id, mp := range model.Mappings {
			if mp.ChainSeq != 0 {
				if err := d.journal.load(tx, int(id)); err != nil {
					splitLost[id] = err
				}
			}
			if mp.Incremental {
				// An unreadable difference record only costs a full copy at the next start.
				if err := d.journal.loadKind(tx, diffKey(int(id))); err != nil {
					d.log.Warn().Err(err).Int("fcmap", int(id)).Msg("difference bitmap unreadable: the next start copies everything")
					d.journal.installKind(diffKey(int(id)), chunks{})
					diffLost = append(diffLost, id)
				}
			}
		}
		return nil
	}); err != nil {
		d.eng.Close()
		return nil, err
	}
	d.model = model

	vols, err := volume.Open(volume.Options{Catalog: opts.Catalog, FS: opts.FS, Stack: d.buildStack, Logger: opts.Logger})
	if err != nil {
		d.eng.Close()
		return nil, err
	}
	d.vols = vols
	if err := d.reopen(diffLost, splitLost); err != nil {
		d.vols.Close()
		d.eng.Close()
		return nil, err
	}
	d.wg.Add(3)
	go d.engineEvents()
	go d.progressLoop()
	go d.recoveryLoop()
	return d, nil
}

// Close stops background work, flushes and closes every volume and the engine.
func (d *Driver) Close() error {
	close(d.stop)
	// Destage every cache while every backing file is still open: the volume manager closes
	// volumes one by one, and a destage that copies on write must find its targets open.
	var errs []error
	d.stacksMu.Lock()
	stacks := make([]*stack, 0, len(d.stacks))
	for _, s := range d.stacks {
		stacks = append(stacks, s)
	}
	d.stacksMu.Unlock()
	for _, s := range stacks {
		if err := s.cache.Flush(); err != nil {
			errs = append(errs, fmt.Errorf("flush volume %d: %w", s.id, err))
		}
	}
	// Then stop the engine's background copy and cleaning (and its committer) before any file
	// closes: a grain copy must never meet a closed file. What was flushed above is durable;
	// the volume manager's own final flush and close below find nothing left to do.
	d.closing.Store(true)
	if err := d.eng.Close(); err != nil {
		errs = append(errs, err)
	}
	err := errors.Join(append(errs, d.vols.Close())...)
	d.wg.Wait()
	d.recordRunsInProgress()
	return err
}

// recordRunsInProgress adds what the engine counted for each mapping still in it to the
// figures of the stored model, in one catalogue commit, so that the next daemon's lsfcmap and
// metrics go on from there (its engine counts from 0). Only the figures change: the stored
// model is what a restart must find, and the one in memory may hold what could not be
// recorded (a suspension while the catalogue failed). The engine is closed, so nothing is
// copied any more, and no other goroutine of the driver runs. If the commit fails, only those
// counts are lost.
func (d *Driver) recordRunsInProgress() {
	d.mu.Lock()
	defer d.mu.Unlock()
	counted := map[mappings.MappingID]mappings.Figures{}
	for id := range d.active {
		if p, err := d.eng.Progress(int(id)); err == nil {
			counted[id] = figures(p)
		}
		delete(d.active, id) // counted once
	}
	if len(counted) == 0 {
		return
	}
	err := d.cat.Update(func(tx *catalog.Tx) error {
		stored := mappings.New()
		if err := json.Unmarshal(tx.Model(), stored); err != nil {
			return err
		}
		for id, f := range counted {
			stored.AddFigures(id, f)
		}
		data, err := json.Marshal(stored)
		if err != nil {
			return err
		}
		return tx.PutModel(data)
	})
	if err != nil {
		d.log.Warn().Err(err).Msg("the copy figures of the runs in progress were not recorded: after the restart they count from 0")
	}
}

// buildStack is the volume manager's StackFunc: gate → cache → engine → file.
func (d *Driver) buildStack(v catalog.Volume, f store.File) (blockdev.Device, error) {
	id := mappings.VolumeID(v.ID)
	f = store.StickySync(f) // a failed FLUSH is never followed by a successful one
	if err := d.eng.AddVolume(int(id), v.Capacity, f); err != nil {
		return nil, err
	}
	low, err := d.eng.Device(int(id))
	if err != nil {
		d.eng.RemoveVolume(int(id))
		return nil, err
	}
	s := &stack{id: id, d: d, cache: cachelayer.New(low, d.pool, d.opts.Cache)}
	s.online.Store(true)
	s.cache.SetWriteThrough(d.opts.WriteThrough)
	d.stacksMu.Lock()
	d.stacks[id] = s
	d.stacksMu.Unlock()
	return s, nil
}

func (d *Driver) stackOf(id mappings.VolumeID) *stack {
	d.stacksMu.Lock()
	defer d.stacksMu.Unlock()
	return d.stacks[id]
}

// Cache returns the cache of volume ref (tests pause its destage through it).
func (d *Driver) Cache(ref string) (*cachelayer.Cache, error) {
	info, err := d.vols.Get(ref)
	if err != nil {
		return nil, err
	}
	s := d.stackOf(mappings.VolumeID(info.ID))
	if s == nil {
		return nil, fcerr.New(fcerr.NoSuchObject, "volume %s has no data path", ref)
	}
	return s.cache, nil
}

var errOffline = fmt.Errorf("volume is offline: %w", syscall.EIO)

func (s *stack) check() error {
	if !s.online.Load() {
		return errOffline
	}
	return nil
}

func (s *stack) Size() int64 { return s.cache.Size() }

func (s *stack) ReadAt(p []byte, off int64) error {
	if err := s.check(); err != nil {
		return err
	}
	return s.cache.ReadAt(p, off)
}

// Extents reports the volume's allocation as the cache sees it.
func (s *stack) Extents(off, length int64) ([]blockdev.Extent, error) {
	if err := s.check(); err != nil {
		return nil, err
	}
	return s.cache.Extents(off, length)
}

func (s *stack) WriteAt(p []byte, off int64, fua bool) error {
	if err := s.check(); err != nil {
		return err
	}
	return s.cache.WriteAt(p, off, fua)
}

func (s *stack) Flush() error {
	// At shutdown the driver has flushed every cache already, before the engine closed.
	if s.d.closing.Load() {
		return nil
	}
	if err := s.check(); err != nil {
		return err
	}
	return s.cache.Flush()
}

func (s *stack) Trim(off, length int64) error {
	if err := s.check(); err != nil {
		return err
	}
	return s.cache.Trim(off, length)
}

func (s *stack) WriteZeroes(off, length int64, mayPunch, fua bool) error {
	if err := s.check(); err != nil {
		return err
	}
	return s.cache.WriteZeroes(off, length, mayPunch, fua)
}

// Close is called by the volume manager after a final Flush when the volume is deleted or the
// daemon stops.
func (s *stack) Close() error {
	err := s.cache.Close()
	if s.d.closing.Load() {
		// Flushed by Driver.Close while the engine was still open; what Close's own flush
		// says of the closed engine (ESHUTDOWN) is not news.
		err = nil
	}
	rerr := s.d.eng.RemoveVolume(int(s.id))
	// At shutdown, volumes still in chains stay registered until the engine closes.
	inUse := errors.Is(rerr, cow.ErrVolumeInUse) && s.d.closing.Load()
	if rerr != nil && !errors.Is(rerr, cow.ErrNoVolume) && !inUse && err == nil {
		err = rerr
	}
	s.d.stacksMu.Lock()
	delete(s.d.stacks, s.id)
	s.d.stacksMu.Unlock()
	return err
}

// Lookup implements nbd.Exports.
func (d *Driver) Lookup(name string) (nbd.Export, bool) { return d.vols.Lookup(name) }

// List implements nbd.Exports.
func (d *Driver) List() []nbd.Export { return d.vols.List() }

// Flush flushes every volume (daemon shutdown).
func (d *Driver) waitCtx(ctx context.Context, ch chan error) error {
	select {
	case err := <-ch:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}
