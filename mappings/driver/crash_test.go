package driver

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"fcnbd/cow"
	"fcnbd/internal/api"
	"fcnbd/internal/catalog"
	"fcnbd/internal/store"
	"fcnbd/internal/store/crashfs"
)

// The crash matrix (docs/flashcopy.md §7, architecture rules 4–6): for each named failpoint,
// a workload runs on volumes in a crashfs and a catalogue whose commits are observed; at the
// failpoint's first hit the world is frozen (no file operation or catalogue commit in flight),
// the catalogue is copied as of its last commit and the files are crash-cloned (only what was
// synced, plus a seeded random part of the rest). A new driver opens the clones and the oracle
// checks: sources hold every acknowledged FUA write (the one in flight: old or new, per
// sector); a started target shows its source as at the start plus its own acknowledged writes,
// never anything later; group members are all started or none; mappings resume and complete.
//
// FCNBD_CRASH_SEED=n replays one seed.

const crashVolSize = 1 << 20

// freezeFS passes every mutating file operation through a shared lock that a crash takes
// exclusively, so that the crash instant falls between operations.
type freezeFS struct {
	*crashfs.FS
	mu *sync.RWMutex
}

func (f freezeFS) Create(name string, size int64) (store.File, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	h, err := f.FS.Create(name, size)
	if err != nil {
		return nil, err
	}
	return freezeFile{h, f.mu}, nil
}

func (f freezeFS) Open(name string) (store.File, error) {
	h, err := f.FS.Open(name)
	if err != nil {
		return nil, err
	}
	return freezeFile{h, f.mu}, nil
}

func (f freezeFS) Remove(name string) error {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.FS.Remove(name)
}

type freezeFile struct {
	store.File
	mu *sync.RWMutex
}

func (f freezeFile) WriteAt(p []byte, off int64) (int, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.File.WriteAt(p, off)
}

func (f freezeFile) Sync() error {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.File.Sync()
}

func (f freezeFile) Punch(off, length int64) error {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.File.Punch(off, length)
}

// crashOracle is what the workload knows: every acknowledged write per volume and slot, the
// write in flight, and each started target's expected image.
type crashOracle struct {
	mu       sync.Mutex
	acked    map[string][][]byte // vol → slot → content (nil: never written, zeroes)
	inflight struct {
		vol  string
		slot int
		p    []byte
	}
	image map[string][][]byte // target → its source's acked content at the start
	phase string
}

func (o *crashOracle) clone() *crashOracle {
	o.mu.Lock()
	defer o.mu.Unlock()
	c := &crashOracle{acked: map[string][][]byte{}, image: map[string][][]byte{}, phase: o.phase, inflight: o.inflight}
	for k, v := range o.acked {
		c.acked[k] = append([][]byte(nil), v...)
	}
	for k, v := range o.image {
		c.image[k] = append([][]byte(nil), v...)
	}
	return c
}

type crashPoint struct {
	name  string // the failpoint
	layer string // "cow" or "driver"
	phase string // the workload phase from which on it fires
}

var crashPoints = []crashPoint{
	{"cow-after-target-write", "cow", "cow"},
	{"cow-after-target-sync", "cow", "cow"},
	{"cow-after-bit-commit", "cow", "cow"},
	{"cow-after-source-write", "cow", "cow"},
	{"cow-after-copy-write", "cow", "cow"},
	{"journal-before-commit", "driver", "cow"},
	{"journal-after-commit", "driver", "cow"},
	{"start-before-commit", "driver", "start"},
	{"start-after-commit", "driver", "start"},
	{"before-persist", "driver", "start"}, // the prepare's commit
	{"before-persist", "driver", "stop"},
	{"after-persist", "driver", "stop"},
	{"before-engine-remove", "driver", "stop"},
	{"before-persist", "driver", "delete"},
	{"after-persist", "driver", "delete"},
	{"delete-before-drop-bitmaps", "driver", "delete"},
}

// crashPhases are the workload's phases in order; a crash point fires at its first hit in
// or after its phase.
var crashPhases = []string{"create", "fill", "mkfcmap", "start", "cow", "stop", "delete", "done"}

