package driver

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"fcnbd/internal/api"
	"fcnbd/internal/blockdev"
	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
	"fcnbd/internal/store/crashfs"
	"fcnbd/nbd"
)

// TestTopologyRace is the race hunter of issue 13: one multi-target and cascaded tree
// (S → T1..T4, T1 → C1 → C2) and an unrelated pair X → Y, with host I/O from several goroutines
// on every volume all the time (writes, write-zeroes, trims, FUA, flushes, reads, through the
// devices the driver exports), while the test goroutine starts (-prep, prestart+start, group),
// stops (normal, -force), changes copy rates and restarts the daemon, cleanly (Close + Open) or
// as after kill -9 (the files frozen, the catalogue copied, crashfs.CrashClone, a new driver on
// the clones). Seeds randomise grain sizes, the volume size (sometimes with a short last grain),
// copy and clean rates, incremental mappings and the group's members.
//
// Liveness: every host request, command and restart is registered with its start time; a
// watchdog goroutine that shares no lock with the workload dumps every goroutine and the stuck
// operations to stderr (and a file) and aborts the test binary when one is older than the
// deadline, so that a hang is diagnosable from one CI log.
//
// Data: a per-volume model of 4 KiB blocks with a known mask (topoVol). At quiescent points
// the model's chains must be the engine's (linksDisagree), every online volume's known blocks
// must read as the model and every offline one fails with EIO; reads during the load are checked where no write could race with them.
//
// FCNBD_TOPO_SEED=n replays one seed (the I/O interleaving differs, the command sequence does
// not); FCNBD_TOPO_SEEDS=n runs n seeds (default 50); FCNBD_TOPO_STEPS=n sets the random steps
// per seed (default 10); FCNBD_TOPO_DEADLINE=d the watchdog's deadline (default 20s);
// FCNBD_TOPO_RESTARTS=p the percentage of steps that restart the daemon (default 16);
// FCNBD_TOPO_NBD=1 (0) sends the writers' requests through an in-process NBD server (straight to
// the driver's devices); by default even seeds use NBD; FCNBD_TOPO_MIB=n makes volumes of 1 to n
// MiB (default 2).
func TestTopologyRace(t *testing.T) {
	var seeds []uint64
	if s := os.Getenv("FCNBD_TOPO_SEED"); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("FCNBD_TOPO_SEED: %v", err)
		}
		seeds = []uint64{n}
	} else {
		n := envInt(t, "FCNBD_TOPO_SEEDS", 50)
		base := uint64(time.Now().UnixNano())
		for i := 0; i < n; i++ {
			seeds = append(seeds, base+uint64(i)*7919)
		}
	}
	steps := envInt(t, "FCNBD_TOPO_STEPS", 10)
	restarts := envInt(t, "FCNBD_TOPO_RESTARTS", 16)
	deadline := 20 * time.Second
	if s := os.Getenv("FCNBD_TOPO_DEADLINE"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			t.Fatalf("FCNBD_TOPO_DEADLINE: %v", err)
		}
		deadline = d
	}
	// Seeds run side by side, FCNBD_TOPO_PARALLEL (default 4) at a time whatever go test's
	// -parallel: much of a seed is waiting (fences, cleaning, restarts), not computing.
	sem := make(chan struct{}, envInt(t, "FCNBD_TOPO_PARALLEL", 4))
	var wg sync.WaitGroup
	for _, seed := range seeds {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
				t.Logf("seed %d (replay: FCNBD_TOPO_SEED=%d go test -race -run 'TestTopologyRace' ./mappings/driver)", seed, seed)
				runTopo(t, seed, steps, restarts, deadline)
			})
		})
	}
	wg.Wait()
}

func envInt(t *testing.T, name string, def int) int {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return n
}

// ---- liveness ----

// liveOp is one registered operation.
type liveOp struct {
	who, vol, op string
	off, n       int64
	start        time.Time
}

// liveness is the registry of operations in progress and its watchdog. Its mutex is held only
// for map updates and copies, never across anything that can block.
type liveness struct {
	mu   sync.Mutex
	ops  map[uint64]liveOp
	next uint64
	// hist is the last commands, printed with a dump.
	hist []string
}

func (l *liveness) begin(who, vol, op string, off, n int64) uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.next++
	l.ops[l.next] = liveOp{who, vol, op, off, n, time.Now()}
	return l.next
}

func (l *liveness) end(id uint64) {
	l.mu.Lock()
	delete(l.ops, id)
	l.mu.Unlock()
}

func (l *liveness) note(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.hist = append(l.hist, time.Now().Format("15:04:05.000 ")+fmt.Sprintf(format, args...))
	if len(l.hist) > 60 {
		l.hist = l.hist[1:]
	}
}

func (l *liveness) history() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.hist...)
}

// stuck lists the operations older than deadline, oldest first.
func (l *liveness) stuck(deadline time.Duration) []string {
	l.mu.Lock()
	var old []liveOp
	for _, o := range l.ops {
		if time.Since(o.start) > deadline {
			old = append(old, o)
		}
	}
	l.mu.Unlock()
	sort.Slice(old, func(i, j int) bool { return old[i].start.Before(old[j].start) })
	var out []string
	for _, o := range old {
		out = append(out, fmt.Sprintf("%s: %s %s [%d,+%d) for %v", o.who, o.op, o.vol, o.off, o.n, time.Since(o.start).Round(time.Millisecond)))
	}
	return out
}

