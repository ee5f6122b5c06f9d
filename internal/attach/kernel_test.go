package attach

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"fcnbd/internal/nbdproto"
)

// TestMain lets the test binary be the attach helper (as `fcnbd attach-helper` is in
// production): startHelper runs it with FCNBD_TEST_HELPER set.
func TestMain(m *testing.M) {
	switch os.Getenv("FCNBD_TEST_HELPER") {
	case "":
		os.Exit(m.Run())
	case "crash":
		fmt.Fprintln(os.Stderr, "helper crashed on purpose")
		os.Exit(7)
	case "hang":
		fmt.Fprintln(os.Stderr, "helper hangs on purpose")
		time.Sleep(time.Minute)
		os.Exit(8)
	}
	fs := flag.NewFlagSet("helper", flag.ExitOnError)
	dev := fs.String("device", "", "")
	export := fs.String("export", "", "")
	unixSock := fs.String("nbd-unix", "", "")
	tcp := fs.String("nbd-tcp", "", "")
	timeout := fs.Duration("timeout", 5*time.Second, "")
	conns := fs.Int("connections", 1, "")
	fs.Parse(os.Args[1:])
	network, addr := "unix", *unixSock
	if *tcp != "" {
		network, addr = "tcp", *tcp
	}
	err := RunHelper(HelperConfig{Device: *dev, Network: network, Address: addr, Export: *export, Connections: *conns,
		Timeout: *timeout, Status: os.NewFile(3, "status"), Commit: os.NewFile(4, "commit"), Log: zerolog.New(os.Stderr)})
	if err != nil {
		os.Exit(1)
	}
	os.Exit(0)
}

// testHelper makes Options run this test binary as the helper, in the given mode.
func testHelper(t *testing.T, mode string) []string {
	t.Setenv("FCNBD_TEST_HELPER", mode)
	return []string{os.Args[0]}
}

func TestHandshake(t *testing.T) {
	sock := serveNBD(t)
	nc, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	info, err := handshake(nc, "v")
	if err != nil {
		t.Fatal(err)
	}
	const flush, fua, trim = nbdproto.FlagSendFlush, nbdproto.FlagSendFUA, nbdproto.FlagSendTrim
	if info.Size != 64<<20 || info.Flags&(nbdproto.FlagHasFlags|flush|fua|trim) != nbdproto.FlagHasFlags|flush|fua|trim || info.Flags&hsFlagReadOnly != 0 {
		t.Fatalf("export info %+v: want 64 MiB, flags HAS_FLAGS|FLUSH|FUA|TRIM, writable", info)
	}
	if info.MinBlock != 1 || info.PrefBlock != 4096 || info.MaxBlock != 32<<20 {
		t.Fatalf("block sizes %+v", info)
	}
	// The connection is in the transmission phase: a DISC request is accepted and the server
	// closes; nothing of the handshake is left unread.
	disc := make([]byte, 28)
	copy(disc, []byte{0x25, 0x60, 0x95, 0x13, 0, 0, 0, 2})
	if _, err := nc.Write(disc); err != nil {
		t.Fatal(err)
	}
	nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := nc.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("after DISC: read %d bytes, %v; want EOF", n, err)
	}

	nc2, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer nc2.Close()
	if _, err := handshake(nc2, "missing"); !errors.Is(err, errNoExport) {
		t.Fatalf("handshake for an unknown export: %v, want errNoExport", err)
	}
}

func TestKernelBlockSize(t *testing.T) {
	for _, c := range []struct {
		info exportInfo
		want uint32
	}{
		{exportInfo{Size: 64 << 20, MinBlock: 1, PrefBlock: 4096, MaxBlock: 32 << 20}, 4096},
		{exportInfo{Size: 64 << 20}, 4096},
		{exportInfo{Size: 64<<20 + 512, MinBlock: 1, PrefBlock: 4096}, 512},
		{exportInfo{Size: 64 << 20, MinBlock: 1, PrefBlock: 1024}, 1024},
		{exportInfo{Size: 64 << 20, MinBlock: 1, PrefBlock: 1}, 512},
		{exportInfo{Size: 1000}, 0},
		{exportInfo{Size: 64 << 20, MinBlock: 8192, PrefBlock: 8192}, 0},
	} {
		got, err := kernelBlockSize(c.info)
		if got != c.want || (err != nil) != (c.want == 0) {
			t.Errorf("kernelBlockSize(%+v) = %d, %v; want %d", c.info, got, err, c.want)
		}
	}
}

