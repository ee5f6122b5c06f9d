package driver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"fcnbd/internal/api"
	"fcnbd/internal/fcerr"
)

// The model oracle of docs/architecture.md, through the driver on real files: seeded random
// host I/O on every online volume, starts, stops, rate changes, deletions and daemon restarts,
// checked against model[vol] []byte, where a start sets model[target] := model[source] for every
// mapping it starts. Host I/O is paused around commands (so a start's instant is well defined)
// but runs while background copy and cleaning do, which is what the data path must get right.
//
// FCNBD_ORACLE_SEED=n replays one seed; FCNBD_ORACLE_SEEDS=n runs n seeds (default 3).

// oracleSize has a short last grain on purpose (64 KiB grains).
const oracleSize = 1<<20 + 3*4096

// oslot is one mapping the oracle may create, start, stop and delete.
type oslot struct {
	name, src, tgt string
	group          string // "" for a stand-alone mapping
	exists         bool
	incremental    bool // mkfcmap -incremental: restarts copy only the differing grains
	restore        bool // started with -restore (it copies a target back onto its source)
}

type oracle struct {
	t     *testing.T
	r     *rig
	rng   *rand.Rand
	ctx   context.Context
	vols  []string
	data  map[string][]byte // nil: unknown (a stopped target, a target of an unknown source)
	slots []*oslot
	log   []string // the last operations, printed on failure
	stats map[string]int
	dur   map[int]time.Duration
}

func TestModelOracle(t *testing.T) {
	var seeds []uint64
	if s := os.Getenv("FCNBD_ORACLE_SEED"); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("FCNBD_ORACLE_SEED: %v", err)
		}
		seeds = []uint64{n}
	} else {
		n := 3
		if s := os.Getenv("FCNBD_ORACLE_SEEDS"); s != "" {
			var err error
			if n, err = strconv.Atoi(s); err != nil {
				t.Fatalf("FCNBD_ORACLE_SEEDS: %v", err)
			}
		}
		base := uint64(time.Now().UnixNano())
		for i := 0; i < n; i++ {
			seeds = append(seeds, base+uint64(i)*7919)
		}
	}
	for _, seed := range seeds {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			t.Logf("seed %d (replay: FCNBD_ORACLE_SEED=%d)", seed, seed)
			runOracle(t, seed, 45)
		})
	}
}

func runOracle(t *testing.T, seed uint64, steps int) {
	o := &oracle{t: t, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), ctx: context.Background(),
		data: map[string][]byte{}, stats: map[string]int{}, dur: map[int]time.Duration{}}
	o.r = newRig(t, nil)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("seed %d; last operations:\n  %s", seed, strings.Join(o.log, "\n  "))
		}
	})
	o.setup()
	// Build the interesting topology first: four targets of one source, a cascade of depth 3
	// and a group, all started, then random operations.
	for _, s := range o.slots {
		o.start(s)
		o.burst()
	}
	o.verify("after the initial starts")
	for i := 0; i < steps; i++ {
		t0 := time.Now()
		p := o.rng.IntN(100)
		switch {
		case p < 40:
			o.burst()
		case p < 50:
			o.verify(fmt.Sprintf("step %d", i))
		case p < 65:
			o.start(o.slots[o.rng.IntN(len(o.slots))])
		case p < 77:
			o.stop(o.slots[o.rng.IntN(len(o.slots))])
		case p < 85:
			o.chrate(o.slots[o.rng.IntN(len(o.slots))])
		case p < 95:
			o.remove(o.slots[o.rng.IntN(len(o.slots))])
		default:
			o.note("restart")
			o.r.restart()
			o.stats["restart"]++
			o.verify(fmt.Sprintf("step %d, after restart", i))
		}
		o.dur[p/5*5] += time.Since(t0)
	}
	t.Logf("time by op bucket: %v", o.dur)
	o.verify("end")
	o.r.restart()
	o.verify("end, after restart")
	t.Logf("operations: %v", o.stats)
}

func (o *oracle) note(format string, args ...any) {
	o.log = append(o.log, fmt.Sprintf(format, args...))
	if len(o.log) > 40 {
		o.log = o.log[1:]
	}
}

func (o *oracle) fatalf(format string, args ...any) {
	o.t.Helper()
	var b strings.Builder
	for _, f := range o.r.d.Fcmaps(o.ctx) {
		fmt.Fprintf(&b, "\n  %s %s→%s %s %d%% rate %d deps %d", f.Name, f.SourceName, f.TargetName, f.Status, f.Progress, f.CopyRate, f.DependentMappings)
	}
	o.t.Fatalf(format+"\nmappings:%s", append(args, b.String())...)
}