// watch runs the watchdog until stop closes. On a hang it writes the stuck operations, the
// seed's history and every goroutine's stack to stderr and to a file, marks t failed and
// panics: the hung goroutines can't be unstuck, and the binary must end with the evidence.
func (l *liveness) watch(t *testing.T, seed uint64, deadline time.Duration, stop <-chan struct{}) {
	tick := time.NewTicker(min(deadline/4, time.Second))
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		stuck := l.stuck(deadline)
		if len(stuck) == 0 {
			continue
		}
		buf := make([]byte, 64<<20)
		buf = buf[:runtime.Stack(buf, true)]
		var b strings.Builder
		fmt.Fprintf(&b, "\n==== HANG: seed %d: %d operation(s) older than %v (replay: FCNBD_TOPO_SEED=%d)\n", seed, len(stuck), deadline, seed)
		for _, s := range stuck {
			fmt.Fprintf(&b, "  stuck %s\n", s)
		}
		fmt.Fprintf(&b, "==== last commands of seed %d:\n  %s\n", seed, strings.Join(l.history(), "\n  "))
		fmt.Fprintf(&b, "==== all goroutines:\n%s\n==== end of hang report (seed %d)\n", buf, seed)
		report := b.String()
		path := filepath.Join(os.TempDir(), fmt.Sprintf("fcnbd-topo-hang-%d.txt", seed))
		if err := os.WriteFile(path, []byte(report), 0o644); err == nil {
			report += "(also written to " + path + ")\n"
		}
		fmt.Fprint(os.Stderr, report)
		t.Errorf("seed %d: hang: %s (goroutine dump on stderr)", seed, strings.Join(stuck, "; "))
		panic(fmt.Sprintf("fcnbd topology test: hang at seed %d (see the dump above)", seed))
	}
}

// ---- the model ----

const topoBlock = 4096

// topoVol is the model of one volume: its bytes, and per 4 KiB block whether the content is
// known, whether it is durable (survives a crash), the writes in flight and a version bumped by
// every write's issue and completion. Guarded by mu, which is never held across I/O.
type topoVol struct {
	name string
	size int64
	comp string // "s" or "x": the connected set

	mu      sync.Mutex
	data    []byte
	known   []bool
	durable []bool
	lastAck []uint64
	ver     []uint32
	busy    []int32
	ackSeq  uint64
	epoch   uint64 // bumped when the model is replaced or forgotten wholesale
	// touched collects the blocks written while a start that involves the volume runs.
	touching bool
	touched  []bool
	// online is what the contract says of the volume's availability; onlineGen changes with
	// every change of it, and while a command or restart may change it (online is then false).
	online    bool
	settled   bool // false while a command or restart may be changing online
	onlineGen uint64
}

func newTopoVol(name, comp string, size int64) *topoVol {
	n := int((size + topoBlock - 1) / topoBlock)
	return &topoVol{name: name, size: size, comp: comp, data: make([]byte, size),
		known: fill(n, true), durable: fill(n, true), lastAck: make([]uint64, n), ver: make([]uint32, n),
		busy: make([]int32, n), touched: make([]bool, n), online: true, settled: true}
}

func fill(n int, v bool) []bool {
	b := make([]bool, n)
	for i := range b {
		b[i] = v
	}
	return b
}

func (v *topoVol) blocks(off, n int64) (int, int) {
	return int(off / topoBlock), int((off + n + topoBlock - 1) / topoBlock)
}

// forgetLocked makes every block unknown (a stopped or preparing target).
func (v *topoVol) forgetLocked() {
	for i := range v.known {
		v.known[i] = false
		v.durable[i] = false
	}
	v.epoch++
}

// ---- the world: the driver in use ----

type topoWorld struct {
	gen  uint64
	d    *Driver
	cat  *catalog.DB
	dir  string
	fs   *crashfs.FS
	devs map[string]blockdev.Device
	// srv serves the driver over NBD on the Unix socket sock, for seeds whose writers go
	// through it (nil otherwise).
	srv      *nbd.Server
	sock     string
	serveErr chan error
}

// shutdownNBD stops the world's NBD server as serve does at SIGTERM, before the driver closes.
func (tp *topo) shutdownNBD(w *topoWorld) {
	if w.srv == nil {
		return
	}
	id := tp.live.begin("main", "", "NBD server shutdown", 0, 0)
	defer tp.live.end(id)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := w.srv.Shutdown(ctx); err != nil {
		tp.t.Logf("NBD shutdown: %v", err)
	}
	<-w.serveErr
	os.RemoveAll(filepath.Dir(w.sock))
}

type topo struct {
	t        *testing.T
	seed     uint64
	rng      *rand.Rand
	ctx      context.Context
	live     *liveness
	vols     map[string]*topoVol
	names    []string
	maps     []*topoMap
	group    []*topoMap // members of group g
	world    atomic.Pointer[topoWorld]
	worldGen atomic.Uint64 // bumped at the beginning and end of every restart
	freeze   sync.RWMutex  // file operations and catalogue commits; a crash takes it
	logger   zerolog.Logger

	viaNBD   bool         // the writers' requests go through an NBD server
	maxMiB   int          // volumes are 1 to maxMiB MiB (plus a short last grain, sometimes)
	pause    sync.RWMutex // writers hold it shared per operation; verify takes it
	stop     chan struct{}
	stopOnce sync.Once
	failed   atomic.Bool
	wg       sync.WaitGroup
	stats    sync.Map // string → *atomic.Int64

	// recent are the last writes with their data, to name the write whose data a mismatch shows.
	recentMu sync.Mutex
	recent   []topoWrite
}

