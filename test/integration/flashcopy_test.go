package integration

import (
	"os/exec"
	"strings"
	"testing"
)

// qemuIO runs qemu-io commands against a volume and returns the output; failed pattern checks
// and I/O errors are reported in it, not by the exit status.
func qemuIO(t *testing.T, d *daemon, vol string, cmds ...string) string {
	t.Helper()
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	return sh(t, "qemu-io", append(args, d.uri(vol))...)
}

// expectEIO checks that a read of the volume fails with EIO and that qemu-io says so.
func expectEIO(t *testing.T, d *daemon, vol string) {
	t.Helper()
	out, err := exec.Command("qemu-io", "-f", "raw", "-c", "read 0 4k", d.uri(vol)).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "Input/output error") {
		t.Fatalf("read of %s: want EIO, got %v:\n%s", vol, err, out)
	}
}

func qemuIOClean(t *testing.T, d *daemon, vol string, cmds ...string) {
	t.Helper()
	out := qemuIO(t, d, vol, cmds...)
	for _, bad := range []string{"failed", "error", "Error", "Pattern verification"} {
		if strings.Contains(out, bad) {
			t.Fatalf("qemu-io on %s: %q in output:\n%s", vol, bad, out)
		}
	}
}

func field(t *testing.T, d *daemon, obj, ref, name string) string {
	t.Helper()
	for _, line := range strings.Split(d.cli(obj, "-delim", ":", ref), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && k == name {
			return v
		}
	}
	t.Fatalf("%s %s has no field %s", obj, ref, name)
	return ""
}

// TestFlashCopyThroughNBD is the engine issue's end-to-end check with a client we did not write
// (qemu-io): a nocopy snapshot keeps P1 while the source moves on, target writes stay on the
// target, stop takes the target offline (EIO), rmfcmap -force brings it back; a copy at rate
// 150 completes on its own and the target keeps P1 when the source is overwritten again.
func TestFlashCopyThroughNBD(t *testing.T) {
	needTools(t, "qemu-io")
	d := startDaemon(t)
	d.cli("mkvolume", "-name", "src", "-size", "16M")
	d.cli("mkvolume", "-name", "tgt", "-size", "16M")
	qemuIOClean(t, d, "src", "write -P 0x11 0 16M", "flush")

	out := d.cli("mkfcmap", "-source", "src", "-target", "tgt", "-name", "snap", "-copyrate", "0")
	if !strings.Contains(out, "FlashCopy Mapping, id [0], successfully created") {
		t.Fatalf("mkfcmap printed %q", out)
	}
	d.cli("prestartfcmap", "snap")
	d.cli("wait", "-status", "prepared", "-timeout", "30s", "snap")
	expectEIO(t, d, "tgt")
	d.cli("startfcmap", "snap")
	if s := field(t, d, "lsfcmap", "snap", "status"); s != "copying" {
		t.Fatalf("status after start: %s", s)
	}
	qemuIOClean(t, d, "src", "write -P 0x22 1M 3M", "write -P 0x22 9000k 100k")
	qemuIOClean(t, d, "tgt", "read -P 0x11 0 16M")
	qemuIOClean(t, d, "tgt", "write -P 0x33 12M 1M", "read -P 0x33 12M 1M", "read -P 0x11 0 12M")
	qemuIOClean(t, d, "src", "read -P 0x11 12M 1M", "read -P 0x22 1M 3M")

	d.cli("stopfcmap", "snap")
	d.cli("wait", "-status", "stopped", "-timeout", "30s", "snap")
	expectEIO(t, d, "tgt")
	d.cli("rmfcmap", "-force", "snap")
	qemuIOClean(t, d, "tgt", "read 0 4k")

	d.cli("mkfcmap", "-source", "src", "-target", "tgt", "-name", "full", "-copyrate", "150")
	d.cli("startfcmap", "-prep", "full")
	d.cli("wait", "-timeout", "60s", "full")
	if s := field(t, d, "lsfcmap", "full", "progress"); s != "100" {
		t.Fatalf("progress after copy: %s", s)
	}
	qemuIOClean(t, d, "src", "write -P 0x44 0 16M")
	qemuIOClean(t, d, "tgt", "read -P 0x11 0 1M", "read -P 0x22 1M 3M", "read -P 0x11 4M 4M")
}