func (o *oracle) setup() {
	o.vols = []string{"s", "t1", "t2", "t3", "t4", "a", "b", "c", "d", "x", "xt", "y", "yt"}
	for _, v := range o.vols {
		if _, err := o.r.d.Create(v, oracleSize); err != nil {
			o.t.Fatal(err)
		}
		o.data[v] = make([]byte, oracleSize)
	}
	if _, err := o.r.d.MkConsistGrp(o.ctx, api.MkConsistGrp{Name: "g"}); err != nil {
		o.t.Fatal(err)
	}
	add := func(name, src, tgt, group string, flags ...string) {
		s := &oslot{name: name, src: src, tgt: tgt, group: group}
		for _, f := range flags {
			s.incremental = s.incremental || f == "incremental"
			s.restore = s.restore || f == "restore"
		}
		o.slots = append(o.slots, s)
	}
	add("m1", "s", "t1", "", "incremental")
	add("m2", "s", "t2", "")
	add("m3", "s", "t3", "", "incremental")
	add("m4", "s", "t4", "")
	add("ab", "a", "b", "", "incremental")
	add("bc", "b", "c", "")
	add("cd", "c", "d", "")
	add("gx", "x", "xt", "g", "incremental")
	add("gy", "y", "yt", "g")
	// Restores: t1 back onto s (partner m1, with m2–m4 other targets of s), and b onto a.
	add("r1", "t1", "s", "", "incremental", "restore")
	add("rb", "b", "a", "", "restore")
	// Some data everywhere before anything starts.
	for _, v := range o.vols {
		o.hostIO(v, 4)
	}
	for _, s := range o.slots {
		o.create(s)
	}
}

func (o *oracle) rate() int {
	return []int{0, 0, 5, 40, 100, 120, 150}[o.rng.IntN(7)]
}

func (o *oracle) create(s *oslot) {
	rate, clean := o.rate(), 100+o.rng.IntN(51)
	if _, err := o.r.d.MkFcmap(o.ctx, api.MkFcmap{Source: s.src, Target: s.tgt, Name: s.name, ConsistGrp: s.group,
		CopyRate: ip(rate), CleanRate: ip(clean), GrainSize: ip(64), Incremental: s.incremental}); err != nil {
		if s.group != "" && refused(err, fcerr.BadState) {
			// A group's membership can't change while its other members are active.
			o.note("mkfcmap %s refused: %v", s.name, err)
			o.stats["mkfcmap refused"]++
			return
		}
		o.fatalf("mkfcmap %s: %v", s.name, err)
	}
	s.exists = true
	o.note("mkfcmap %s %s→%s rate %d clean %d incremental %v", s.name, s.src, s.tgt, rate, clean, s.incremental)
}

// refused reports whether err is a refusal the oracle's random commands may legitimately get.
func refused(err error, codes ...string) bool {
	c := fcerr.CodeOf(err)
	for _, w := range codes {
		if c == w {
			return true
		}
	}
	return false
}

// maps returns the driver's view of every mapping by name.
func (o *oracle) maps() map[string]api.Fcmap {
	out := map[string]api.Fcmap{}
	for _, f := range o.r.d.Fcmaps(o.ctx) {
		out[f.Name] = f
	}
	return out
}

// forget marks unknown every target whose data the contract no longer defines.
func (o *oracle) forget() {
	for _, f := range o.maps() {
		switch f.Status {
		case "stopped", "preparing", "prepared":
			o.data[f.TargetName] = nil
		}
	}
}

func (o *oracle) start(s *oslot) {
	if !s.exists {
		o.create(s)
	}
	members := []*oslot{s}
	var err error
	if s.group != "" {
		members = nil
		for _, x := range o.slots {
			if x.group == s.group {
				if !x.exists {
					o.create(x)
				}
				members = append(members, x)
			}
		}
		o.note("startfcconsistgrp -prep %s", s.group)
		err = o.r.d.StartConsistGrp(o.ctx, s.group, true, false)
	} else if o.rng.IntN(3) == 0 {
		o.note("prestartfcmap %s restore=%v; startfcmap %s", s.name, s.restore, s.name)
		err = o.r.d.PrestartFcmap(o.ctx, s.name, s.restore)
		if err == nil {
			o.waitNot(s.name, "preparing")
			err = o.r.d.StartFcmap(o.ctx, s.name, false, s.restore)
		}
	} else {
		o.note("startfcmap -prep %s restore=%v", s.name, s.restore)
		err = o.r.d.StartFcmap(o.ctx, s.name, true, s.restore)
	}
	if err != nil {
		if !refused(err, fcerr.BadState, fcerr.AlreadyCopying, fcerr.NeedsRestore, fcerr.DuplicateRestore) {
			o.fatalf("start %s: %v", s.name, err)
		}
		o.note("  refused: %v", err)
		o.stats["start refused"]++
		o.forget()
		return
	}
	o.stats["start"]++
	for _, m := range members {
		if m.restore {
			o.stats["restore start"]++
		}
		if f := o.maps()[m.name]; m.incremental && f.Progress > 0 {
			o.stats["incremental restart, some grains skipped"]++
		}
	}
	for _, m := range members {
		if src := o.data[m.src]; src != nil {
			o.data[m.tgt] = bytes.Clone(src)
		} else {
			o.data[m.tgt] = nil
		}
	}
	// What hosts see right after the start returns: every target online, with its image.
	for _, m := range members {
		if o.data[m.tgt] != nil {
			o.check(m.tgt, "right after start of "+m.name)
		}
	}
}

