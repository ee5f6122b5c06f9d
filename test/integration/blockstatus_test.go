package integration

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
)

type mapEntry struct {
	Offset int64  `json:"offset"`
	Length int64  `json:"length"`
	Type   int    `json:"type"`
	Desc   string `json:"description"`
}

// nbdinfoMap returns `nbdinfo --map --json` of a volume: base:allocation, from offset 0 to the
// end in order.
func nbdinfoMap(t *testing.T, d *daemon, vol string) []mapEntry {
	t.Helper()
	out := sh(t, "nbdinfo", "--map", "--json", d.uri(vol))
	var m []mapEntry
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("nbdinfo --map --json: %v\n%s", err, out)
	}
	return m
}

// mapType returns the type (0 data, 3 hole and zero) the map gives to every byte of
// [off, off+n), failing if they differ.
func mapType(t *testing.T, m []mapEntry, off, n int64) int {
	t.Helper()
	typ := -1
	for _, e := range m {
		if e.Offset+e.Length <= off || e.Offset >= off+n {
			continue
		}
		if typ >= 0 && e.Type != typ {
			t.Fatalf("[%d,+%d) is not one type in the map %+v", off, n, m)
		}
		typ = e.Type
	}
	return typ
}

const mib = 1 << 20

// TestNbdinfoMap: nbdinfo --map shows a sparse volume's holes and data exactly, and a
// FlashCopy target's map is that of its point-in-time image — the source's allocation where
// it reads through the source, its own where it has written — not that of its own empty file.
func TestNbdinfoMap(t *testing.T) {
	needTools(t, "nbdinfo", "qemu-io")
	checkChainMaps(t, "nbdinfo --map", nbdinfoMap)
}

// checkChainMaps runs the map scenario of TestNbdinfoMap and TestQemuImgMap through one tool's
// view of base:allocation: mapOf returns a volume's map with adjacent entries of one type merged.
func checkChainMaps(t *testing.T, tool string, mapOf func(*testing.T, *daemon, string) []mapEntry) {
	d := startDaemon(t)
	d.cli("mkvolume", "-name", "src", "-size", "64M")
	d.cli("mkvolume", "-name", "tgt", "-size", "64M")
	qemuIOClean(t, d, "src", "write -P 0xaa 1M 2M", "write -P 0xbb 40M 64k", "flush")

	want := []mapEntry{
		{0, 1 * mib, 3, "hole,zero"},
		{1 * mib, 2 * mib, 0, "data"},
		{3 * mib, 37 * mib, 3, "hole,zero"},
		{40 * mib, 64 << 10, 0, "data"},
		{40*mib + 64<<10, 24*mib - 64<<10, 3, "hole,zero"},
	}
	if got := mapOf(t, d, "src"); !slices.Equal(got, want) {
		t.Fatalf("%s of the source:\n%+v\nwant\n%+v", tool, got, want)
	}
	if got := mapOf(t, d, "tgt"); !slices.Equal(got, []mapEntry{{0, 64 * mib, 3, "hole,zero"}}) {
		t.Fatalf("%s of the new target: %+v, want one hole", tool, got)
	}

	d.cli("mkfcmap", "-source", "src", "-target", "tgt", "-name", "snap", "-copyrate", "0")
	d.cli("startfcmap", "-prep", "snap")
	if got := mapOf(t, d, "tgt"); !slices.Equal(got, want) {
		t.Fatalf("%s of the started target (its image is the source's):\n%+v\nwant\n%+v", tool, got, want)
	}
	// The source moves on: trimmed where the target still needs its data, written elsewhere.
	// The target writes a range of its own. (Where the source's later write copied a grain of
	// holes into the target, the target's grain is allocated: data, which promises nothing.)
	qemuIOClean(t, d, "src", "discard 1M 2M", "write -P 0xcc 50M 64k", "flush")
	qemuIOClean(t, d, "tgt", "write -P 0xdd 10M 64k", "flush")
	tm := mapOf(t, d, "tgt")
	for _, c := range []struct {
		off, n int64
		typ    int
		why    string
	}{
		{1 * mib, 2 * mib, 0, "data the source held at the start, copied before its trim"},
		{40 * mib, 64 << 10, 0, "data read through the source"},
		{10 * mib, 64 << 10, 0, "the target's own write"},
		{0, 1 * mib, 3, "a hole in both"},
		{20 * mib, 10 * mib, 3, "a hole in both"},
	} {
		if got := mapType(t, tm, c.off, c.n); got != c.typ {
			t.Errorf("%s: target [%d,+%d) (%s): type %d, want %d; map %+v", tool, c.off, c.n, c.why, got, c.typ, tm)
		}
	}
	sm := mapOf(t, d, "src")
	if got := mapType(t, sm, 1*mib, 2*mib); got != 3 {
		t.Errorf("%s: source's trimmed range: type %d, want 3 (hole); map %+v", tool, got, sm)
	}
	qemuIOClean(t, d, "tgt", "read -P 0xaa 1M 2M", "read -P 0xbb 40M 64k", "read -P 0 50M 64k")
}