type topoWrite struct {
	vol, who string
	kind     string
	n        int64
	issued   time.Time
	off      int64
	p        []byte
	at       time.Time
	world    uint64
	acked    bool
}

func (tp *topo) remember(w topoWrite) {
	tp.recentMu.Lock()
	defer tp.recentMu.Unlock()
	tp.recent = append(tp.recent, w)
	if len(tp.recent) > 4000 {
		tp.recent = tp.recent[1000:]
	}
}

// whoWrote names the recent writes whose data at byte pos is got (16 bytes or fewer).
func (tp *topo) whoWrote(pos int64, got []byte) string {
	tp.recentMu.Lock()
	defer tp.recentMu.Unlock()
	var out []string
	for _, w := range tp.recent {
		if pos < w.off || pos+int64(len(got)) > w.off+w.n {
			continue
		}
		data := "zeroes"
		if w.p != nil {
			data = fmt.Sprintf("%x", w.p[pos-w.off:pos-w.off+int64(len(got))])
			if bytes.Equal(w.p[pos-w.off:pos-w.off+int64(len(got))], got) {
				data = "THAT DATA"
			}
		}
		out = append(out, fmt.Sprintf("\n    %s %s by %s [%d,+%d) %s–%s world %d acked %v: %s", w.kind, w.vol, w.who, w.off, w.n,
			w.issued.Format("15:04:05.000"), w.at.Format("15:04:05.000"), w.world, w.acked, data))
	}
	return "recent writes there, all volumes:" + strings.Join(out, "")
}

type topoMap struct {
	name, src, tgt string
	incremental    bool
	grp            bool
}

func (tp *topo) count(what string) {
	c, _ := tp.stats.LoadOrStore(what, new(atomic.Int64))
	c.(*atomic.Int64).Add(1)
}

func (tp *topo) fail(format string, args ...any) {
	tp.t.Helper()
	msg := fmt.Sprintf(format, args...)
	if tp.failed.CompareAndSwap(false, true) {
		tp.t.Errorf("seed %d: %s\nreplay: FCNBD_TOPO_SEED=%d\nlast commands:\n  %s", tp.seed, msg, tp.seed, strings.Join(tp.live.history(), "\n  "))
	} else {
		tp.t.Errorf("seed %d: %s", tp.seed, msg)
	}
}

func runTopo(t *testing.T, seed uint64, steps, restartPct int, deadline time.Duration) {
	tp := &topo{t: t, seed: seed, rng: rand.New(rand.NewPCG(seed, seed^0x243f6a8885a308d3)), ctx: context.Background(),
		live: &liveness{ops: map[uint64]liveOp{}}, vols: map[string]*topoVol{}, stop: make(chan struct{}),
		logger: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.ErrorLevel)}
	watchStop := make(chan struct{})
	go tp.live.watch(t, seed, deadline, watchStop)
	defer close(watchStop)

	tp.maxMiB = max(envInt(t, "FCNBD_TOPO_MIB", 2), 1)
	switch os.Getenv("FCNBD_TOPO_NBD") {
	case "0":
	case "1":
		tp.viaNBD = true
	default:
		tp.viaNBD = seed%2 == 0
	}
	tp.setup()
	// However the test goroutine ends (a Fatal included), the writers stop before the test does.
	t.Cleanup(func() {
		tp.stopOnce.Do(func() { close(tp.stop) })
		tp.wg.Wait()
	})
	const writers = 4
	for i := range writers {
		tp.wg.Add(1)
		go tp.writer(i, rand.New(rand.NewPCG(seed+uint64(i)+1, 99)))
	}
	// The interesting topology first, then random steps.
	for _, m := range tp.maps {
		if !m.grp {
			tp.start(m)
		}
	}
	tp.startGroup()
	tp.verify("after the initial starts")
	for i := 0; i < steps && !tp.failed.Load(); i++ {
		p := tp.rng.IntN(100)
		switch {
		case p < restartPct/2:
			tp.restart(false)
		case p < restartPct:
			tp.restart(true)
		case p < restartPct+25:
			if tp.rng.IntN(4) == 0 {
				tp.startGroup()
			} else {
				tp.start(tp.maps[tp.rng.IntN(len(tp.maps))])
			}
		case p < restartPct+42:
			tp.stopMap(tp.maps[tp.rng.IntN(len(tp.maps))])
		case p < restartPct+55:
			tp.chrate(tp.maps[tp.rng.IntN(len(tp.maps))])
		case p < restartPct+67:
			tp.verify(fmt.Sprintf("step %d", i))
		default:
			tp.sleep(time.Duration(20+tp.rng.IntN(150)) * time.Millisecond)
		}
	}
	if !tp.failed.Load() {
		tp.verify("end")
		tp.restart(false)
		tp.verify("end, after a clean restart")
	}
	tp.stopOnce.Do(func() { close(tp.stop) })
	tp.wg.Wait()
	w := tp.world.Load()
	tp.shutdownNBD(w)
	id := tp.live.begin("main", "", "final close", 0, 0)
	if err := w.d.Close(); err != nil {
		t.Logf("final close: %v", err)
	}
	w.cat.Close()
	tp.live.end(id)
	var st []string
	tp.stats.Range(func(k, v any) bool {
		st = append(st, fmt.Sprintf("%s=%d", k, v.(*atomic.Int64).Load()))
		return true
	})
	sort.Strings(st)
	t.Logf("seed %d: %s", seed, strings.Join(st, " "))
	if os.Getenv("FCNBD_TOPO_HISTORY") != "" {
		t.Logf("history:\n  %s", strings.Join(tp.live.history(), "\n  "))
	}
}

