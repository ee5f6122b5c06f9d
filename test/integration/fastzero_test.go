package integration

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// nbdsh runs a python script under libnbd's nbdsh module with URI set and fails the test
// unless it prints marker.
func nbdsh(t *testing.T, uri, marker, script string) {
	t.Helper()
	out := sh(t, "/usr/bin/python3", "-m", "nbd", "-c", "URI = "+pyString(uri)+"\n"+script)
	if !strings.Contains(out, marker) {
		t.Fatalf("nbdsh script did not finish:\n%s", out)
	}
}

// nbdshFastZeroPlain: on a volume in no mapping, FAST_ZERO is advertised and done: the range
// reads as zeroes, punched (a hole in base:allocation) without NO_HOLE.
const nbdshFastZeroPlain = `
import errno, sys
MiB = 1 << 20
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(URI)
assert h.can_fast_zero(), "FAST_ZERO not advertised"
assert h.can_zero()

def status(length, off):
    got = []
    def cb(ctx, offset, entries, err):
        got.extend(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(length, off, cb)
    return got

assert h.pread(4096, 2 * MiB) == b"\xaa" * 4096
h.zero(2 * MiB, 1 * MiB, nbd.CMD_FLAG_FAST_ZERO)
h.zero(1 * MiB, 5 * MiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
h.zero(1000, 7 * MiB + 5, nbd.CMD_FLAG_FAST_ZERO)  # unaligned
assert h.pread(2 * MiB, 1 * MiB) == bytes(2 * MiB), "fast zero did not zero"
assert h.pread(1 * MiB, 5 * MiB) == bytes(1 * MiB), "fast zero with NO_HOLE did not zero"
assert h.pread(1000, 7 * MiB + 5) == bytes(1000)
assert h.pread(5, 7 * MiB) == b"\xaa" * 5
assert h.pread(4096, 7 * MiB + 4096) == b"\xaa" * 4096
assert h.pread(1 * MiB, 6 * MiB) == b"\xaa" * MiB
h.flush()
st = status(2 * MiB, 1 * MiB)
assert st == [(2 * MiB, 3)], "punched range not a hole: %r" % st
# The NO_HOLE range stays allocated as unwritten extents, which SEEK_DATA may report either way.

h.set_strict_mode(0)
for name, length, off, flags in [
        ("beyond the end", 8192, h.get_size() - 4096, nbd.CMD_FLAG_FAST_ZERO),
        ("huge length", 0xffffffff, 0, nbd.CMD_FLAG_FAST_ZERO)]:
    try:
        h.zero(length, off, flags)
        sys.exit("fast zero %s succeeded" % name)
    except nbd.Error as e:
        if e.errnum != errno.EINVAL:
            sys.exit("fast zero %s: errno %s, want EINVAL" % (name, e.errnum))
for name, fn in [("pread", lambda: h.pread(4096, 0, nbd.CMD_FLAG_FAST_ZERO)),
                 ("trim", lambda: h.trim(4096, 0, nbd.CMD_FLAG_FAST_ZERO)),
                 ("cache", lambda: h.cache(4096, 0, nbd.CMD_FLAG_FAST_ZERO)),
                 ("pwrite", lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_FAST_ZERO))]:
    try:
        fn()
        sys.exit("FAST_ZERO on %s succeeded" % name)
    except nbd.Error as e:
        if e.errnum != errno.EINVAL:
            sys.exit("FAST_ZERO on %s: errno %s, want EINVAL" % (name, e.errnum))
assert h.pread(512, 0) == b"\xaa" * 512, "a refused pwrite wrote"
print("nbdsh-fast-zero-ok")
`

// nbdshFastZeroMapped: the source and the target of a started mapping with copy rate 0, whose
// grains are unsplit: a FAST_ZERO that would copy a grain (any range of the source, part of a
// target grain) is ENOTSUP and changes nothing; the same zeroing without FAST_ZERO is done,
// copy-on-write and all.
const nbdshFastZeroMapped = `
import errno, sys
MiB = 1 << 20
src = nbd.NBD()
src.connect_uri(URI)
tgt = nbd.NBD()
tgt.connect_uri(TGT)
assert src.can_fast_zero() and tgt.can_fast_zero()
for name, h, length, off in [("source", src, 1 * MiB, 2 * MiB),
                             ("source, unaligned", src, 1000, 100),
                             ("target, part of a grain", tgt, 4096, 3 * MiB + 4096)]:
    try:
        h.zero(length, off, nbd.CMD_FLAG_FAST_ZERO)
        sys.exit("fast zero of the %s's unsplit grains succeeded" % name)
    except nbd.Error as e:
        if e.errnum != errno.ENOTSUP:
            sys.exit("fast zero of the %s: errno %s, want ENOTSUP" % (name, e.errnum))
for h in (src, tgt):
    assert h.pread(8 * MiB, 0) == b"\xaa" * (8 * MiB), "a refused fast zero changed data"
src.zero(1 * MiB, 2 * MiB)  # copy-on-write, then zeroes
assert src.pread(1 * MiB, 2 * MiB) == bytes(MiB)
assert tgt.pread(1 * MiB, 2 * MiB) == b"\xaa" * MiB, "target lost its point-in-time data"
src.zero(4096, 2 * MiB + 4096, nbd.CMD_FLAG_FAST_ZERO)  # split now: fast
assert src.pread(4096, 2 * MiB + 4096) == bytes(4096)
print("nbdsh-fast-zero-mapped-ok")
`