// TestStartHelperFailures: the helper's errors reach the caller with their reason, and the
// helper is gone when startHelper returns. These fail before any device is touched, so they run
// without the kernel NBD driver.
func TestStartHelperFailures(t *testing.T) {
	sock := serveNBD(t)
	dir := t.TempDir()
	ctx := context.Background()
	for _, c := range []struct {
		name, mode, socket, tcp, volume, want string
	}{
		{"unreachable", "run", filepath.Join(dir, "nothing.sock"), "", "v", "not reachable"},
		{"unreachable tcp", "run", "", "127.0.0.1:1", "v", "not reachable"},
		{"unknown export", "run", sock, "", "missing", "no such export"},
		{"crash", "crash", sock, "", "v", "helper crashed on purpose"},
	} {
		t.Run(c.name, func(t *testing.T) {
			o := Options{Dir: dir, Timeout: 3 * time.Second, Helper: testHelper(t, c.mode)}
			rec := &Record{ID: "x-0", Volume: c.volume, Socket: c.socket, TCP: c.tcp}
			start := time.Now()
			_, _, err := startHelper(ctx, rec, "/dev/nbd-test-never-opened", o)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("startHelper: %v, want an error containing %q", err, c.want)
			}
			if errors.Is(err, errBusy) {
				t.Fatalf("startHelper: %v is not a busy device", err)
			}
			if d := time.Since(start); d > 3*time.Second {
				t.Fatalf("startHelper took %v to report the failure", d)
			}
		})
	}
}

// TestAttachNoNBDDevice: MethodNBD without a free /dev/nbdN is a clear error and leaves nothing.
func TestAttachNoNBDDevice(t *testing.T) {
	if _, err := os.Stat("/dev/nbd0"); err == nil {
		t.Skip("this machine has /dev/nbd0")
	}
	old := NBDLockPath
	NBDLockPath = filepath.Join(t.TempDir(), "nbd-attach.lock")
	t.Cleanup(func() { NBDLockPath = old })
	opts := Options{Dir: filepath.Join(t.TempDir(), "attach"), Socket: "/nonexistent.sock", Method: MethodNBD}
	_, err := Attach(context.Background(), "v", opts)
	if err == nil || !strings.Contains(err.Error(), "the kernel has no NBD device") {
		t.Fatalf("Attach: %v, want: the kernel has no NBD device", err)
	}
	if ents, _ := os.ReadDir(opts.Dir); len(ents) != 0 {
		t.Fatalf("left behind: %v", ents)
	}
	if _, err := Attach(context.Background(), "v", Options{Dir: opts.Dir, Method: "bogus"}); err == nil || !strings.Contains(err.Error(), "unknown attach method") {
		t.Fatalf("Attach with a bogus method: %v", err)
	}
	if _, err := Attach(context.Background(), "v", Options{Dir: opts.Dir, Method: MethodNBDFuse, Connections: 2}); err == nil || !strings.Contains(err.Error(), "connections") {
		t.Fatalf("Attach nbdfuse with 2 connections: %v", err)
	}
	if _, err := Attach(context.Background(), "v", Options{Dir: opts.Dir, Method: MethodNBD, TCP: "nohost"}); err == nil || !strings.Contains(err.Error(), "TCP address") {
		t.Fatalf("Attach with a bad TCP address: %v", err)
	}
}

func TestHelperAlive(t *testing.T) {
	if helperAlive(os.Getpid(), "/dev/nbd0") {
		t.Fatal("the test process counts as the helper of /dev/nbd0")
	}
	if helperAlive(0, "/dev/nbd0") || helperAlive(1<<30, "/dev/nbd0") {
		t.Fatal("a pid that cannot be the helper counts as alive")
	}
	if n, err := nbdIndex("/dev/nbd12"); n != 12 || err != nil {
		t.Fatalf("nbdIndex: %d, %v", n, err)
	}
	if _, err := nbdIndex("/dev/loop0"); err == nil {
		t.Fatal("nbdIndex accepted /dev/loop0")
	}
}