func (tp *topo) sleep(d time.Duration) {
	select {
	case <-time.After(d):
	case <-tp.stop:
	}
}

func (tp *topo) openWorld(dir string, fs *crashfs.FS) *topoWorld {
	tp.t.Helper()
	cat, err := catalog.OpenWith(dir, catalog.Options{CommitHook: func(commit func() error) error {
		tp.freeze.RLock()
		defer tp.freeze.RUnlock()
		return commit()
	}})
	if err != nil {
		tp.t.Fatal(err)
	}
	d, err := Open(Options{Catalog: cat, FS: freezeFS{fs, &tp.freeze}, Logger: tp.logger,
		ProgressInterval: 10 * time.Millisecond, FenceTimeout: 5 * time.Second, CacheSize: 8 << 20})
	if err != nil {
		cat.Close()
		tp.t.Fatalf("open the driver: %v", err)
	}
	w := &topoWorld{d: d, cat: cat, dir: dir, fs: fs, devs: map[string]blockdev.Device{}}
	for _, n := range tp.names {
		if e, ok := d.Lookup(n); ok {
			w.devs[n] = e.Device
		}
	}
	if tp.viaNBD {
		sdir, err := os.MkdirTemp("", "fcnbd-topo-nbd-") // short: a socket path has 108 bytes
		if err != nil {
			tp.t.Fatal(err)
		}
		w.sock = filepath.Join(sdir, "nbd.sock")
		l, err := net.Listen("unix", w.sock)
		if err != nil {
			tp.t.Fatal(err)
		}
		w.srv = nbd.NewServer(d, nbd.Options{Logger: tp.logger})
		w.serveErr = make(chan error, 1)
		go func() { w.serveErr <- w.srv.Serve(l) }()
	}
	return w
}

// tempDir is a directory for a catalogue: in memory (/dev/shm) where there is one, since
// every split bit is a catalogue commit and the disk's syncs would make a seed last seconds
// more; FCNBD_TOPO_DISK=1 keeps them on disk (t.TempDir), with the disk's latencies.
func (tp *topo) tempDir() string {
	if os.Getenv("FCNBD_TOPO_DISK") == "" {
		if dir, err := os.MkdirTemp("/dev/shm", "fcnbd-topo-"); err == nil {
			tp.t.Cleanup(func() { os.RemoveAll(dir) })
			return dir
		}
	}
	return tp.t.TempDir()
}

func (tp *topo) setup() {
	rng := tp.rng
	grainS := []int{64, 256}[rng.IntN(2)]
	grainX := []int{64, 256}[rng.IntN(2)]
	size := func() int64 {
		s := int64(1+rng.IntN(tp.maxMiB)) << 20
		if rng.IntN(2) == 0 {
			s += int64(1+rng.IntN(15)) * topoBlock // a short last grain
		}
		return s
	}
	sizeS, sizeX := size(), size()
	for _, n := range []string{"s", "t1", "t2", "t3", "t4", "c1", "c2"} {
		tp.vols[n] = newTopoVol(n, "s", sizeS)
		tp.names = append(tp.names, n)
	}
	for _, n := range []string{"x", "y"} {
		tp.vols[n] = newTopoVol(n, "x", sizeX)
		tp.names = append(tp.names, n)
	}
	w := tp.openWorld(tp.tempDir(), crashfs.New())
	for _, n := range tp.names {
		if _, err := w.d.Create(n, tp.vols[n].size); err != nil {
			tp.t.Fatal(err)
		}
		e, _ := w.d.Lookup(n)
		w.devs[n] = e.Device
	}
	w.gen = tp.worldGen.Load()
	tp.world.Store(w)
	if _, err := w.d.MkConsistGrp(tp.ctx, api.MkConsistGrp{Name: "g"}); err != nil {
		tp.t.Fatal(err)
	}
	add := func(name, src, tgt string, grain int) {
		m := &topoMap{name: name, src: src, tgt: tgt, incremental: rng.IntN(3) == 0}
		// The group takes some of the mappings that no other member's volumes depend on.
		if name == "m3" || name == "m4" || name == "xy" {
			m.grp = rng.IntN(2) == 0
		}
		rate := []int{0, 1, 5, 40, 80, 120, 150}[rng.IntN(7)]
		clean := []int{0, 50, 60, 100, 150}[rng.IntN(5)]
		req := api.MkFcmap{Source: src, Target: tgt, Name: name, CopyRate: ip(rate), CleanRate: ip(clean),
			GrainSize: ip(grain), Incremental: m.incremental}
		if m.grp {
			req.ConsistGrp = "g"
			tp.group = append(tp.group, m)
		}
		if _, err := w.d.MkFcmap(tp.ctx, req); err != nil {
			tp.t.Fatalf("mkfcmap %s: %v", name, err)
		}
		tp.live.note("mkfcmap %s %s→%s grain %d rate %d clean %d incremental %v group %v", name, src, tgt, grain, rate, clean, m.incremental, m.grp)
		tp.maps = append(tp.maps, m)
	}
	for _, m := range [][2]string{{"m1", "t1"}, {"m2", "t2"}, {"m3", "t3"}, {"m4", "t4"}} {
		add(m[0], "s", m[1], grainS)
	}
	add("c1", "t1", "c1", grainS)
	add("c2", "c1", "c2", grainS)
	add("xy", "x", "y", grainX)
	tp.live.note("seed %d: S tree %d bytes, grain %d KiB; X→Y %d bytes, grain %d KiB; host I/O through NBD: %v", tp.seed, sizeS, grainS, sizeX, grainX, tp.viaNBD)
}

