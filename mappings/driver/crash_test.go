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
// Every listed crash point must fire: a run that never reaches its failpoint fails.
//
// Every named failpoint of the copy-on-write engine (cow/*.go) and of the driver is listed in
// crashPoints, but cow-fail-before-unlink (a failed copy's path: failcrash_test.go), and the
// workload is built so that each is reached whatever the seed: the copy-on-write of a write
// into the volumes below it, ta's and tc's (cow-after-target-*, -bit-commit, -source-write),
// the fill of a partial-grain write to a target (cow-after-fill-*), an incremental mapping's
// difference bits (cow-after-difference-commit), background copy (cow-after-copy-write), the
// preservation of a cascade's image when its source becomes a target
// (cow-after-preserve-write), and cleaning on the stop path (cow-after-clean-write).
// Preservation needs a start whose target has volumes reading through it: the target of an
// active mapping's source, which the model starts only with -restore (checkRestore in
// mappings/commands.go), hence the group's -restore start.
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
	{"cow-after-fill-write", "cow", "cow"},        // a partial-grain write to ta, grain filled from a
	{"cow-after-fill-commit", "cow", "cow"},       // the same, after the fill's bit
	{"cow-after-difference-commit", "cow", "cow"}, // a write to b recorded for incremental mb
	{"cow-after-preserve-write", "cow", "start"},  // td keeps tb's image as tb becomes mb's target
	{"cow-after-clean-write", "cow", "stop"},      // stopping ma cleans into tc, which reads through ta
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

var crashVols = []string{"a", "b", "ta", "tb", "tc", "td"}

// crashWriter is the writer field of vol's records, so that no two volumes' records are alike.
func crashWriter(vol string) uint32 {
	for i, v := range crashVols {
		if v == vol {
			return uint32(i + 1)
		}
	}
	panic("unknown volume " + vol)
}

// crashCopyRate is mb's copy rate from the cow phase on.
const crashCopyRate = 70

// crashGrainSlots is the number of record slots in a grain (all mappings use 64 KiB grains).
const crashGrainSlots = 64 << 10 / recSize

// The last three grains of a and ta are kept from the random copy-on-write writes
// (crashWorkload): one for the write that makes sure a fill happens, one for the write that
// makes sure stopping ma has cleaning to do, and one never written, so that ma (no background
// copy) stays below 100 % and cannot complete, cleaning, before the stop.
const (
	crashFreeGrains = 3
	crashFillGrain  = crashVolSize/(64<<10) - 2
	crashCleanGrain = crashVolSize/(64<<10) - 1
)

