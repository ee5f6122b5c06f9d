package integration

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// dirtyMap returns `nbdinfo --map=qemu:dirty-bitmap:MAP --json` of a volume.
func dirtyMap(t *testing.T, d *daemon, vol, mapping string) []mapEntry {
	t.Helper()
	out := sh(t, "nbdinfo", "--map=qemu:dirty-bitmap:"+mapping, "--json", d.uri(vol))
	var m []mapEntry
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("nbdinfo --map: %v\n%s", err, out)
	}
	return m
}

// dirtyRanges is the map's dirty ranges ([off, end) pairs, in order).
func dirtyRanges(m []mapEntry) [][2]int64 {
	var out [][2]int64
	for _, e := range m {
		if e.Type&1 != 0 {
			out = append(out, [2]int64{e.Offset, e.Offset + e.Length})
		}
	}
	return out
}

func sameRanges(a, b [][2]int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// nbdshListContexts lists, for each query, what NBD_OPT_LIST_META_CONTEXT answers, one line
// each: the query, a tab, the context names joined by commas.
const nbdshListContexts = `
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(URI)
for q in QUERIES:
    h.clear_meta_contexts()
    if q:
        h.add_meta_context(q)
    got = []
    h.opt_list_meta_context(lambda n: got.append(n) or 0)
    print("%s\t%s" % (q, ",".join(got)))
h.opt_abort()
`

func listContexts(t *testing.T, d *daemon, vol string, queries ...string) map[string]string {
	t.Helper()
	qs, _ := json.Marshal(queries)
	out := sh(t, "/usr/bin/python3", "-m", "nbd", "-c",
		"URI = "+pyString(d.uri(vol))+"\nQUERIES = "+string(qs)+"\n"+nbdshListContexts)
	got := map[string]string{}
	for _, l := range strings.Split(strings.Trim(out, "\n"), "\n") {
		q, names, ok := strings.Cut(l, "\t")
		if !ok {
			t.Fatalf("unexpected output of the listing script:\n%s", out)
		}
		got[q] = names
	}
	return got
}

// TestDirtyBitmapContexts: every incremental mapping of a volume is a qemu:dirty-bitmap
// context on its source and its target, listed by the qemu: and qemu:dirty-bitmap: queries;
// the source reports what was written since the last start, the target what the last start
// recopied plus what was written since; a never-started mapping reports everything; the
// bitmap survives a restart and follows a rename; unknown names select nothing.
func TestDirtyBitmapContexts(t *testing.T) {
	needTools(t, "nbdinfo", "nbdsh", "qemu-io", "qemu-img")
	const k256 = 256 << 10
	d := startDaemon(t)
	for _, v := range []string{"src", "tgt", "snap"} {
		d.cli("mkvolume", "-name", v, "-size", "64M")
	}
	d.cli("mkfcmap", "-source", "src", "-target", "tgt", "-name", "bk", "-incremental", "-copyrate", "100")
	d.cli("mkfcmap", "-source", "src", "-target", "snap", "-name", "plain", "-copyrate", "0")

	lists := listContexts(t, d, "src", "", "qemu:", "qemu:dirty-bitmap:", "qemu:dirty-bitmap:bk",
		"qemu:dirty-bitmap:plain", "qemu:dirty-bitmap:nope", "base:")
	for q, want := range map[string]string{
		"":                        "base:allocation,qemu:dirty-bitmap:bk",
		"qemu:":                   "qemu:dirty-bitmap:bk",
		"qemu:dirty-bitmap:":      "qemu:dirty-bitmap:bk",
		"qemu:dirty-bitmap:bk":    "qemu:dirty-bitmap:bk",
		"qemu:dirty-bitmap:plain": "", // not incremental: no bitmap
		"qemu:dirty-bitmap:nope":  "",
		"base:":                   "base:allocation",
	} {
		if lists[q] != want {
			t.Errorf("LIST_META_CONTEXT %q on the source: %q, want %q", q, lists[q], want)
		}
	}
	if got := listContexts(t, d, "snap", "qemu:")["qemu:"]; got != "" {
		t.Errorf("LIST qemu: on the target of a plain mapping: %q, want none", got)
	}

	all := [][2]int64{{0, 64 * mib}}
	expect := func(vol string, want [][2]int64, why string) {
		t.Helper()
		if got := dirtyRanges(dirtyMap(t, d, vol, "bk")); !sameRanges(got, want) {
			t.Errorf("%s: dirty ranges of %s %v, want %v", why, vol, got, want)
		}
	}
	expect("src", all, "never started")
	expect("tgt", all, "never started")

	d.cli("startfcmap", "-prep", "bk")
	d.cli("wait", "bk", "-timeout", "60s")
	expect("src", nil, "just after the first start")
	expect("tgt", all, "the first start copies everything")

	qemuIOClean(t, d, "src", "write -P 1 1M 64k", "write -P 2 10000k 100k")
	qemuIOClean(t, d, "tgt", "write -P 3 40M 4k")
	// Grains of 256 KiB: 4 (1M), 39 (10000k..10100k) and 160 (40M, the target's write).
	written := [][2]int64{{4 * k256, 5 * k256}, {39 * k256, 40 * k256}, {160 * k256, 161 * k256}}
	expect("src", written, "source and target writes since the start")
	expect("tgt", all, "the first start copied everything")

	d.cli("startfcmap", "-prep", "bk")
	expect("src", nil, "just after the second start")
	expect("tgt", written, "the second start recopies the difference")
	qemuIOClean(t, d, "tgt", "write -P 4 63M 1")
	qemuIOClean(t, d, "src", "write -P 5 30M 4k") // grain 120: the target's image keeps it
	last := append(append([][2]int64(nil), written...), [2]int64{252 * k256, 253 * k256})
	expect("tgt", last, "the target's own write after the start, not the source's")
	expect("src", [][2]int64{{120 * k256, 121 * k256}, {252 * k256, 253 * k256}}, "source and target writes after the start")

	// qemu's own client, with the bitmap read in place of base:allocation (x-dirty-bitmap):
	// a dirty range is "data": false.
	opts := "driver=nbd,server.type=unix,server.path=" + d.nbdSock + ",export=tgt,x-dirty-bitmap=qemu:dirty-bitmap:bk"
	var qm []struct {
		Start, Length int64
		Data          bool
	}
	out := sh(t, "qemu-img", "map", "--output=json", "--image-opts", opts)
	if err := json.Unmarshal([]byte(out), &qm); err != nil {
		t.Fatalf("qemu-img map: %v\n%s", err, out)
	}
	var qdirty [][2]int64
	for _, e := range qm {
		if !e.Data {
			if n := len(qdirty); n > 0 && qdirty[n-1][1] == e.Start {
				qdirty[n-1][1] += e.Length
			} else {
				qdirty = append(qdirty, [2]int64{e.Start, e.Start + e.Length})
			}
		}
	}
	if !sameRanges(qdirty, last) {
		t.Errorf("qemu-img map with x-dirty-bitmap: dirty %v, want %v\n%s", qdirty, last, out)
	}

	// Unknown names select nothing: nbdinfo and qemu-img refuse them.
	if _, err := runOut("nbdinfo", "--map=qemu:dirty-bitmap:nope", d.uri("tgt")); err == nil {
		t.Error("nbdinfo --map of an unknown bitmap succeeded")
	}
	if _, err := runOut("nbdinfo", "--map=qemu:dirty-bitmap:plain", d.uri("src")); err == nil {
		t.Error("nbdinfo --map of a plain mapping's bitmap succeeded")
	}

	// After a restart the start difference is the same (it is durable); the target's own
	// writes are no longer told from the source's, so the source's write shows too.
	d.cli("wait", "bk", "-timeout", "60s")
	d.stop()
	d.start()
	last = [][2]int64{written[0], written[1], {120 * k256, 121 * k256}, written[2], {252 * k256, 253 * k256}}
	expect("tgt", last, "after a restart")

	// A rename renames the context.
	d.cli("chfcmap", "-name", "nightly", "bk")
	if got := listContexts(t, d, "tgt", "qemu:")["qemu:"]; got != "qemu:dirty-bitmap:nightly" {
		t.Errorf("contexts after the rename: %q", got)
	}
	if got := dirtyRanges(dirtyMap(t, d, "tgt", "nightly")); !sameRanges(got, last) {
		t.Errorf("renamed bitmap: %v, want %v", got, last)
	}
}

// runOut runs a command and returns its combined output and error.
func runOut(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}

// nbdshIncrementalBackup is the incremental half of the backup recipe, driven only by the
// dirty bitmap: block status of qemu:dirty-bitmap:MAP over the whole target, then a pread of
// each dirty extent written into the backup file at its offset. It prints the bytes read.
const nbdshIncrementalBackup = `
h = nbd.NBD()
h.add_meta_context(CONTEXT)
h.connect_uri(URI)
assert h.can_meta_context(CONTEXT), "context not negotiated"
size = h.get_size()
dirty = []
off = 0
while off < size:
    got = []
    def cb(ctx, o, entries, err):
        if ctx == CONTEXT:
            got.extend(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(min(size - off, 1 << 30), off, cb)
    assert got, "empty block status"
    for n, flags in got:
        if flags & 1:
            dirty.append((off, n))
        off += n
read = 0
with open(BACKUP, "r+b") as f:
    for o, n in dirty:
        while n > 0:
            k = min(n, 16 << 20)
            f.seek(o)
            f.write(h.pread(k, o))
            read += k
            o += k
            n -= k
h.shutdown()
print("read", read)
`

// nbdshRewrite writes random data over COUNT random whole grains of the volume at URI
// (seeded: the run is reproducible).
const nbdshRewrite = `
import random
r = random.Random(SEED)
h = nbd.NBD()
h.connect_uri(URI)
grains = h.get_size() // GRAIN
for g in r.sample(range(grains), COUNT):
    h.pwrite(r.randbytes(GRAIN), g * GRAIN)
h.flush()
h.shutdown()
`

func fileHash(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// TestIncrementalBackup is the acceptance test: a full backup of a 1 GiB volume from
// an incremental mapping's target, 1 % of the volume rewritten, the mapping started again, and
// an incremental backup that reads only what qemu:dirty-bitmap:MAP calls dirty — while the
// source is written again after the start and the incremental copy runs — equals the source's
// image at the second start byte for byte, after reading at most 2 % of the volume.
func TestIncrementalBackup(t *testing.T) {
	needTools(t, "nbdsh", "nbdcopy")
	const size, grain = 1 << 30, 256 << 10
	d := startDaemon(t)
	d.cli("mkvolume", "-name", "vol", "-size", "1G")
	d.cli("mkvolume", "-name", "bkt", "-size", "1G")
	dir := t.TempDir()
	rewrite := func(seed, count int) {
		t.Helper()
		sh(t, "/usr/bin/python3", "-m", "nbd", "-c", "URI = "+pyString(d.uri("vol"))+
			"\nSEED = "+strconv.Itoa(seed)+"\nGRAIN = "+strconv.Itoa(grain)+"\nCOUNT = "+strconv.Itoa(count)+"\n"+nbdshRewrite)
	}
	rewrite(1, 200) // the volume's first contents: 50 MiB in random grains, holes elsewhere

	d.cli("mkfcmap", "-source", "vol", "-target", "bkt", "-name", "nightly", "-incremental", "-copyrate", "100")
	d.cli("startfcmap", "-prep", "nightly")
	// Night 1: the full backup, from the target.
	backup := filepath.Join(dir, "backup.img")
	sh(t, "nbdcopy", d.uri("bkt"), backup)
	d.cli("wait", "nightly", "-timeout", "120s")

	// Day 2: 1 % of the volume is rewritten (41 grains of 256 KiB).
	rewrite(2, size/grain/100+1)
	want := filepath.Join(dir, "want.img")
	sh(t, "nbdcopy", d.uri("vol"), want) // the source's image at the coming start

	// Night 2: start again, and go on writing the source while the backup runs.
	d.cli("startfcmap", "-prep", "nightly")
	rewrite(3, 20)
	out := sh(t, "/usr/bin/python3", "-m", "nbd", "-c", "URI = "+pyString(d.uri("bkt"))+
		"\nCONTEXT = \"qemu:dirty-bitmap:nightly\"\nBACKUP = "+pyString(backup)+"\n"+nbdshIncrementalBackup)
	var read int64
	for _, l := range strings.Split(out, "\n") {
		if n, ok := strings.CutPrefix(l, "read "); ok {
			read, _ = strconv.ParseInt(strings.TrimSpace(n), 10, 64)
		}
	}
	t.Logf("incremental backup read %d bytes (%.2f %% of the volume)", read, 100*float64(read)/size)
	if got, w := fileHash(t, backup), fileHash(t, want); got != w {
		t.Fatalf("the backup (sha256 %s) differs from the source's image at the start (%s)", got, w)
	}
	if read <= 0 || read > size*2/100 {
		t.Fatalf("the incremental backup read %d bytes, want 1 to %d (2 %% of the volume)", read, size*2/100)
	}
}
