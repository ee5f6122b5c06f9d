package integration

// FlashCopy of mounted ext4 filesystems under load, through real kernel block devices: on this
// host with `fcnbd attach` (nbdfuse + loop), and in the test VM with the kernel NBD driver. These
// are the end-to-end checks of docs/flashcopy.md §6 (the fence): every write acknowledged before
// the start is in every target of the group, none made after it is, and a group of two
// filesystems is dependent-write consistent.

import (
	"bufio"
	"crypto/rand"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fcSeed is the seed of a test's random timings and sizes: $FCNBD_FC_SEED, else the clock. It
// is logged so that a failing run can be repeated.
func fcSeed(t *testing.T) uint64 {
	t.Helper()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("FCNBD_FC_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("FCNBD_FC_SEED=%q: %v", s, err)
		}
		seed = v
	}
	t.Logf("seed %d (set FCNBD_FC_SEED to repeat)", seed)
	return seed
}

// fcKernel makes the mounts and attachments of one test and undoes them when it ends: mounts
// first (last made, first undone), then detaches what is still attached. Attachments are recorded
// in a private --attach-dir, so that neither this test nor its cleanup ever touches a device
// another test (or engineer) attached: loop devices are reused as soon as they are free.
type fcKernel struct {
	t      *testing.T
	d      *daemon
	dir    string
	mounts []string
	devs   map[string]string // device → volume
}

func newFCKernel(t *testing.T, d *daemon) *fcKernel {
	k := &fcKernel{t: t, d: d, dir: t.TempDir(), devs: map[string]string{}}
	t.Cleanup(k.cleanup)
	return k
}

func (k *fcKernel) attach(vol string) string {
	k.t.Helper()
	dev := strings.TrimSpace(k.d.cli("attach", "--nbd-unix", k.d.nbdSock, "--attach-dir", k.dir, vol))
	if !strings.HasPrefix(dev, "/dev/") {
		k.t.Fatalf("fcnbd attach %s printed %q, want a /dev/ path", vol, dev)
	}
	k.devs[dev] = vol
	return dev
}

func (k *fcKernel) detach(dev string) {
	k.t.Helper()
	k.d.cli("detach", "--attach-dir", k.dir, dev)
	delete(k.devs, dev)
}

func (k *fcKernel) mount(dev, dir string, opts ...string) {
	k.t.Helper()
	sh(k.t, "mount", append(append([]string{"-t", "ext4"}, opts...), dev, dir)...)
	k.mounts = append(k.mounts, dir)
}

func (k *fcKernel) umount(dir string) {
	k.t.Helper()
	sh(k.t, "umount", dir)
	for i, m := range k.mounts {
		if m == dir {
			k.mounts = append(k.mounts[:i], k.mounts[i+1:]...)
			break
		}
	}
}

func (k *fcKernel) cleanup() {
	for i := len(k.mounts) - 1; i >= 0; i-- {
		if out, err := exec.Command("umount", k.mounts[i]).CombinedOutput(); err != nil {
			k.t.Errorf("cleanup: umount %s: %v: %s", k.mounts[i], err, out)
			exec.Command("umount", "-l", k.mounts[i]).Run()
		}
	}
	for dev := range k.devs {
		if _, errs, err := k.d.run("detach", "--attach-dir", k.dir, dev); err != nil {
			k.t.Errorf("cleanup: fcnbd detach %s: %v: %s", dev, err, errs)
		}
	}
}

// fcLoad is the dependent-write workload on two mounted filesystems A (0) and B (1). For each n:
// file n on A (random content) is written and fsynced, then "n sha256" is appended to A's log
// and the log fsynced; then the same on B. So B's record n exists only after A's record n is
// durable, and A's record n+1 only after B's record n is.
type fcLoad struct {
	dirs    [2]string
	logs    [2]*os.File
	next    int
	started [2]atomic.Int64 // highest n whose file on the volume has begun to be written
	done    [2]atomic.Int64 // highest n whose record on the volume has been fsynced
	stop    chan struct{}
	result  chan error
}

func fcFileName(n int) string { return fmt.Sprintf("f%06d", n) }

