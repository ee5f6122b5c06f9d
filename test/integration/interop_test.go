package integration

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestNbdinfo: size, advertised capabilities and the export list as libnbd's nbdinfo sees them.
func TestNbdinfo(t *testing.T) {
	needTools(t, "nbdinfo")
	d := startDaemon(t)
	d.cli("mkvolume", "-name", "alpha", "-size", "64M")
	d.cli("mkvolume", "-name", "beta", "-size", "8M")

	out := sh(t, "nbdinfo", "--json", d.uri("alpha"))
	var info struct {
		Exports []struct {
			Name         string `json:"export-name"`
			Size         int64  `json:"export-size"`
			ReadOnly     bool   `json:"is_read_only"`
			CanFlush     bool   `json:"can_flush"`
			CanFUA       bool   `json:"can_fua"`
			CanTrim      bool   `json:"can_trim"`
			CanZero      bool   `json:"can_zero"`
			CanMultiConn bool   `json:"can_multi_conn"`
		} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("nbdinfo --json: %v\n%s", err, out)
	}
	if len(info.Exports) != 1 {
		t.Fatalf("nbdinfo shows %d exports, want 1:\n%s", len(info.Exports), out)
	}
	e := info.Exports[0]
	if e.Name != "alpha" || e.Size != 64<<20 || e.ReadOnly {
		t.Errorf("export = %+v, want alpha, 64 MiB, writable", e)
	}
	for _, c := range []string{"flush", "fua", "trim", "zero", "multi-conn"} {
		if err := exec.Command("nbdinfo", "--can", c, d.uri("alpha")).Run(); err != nil {
			t.Errorf("nbdinfo --can %s: %v (want true)", c, err)
		}
	}
	list := sh(t, "nbdinfo", "--list", "--json", "nbd+unix:///?socket="+d.nbdSock)
	for _, name := range []string{"alpha", "beta"} {
		if !strings.Contains(list, `"`+name+`"`) {
			t.Errorf("nbdinfo --list misses %s:\n%s", name, list)
		}
	}
}

// TestQemuIO: pattern writes and reads, write-zeroes, discard and flush through qemu's client.
func TestQemuIO(t *testing.T) {
	needTools(t, "qemu-io")
	d := startDaemon(t)
	d.cli("mkvolume", "-name", "q", "-size", "32M")
	cmds := []string{
		"write -P 0xab 0 4M", "write -P 0x5c 4M 1M", "write -P 0x11 6144 512", "flush",
		"read -P 0xab 0 6144", "read -P 0x11 6144 512", "read -P 0xab 6656 4187648",
		"read -P 0x5c 4M 1M",
		"write -z 1M 1M", "read -P 0 1M 1M", "read -P 0xab 2M 2M",
		"discard 2M 1M", "read -P 0 2M 1M", "read -P 0xab 3M 1M",
		"write -P 0x77 -f 8M 64k", "read -P 0x77 8M 64k", "flush",
	}
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out := sh(t, "qemu-io", append(args, d.uri("q"))...)
	for _, bad := range []string{"failed", "error", "Error"} {
		if strings.Contains(out, bad) {
			t.Fatalf("qemu-io reported %q:\n%s", bad, out)
		}
	}
	if n := strings.Count(out, "read "); n != 9 {
		t.Fatalf("qemu-io completed %d reads, want 9:\n%s", n, out)
	}
	// Data written by one connection is there for the next one.
	sh(t, "qemu-io", "-f", "raw", "-c", "read -P 0x5c 4M 1M", d.uri("q"))
}

// TestNbdcopyRoundTrip: a volume copied to a file and back, byte-identical, with nbdcopy's
// several connections (multi-conn) and concurrent requests.
func TestNbdcopyRoundTrip(t *testing.T) {
	needTools(t, "nbdcopy")
	d := startDaemon(t)
	d.cli("mkvolume", "-name", "c", "-size", "48M")
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	data := make([]byte, 48<<20)
	rand.Read(data[:20<<20])
	rand.Read(data[36<<20:])
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	sh(t, "nbdcopy", "--flush", src, d.uri("c"))
	back := filepath.Join(dir, "back")
	sh(t, "nbdcopy", d.uri("c"), back)
	got, err := os.ReadFile(back)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("volume copied back differs from what was copied in")
	}
	// And after a daemon restart, from the backing store.
	d.stop()
	d.start()
	back2 := filepath.Join(dir, "back2")
	sh(t, "nbdcopy", d.uri("c"), back2)
	got, _ = os.ReadFile(back2)
	if !bytes.Equal(got, data) {
		t.Fatal("volume differs after a daemon restart")
	}
}