func phaseIndex(p string) int {
	for i, q := range crashPhases {
		if q == p {
			return i
		}
	}
	return -1
}

func TestCrashMatrix(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("FCNBD_CRASH_SEED"); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		seed = n
	}
	t.Logf("seed %d (replay: FCNBD_CRASH_SEED=%d)", seed, seed)
	for i, cp := range crashPoints {
		for _, unsynced := range []int{0, 50} {
			s := seed + uint64(i)*7919 + uint64(unsynced)
			t.Run(fmt.Sprintf("%s@%s/unsynced=%d", cp.name, cp.phase, unsynced), func(t *testing.T) {
				runCrash(t, cp, s, unsynced)
			})
		}
	}
}

func setFailpoint(cp crashPoint, fn func(string)) {
	if fn == nil {
		failpointHook.Store(nil)
		cow.FailpointHook.Store(nil)
		return
	}
	if cp.layer == "cow" {
		cow.FailpointHook.Store(&fn)
	} else {
		failpointHook.Store(&fn)
	}
}

func runCrash(t *testing.T, cp crashPoint, seed uint64, unsynced int) {
	rng := rand.New(rand.NewPCG(seed, 17))
	var freeze sync.RWMutex
	cfs := crashfs.New()
	dir := t.TempDir()
	logger := zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.ErrorLevel + 1)
	opts := Options{Logger: logger, ProgressInterval: 5 * time.Millisecond, FenceTimeout: 2 * time.Second}
	cat, err := catalog.OpenWith(dir, catalog.Options{CommitHook: func(commit func() error) error {
		freeze.RLock()
		defer freeze.RUnlock()
		return commit()
	}})
	if err != nil {
		t.Fatal(err)
	}
	o := opts
	o.Catalog, o.FS = cat, freezeFS{cfs, &freeze}
	d, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}

	or := &crashOracle{acked: map[string][][]byte{}, image: map[string][][]byte{}}
	var crashed atomic.Bool
	var snap struct {
		dir string
		fs  *crashfs.FS
		or  *crashOracle
	}
	crashDone := make(chan struct{})
	setFailpoint(cp, func(name string) {
		if name != cp.name {
			return
		}
		or.mu.Lock()
		early := phaseIndex(or.phase) < phaseIndex(cp.phase)
		or.mu.Unlock()
		if early || !crashed.CompareAndSwap(false, true) {
			return
		}
		freeze.Lock()
		defer freeze.Unlock()
		snap.dir = t.TempDir()
		f, err := os.Create(filepath.Join(snap.dir, catalog.FileName))
		if err == nil {
			err = cat.CopyTo(f)
			f.Close()
		}
		if err != nil {
			t.Errorf("copy the catalogue at the crash: %v", err)
		}
		snap.fs = cfs.CrashClone(crashfs.CrashConfig{UnsyncedPercent: unsynced, Seed: seed})
		snap.or = or.clone()
		close(crashDone)
	})
	t.Cleanup(func() { setFailpoint(cp, nil) })

	crashWorkload(t, d, or, rng, &crashed)
	setFailpoint(cp, nil)
	d.Close()
	cat.Close()
	select {
	case <-crashDone:
	default:
		t.Fatalf("the workload never reached failpoint %s", cp.name)
	}
	t.Logf("crashed at %s during %q", cp.name, snap.or.phase)

	cat2, err := catalog.Open(snap.dir)
	if err != nil {
		t.Fatalf("reopen the catalogue after the crash: %v", err)
	}
	o2 := opts
	o2.Catalog, o2.FS = cat2, snap.fs
	d2, err := Open(o2)
	if err != nil {
		cat2.Close()
		t.Fatalf("reopen the driver after the crash: %v", err)
	}
	t.Cleanup(func() {
		if err := d2.Close(); err != nil {
			t.Errorf("close after the crash: %v", err)
		}
		cat2.Close()
	})
	checkAfterCrash(t, d2, snap.or)
}

var crashVols = []string{"a", "b", "ta", "tb"}