func openFCLoad(t *testing.T, dirs [2]string) *fcLoad {
	t.Helper()
	w := &fcLoad{dirs: dirs}
	for i, dir := range dirs {
		f, err := os.OpenFile(filepath.Join(dir, "log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		w.logs[i] = f
	}
	return w
}

func (w *fcLoad) close() {
	for _, f := range w.logs {
		f.Close()
	}
}

// run starts the workload on its own goroutine with file sizes of 1 to maxBytes bytes.
func (w *fcLoad) run(rng *mrand.Rand, maxBytes int) {
	w.stop, w.result = make(chan struct{}), make(chan error, 1)
	go func() { w.result <- w.loop(rng, maxBytes) }()
}

// halt stops the workload after its current step and returns its error.
func (w *fcLoad) halt() error {
	close(w.stop)
	return <-w.result
}

func (w *fcLoad) loop(rng *mrand.Rand, maxBytes int) error {
	buf := make([]byte, maxBytes)
	for {
		select {
		case <-w.stop:
			return nil
		default:
		}
		w.next++
		n := w.next
		for i, dir := range w.dirs {
			w.started[i].Store(int64(n))
			data := buf[:1+rng.IntN(maxBytes)]
			rand.Read(data)
			if err := fcWriteSync(filepath.Join(dir, fcFileName(n)), data); err != nil {
				return err
			}
			if _, err := fmt.Fprintf(w.logs[i], "%d %s\n", n, sum(data)); err != nil {
				return err
			}
			if err := w.logs[i].Sync(); err != nil {
				return err
			}
			w.done[i].Store(int64(n))
		}
	}
}

func fcWriteSync(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// fcCheckLog checks the log of a mounted filesystem (a source, or a target's point-in-time copy)
// against the source's own log: the records are numbered 1, 2, … without a gap, each is
// byte-identical to the source's record of that number, and every file a record names is there
// with the recorded sha256. It returns the number of records.
func fcCheckLog(t *testing.T, dir, sourceLog string) int {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(dir, "log"))
	if err != nil {
		t.Fatalf("%s: %v", dir, err)
	}
	src := strings.Split(sourceLog, "\n")
	lines := strings.Split(string(data), "\n")
	if tail := lines[len(lines)-1]; tail != "" {
		// An append that the workload had not fsynced yet may be cut anywhere: it claims nothing.
		t.Logf("%s/log: incomplete last record %q ignored", dir, tail)
	}
	lines = lines[:len(lines)-1]
	for i, l := range lines {
		var n int
		var s string
		if _, err := fmt.Sscanf(l, "%d %s", &n, &s); err != nil || n != i+1 || len(s) != 64 {
			t.Fatalf("%s/log: record %d is %q, want \"%d <sha256>\"", dir, i+1, l, i+1)
		}
		if i >= len(src) || src[i] != l {
			t.Fatalf("%s/log: record %d is %q, the source's is %q", dir, n, l, src[min(i, len(src)-1)])
		}
		b, err := os.ReadFile(filepath.Join(dir, fcFileName(n)))
		if err != nil {
			t.Fatalf("%s/log claims file %d complete: %v", dir, n, err)
		}
		if got := sum(b); got != s {
			t.Fatalf("%s/%s: sha256 %s (%d bytes), its log record says %s", dir, fcFileName(n), got, len(b), s)
		}
	}
	return len(lines)
}

// fcCheckTargets attaches the two targets of a round, makes sure each is the copy of a mounted
// filesystem (needs_recovery) when fresh is set, mounts them read-write so that the journal is
// replayed, checks their logs against the sources' logs (srcLogs), unmounts, runs e2fsck -fn and
// detaches. It returns the number of complete records on each.
func fcCheckTargets(t *testing.T, k *fcKernel, vols [2]string, srcLogs [2]string, fresh bool) [2]int {
	t.Helper()
	var last [2]int
	var devs [2]string
	for i, vol := range vols {
		devs[i] = k.attach(vol)
		if fresh {
			out := sh(t, "dumpe2fs", "-h", devs[i])
			if !strings.Contains(out, "needs_recovery") {
				t.Errorf("target %s is not marked needs_recovery: not a copy of a mounted ext4?", vol)
			}
		}
		mnt := t.TempDir()
		k.mount(devs[i], mnt)
		last[i] = fcCheckLog(t, mnt, srcLogs[i])
		k.umount(mnt)
	}
	for i, dev := range devs {
		out, err := exec.Command("e2fsck", "-fn", dev).CombinedOutput()
		if err != nil {
			t.Errorf("e2fsck -fn on target %s (%s) after journal replay: %v\n%s", vols[i], dev, err, out)
		}
		k.detach(dev)
	}
	return last
}

// fcCheckCut asserts what the fence promises for one round: pre are the records fsynced before
// the start command began, post the records begun before it returned, last what the targets hold.
func fcCheckCut(t *testing.T, round string, pre, post, last [2]int) {
	t.Helper()
	for i, v := range []string{"A", "B"} {
		if last[i] < pre[i] {
			t.Errorf("%s: target of %s holds %d records, but %d were fsynced before the start command began", round, v, last[i], pre[i])
		}
		if last[i] > post[i] {
			t.Errorf("%s: target of %s holds %d records, but only %d had been begun when the start command returned", round, v, last[i], post[i])
		}
	}
	// B's record n is written after A's record n is durable, A's n+1 after B's n: a consistent
	// cut of the group has lastB <= lastA <= lastB+1.
	if last[1] > last[0] {
		t.Errorf("%s: dependent-write order broken: B's copy claims %d records, A's copy only %d", round, last[1], last[0])
	}
	if last[0] > last[1]+1 {
		t.Errorf("%s: dependent-write order broken: A's copy claims %d records, B's copy only %d", round, last[0], last[1])
	}
}

func fcReadLogs(t *testing.T, dirs [2]string) [2]string {
	t.Helper()
	var logs [2]string
	for i, dir := range dirs {
		b, err := os.ReadFile(filepath.Join(dir, "log"))
		if err != nil {
			t.Fatal(err)
		}
		logs[i] = string(b)
	}
	return logs
}

// TestFCGroupExt4Consistency: two ext4 filesystems A and B, mounted through `fcnbd attach`
// (nbdfuse + loop on this host), take the dependent-write workload (fcLoad) while a consistency
// group of nocopy mappings A→A<r>, B→B<r> is started with `startfcconsistgrp -prep`, round after
// round with random timing and file sizes (each round adds a target to each source's dependency
// chain). In every round, the targets, mounted read-write (journal replay), hold every record
// fsynced before the start command began and none begun after it returned, every record they
// hold names a file with the right content, B's copy never claims more than A's (nor A's more than
// one past B's), and e2fsck -fn is clean after the unmount. At the end the oldest targets, which
// now read through the whole chain, are checked again and give the same answer, and the sources
// themselves are clean and hold every record.
func TestFCGroupExt4Consistency(t *testing.T) {
	needRoot(t)
	needTools(t, "mkfs.ext4", "e2fsck", "dumpe2fs", "mount", "umount", "nbdfuse", "losetup", "fusermount3")
	_, fuseErr := os.Stat("/dev/fuse")
	need(t, "/dev/fuse does not exist", fuseErr == nil)
	rounds := 5
	if s := os.Getenv("FCNBD_FC_ROUNDS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("FCNBD_FC_ROUNDS=%q", s)
		}
		rounds = n
	}
	seed := fcSeed(t)
	rng := mrand.New(mrand.NewPCG(seed, 1))
	wrng := mrand.New(mrand.NewPCG(seed, 2)) // the workload goroutine's own

	d := startDaemon(t)
	k := newFCKernel(t, d)
	const size = "64M"
	var mnts [2]string
	var srcDevs [2]string
	for i, vol := range []string{"A", "B"} {
		d.cli("mkvolume", "-name", vol, "-size", size)
		srcDevs[i] = k.attach(vol)
		sh(t, "mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", srcDevs[i])
		mnts[i] = t.TempDir()
		k.mount(srcDevs[i], mnts[i])
	}
	w := openFCLoad(t, mnts)
	defer w.close()

	maxKiB := []int{4, 64, 16, 256, 1, 128}
	type roundResult struct {
		vols [2]string
		last [2]int
	}
	var results []roundResult
	for r := range rounds {
		name := fmt.Sprintf("round %d", r)
		tgts := [2]string{fmt.Sprintf("A%d", r), fmt.Sprintf("B%d", r)}
		grp := fmt.Sprintf("G%d", r)
		d.cli("mkfcconsistgrp", "-name", grp)
		for i, src := range []string{"A", "B"} {
			d.cli("mkvolume", "-name", tgts[i], "-size", size)
			d.cli("mkfcmap", "-source", src, "-target", tgts[i], "-consistgrp", grp, "-copyrate", "0")
		}
		maxBytes := maxKiB[r%len(maxKiB)] * 1024
		delay := time.Duration(50+rng.IntN(950)) * time.Millisecond
		after := time.Duration(rng.IntN(300)) * time.Millisecond
		w.run(wrng, maxBytes)
		time.Sleep(delay)
		pre := [2]int{int(w.done[0].Load()), int(w.done[1].Load())}
		t0 := time.Now()
		out, errs, err := d.run("startfcconsistgrp", "-prep", grp)
		took := time.Since(t0)
		post := [2]int{int(w.started[0].Load()), int(w.started[1].Load())}
		time.Sleep(after)
		werr := w.halt()
		if err != nil {
			t.Fatalf("%s: startfcconsistgrp -prep %s: %v\n%s%s", name, grp, err, out, errs)
		}
		if werr != nil {
			t.Fatalf("%s: workload: %v", name, werr)
		}
		if s := field(t, d, "lsfcconsistgrp", grp, "status"); s != "copying" {
			t.Fatalf("%s: group %s is %s after the start, want copying", name, grp, s)
		}
		hold := field(t, d, "lsfcconsistgrp", grp, "last_hold_ms")

		last := fcCheckTargets(t, k, tgts, fcReadLogs(t, mnts), true)
		t.Logf("%s: files up to %d KiB, start after %v took %v (hold %s ms); fsynced before %v, begun by its end %v, targets hold %v, sources now %d",
			name, maxBytes/1024, delay, took.Round(time.Millisecond), hold, pre, post, last, w.next)
		fcCheckCut(t, name, pre, post, last)
		if t.Failed() {
			t.FailNow()
		}
		results = append(results, roundResult{tgts, last})
	}

	// The sources: every record there, clean after unmount.
	logs := fcReadLogs(t, mnts)
	for i, mnt := range mnts {
		if n := fcCheckLog(t, mnt, logs[i]); n != w.next {
			t.Errorf("source %d holds %d records, the workload wrote %d", i, n, w.next)
		}
	}
	w.close()
	for i, mnt := range mnts {
		k.umount(mnt)
		sh(t, "e2fsck", "-fn", srcDevs[i])
		k.detach(srcDevs[i])
	}
	// The oldest targets read every grain they do not hold through all the newer ones.
	first := results[0]
	if again := fcCheckTargets(t, k, first.vols, logs, false); again != first.last {
		t.Errorf("the round 0 targets now hold %v records, %v when they were first checked", again, first.last)
	}
}

// TestVMFCGroupExt4Consistency is the same through the kernel NBD driver in the test VM, and the
// kernel I/O issue's check that a FlashCopy of the guest's mounted filesystem taken from the host
// while the guest writes holds every file the guest had fsynced before the start command began.
// The guest (guest/fc-group-ext4.sh) attaches A and B as /dev/nbd0 and /dev/nbd1, makes ext4,
// mounts both and runs the dependent-write workload; over the control port it tells the host it
// is ready, the host (after a random delay) announces the start, the guest notes what it has
// fsynced and answers GO, the host runs `startfcconsistgrp -prep` and answers STARTED, and the
// guest notes what it has begun. The guest then stops the workload, attaches the targets as
// /dev/nbd2 and /dev/nbd3, mounts them (journal replay), and checks what fcCheckCut checks;
// e2fsck -fn is clean on all four devices.
func TestVMFCGroupExt4Consistency(t *testing.T) {
	vmRequire(t)
	rng := mrand.New(mrand.NewPCG(fcSeed(t), 1))
	d := startDaemon(t)
	for _, v := range []string{"A", "B", "At", "Bt"} {
		d.cli("mkvolume", "-name", v, "-size", "32M")
	}
	d.cli("mkfcconsistgrp", "-name", "G")
	d.cli("mkfcmap", "-source", "A", "-target", "At", "-consistgrp", "G", "-copyrate", "0")
	d.cli("mkfcmap", "-source", "B", "-target", "Bt", "-consistgrp", "G", "-copyrate", "0")

	ctlPath := filepath.Join(t.TempDir(), "ctl.sock")
	ln, err := net.Listen("unix", ctlPath)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	delay := time.Duration(300+rng.IntN(1500)) * time.Millisecond
	var (
		wg       sync.WaitGroup
		startErr error
		starts   int
		took     time.Duration
	)
	wg.Add(1)
	go func() { // the host side of the guest's control port
		defer wg.Done()
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Minute))
		rd := bufio.NewReader(c)
		expect := func(want string) bool {
			line, err := rd.ReadString('\n')
			if strings.TrimSpace(line) != want {
				startErr = fmt.Errorf("control port: got %q (%v), want %s", line, err, want)
				return false
			}
			return true
		}
		if !expect("READY") {
			return
		}
		time.Sleep(delay)
		fmt.Fprintf(c, "ABOUT-TO-START\n")
		if !expect("GO") {
			return
		}
		t0 := time.Now()
		out, errs, err := d.run("startfcconsistgrp", "-prep", "G")
		took = time.Since(t0)
		if err != nil {
			startErr = fmt.Errorf("startfcconsistgrp -prep G: %v\n%s%s", err, out, errs)
			fmt.Fprintf(c, "FAILED\n")
			return
		}
		starts++
		fmt.Fprintf(c, "STARTED\n")
	}()
	r := runVM(t, vmGuestScript(t, "fc-group-ext4.sh"),
		VMForward(10809, "unix:"+d.nbdSock), VMForward(10810, "unix:"+ctlPath),
		VMEnv("SRC_A", "A"), VMEnv("SRC_B", "B"), VMEnv("TGT_A", "At"), VMEnv("TGT_B", "Bt"),
		VMEnv("MAX_KIB", "64"), VMTimeout(3*time.Minute))
	ln.Close()
	wg.Wait()
	if startErr != nil {
		t.Error(startErr) // after the guest's own account of a failure, if there is one
	}
	requireVMOK(t, r)
	if startErr != nil {
		t.FailNow()
	}
	if starts != 1 {
		t.Fatalf("the guest never asked for the start")
	}
	res := r.Lines("GUEST-FCRESULT ")
	if len(res) != 1 {
		t.Fatalf("guest printed %d GUEST-FCRESULT lines, want 1", len(res))
	}
	if s := field(t, d, "lsfcconsistgrp", "G", "status"); s != "copying" {
		t.Fatalf("group G is %s, want copying", s)
	}
	t.Logf("start after %v took %v (hold %s ms); guest: %s", delay, took.Round(time.Millisecond),
		field(t, d, "lsfcconsistgrp", "G", "last_hold_ms"), res[0])
}