// TestAwaitCommit: the helper keeps the device only on an explicit commit; the attaching
// process's end (EOF) or silence is not one.
func TestAwaitCommit(t *testing.T) {
	pipe := func() (*os.File, *os.File) {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		return r, w
	}
	r, w := pipe()
	fmt.Fprintln(w, commitLine)
	if err := awaitCommit(r, time.Second); err != nil {
		t.Fatalf("commit: %v", err)
	}
	w.Close()
	r, w = pipe()
	w.Close()
	if err := awaitCommit(r, time.Second); err == nil {
		t.Fatal("EOF counted as a commit")
	}
	r, w = pipe()
	defer w.Close()
	start := time.Now()
	if err := awaitCommit(r, 100*time.Millisecond); err == nil || time.Since(start) > 2*time.Second {
		t.Fatalf("silence: %v after %v", err, time.Since(start))
	}
}

// TestIoctlNumbers: whichever file defines them (go-nbd's, from cgo or for amd64, or ours),
// the NBD ioctls are _IO(0xab, n) of linux/nbd.h.
func TestIoctlNumbers(t *testing.T) {
	io := func(n uintptr) uintptr { return 0xab<<8 | n }
	for _, c := range []struct {
		name      string
		got, want uintptr
	}{
		{"NBD_SET_SOCK", ioctlSetSock, io(0)},
		{"NBD_SET_BLKSIZE", ioctlSetBlksize, io(1)},
		{"NBD_DO_IT", ioctlDoIt, io(3)},
		{"NBD_CLEAR_SOCK", ioctlClearSock, io(4)},
		{"NBD_SET_SIZE_BLOCKS", ioctlSetSizeBlocks, io(7)},
		{"NBD_SET_FLAGS", nbdSetFlags, io(10)},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
}

// TestDetachRecords: Detach of records it cannot see the kernel side of, without the kernel NBD
// driver: a MethodNBD record from before MethodNBDClient existed (no helper pid) is undone with
// nbd-client -d; a MethodNBD record whose helper is gone is dropped without touching the device.
func TestDetachRecords(t *testing.T) {
	if _, err := os.Stat("/sys/block/nbd7"); err == nil {
		t.Skip("this machine has /dev/nbd7")
	}
	bin := t.TempDir()
	calls := filepath.Join(bin, "calls")
	script := "#!/bin/sh\necho \"$@\" >>" + calls + "\n"
	if err := os.WriteFile(filepath.Join(bin, "nbd-client"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+":"+os.Getenv("PATH"))
	dir := t.TempDir()
	opts := Options{Dir: dir, Timeout: time.Second}
	ctx := context.Background()

	if err := writeRecord(dir, Record{ID: "old-0", Volume: "old", Device: "/dev/nbd7", Method: MethodNBD}); err != nil {
		t.Fatal(err)
	}
	if err := Detach(ctx, "nbd7", opts); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(calls); strings.TrimSpace(string(got)) != "-d /dev/nbd7" {
		t.Fatalf("nbd-client calls %q, want -d /dev/nbd7", got)
	}

	os.Remove(calls)
	if err := writeRecord(dir, Record{ID: "dead-0", Volume: "dead", Device: "/dev/nbd7", Method: MethodNBD, HelperPID: 1 << 30}); err != nil {
		t.Fatal(err)
	}
	if err := Detach(ctx, "/dev/nbd7", opts); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(calls); err == nil {
		t.Fatal("nbd-client ran for a MethodNBD record with a helper pid")
	}
	if recs, _ := List(dir); len(recs) != 0 {
		t.Fatalf("records left: %+v", recs)
	}
}

// TestStartHelperCanceled: an attach interrupted while its helper sets up returns at once with
// the context's error, and the helper is gone (asked with SIGTERM).
func TestStartHelperCanceled(t *testing.T) {
	o := Options{Dir: t.TempDir(), Timeout: 30 * time.Second, Helper: testHelper(t, "hang")}
	rec := &Record{ID: "x-0", Volume: "v", Socket: "/nonexistent"}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, _, err := startHelper(ctx, rec, "/dev/nbd-test-never-opened", o)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("startHelper: %v, want the context's error", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("startHelper took %v after its context ended", d)
	}
}