// TestNbdcopySparse: nbdcopy of a sparse volume to a file leaves the file sparse (it skips
// what base:allocation calls holes), with the volume's bytes.
func TestNbdcopySparse(t *testing.T) {
	needTools(t, "nbdcopy", "qemu-io")
	d := startDaemon(t)
	d.cli("mkvolume", "-name", "sp", "-size", "256M")
	qemuIOClean(t, d, "sp", "write -P 0x5a 3M 2M", "write -P 0xa5 200M 1M", "flush")
	dst := filepath.Join(t.TempDir(), "copy.img")
	sh(t, "nbdcopy", d.uri("sp"), dst)
	var st syscall.Stat_t
	if err := syscall.Stat(dst, &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != 256*mib {
		t.Fatalf("copy of %d bytes, want %d", st.Size, 256*mib)
	}
	// 3 MiB of data; a filesystem may allocate a little more around it, never the holes.
	if alloc := st.Blocks * 512; alloc > 8*mib {
		t.Fatalf("copy allocates %d bytes for 3 MiB of data: holes were written", alloc)
	}
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 256*mib)
	copy(want[3*mib:5*mib], bytes.Repeat([]byte{0x5a}, 2*mib))
	copy(want[200*mib:201*mib], bytes.Repeat([]byte{0xa5}, mib))
	if !bytes.Equal(got, want) {
		t.Fatal("the copy's bytes differ from the volume's")
	}
}

// nbdshBlockStatus asks, through libnbd, for structured replies and base:allocation, reads
// with odd offsets over holes and data, asks block status with odd offsets and lengths (with
// and without REQ_ONE), and checks the protocol's errors for a request beyond the end and for
// block status on a connection that selected no context.
const nbdshBlockStatus = `
import errno, sys
MiB = 1 << 20
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(URI)
assert h.get_structured_replies_negotiated(), "structured replies not negotiated"
assert h.can_meta_context("base:allocation"), "base:allocation not negotiated"
size = h.get_size()

def status(length, off, flags=0):
    got = []
    def cb(ctx, offset, entries, err):
        assert ctx == "base:allocation", ctx
        assert offset == off, (offset, off)
        got.extend(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(length, off, cb, flags)
    return got

# Data at [1M, 3M) (0xaa); holes elsewhere.
def expect(length, off, want, flags=0):
    got = status(length, off, flags)
    if got != want:
        sys.exit("block_status(%d, %d, %d): %r, want %r" % (length, off, flags, got, want))

expect(1, 0, [(1, 3)])
expect(4097, MiB - 4095, [(4095, 3), (2, 0)])
expect(3 * MiB, 1, [(MiB - 1, 3), (2 * MiB, 0), (1, 3)])
expect(3 * MiB, 1, [(MiB - 1, 3)], nbd.CMD_FLAG_REQ_ONE)
expect(12345, MiB + 7, [(12345, 0)], nbd.CMD_FLAG_REQ_ONE)
expect(511, size - 511, [(511, 3)])
total = sum(n for n, _ in status(size, 0))
assert 0 < total <= size, total

assert h.pread(3, MiB - 1) == b"\0\xaa\xaa"
buf = h.pread(2 * MiB + 3, MiB - 1)
assert buf == b"\0" + b"\xaa" * (2 * MiB) + b"\0\0", "structured read over holes and data"
assert h.pread(512 * 1024 + 1, 10 * MiB + 5) == bytes(512 * 1024 + 1)

h.set_strict_mode(0)
for name, fn in [("beyond the end", lambda: status(4096, size - 1)),
                 ("huge length", lambda: status(0xffffffff, 0)),
                 ("empty", lambda: status(0, 0))]:
    try:
        fn()
        sys.exit("block status %s succeeded" % name)
    except nbd.Error as e:
        if e.errnum != errno.EINVAL:
            sys.exit("block status %s: errno %s, want EINVAL" % (name, e.errnum))
expect(1, 0, [(1, 3)])

g = nbd.NBD()
g.set_strict_mode(0)
g.connect_uri(URI)  # structured replies, no context
try:
    g.block_status(4096, 0, lambda *a: 0)
    sys.exit("block status without a context succeeded")
except nbd.Error as e:
    if e.errnum != errno.EINVAL:
        sys.exit("block status without a context: errno %s, want EINVAL" % e.errnum)
assert g.pread(4096, MiB) == b"\xaa" * 4096
print("nbdsh-block-status-ok")
`

func TestNbdshBlockStatus(t *testing.T) {
	needTools(t, "nbdsh", "qemu-io")
	d := startDaemon(t)
	d.cli("mkvolume", "-name", "bs", "-size", "16M")
	qemuIOClean(t, d, "bs", "write -P 0xaa 1M 2M", "flush")
	script := "URI = " + pyString(d.uri("bs")) + "\n" + nbdshBlockStatus
	out := sh(t, "/usr/bin/python3", "-m", "nbd", "-c", script)
	if !strings.Contains(out, "nbdsh-block-status-ok") {
		t.Fatalf("nbdsh script did not finish:\n%s", out)
	}
}