func TestNbdshFastZero(t *testing.T) {
	needTools(t, "nbdsh", "qemu-io")
	d := startDaemon(t)
	d.cli("mkvolume", "-name", "fz", "-size", "16M")
	qemuIOClean(t, d, "fz", "write -P 0xaa 0 8M", "flush")
	nbdsh(t, d.uri("fz"), "nbdsh-fast-zero-ok", nbdshFastZeroPlain)
	// The backing file gave the punched 2 MiB back: 8 MiB written, 6 MiB allocated (the range
	// zeroed with NO_HOLE keeps its blocks).
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(d.dir, "vol-0.img"), &st); err != nil {
		t.Fatal(err)
	}
	if alloc := st.Blocks * 512; alloc > 6*mib+64<<10 {
		t.Fatalf("volume file allocates %d bytes after punching 2 MiB of 8 MiB", alloc)
	}

	d.cli("mkvolume", "-name", "src", "-size", "16M")
	d.cli("mkvolume", "-name", "tgt", "-size", "16M")
	qemuIOClean(t, d, "src", "write -P 0xaa 0 8M", "flush")
	d.cli("mkfcmap", "-source", "src", "-target", "tgt", "-name", "m", "-copyrate", "0", "-grainsize", "256")
	d.cli("startfcmap", "-prep", "m")
	nbdsh(t, d.uri("src"), "nbdsh-fast-zero-mapped-ok", "TGT = "+pyString(d.uri("tgt"))+"\n"+nbdshFastZeroMapped)
	if got := field(t, d, "lsfcmap", "m", "status"); got != "copying" {
		t.Fatalf("mapping status %q after the test, want copying", got)
	}
}

// TestQemuFastZero: qemu's NBD client sends FAST_ZERO for a zeroing that must not fall back to
// writing (BDRV_REQ_NO_FALLBACK, qemu-io's write -z -n): done on a plain volume, ENOTSUP on the
// unsplit source of a copying mapping. qemu-img convert -n (qemu 7.2 zeroes the target without
// FAST_ZERO) onto both then leaves each equal to the image, and the target keeps its
// point-in-time data.
func TestQemuFastZero(t *testing.T) {
	needTools(t, "qemu-img", "qemu-io", "fallocate")
	d := startDaemon(t)
	img := filepath.Join(t.TempDir(), "in.img")
	want := make([]byte, 16*mib)
	copy(want[3*mib:], bytes.Repeat([]byte{0x42}, mib))
	copy(want[9*mib+4096:], bytes.Repeat([]byte{0x24}, 8192))
	if err := os.WriteFile(img, want, 0o600); err != nil {
		t.Fatal(err)
	}
	sh(t, "fallocate", "--dig-holes", img)
	for _, vol := range []string{"plain", "src", "tgt"} {
		d.cli("mkvolume", "-name", vol, "-size", "16M")
	}
	qemuIOClean(t, d, "plain", "write -P 0xee 0 16M", "flush")
	qemuIOClean(t, d, "src", "write -P 0xee 0 16M", "flush")
	d.cli("mkfcmap", "-source", "src", "-target", "tgt", "-name", "m", "-copyrate", "0")
	d.cli("startfcmap", "-prep", "m")

	qemuIOClean(t, d, "plain", "write -z -n 1M 1M", "write -z -u -n 4M 1M", "read -P 0 1M 1M", "read -P 0 4M 1M", "read -P 0xee 2M 2M")
	// qemu-io exits non-zero after a failed command: its output is what counts.
	outb, _ := exec.Command("qemu-io", "-f", "raw", "-c", "write -z -n 1M 1M", "-c", "write -z -u -n 4M 1M", d.uri("src")).CombinedOutput()
	out := string(outb)
	if n := strings.Count(out, "write failed: Operation not supported"); n != 2 {
		t.Fatalf("qemu-io fast zeroes of the unsplit source: want 2 ENOTSUP, got:\n%s", out)
	}
	qemuIOClean(t, d, "src", "read -P 0xee 0 16M")

	for _, vol := range []string{"plain", "src"} {
		sh(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", img, d.uri(vol))
		sh(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", img, d.uri(vol))
	}
	qemuIOClean(t, d, "tgt", "read -P 0xee 0 16M")
}