// crashWorkload: volumes a, b (sources), ta, tb, tc, td; FUA writes to a, b and part of tb;
// stand-alone mappings mc a→tc and md tb→td (a cascade from tb), no background copy, started
// before the group; a group g with ma a→ta (no background copy) and mb b→tb (incremental;
// background copy from the cow phase on), started with -restore since tb is md's active
// source (the start preserves tb's image in td), which puts ta between a and tc; FUA writes to
// sources and ta (copy-on-write, partial-grain fills, difference bits); a group stop (ma
// cleans into tc); deletions. It stops at the first step after the crash.
func crashWorkload(t *testing.T, d *Driver, or *crashOracle, rng *rand.Rand, crashed *atomic.Bool) {
	ctx := context.Background()
	const slots = crashVolSize / recSize
	// phase enters phase p, unless the crash has come: then the phase stays the one the crash
	// came in (what the oracle is told), and the workload stops.
	phase := func(p string) bool {
		or.mu.Lock()
		defer or.mu.Unlock()
		if crashed.Load() {
			return false
		}
		or.phase = p
		return true
	}
	must := func(err error) {
		if err != nil && !crashed.Load() {
			t.Fatal(err)
		}
	}
	write := func(vol string, slot int, gen uint64) {
		p := record(uint32(gen), crashWriter(vol), uint64(slot)+gen<<16)
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
		if s%3 == 0 {
			write("tb", s, 1) // md's image: tb before mb's start, unlike b
		}
	}
	if !phase("mkfcmap") {
		return
	}
	_, err := d.MkConsistGrp(ctx, api.MkConsistGrp{Name: "g"})
	must(err)
	_, err = d.MkFcmap(ctx, api.MkFcmap{Source: "a", Target: "ta", Name: "ma", CopyRate: ip(0), GrainSize: ip(64), ConsistGrp: "g"})
	must(err)
	// mb's background copy is switched on only once the cow phase has begun: started at once,
	// it could finish (under load) before the workload enters that phase, and the
	// background-copy crash point would never fire.
	_, err = d.MkFcmap(ctx, api.MkFcmap{Source: "b", Target: "tb", Name: "mb", CopyRate: ip(0), GrainSize: ip(64), ConsistGrp: "g", Incremental: true})
	must(err)
	_, err = d.MkFcmap(ctx, api.MkFcmap{Source: "a", Target: "tc", Name: "mc", CopyRate: ip(0), GrainSize: ip(64)})
	must(err)
	_, err = d.MkFcmap(ctx, api.MkFcmap{Source: "tb", Target: "td", Name: "md", CopyRate: ip(0), GrainSize: ip(64)})
	must(err)
	// mc and md start before any crash point may fire (all are at "start" or later): the oracle
	// expects both started, tc as a and td as tb were here.
	or.mu.Lock()
	or.image["tc"] = append([][]byte(nil), or.acked["a"]...)
	or.image["td"] = append([][]byte(nil), or.acked["tb"]...)
	or.mu.Unlock()
	must(d.StartFcmap(ctx, "mc", true, false))
	must(d.StartFcmap(ctx, "md", true, false))
	if !phase("start") {
		return
	}
	// The expected images are the sources as acknowledged before the start (nothing writes
	// during it); they apply only if the start committed. tb's own writes so far are md's
	// image (kept in image["td"]), not writes to mb's target: they are forgotten here.
	or.mu.Lock()
	or.image["ta"] = append([][]byte(nil), or.acked["a"]...)
	or.image["tb"] = append([][]byte(nil), or.acked["b"]...)
	or.acked["tb"] = nil
	or.mu.Unlock()
	// -restore: tb is the source of md, which is copying.
	must(d.StartConsistGrp(ctx, "g", true, true))
	if !phase("cow") {
		return
	}
	must(d.ChFcmap(ctx, "mb", api.ChFcmap{CopyRate: ip(crashCopyRate)}))
	for i := 0; i < 48 && !crashed.Load(); i++ {
		v := []string{"a", "b", "ta"}[rng.IntN(3)]
		n := slots
		if v != "b" {
			n = (crashVolSize/(64<<10) - crashFreeGrains) * crashGrainSlots
		}
		write(v, rng.IntN(n), 2)
	}
	if !crashed.Load() {
		// A partial-grain write to a grain ta does not hold (a and ta have not written it,
		// ma copies nothing): tc gets ta's view first, then ta is filled from a
		// (cow-after-fill-*).
		write("ta", crashFillGrain*crashGrainSlots+rng.IntN(crashGrainSlots), 2)
		// A source write to a grain ta does not hold: ta gets it, tc (which reads through ta)
		// does not, so stopping ma must clean it into tc (cow-after-clean-write).
		write("a", crashCleanGrain*crashGrainSlots+rng.IntN(crashGrainSlots), 2)
		// At least one write to b since mb's start records a difference bit.
		write("b", rng.IntN(slots), 2)
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
	// ma stops after cleaning into tc.
	must(d.StopConsistGrp(ctx, "g", false, false))
	for deadline := time.Now().Add(15 * time.Second); !crashed.Load(); {
		f, err := d.Fcmap(ctx, "ma")
		must(err)
		if f.Status == "stopped" || f.Status == "idle_or_copied" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ma still %s (clean %d%%) 15 s after the stop", f.Status, f.CleanProgress)
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
		// Resume: the background copy completes (or cleaning ends) and tb is exact. A crash
		// before the workload switched mb's copy on leaves it at rate 0: switch it on here.
		if mb.Status == "copying" && mb.CopyRate == 0 {
			if err := d.ChFcmap(ctx, "mb", api.ChFcmap{CopyRate: ip(crashCopyRate)}); err != nil {
				t.Fatalf("chfcmap mb after the crash: %v", err)
			}
		}
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
	// mc and md started before any crash point could fire, and nothing stops them.
	mc, errC := d.Fcmap(ctx, "mc")
	md, errD := d.Fcmap(ctx, "md")
	if errC != nil || errD != nil {
		t.Fatalf("mc or md missing after the crash: %v / %v", errC, errD)
	}
	t.Logf("after the crash: mc %s %d%%, md %s %d%%", mc.Status, mc.Progress, md.Status, md.Progress)
	if mc.StartTime.IsZero() || !online(mc.Status, mc.Progress) || md.StartTime.IsZero() || !online(md.Status, md.Progress) {
		t.Fatalf("after the crash mc is %s (start %v), md %s (start %v): both should be copying or copied", mc.Status, mc.StartTime, md.Status, md.StartTime)
	}
	// td shows tb as it was at md's start, never what tb shows as mb's target: the start of mb
	// preserved that image in td before tb's view changed.
	checkVol("td", func(s int) []byte { return want(or.image["td"], s) }, "target td after the crash")
	if errB == nil && mb.StartTime.IsZero() && mb.Status == "idle_or_copied" {
		// mb never started nor prepared (tb offline): tb is md's source and holds every
		// acknowledged write.
		checkVol("tb", func(s int) []byte { return want(or.image["td"], s) }, "tb, source of md (mb not started), after the crash")
	}
	// tc shows a as at mc's start, whether it reads through ta (ma copying or stopping) or not.
	checkVol("tc", targetImage("tc"), "target tc after the crash")
	if errA == nil && ma.Status == "stopping" {
		// Resume: the cleaning into tc completes, ta leaves the chain, tc is still exact.
		deadline := time.Now().Add(20 * time.Second)
		for ma.Status == "stopping" && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
			ma, _ = d.Fcmap(ctx, "ma")
		}
		if ma.Status == "stopping" {
			t.Fatalf("ma still stopping 20 s after the crash (clean %d%%)", ma.CleanProgress)
		}
		t.Logf("after the resumed cleaning: ma %s", ma.Status)
		checkVol("tc", targetImage("tc"), "target tc after the resumed cleaning")
	}
	maCopying := errA == nil && ma.Status == "copying"
	if maCopying || mc.Status == "copying" {
		// Copy-on-write works after the reopen: a source write leaves the targets as they were.
		e, _ := d.Lookup("a")
		if err := e.Device.WriteAt(pattern(0xee, 64<<10), 0, true); err != nil {
			t.Fatalf("source write after the crash: %v", err)
		}
		if maCopying {
			checkVol("ta", targetImage("ta"), "target ta after a copy-on-write following the crash")
		}
		if mc.Status == "copying" {
			checkVol("tc", targetImage("tc"), "target tc after a copy-on-write following the crash")
		}
	}
}
