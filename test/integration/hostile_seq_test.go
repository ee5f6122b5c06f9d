package integration

import (
	"strings"
	"testing"
)

// nbdshHostileSequences: the requests and negotiations libnbd sends only with strict mode off,
// and that blockstatus_test.go, fastzero_test.go, cache_test.go and interop_test.go's error
// script do not already cover: block status with only an unknown context asked for (nothing is
// selected), with structured replies refused (no context can be), flags on commands they do not
// apply to, huge lengths on WRITE_ZEROES and TRIM, and a pipeline mixing such failures with good
// requests, all answered on one connection that then goes on.
const nbdshHostileSequences = `
import errno, sys
MiB = 1 << 20

def expect(name, fn, want):
    try:
        fn()
    except nbd.Error as e:
        if e.errnum != want:
            sys.exit("%s: errno %s, want %s (%s)" % (name, e.errnum, want, e))
        return
    sys.exit("%s: succeeded, want errno %d" % (name, want))

# Only an unknown context asked for: none is selected, so block status is EINVAL.
u = nbd.NBD()
u.set_strict_mode(0)
u.add_meta_context("x-fcnbd-no-such:context")
u.connect_uri(URI)
assert u.get_structured_replies_negotiated()
assert not u.can_meta_context("x-fcnbd-no-such:context")
assert not u.can_meta_context("base:allocation")
expect("block status, unknown context only", lambda: u.block_status(4096, 0, lambda *a: 0), errno.EINVAL)
assert u.pread(4096, MiB) == b"\xaa" * 4096

# An unknown context next to base:allocation: only base:allocation is selected and reported.
m = nbd.NBD()
m.add_meta_context("x-fcnbd-no-such:context")
m.add_meta_context("base:allocation")
m.connect_uri(URI)
seen = []
m.block_status(4096, 0, lambda ctx, off, ents, err: seen.append(ctx) or 0)
assert seen == ["base:allocation"], seen

# Structured replies refused: base:allocation cannot be negotiated; block status is a simple
# EINVAL, and reads stay simple.
s = nbd.NBD()
s.set_strict_mode(0)
s.set_request_structured_replies(False)
s.add_meta_context("base:allocation")
s.connect_uri(URI)
assert not s.get_structured_replies_negotiated()
assert not s.can_meta_context("base:allocation")
expect("block status without structured replies", lambda: s.block_status(4096, 0, lambda *a: 0), errno.EINVAL)
assert s.pread(4096, MiB) == b"\xaa" * 4096

h = nbd.NBD()
h.set_strict_mode(0)
h.add_meta_context("base:allocation")
h.connect_uri(URI)
size = h.get_size()
expect("REQ_ONE on read", lambda: h.pread(4096, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL)
expect("REQ_ONE on zero", lambda: h.zero(4096, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL)
expect("NO_HOLE on trim", lambda: h.trim(4096, 0, nbd.CMD_FLAG_NO_HOLE), errno.EINVAL)
expect("FAST_ZERO on block status", lambda: h.block_status(4096, 0, lambda *a: 0, nbd.CMD_FLAG_FAST_ZERO), errno.EINVAL)
expect("NO_HOLE on cache", lambda: h.cache(4096, 0, nbd.CMD_FLAG_NO_HOLE), errno.EINVAL)
expect("zero of 4 GiB - 1", lambda: h.zero(0xffffffff, 0), errno.EINVAL)
expect("trim of 4 GiB - 1", lambda: h.trim(0xffffffff, 0), errno.EINVAL)
expect("zero offset wraps", lambda: h.zero(8192, (1 << 64) - 4096), errno.EINVAL)
expect("block status offset wraps", lambda: h.block_status(8192, (1 << 64) - 4096, lambda *a: 0), errno.EINVAL)

# A pipeline of good and bad requests, all in flight at once: every one gets its own answer.
cookies = []
for i in range(8):
    buf = nbd.Buffer(4096)
    cookies.append(("read", h.aio_pread(buf, MiB + i * 4096), 0))
    cookies.append(("cache", h.aio_cache(MiB, i * MiB), 0))
    cookies.append(("cache past end", h.aio_cache(8192, size - 4096), errno.EINVAL))
    cookies.append(("block status huge", h.aio_block_status(0xffffffff, 0, lambda *a: 0), errno.EINVAL))
    cookies.append(("block status", h.aio_block_status(MiB, i * 4096, lambda *a: 0), 0))
    cookies.append(("zero FAST_ZERO past end", h.aio_zero(8192, size - 4096, flags=nbd.CMD_FLAG_FAST_ZERO), errno.EINVAL))
    cookies.append(("read REQ_ONE", h.aio_pread(nbd.Buffer(512), 0, flags=nbd.CMD_FLAG_REQ_ONE), errno.EINVAL))
while h.aio_in_flight() > 0:
    h.poll(-1)
for name, c, want in cookies:
    try:
        h.aio_command_completed(c)
        got = 0
    except nbd.Error as e:
        got = e.errnum
    if got != want:
        sys.exit("pipelined %s: errno %s, want %s" % (name, got, want))
assert h.pread(4096, MiB) == b"\xaa" * 4096, "connection unusable after the pipeline"
print("nbdsh-hostile-sequences-ok")
`

func TestNbdshHostileSequences(t *testing.T) {
	needTools(t, "nbdsh", "qemu-io")
	d := startDaemon(t)
	d.cli("mkvolume", "-name", "hs", "-size", "16M")
	qemuIOClean(t, d, "hs", "write -P 0xaa 1M 2M", "flush")
	nbdsh(t, d.uri("hs"), "nbdsh-hostile-sequences-ok", nbdshHostileSequences)
	if strings.Contains(d.logs.String(), "panic") {
		t.Fatal("panic in the daemon log")
	}
}
