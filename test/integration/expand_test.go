package integration

import (
	"bufio"
	"context"
	"io"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// nbdsize is the export's size as nbdinfo reports it.
func nbdsize(t *testing.T, uri string) int64 {
	t.Helper()
	out := strings.TrimSpace(sh(t, "nbdinfo", "--size", uri))
	n, err := strconv.ParseInt(out, 10, 64)
	if err != nil {
		t.Fatalf("nbdinfo --size: %q", out)
	}
	return n
}

// lsvdiskCapacity is lsvdisk -bytes's capacity of vol (the detailed view).
func lsvdiskCapacity(t *testing.T, d *daemon, vol string) string {
	t.Helper()
	for _, l := range strings.Split(d.cli("svcinfo", "lsvdisk", "-bytes", "-delim", ":", vol), "\n") {
		if v, ok := strings.CutPrefix(l, "capacity:"); ok {
			return v
		}
	}
	t.Fatalf("lsvdisk %s has no capacity line", vol)
	return ""
}

// heldConn is an NBD connection (nbdsh) opened before an expansion and used after it: it keeps
// the size it negotiated and its requests keep working.
const heldConn = `
import sys
h.pwrite(b"\x3c" * 4096, 8192)
print("size", h.get_size(), flush=True)
sys.stdin.readline()
assert h.pread(4096, 8192) == b"\x3c" * 4096
h.pwrite(b"\x3d" * 4096, 12288)
h.flush()
print("size", h.get_size(), flush=True)
print("held-ok", flush=True)
`

// TestExpandVdisk: expandvdisksize through the SVC command line grows a volume while an NBD
// connection is open; new connections (nbdinfo, qemu-io) see the new size and use the new
// range, which reads zeroes; the old data and the open connection are unaffected; lsvdisk
// -bytes shows the capacity; refusals (a volume in a FlashCopy mapping, bad sizes, a missing
// volume) change nothing; a restart keeps it all.
func TestExpandVdisk(t *testing.T) {
	needTools(t, "nbdinfo", "qemu-io", "nbdsh")
	d := startDaemon(t)
	d.cli("svctask", "mkvdisk", "-name", "ev", "-mdiskgrp", "pool0", "-iogrp", "0", "-size", "16", "-unit", "mb")
	uri := d.uri("ev")
	if got := nbdsize(t, uri); got != 16<<20 {
		t.Fatalf("size before: %d", got)
	}
	qemuIOClean(t, d, "ev", "write -P 0x5a 0 1M", "write -P 0x5b 15M 1M", "flush")

	// A connection open across the expansion.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// nbdsh is `python3 -m nbd`, with Debian's python3 (which has the nbd module).
	held := exec.CommandContext(ctx, "/usr/bin/python3", "-m", "nbd", "-u", uri, "-c", heldConn)
	stdin, _ := held.StdinPipe()
	stdout, _ := held.StdoutPipe()
	var heldErr strings.Builder
	held.Stderr = &heldErr
	if err := held.Start(); err != nil {
		t.Fatal(err)
	}
	lines := bufio.NewScanner(stdout)
	if !lines.Scan() || lines.Text() != "size 16777216" {
		t.Fatalf("held connection: %q %s", lines.Text(), heldErr.String())
	}

	if out := d.cli("svctask", "expandvdisksize", "-size", "8", "-unit", "mb", "ev"); out != "" {
		t.Errorf("expandvdisksize printed %q, want nothing (as SVC)", out)
	}
	d.cli("svctask", "expandvdisksize", "-size", "4", "ev") // the default unit is mb
	d.cli("svctask", "expandvdisksize", "-rsize", "2", "-unit", "gb", "ev")
	const size = 28 << 20
	if got := nbdsize(t, uri); got != size {
		t.Fatalf("size after: %d, want %d", got, size)
	}
	if got := lsvdiskCapacity(t, d, "ev"); got != strconv.Itoa(size) {
		t.Fatalf("lsvdisk -bytes capacity %s, want %d", got, size)
	}
	concise := d.cli("svcinfo", "lsvdisk", "-bytes", "-delim", ":", "-nohdr", "-filtervalue", "name=ev")
	if f := strings.Split(strings.TrimSpace(concise), ":"); len(f) < 8 || f[7] != strconv.Itoa(size) {
		t.Fatalf("lsvdisk concise: %q", concise)
	}

	// The held connection goes on with the size it negotiated.
	io.WriteString(stdin, "go\n")
	stdin.Close()
	var rest []string
	for lines.Scan() {
		rest = append(rest, lines.Text())
	}
	if err := held.Wait(); err != nil || len(rest) != 2 || rest[0] != "size 16777216" || rest[1] != "held-ok" {
		t.Fatalf("held connection after the expansion: %v %q %s", err, rest, heldErr.String())
	}

	qemuIOClean(t, d, "ev", "read -P 0x5a 0 8192", "read -P 0x5a 16384 1032192", "read -P 0x5b 15M 1M", "read -P 0x3c 8192 4096", "read -P 0x3d 12288 4096",
		"read -P 0 16M 12M", "write -P 0x6c 20M 1M", "write -P 0x6d 27M 1M", "flush")
	qemuIOClean(t, d, "ev", "read -P 0x6c 20M 1M", "read -P 0x6d 27M 1M", "read -P 0 16M 4M")

	// Refusals change nothing.
	d.cli("svctask", "mkvdisk", "-name", "src", "-mdiskgrp", "pool0", "-size", "4", "-unit", "mb")
	d.cli("svctask", "mkvdisk", "-name", "tgt", "-mdiskgrp", "pool0", "-size", "4", "-unit", "mb")
	d.cli("svctask", "mkfcmap", "-source", "src", "-target", "tgt")
	for _, c := range []struct {
		args []string
		code string
	}{
		{[]string{"-size", "1", "src"}, "CMMVC9007E"},
		{[]string{"-size", "1", "tgt"}, "CMMVC9007E"},
		{[]string{"-size", "0", "ev"}, "CMMVC5731E"},
		{[]string{"-size", "100", "-unit", "b", "ev"}, "CMMVC5731E"},
		{[]string{"-size", "512", "-unit", "b", "ev"}, "CMMVC5731E"}, // the capacity stays a multiple of 4096
		{[]string{"-size", "99999999", "-unit", "pb", "ev"}, "CMMVC5731E"},
		{[]string{"-size", "300", "-unit", "tb", "ev"}, "CMMVC5731E"},
		{[]string{"-size", "1", "-unit", "xb", "ev"}, "CMMVC5731E"},
		{[]string{"-size", "1", "-rsize", "1", "ev"}, "CMMVC5713E"},
		{[]string{"ev"}, "CMMVC5707E"},
		{[]string{"-size", "1", "nosuch"}, "CMMVC5754E"},
	} {
		_, errs, err := d.run(append([]string{"svctask", "expandvdisksize"}, c.args...)...)
		if err == nil || !strings.HasPrefix(errs, c.code) {
			t.Errorf("expandvdisksize %v: %v %q, want %s", c.args, err, errs, c.code)
		}
	}
	for vol, want := range map[string]int{"ev": size, "src": 4 << 20, "tgt": 4 << 20} {
		if got := lsvdiskCapacity(t, d, vol); got != strconv.Itoa(want) {
			t.Errorf("after the refusals %s has capacity %s, want %d", vol, got, want)
		}
	}
	if got := nbdsize(t, d.uri("src")); got != 4<<20 {
		t.Errorf("src size %d after a refusal", got)
	}

	d.stop()
	d.start()
	if got := nbdsize(t, uri); got != size {
		t.Fatalf("size after restart: %d", got)
	}
	if got := lsvdiskCapacity(t, d, "ev"); got != strconv.Itoa(size) {
		t.Fatalf("lsvdisk -bytes capacity after restart %s", got)
	}
	qemuIOClean(t, d, "ev", "read -P 0x5a 0 8192", "read -P 0x3c 8192 4096", "read -P 0x3d 12288 4096",
		"read -P 0x5a 16384 1032192", "read -P 0x5b 15M 1M", "read -P 0x6c 20M 1M", "read -P 0x6d 27M 1M",
		"read -P 0 16M 4M", "read -P 0 21M 6M")
}