// ---- host I/O ----

// topoWriter is one writer goroutine's state: its NBD connections to the current world.
type topoWriter struct {
	who    string
	gen    uint64
	conns  map[string]*nbdDev
	failed bool // the last request failed
}

func (tp *topo) writer(i int, rng *rand.Rand) {
	defer tp.wg.Done()
	ws := &topoWriter{who: fmt.Sprintf("writer %d", i), conns: map[string]*nbdDev{}}
	defer ws.closeConns()
	for {
		select {
		case <-tp.stop:
			return
		default:
		}
		tp.pause.RLock()
		ws.failed = false
		tp.hostOp(ws, rng)
		tp.pause.RUnlock()
		if ws.failed {
			time.Sleep(time.Millisecond) // no spinning on an offline volume or a restart
		}
	}
}

func (ws *topoWriter) closeConns() {
	for n, c := range ws.conns {
		c.Close()
		delete(ws.conns, n)
	}
}

// device returns the device the writer uses for vol in world w: the driver's, or an NBD
// connection to w's server (dialled again after a failure or a restart).
func (tp *topo) device(ws *topoWriter, w *topoWorld, vol string) blockdev.Device {
	if w.srv == nil {
		return w.devs[vol]
	}
	if ws.gen != w.gen {
		ws.closeConns()
		ws.gen = w.gen
	}
	if c := ws.conns[vol]; c != nil && !c.failed() {
		return c
	}
	c, err := dialNBD(w.sock, vol)
	if err != nil {
		return errDev{fmt.Errorf("%v: %w", err, syscall.ESHUTDOWN)}
	}
	ws.conns[vol] = c
	return c
}

// pickRange chooses a request's range in v.
func pickRange(rng *rand.Rand, v *topoVol) (int64, int64) {
	nb := v.size / topoBlock
	var off, n int64
	switch rng.IntN(10) {
	case 0: // unaligned, small
		off, n = rng.Int64N(v.size), 1+rng.Int64N(9000)
	case 1: // larger than a cached write: goes through the cache
		off, n = rng.Int64N(nb)*topoBlock, 300<<10
	case 2, 3: // a whole grain of either size
		g := []int64{64 << 10, 256 << 10}[rng.IntN(2)]
		off, n = rng.Int64N(v.size/g+1)*g, g
	default:
		off, n = rng.Int64N(nb)*topoBlock, topoBlock*(1+rng.Int64N(16))
	}
	off = min(off, v.size-1)
	return off, min(n, v.size-off)
}