func (o *oracle) stop(s *oslot) {
	if !s.exists {
		return
	}
	force, split := o.rng.IntN(4) == 0, false
	if f := o.maps()[s.name]; !force && f.Progress == 100 && o.rng.IntN(2) == 0 {
		split = true
	}
	var err error
	ref := s.name
	if s.group != "" {
		ref = s.group
		o.note("stopfcconsistgrp %s force=%v split=%v", ref, force, split)
		err = o.r.d.StopConsistGrp(o.ctx, ref, force, split)
	} else {
		o.note("stopfcmap %s force=%v split=%v", ref, force, split)
		err = o.r.d.StopFcmap(o.ctx, ref, force, split)
	}
	if err != nil {
		if !refused(err, fcerr.AlreadyStopped, fcerr.NotCopied, fcerr.BadState) {
			o.fatalf("stop %s: %v", ref, err)
		}
		o.note("  refused: %v", err)
		o.stats["stop refused"]++
		return
	}
	o.stats["stop"]++
	// Host I/O runs while the stopping mappings clean; their targets are off limits meanwhile.
	pending := map[string]bool{}
	for _, f := range o.maps() {
		if f.Status == "stopping" {
			pending[f.TargetName] = true
		}
	}
	o.burstExcept(pending)
	for name, f := range o.maps() {
		if f.Status == "stopping" {
			o.waitNot(name, "stopping")
		}
	}
	o.forget()
}