// TestFioVerify: fio's nbd ioengine at iodepth 64, with crc32c verification of every block.
func TestFioVerify(t *testing.T) {
	needTools(t, "fio")
	d := startDaemon(t)
	d.cli("mkvolume", "-name", "f", "-size", "64M")
	for _, rw := range []string{"randwrite", "write"} {
		out := sh(t, "fio", "--name=verify-"+rw, "--ioengine=nbd", "--uri="+d.uri("f"),
			"--rw="+rw, "--bsrange=4k-128k", "--iodepth=64", "--size=64M", "--verify=crc32c",
			"--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=terse")
		if strings.Contains(out, "verify:") || strings.Contains(out, "bad magic") {
			t.Fatalf("fio %s verify failed:\n%s", rw, out)
		}
	}
}

// nbdshErrors sends, through libnbd with strict mode off, requests a careful client never
// would, and checks each errno and that the connection is still usable afterwards. The unknown
// command, which libnbd cannot send, goes over a raw socket from the same script.
const nbdshErrors = `
import errno, socket, struct, sys
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(URI)
size = h.get_size()

def expect(name, fn, want):
    try:
        fn()
    except nbd.Error as e:
        if e.errnum != want:
            sys.exit("%s: errno %s, want %s (%s)" % (name, e.errnum, want, e))
        return
    sys.exit("%s: succeeded, want errno %d" % (name, want))

expect("read past end", lambda: h.pread(4096, size), errno.EINVAL)
expect("read straddling end", lambda: h.pread(8192, size - 4096), errno.EINVAL)
expect("write past end", lambda: h.pwrite(b"x" * 4096, size), errno.ENOSPC)
expect("trim past end", lambda: h.trim(4096, size), errno.EINVAL)
expect("zero past end", lambda: h.zero(4096, size), errno.EINVAL)
expect("read with DF flag", lambda: h.pread(4096, 0, nbd.CMD_FLAG_DF), errno.EINVAL)
expect("write with NO_HOLE flag", lambda: h.pwrite(b"y" * 4096, 0, nbd.CMD_FLAG_NO_HOLE), errno.EINVAL)
expect("write with unknown flag", lambda: h.pwrite(b"y" * 4096, 0, 0x80), errno.EINVAL)

h.pwrite(b"a" * 4096, 0)
h.flush()
assert h.pread(4096, 0) == b"a" * 4096, "connection unusable after errors"

s = socket.socket(socket.AF_UNIX)
s.connect(SOCK)
def recv(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            sys.exit("raw: connection closed")
        b += c
    return b
magic, opt, hflags = struct.unpack(">QQH", recv(18))
assert magic == 0x4e42444d41474943 and opt == 0x49484156454f5054, "bad greeting"
s.sendall(struct.pack(">I", 3))
name = VOL.encode()
s.sendall(struct.pack(">QII", 0x49484156454f5054, 1, len(name)) + name)
esize, tflags = struct.unpack(">QH", recv(10))
assert esize == size
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 99, 7, 0, 512))
rmagic, err, handle = struct.unpack(">IIQ", recv(16))
if (rmagic, err, handle) != (0x67446698, errno.EINVAL, 7):
    sys.exit("unknown command: reply %x %d %d, want EINVAL" % (rmagic, err, handle))
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 8, 0, 4096))
rmagic, err, handle = struct.unpack(">IIQ", recv(16))
assert (rmagic, err, handle) == (0x67446698, 0, 8), "read after unknown command failed"
assert recv(4096) == b"a" * 4096
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 9, 0, 0))
print("nbdsh-errors-ok")
`

func TestNbdshErrorReplies(t *testing.T) {
	needTools(t, "nbdsh")
	d := startDaemon(t)
	d.cli("mkvolume", "-name", "e", "-size", "16M")
	script := "URI = " + pyString(d.uri("e")) + "\nSOCK = " + pyString(d.nbdSock) + "\nVOL = 'e'\n" + nbdshErrors
	// nbdsh is `python3 -m nbd`; Debian's python3 has the nbd module, a python3 earlier on
	// PATH (pyenv, venv) may not, so run that exactly.
	out := sh(t, "/usr/bin/python3", "-m", "nbd", "-c", script)
	if !strings.Contains(out, "nbdsh-errors-ok") {
		t.Fatalf("nbdsh script did not finish:\n%s", out)
	}
}

func pyString(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}