// hostOp runs one random request against the current world and checks it against the model.
func (tp *topo) hostOp(ws *topoWriter, rng *rand.Rand) {
	who := ws.who
	v := tp.vols[tp.names[rng.IntN(len(tp.names))]]
	w := tp.world.Load()
	dev := tp.device(ws, w, v.name)
	k := rng.IntN(100)
	if k < 6 {
		tp.flushOp(who, v, w, dev)
		return
	}
	off, n := pickRange(rng, v)
	kind := "read"
	switch {
	case k < 55:
		kind = "write"
	case k < 62:
		kind = "writezeroes"
		off, n = off&^511, max(n&^511, 512)
		n = min(n, v.size-off)
	case k < 67:
		kind = "trim"
		off, n = off&^511, max(n&^511, 512)
		n = min(n, v.size-off)
	}
	fua := kind != "trim" && kind != "read" && rng.IntN(5) == 0
	var p []byte
	switch kind {
	case "write":
		p = make([]byte, n)
		for i := 0; i < len(p); i += 8 {
			var w [8]byte
			binary.LittleEndian.PutUint64(w[:], rng.Uint64())
			copy(p[i:], w[:])
		}
	case "read":
		p = make([]byte, n)
	}

	b0, b1 := v.blocks(off, n)
	v.mu.Lock()
	if kind != "read" {
		for b := b0; b < b1; b++ {
			if v.busy[b] > 0 {
				v.mu.Unlock()
				return // another writer has the range: no two writes of a block race
			}
		}
	}
	readable := make([]bool, b1-b0) // blocks a read may check: known, no write in flight
	vers := make([]uint32, b1-b0)
	for b := b0; b < b1; b++ {
		if kind == "read" {
			readable[b-b0] = v.known[b] && v.busy[b] == 0
			vers[b-b0] = v.ver[b]
			continue
		}
		v.busy[b]++
		v.ver[b]++
		if v.touching {
			v.touched[b] = true
		}
	}
	epoch, online, onlineGen, settled := v.epoch, v.online, v.onlineGen, v.settled
	// A target's contents change at an instant inside a start's window: no read then is checked.
	windowed := v.touching
	wgen := tp.worldGen.Load()
	v.mu.Unlock()

	issued := time.Now()
	id := tp.live.begin(who, v.name, kind+map[bool]string{true: "+fua"}[fua], off, n)
	var err error
	switch kind {
	case "write":
		err = dev.WriteAt(p, off, fua)
	case "writezeroes":
		err = dev.WriteZeroes(off, n, rng.IntN(2) == 0, fua)
	case "trim":
		err = dev.Trim(off, n)
	case "read":
		err = dev.ReadAt(p, off)
	}
	tp.live.end(id)

	v.mu.Lock()
	defer v.mu.Unlock()
	same := epoch == v.epoch && wgen == tp.worldGen.Load() && w.gen == wgen
	strict := same && settled && onlineGen == v.onlineGen
	switch {
	case strict && online && err != nil:
		tp.fail("%s: %s %s [%d,+%d) on an online volume: %v", who, kind, v.name, off, n, err)
	case strict && !online && err == nil:
		tp.fail("%s: %s %s [%d,+%d) on an offline volume succeeded", who, kind, v.name, off, n)
	case strict && !online && !errors.Is(err, syscall.EIO):
		tp.fail("%s: %s %s [%d,+%d) on an offline volume: %v, want EIO", who, kind, v.name, off, n, err)
	}
	if err != nil {
		tp.count(kind + " failed")
		if os.Getenv("FCNBD_TOPO_DEBUG") != "" {
			tp.t.Logf("%s %s %s: %v", who, kind, v.name, err)
		}
		ws.failed = true
	} else {
		tp.count(kind)
	}
	if kind == "read" {
		if err != nil || !same || windowed || v.touching {
			return
		}
		for b := b0; b < b1; b++ {
			if !readable[b-b0] || !v.known[b] || v.ver[b] != vers[b-b0] {
				continue
			}
			lo, hi := max(off, int64(b)*topoBlock), min(off+n, int64(b+1)*topoBlock)
			if i := firstDiff(p[lo-off:hi-off], v.data[lo:hi]); i >= 0 {
				at := lo + int64(i)
				got := p[at-off : min(at-off+16, hi-off)]
				tp.fail("%s: read %s [%d,+%d) under load differs from the model at byte %d (block %d): got %x want %x; %s",
					who, v.name, off, n, at, b, got, v.data[at:at+int64(len(got))], tp.whoWrote(at, got))
				return
			}
		}
		return
	}
	v.ackSeq++
	for b := b0; b < b1; b++ {
		v.busy[b]--
		v.ver[b]++
		if v.touching {
			v.touched[b] = true
		}
		if err != nil || !same {
			v.known[b], v.durable[b] = false, false
			continue
		}
		whole := off <= int64(b)*topoBlock && off+n >= min(int64(b+1)*topoBlock, v.size)
		if whole {
			v.known[b] = true
		}
		v.durable[b] = fua && (whole || v.durable[b])
		v.lastAck[b] = v.ackSeq
	}
	if kind != "read" {
		tp.remember(topoWrite{vol: v.name, who: who, kind: kind, off: off, n: n, p: p, issued: issued, at: time.Now(), world: wgen, acked: err == nil && same})
	}
	if err == nil && same {
		switch kind {
		case "write":
			copy(v.data[off:], p)
		default:
			clear(v.data[off : off+n])
		}
	}
}

// flushOp flushes v: every write acknowledged before it becomes durable.
func (tp *topo) flushOp(who string, v *topoVol, w *topoWorld, dev blockdev.Device) {
	v.mu.Lock()
	upTo, epoch, online, onlineGen, settled := v.ackSeq, v.epoch, v.online, v.onlineGen, v.settled
	wgen := tp.worldGen.Load()
	v.mu.Unlock()
	id := tp.live.begin(who, v.name, "flush", 0, 0)
	err := dev.Flush()
	tp.live.end(id)
	v.mu.Lock()
	defer v.mu.Unlock()
	same := epoch == v.epoch && wgen == tp.worldGen.Load() && w.gen == wgen
	if same && settled && onlineGen == v.onlineGen && online && err != nil {
		tp.fail("%s: flush %s on an online volume: %v", who, v.name, err)
	}
	if err != nil || !same {
		tp.count("flush failed")
		return
	}
	tp.count("flush")
	for b := range v.durable {
		if v.lastAck[b] <= upTo && v.busy[b] == 0 {
			v.durable[b] = true
		}
	}
}

// ---- commands ----

// cmd runs a control command registered with the watchdog.
func (tp *topo) cmd(what string, f func(d *Driver) error) error {
	tp.live.note("%s", what)
	id := tp.live.begin("main", "", what, 0, 0)
	defer tp.live.end(id)
	err := f(tp.world.Load().d)
	if err != nil {
		tp.live.note("  → %v", err)
	}
	return err
}

// unsettle marks the volumes of comp (all, if "") as possibly changing availability.
func (tp *topo) unsettle(comp string) {
	for _, v := range tp.vols {
		if comp == "" || v.comp == comp {
			v.mu.Lock()
			v.online, v.settled = false, false
			v.onlineGen++
			v.mu.Unlock()
		}
	}
}