func (o *oracle) waitNot(name, status string) {
	o.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		f, err := o.r.d.Fcmap(o.ctx, name)
		if err != nil || f.Status != status {
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
	o.fatalf("mapping %s still %s after 20 s", name, status)
}

func (o *oracle) chrate(s *oslot) {
	if !s.exists {
		return
	}
	rate := o.rate()
	o.note("chfcmap %s -copyrate %d", s.name, rate)
	if err := o.r.d.ChFcmap(o.ctx, s.name, api.ChFcmap{CopyRate: ip(rate)}); err != nil {
		o.fatalf("chfcmap %s: %v", s.name, err)
	}
	o.stats["chfcmap"]++
}

func (o *oracle) remove(s *oslot) {
	if !s.exists {
		return
	}
	f := o.maps()[s.name]
	force := f.Status == "stopped"
	o.note("rmfcmap %s force=%v (%s)", s.name, force, f.Status)
	err := o.r.d.RmFcmap(o.ctx, s.name, force)
	if err != nil {
		if !refused(err, fcerr.BadState) {
			o.fatalf("rmfcmap %s: %v", s.name, err)
		}
		o.stats["rmfcmap refused"]++
		return
	}
	o.stats["rmfcmap"]++
	s.exists = false
	if force {
		// The target is online again, its contents as they are: they become the model.
		p, err := o.r.read(s.tgt, 0, oracleSize)
		if err != nil {
			o.fatalf("read %s after rmfcmap -force: %v", s.tgt, err)
		}
		o.data[s.tgt] = p
	}
}

// online returns whether the contract says volume v accepts I/O now (docs/flashcopy.md §2).
func online(v string, fs map[string]api.Fcmap) bool {
	for _, f := range fs {
		if f.TargetName == v {
			switch f.Status {
			case "preparing", "prepared", "stopped", "suspended":
				return false
			case "stopping":
				if f.Progress < 100 {
					return false
				}
			}
		}
		if f.SourceName == v && f.Status == "suspended" {
			return false
		}
	}
	return true
}

func (o *oracle) burst() { o.burstExcept(nil) }

// burstExcept runs host I/O on every volume at once (one sequential writer per volume, so the
// model of each volume has one owner).
func (o *oracle) burstExcept(skip map[string]bool) {
	o.stats["burst"]++
	fs := o.maps()
	var wg sync.WaitGroup
	errs := make(chan string, len(o.vols))
	seeds := make([]uint64, len(o.vols))
	for i := range seeds {
		seeds[i] = o.rng.Uint64()
	}
	for i, v := range o.vols {
		if skip[v] {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if msg := o.volumeIO(v, online(v, fs), rand.New(rand.NewPCG(seeds[i], 1)), 1+int(seeds[i]%4)); msg != "" {
				errs <- msg
			}
		}()
	}
	wg.Wait()
	close(errs)
	for msg := range errs {
		o.fatalf("%s", msg)
	}
}

func (o *oracle) hostIO(v string, n int) {
	if msg := o.volumeIO(v, true, rand.New(rand.NewPCG(o.rng.Uint64(), 2)), n); msg != "" {
		o.fatalf("%s", msg)
	}
}

// volumeIO issues n random requests to v and checks each against the model; it returns a
// description of the first discrepancy. o.data[v] is only touched by this goroutine.
func (o *oracle) volumeIO(v string, up bool, rng *rand.Rand, n int) string {
	dev := o.r.vol(v)
	if !up {
		p := make([]byte, 4096)
		if err := dev.ReadAt(p, 0); !errors.Is(err, syscall.EIO) {
			return fmt.Sprintf("read of offline volume %s: %v, want EIO", v, err)
		}
		if err := dev.WriteAt(p, 0, false); !errors.Is(err, syscall.EIO) {
			return fmt.Sprintf("write to offline volume %s: %v, want EIO", v, err)
		}
		return ""
	}
	model := o.data[v]
	if model == nil {
		return "" // no defined contents: nothing to write against
	}
	for i := 0; i < n; i++ {
		var off, length int64
		switch rng.IntN(4) {
		case 0: // small, unaligned
			off, length = rng.Int64N(oracleSize), 1+rng.Int64N(9000)
		case 1: // multi-grain
			off, length = rng.Int64N(oracleSize), 64<<10+rng.Int64N(200<<10)
		case 2: // whole grain, aligned
			off, length = rng.Int64N(oracleSize/(64<<10))*(64<<10), 64<<10
		default: // 4 KiB aligned
			off, length = rng.Int64N(oracleSize/4096)*4096, 4096*(1+rng.Int64N(8))
		}
		length = min(length, oracleSize-off)
		if length == 0 {
			continue
		}
		var err error
		what := ""
		switch k := rng.IntN(20); {
		case k < 2:
			off, length = off&^511, max(length&^511, 512)
			length = min(length, oracleSize-off)
			what = "writezeroes"
			err = dev.WriteZeroes(off, length, k == 0, rng.IntN(2) == 0)
			if err == nil {
				clear(model[off : off+length])
			}
		case k < 3:
			off, length = off&^511, max(length&^511, 512)
			length = min(length, oracleSize-off)
			what = "trim"
			err = dev.Trim(off, length)
			if err == nil {
				clear(model[off : off+length])
			}
		default:
			p := make([]byte, length)
			for j := range p {
				p[j] = byte(rng.Uint32())
			}
			fua := rng.IntN(5) == 0
			what = fmt.Sprintf("write fua=%v", fua)
			err = dev.WriteAt(p, off, fua)
			if err == nil {
				copy(model[off:], p)
			}
		}
		if err != nil {
			return fmt.Sprintf("%s %s [%d,+%d): %v", what, v, off, length, err)
		}
		if rng.IntN(3) == 0 {
			roff := rng.Int64N(oracleSize)
			rlen := min(1+rng.Int64N(300<<10), oracleSize-roff)
			p := make([]byte, rlen)
			if err := dev.ReadAt(p, roff); err != nil {
				return fmt.Sprintf("read %s [%d,+%d): %v", v, roff, rlen, err)
			}
			if i := firstDiff(p, model[roff:roff+rlen]); i >= 0 {
				return fmt.Sprintf("read %s [%d,+%d) differs from the model at byte %d (grain %d) after %s [%d,+%d)",
					v, roff, rlen, roff+int64(i), (roff+int64(i))>>16, what, off, length)
			}
		}
	}
	return ""
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// check reads all of v and compares it with the model.
func (o *oracle) check(v, when string) {
	o.t.Helper()
	p, err := o.r.read(v, 0, oracleSize)
	if err != nil {
		o.fatalf("%s: read %s: %v", when, v, err)
	}
	if i := firstDiff(p, o.data[v]); i >= 0 {
		o.fatalf("%s: volume %s differs from the model at byte %d (grain %d): got %02x want %02x",
			when, v, i, i>>16, p[i], o.data[v][i])
	}
}

// verify reads every volume: online ones with a defined model must equal it, offline ones must
// fail with EIO.
func (o *oracle) verify(when string) {
	o.t.Helper()
	o.stats["verify"]++
	fs := o.maps()
	for _, v := range o.vols {
		if !online(v, fs) {
			if _, err := o.r.read(v, 0, 4096); !errors.Is(err, syscall.EIO) {
				o.fatalf("%s: read of offline volume %s: %v, want EIO", when, v, err)
			}
			continue
		}
		if o.data[v] == nil {
			if _, err := o.r.read(v, 0, oracleSize); err != nil {
				o.fatalf("%s: read of online volume %s: %v", when, v, err)
			}
			continue
		}
		o.check(v, when)
	}
}