// crashWorkload: volumes a, b (sources) and ta, tb; a group g with ma a→ta (no background
// copy) and mb b→tb (background copy); FUA writes before the start; a start; FUA writes to
// sources and a target (copy-on-write); a group stop (cleaning); deletions. It stops at the
// first step after the crash.
func crashWorkload(t *testing.T, d *Driver, or *crashOracle, rng *rand.Rand, crashed *atomic.Bool) {
	ctx := context.Background()
	const slots = crashVolSize / recSize
	phase := func(p string) bool {
		or.mu.Lock()
		or.phase = p
		or.mu.Unlock()
		return !crashed.Load()
	}
	must := func(err error) {
		if err != nil && !crashed.Load() {
			t.Fatal(err)
		}
	}
	write := func(vol string, slot int, gen uint64) {
		p := record(uint32(gen), uint32(len(vol)), uint64(slot)+gen<<16)
		or.mu.Lock()
		or.inflight.vol, or.inflight.slot, or.inflight.p = vol, slot, p
		or.mu.Unlock()
		e, _ := d.Lookup(vol)
		err := e.Device.WriteAt(p, int64(slot)*recSize, true)
		or.mu.Lock()
		if err == nil {
			if or.acked[vol] == nil {
				or.acked[vol] = make([][]byte, slots)
			}
			or.acked[vol][slot] = p
		}
		or.inflight.p = nil
		or.mu.Unlock()
		must(err)
	}
	phase("create")
	for _, v := range crashVols {
		_, err := d.Create(v, crashVolSize)
		must(err)
	}
	if !phase("fill") {
		return
	}
	for s := 0; s < slots && !crashed.Load(); s++ {
		write("a", s, 1)
		write("b", s, 1)
	}
	if !phase("mkfcmap") {
		return
	}
	_, err := d.MkConsistGrp(ctx, api.MkConsistGrp{Name: "g"})
	must(err)
	_, err = d.MkFcmap(ctx, api.MkFcmap{Source: "a", Target: "ta", Name: "ma", CopyRate: ip(0), GrainSize: ip(64), ConsistGrp: "g"})
	must(err)
	_, err = d.MkFcmap(ctx, api.MkFcmap{Source: "b", Target: "tb", Name: "mb", CopyRate: ip(70), GrainSize: ip(64), ConsistGrp: "g"})
	must(err)
	if !phase("start") {
		return
	}
	// The expected images are the sources as acknowledged before the start (nothing writes
	// during it); they apply only if the start committed.
	or.mu.Lock()
	or.image["ta"] = append([][]byte(nil), or.acked["a"]...)
	or.image["tb"] = append([][]byte(nil), or.acked["b"]...)
	or.mu.Unlock()
	must(d.StartConsistGrp(ctx, "g", true, false))
	if !phase("cow") {
		return
	}
	for i := 0; i < 48 && !crashed.Load(); i++ {
		write([]string{"a", "b", "ta"}[rng.IntN(3)], rng.IntN(slots), 2)
	}
	// Background copy (mb) must have copied a grain before the stop, whatever the machine's
	// load: the background-copy crash points fire only then.
	for deadline := time.Now().Add(5 * time.Second); !crashed.Load() && time.Now().Before(deadline); {
		f, err := d.Fcmap(ctx, "mb")
		must(err)
		if f.GrainsCopied > 0 || f.Progress == 100 {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if !phase("stop") {
		return
	}
	// Let part of the background copy happen, so cleaning has work.
	must(d.StopConsistGrp(ctx, "g", false, false))
	for i := 0; i < 400 && !crashed.Load(); i++ {
		f, err := d.Fcmap(ctx, "ma")
		must(err)
		if f.Status == "stopped" || f.Status == "idle_or_copied" {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if !phase("delete") {
		return
	}
	must(d.RmFcmap(ctx, "ma", true))
	must(d.RmFcmap(ctx, "mb", true))
	phase("done")
}

// checkAfterCrash is the oracle on the reopened driver.
func checkAfterCrash(t *testing.T, d *Driver, or *crashOracle) {
	ctx := context.Background()
	read := func(vol string, slot int) ([]byte, error) {
		e, ok := d.Lookup(vol)
		if !ok {
			return nil, fmt.Errorf("no volume %s", vol)
		}
		p := make([]byte, recSize)
		return p, e.Device.ReadAt(p, int64(slot)*recSize)
	}
	zero := make([]byte, recSize)
	want := func(vals [][]byte, slot int) []byte {
		if vals == nil || vals[slot] == nil {
			return zero
		}
		return vals[slot]
	}
	// matches: got is want, or (for the write in flight) each sector old or new.
	matches := func(vol string, slot int, got, want []byte) bool {
		if bytes.Equal(got, want) {
			return true
		}
		in := or.inflight
		if in.p == nil || in.vol != vol || in.slot != slot {
			return false
		}
		for s := 0; s < recSize; s += crashfs.SectorSize {
			g := got[s : s+crashfs.SectorSize]
			if !bytes.Equal(g, want[s:s+crashfs.SectorSize]) && !bytes.Equal(g, in.p[s:s+crashfs.SectorSize]) {
				return false
			}
		}
		return true
	}
	const slots = crashVolSize / recSize
	checkVol := func(vol string, expect func(slot int) []byte, what string) {
		for s := 0; s < slots; s++ {
			got, err := read(vol, s)
			if err != nil {
				t.Fatalf("%s: read %s slot %d: %v", what, vol, s, err)
			}
			if !matches(vol, s, got, expect(s)) {
				t.Fatalf("%s: %s slot %d holds %x…, want %x… (crash during %q)", what, vol, s, got[:20], expect(s)[:20], or.phase)
			}
		}
	}
	// Sources: every acknowledged FUA write survived.
	for _, v := range []string{"a", "b"} {
		if _, ok := d.Lookup(v); !ok {
			continue // the crash came before its creation committed
		}
		checkVol(v, func(s int) []byte { return want(or.acked[v], s) }, "source after the crash")
	}
	ma, errA := d.Fcmap(ctx, "ma")
	mb, errB := d.Fcmap(ctx, "mb")
	if (errA == nil) != (errB == nil) && or.phase != "delete" && or.phase != "done" {
		t.Fatalf("only one mapping of the group exists after the crash: %v / %v", errA, errB)
	}
	if errA == nil && errB == nil && ma.StartTime.IsZero() != mb.StartTime.IsZero() {
		t.Fatalf("group half started after the crash: ma %s (start %v), mb %s (start %v)", ma.Status, ma.StartTime, mb.Status, mb.StartTime)
	}
	if errA == nil {
		t.Logf("after the crash: ma %s %d%%", ma.Status, ma.Progress)
	}
	if errB == nil {
		t.Logf("after the crash: mb %s %d%%", mb.Status, mb.Progress)
	}
	// A started target shows its source's image at the start plus its own writes.
	targetImage := func(tgt string) func(int) []byte {
		return func(s int) []byte {
			if or.acked[tgt] != nil && or.acked[tgt][s] != nil {
				return or.acked[tgt][s]
			}
			return want(or.image[tgt], s)
		}
	}
	online := func(st string, progress int) bool {
		return st == "copying" || (st == "stopping" && progress == 100) || st == "idle_or_copied"
	}
	if errA == nil && !ma.StartTime.IsZero() && online(ma.Status, ma.Progress) {
		checkVol("ta", targetImage("ta"), "target ta after the crash")
	}
	if errB == nil && !mb.StartTime.IsZero() {
		// Resume: the background copy completes (or cleaning ends) and tb is exact.
		deadline := time.Now().Add(20 * time.Second)
		for time.Now().Before(deadline) {
			mb, _ = d.Fcmap(ctx, "mb")
			if mb.Status != "copying" && mb.Status != "stopping" && mb.Status != "preparing" {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		if mb.Status == "idle_or_copied" {
			checkVol("tb", targetImage("tb"), "target tb after the resumed copy")
		}
	}
	if errA == nil && ma.Status == "copying" {
		// Copy-on-write works after the reopen: a source write leaves the target as it was.
		e, _ := d.Lookup("a")
		if err := e.Device.WriteAt(pattern(0xee, 64<<10), 0, true); err != nil {
			t.Fatalf("source write after the crash: %v", err)
		}
		checkVol("ta", targetImage("ta"), "target ta after a copy-on-write following the crash")
	}
}