// TestVMFcnbdAttach runs `fcnbd attach` where it uses the kernel NBD driver: in the test VM, with
// the static fcnbd binary as both daemon and CLI (attach reaches the daemon through its local
// control and NBD Unix sockets, so daemon and attach run on the same machine, as in production).
// The guest (guest/fc-attach.sh) attaches a volume with the default method (nbd: fcnbd's own
// helper process holds the device, set up through go-nbd's ioctls; a /dev/nbdN is printed, the
// kernel has the export's FLUSH and TRIM), makes ext4, writes files, sees detach refused while
// mounted, unmounts, detaches (the device is released, the helper gone), attaches again:
// e2fsck -fn is clean and the checksums equal; the same over --nbd-tcp and with --method
// nbd-client, whose writes the nbd method then reads; an unreachable daemon fails clearly and
// leaves nothing; concurrent attaches get different devices; the daemon exits cleanly on
// SIGTERM; a helper killed with SIGKILL, or whose daemon stopped, still detaches cleanly; a
// helper not committed by fcnbd attach disconnects its device.
func TestVMFcnbdAttach(t *testing.T) {
	vmRequire(t)
	bin := filepath.Join(t.TempDir(), "fcnbd")
	cmd := exec.Command("go", "build", "-o", bin, "fcnbd/cmd/fcnbd")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build (static) fcnbd: %v\n%s", err, out)
	}
	r := runVM(t, vmGuestScript(t, "fc-attach.sh"), VMFile("/usr/local/bin/fcnbd", bin),
		VMTimeout(5*time.Minute))
	requireVMOK(t, r)
	attaches := r.Lines("GUEST-ATTACHED ")
	methods := map[string]int{}
	for _, a := range attaches {
		method, dev, _ := strings.Cut(a, " ")
		methods[method]++
		if !strings.HasPrefix(dev, "/dev/nbd") {
			t.Errorf("fcnbd attach (%s) in the guest printed %q, want /dev/nbdN (the kernel NBD driver)", method, dev)
		}
	}
	if len(attaches) != 7 || methods["nbd"] != 6 || methods["nbd-client"] != 1 {
		t.Fatalf("guest attached %d times (%v), want 6 with method nbd and 1 with nbd-client", len(attaches), methods)
	}
	for _, l := range r.Lines("GUEST-INTERRUPT ") {
		t.Logf("attach interrupted after (s): %s", l)
	}
	for _, l := range r.Lines("GUEST-TIMING ") {
		t.Logf("guest timing (TCG, 1 connection): %s", l)
	}
	if len(r.Lines("GUEST-STEP: ok ")) != 1 {
		t.Fatalf("guest script did not reach its end")
	}
}