// settle waits until no mapping is stopping or preparing, then makes the model follow the
// mappings' states: targets that lost their data forget it, and every volume's availability is
// what the contract says.
func (tp *topo) settle() {
	id := tp.live.begin("main", "", "settle (wait for stopping/preparing)", 0, 0)
	defer tp.live.end(id)
	var fs map[string]api.Fcmap
	for {
		fs = map[string]api.Fcmap{}
		busy := false
		for _, f := range tp.world.Load().d.Fcmaps(tp.ctx) {
			fs[f.Name] = f
			busy = busy || f.Status == "stopping" || f.Status == "preparing"
		}
		if !busy || tp.failed.Load() {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	for _, f := range fs {
		switch f.Status {
		case "stopped", "preparing", "prepared", "suspended":
			v := tp.vols[f.TargetName]
			v.mu.Lock()
			v.forgetLocked()
			v.mu.Unlock()
		}
	}
	for _, v := range tp.vols {
		on := online(v.name, fs)
		v.mu.Lock()
		v.online, v.settled = on, true
		v.onlineGen++
		v.mu.Unlock()
	}
}

func refusedTopo(err error) bool {
	return refused(err, fcerr.BadState, fcerr.AlreadyCopying, fcerr.NeedsRestore, fcerr.AlreadyStopped,
		fcerr.NotCopied, fcerr.FenceTimeout, fcerr.GroupMember)
}

// startWindow marks the start of a start command: writes to the members' volumes from now on
// (and those in flight) are recorded in touched, and the targets' models are void.
func (tp *topo) startWindow(members []*topoMap) {
	for _, m := range members {
		for _, n := range []string{m.src, m.tgt} {
			v := tp.vols[n]
			v.mu.Lock()
			v.touching = true
			for b := range v.touched {
				v.touched[b] = v.busy[b] > 0
			}
			if n == m.tgt {
				v.epoch++
			}
			v.mu.Unlock()
		}
	}
}

// endWindow ends the start: on success each target's model is its source's, less the blocks
// written on either while the start ran.
func (tp *topo) endWindow(members []*topoMap, started bool) {
	type img struct {
		data           []byte
		known, durable []bool
		touched        []bool
	}
	imgs := map[string]img{}
	for _, m := range members {
		v := tp.vols[m.src]
		v.mu.Lock()
		imgs[m.src] = img{bytes.Clone(v.data), slices.Clone(v.known), slices.Clone(v.durable), slices.Clone(v.touched)}
		v.mu.Unlock()
	}
	for _, m := range members {
		v := tp.vols[m.tgt]
		v.mu.Lock()
		if started {
			s := imgs[m.src]
			copy(v.data, s.data)
			for b := range v.known {
				v.known[b] = s.known[b] && !s.touched[b] && !v.touched[b]
				v.durable[b] = v.known[b] && s.durable[b]
				// A flush of the target does not make durable what it reads through its
				// source: only the target's own writes count for its flushes.
				v.lastAck[b] = math.MaxUint64
			}
		}
		v.epoch++
		v.mu.Unlock()
	}
	for _, m := range members {
		for _, n := range []string{m.src, m.tgt} {
			v := tp.vols[n]
			v.mu.Lock()
			v.touching = false
			v.mu.Unlock()
		}
	}
}

func (tp *topo) start(m *topoMap) {
	if m.grp {
		tp.startGroup()
		return
	}
	comp := tp.vols[m.src].comp
	tp.unsettle(comp)
	tp.startWindow([]*topoMap{m})
	var err error
	if tp.rng.IntN(3) == 0 {
		err = tp.cmd("prestartfcmap "+m.name, func(d *Driver) error { return d.PrestartFcmap(tp.ctx, m.name, false) })
		if err == nil {
			tp.waitNotPreparing(m.name)
			err = tp.cmd("startfcmap "+m.name, func(d *Driver) error { return d.StartFcmap(tp.ctx, m.name, false, false) })
		}
	} else {
		err = tp.cmd("startfcmap -prep "+m.name, func(d *Driver) error { return d.StartFcmap(tp.ctx, m.name, true, false) })
	}
	tp.endWindow([]*topoMap{m}, err == nil)
	tp.result("start", err)
	tp.settle()
}

func (tp *topo) startGroup() {
	if len(tp.group) == 0 {
		return
	}
	tp.unsettle("")
	tp.startWindow(tp.group)
	err := tp.cmd("startfcconsistgrp -prep g", func(d *Driver) error { return d.StartConsistGrp(tp.ctx, "g", true, false) })
	tp.endWindow(tp.group, err == nil)
	tp.result("group start", err)
	tp.settle()
}

func (tp *topo) result(what string, err error) {
	switch {
	case err == nil:
		tp.count(what)
	case refusedTopo(err):
		tp.count(what + " refused")
	default:
		tp.fail("%s: %v", what, err)
	}
}

func (tp *topo) waitNotPreparing(name string) {
	id := tp.live.begin("main", "", "wait for "+name+" prepared", 0, 0)
	defer tp.live.end(id)
	for !tp.failed.Load() {
		f, err := tp.world.Load().d.Fcmap(tp.ctx, name)
		if err != nil || f.Status != "preparing" {
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func (tp *topo) stopMap(m *topoMap) {
	force := tp.rng.IntN(3) == 0
	if m.grp {
		tp.unsettle("")
	} else {
		tp.unsettle(tp.vols[m.src].comp)
	}
	var err error
	if m.grp {
		err = tp.cmd(fmt.Sprintf("stopfcconsistgrp g force=%v", force), func(d *Driver) error { return d.StopConsistGrp(tp.ctx, "g", force, false) })
	} else {
		err = tp.cmd(fmt.Sprintf("stopfcmap %s force=%v", m.name, force), func(d *Driver) error { return d.StopFcmap(tp.ctx, m.name, force, false) })
	}
	tp.result("stop", err)
	tp.settle()
}

func (tp *topo) chrate(m *topoMap) {
	rate := []int{0, 1, 5, 40, 80, 120, 150}[tp.rng.IntN(7)]
	err := tp.cmd(fmt.Sprintf("chfcmap %s -copyrate %d", m.name, rate), func(d *Driver) error {
		return d.ChFcmap(tp.ctx, m.name, api.ChFcmap{CopyRate: ip(rate)})
	})
	tp.result("chfcmap", err)
}

// verify pauses the writers and reads every volume: online ones must show the model's known
// blocks, offline ones fail with EIO.
func (tp *topo) verify(when string) {
	tp.live.note("verify (%s)", when)
	id := tp.live.begin("main", "", "pause the writers", 0, 0)
	tp.pause.Lock()
	tp.live.end(id)
	defer tp.pause.Unlock()
	tp.count("verify")
	w := tp.world.Load()
	if msg := linksDisagree(w.d, 2*time.Second); msg != "" {
		tp.fail("%s: %s%s", when, msg, tp.mapsLine())
	}
	for _, n := range tp.names {
		v := tp.vols[n]
		dev := w.devs[n]
		v.mu.Lock()
		on := v.online
		v.mu.Unlock()
		if !on {
			id := tp.live.begin("main", n, "verify read (offline)", 0, topoBlock)
			_, err := readDev(dev, 0, topoBlock)
			tp.live.end(id)
			if !errors.Is(err, syscall.EIO) {
				tp.fail("%s: read of offline volume %s: %v, want EIO", when, n, err)
			}
			continue
		}
		id := tp.live.begin("main", n, "verify read", 0, v.size)
		p, err := readDev(dev, 0, v.size)
		tp.live.end(id)
		if err != nil {
			tp.fail("%s: read of online volume %s: %v", when, n, err)
			continue
		}
		v.mu.Lock()
		for b := range v.known {
			if !v.known[b] {
				continue
			}
			lo, hi := int64(b)*topoBlock, min(int64(b+1)*topoBlock, v.size)
			if i := firstDiff(p[lo:hi], v.data[lo:hi]); i >= 0 {
				at := lo + int64(i)
				got := p[at:min(at+16, hi)]
				tp.fail("%s: volume %s differs from the model at byte %d (block %d): got %x want %x; %s%s",
					when, n, at, b, got, v.data[at:at+int64(len(got))], tp.whoWrote(at, got), tp.mapsLine())
				break
			}
		}
		v.mu.Unlock()
	}
}

func readDev(dev blockdev.Device, off, n int64) ([]byte, error) {
	p := make([]byte, n)
	return p, dev.ReadAt(p, off)
}

func (tp *topo) mapsLine() string {
	var b strings.Builder
	for _, f := range tp.world.Load().d.Fcmaps(tp.ctx) {
		fmt.Fprintf(&b, "\n  %s %s→%s %s %d%% rate %d", f.Name, f.SourceName, f.TargetName, f.Status, f.Progress, f.CopyRate)
	}
	return b.String()
}

// ---- restarts ----

// restart closes the driver and opens a new one: cleanly (Close, then Open on the same files),
// or as after kill -9 (the state is cloned as a crash would leave it and a new driver opens the
// clone; the old one is closed afterwards, its acknowledgements no longer count). Host I/O runs
// throughout.
func (tp *topo) restart(crash bool) {
	what := map[bool]string{false: "clean restart", true: "kill -9 restart"}[crash]
	tp.live.note("%s", what)
	id := tp.live.begin("main", "", what, 0, 0)
	defer tp.live.end(id)
	tp.count(what)
	tp.unsettle("")
	old := tp.world.Load()
	tp.worldGen.Add(1)
	var next *topoWorld
	if crash {
		tp.freeze.Lock()
		for _, v := range tp.vols {
			v.mu.Lock()
			for b := range v.known {
				if v.busy[b] > 0 || !v.durable[b] {
					v.known[b] = false
				}
			}
			v.epoch++
			v.mu.Unlock()
		}
		dir := tp.tempDir()
		f, err := os.Create(filepath.Join(dir, catalog.FileName))
		if err == nil {
			err = old.cat.CopyTo(f)
			f.Close()
		}
		if err != nil {
			tp.freeze.Unlock()
			tp.t.Fatalf("copy the catalogue at the crash: %v", err)
		}
		clone := old.fs.CrashClone(crashfs.CrashConfig{UnsyncedPercent: tp.rng.IntN(60), Seed: tp.rng.Uint64()})
		tp.freeze.Unlock()
		tp.shutdownNBD(old)
		cid := tp.live.begin("main", "", "close the crashed driver", 0, 0)
		old.d.Close()
		old.cat.Close()
		tp.live.end(cid)
		next = tp.openWorld(dir, clone)
	} else {
		tp.shutdownNBD(old)
		if err := old.d.Close(); err != nil {
			tp.t.Logf("clean restart: close: %v", err)
		}
		old.cat.Close()
		// What was acknowledged before the close is durable: Close flushes every cache.
		for _, v := range tp.vols {
			v.mu.Lock()
			for b := range v.durable {
				v.durable[b] = v.known[b] && v.busy[b] == 0
			}
			v.mu.Unlock()
		}
		next = tp.openWorld(old.dir, old.fs)
	}
	next.gen = tp.worldGen.Add(1)
	tp.world.Store(next)
	tp.settle()
}
