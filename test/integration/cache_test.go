package integration

import (
	"path/filepath"
	"testing"
)

// nbdshCache: CACHE is advertised, a cached range is then read from the daemon's memory (the
// test punches the volume's backing file behind the daemon's back between the two scripts),
// and hostile ranges get EINVAL; a huge one succeeds, bounded.
const nbdshCache = `
import errno, sys
MiB = 1 << 20
h = nbd.NBD()
h.connect_uri(URI)
assert h.can_cache(), "CACHE not advertised"
h.cache(4 * MiB, 0)
h.set_strict_mode(0)
for name, length, off in [("beyond the end", 8192, h.get_size() - 4096),
                          ("offset beyond the end", 1, h.get_size() + 1),
                          ("huge length", 0xffffffff, 4096)]:
    try:
        h.cache(length, off)
        sys.exit("cache %s succeeded" % name)
    except nbd.Error as e:
        if e.errnum != errno.EINVAL:
            sys.exit("cache %s: errno %s, want EINVAL" % (name, e.errnum))
h.cache(0, 4096)
print("nbdsh-cache-ok")
`

// nbdshCacheRead checks, after the backing file was punched under the daemon, that the range
// CACHE loaded still reads as the data (from memory) while the rest reads the punched file.
const nbdshCacheRead = `
MiB = 1 << 20
h = nbd.NBD()
h.connect_uri(URI)
assert h.pread(4 * MiB, 0) == b"\xaa" * (4 * MiB), "the cached range was not served from the cache"
assert h.pread(4 * MiB, 4 * MiB) == bytes(4 * MiB), "the uncached range did not read the file"
print("nbdsh-cache-read-ok")
`

// nbdshCacheHuge: a CACHE of 4 GiB - 4 KiB, far more than the cache holds, succeeds; the
// data reads back.
const nbdshCacheHuge = `
h = nbd.NBD()
h.connect_uri(URI)
h.cache(0xffffffff - 4095, 0)
assert h.pread(4096, 1 << 30) == b"\xbb" * 4096
print("nbdsh-cache-huge-ok")
`

func TestNbdshCache(t *testing.T) {
	needTools(t, "nbdsh", "qemu-io", "fallocate")
	d := startDaemon(t)
	d.cli("mkvolume", "-name", "c", "-size", "64M")
	// One 8 MiB write is larger than the cache takes: it goes through, nothing stays cached.
	qemuIOClean(t, d, "c", "write -P 0xaa 0 8M", "flush")
	nbdsh(t, d.uri("c"), "nbdsh-cache-ok", nbdshCache)
	sh(t, "fallocate", "--punch-hole", "--offset", "0", "--length", "8MiB", filepath.Join(d.dir, "vol-0.img"))
	nbdsh(t, d.uri("c"), "nbdsh-cache-read-ok", nbdshCacheRead)

	d.cli("mkvolume", "-name", "big", "-size", "4G")
	qemuIOClean(t, d, "big", "write -P 0xbb 1G 1M", "flush")
	nbdsh(t, d.uri("big"), "nbdsh-cache-huge-ok", nbdshCacheHuge)
}
