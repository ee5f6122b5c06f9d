package integration

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// cinderPython is the interpreter with OpenStack Cinder (python3-cinder) installed.
const cinderPython = "/usr/bin/python3"

// TestCinderStorwize drives the daemon with OpenStack Cinder's own Storwize/SVC driver code
// (storwize_svc_common, unchanged): the do_setup reads, a new volume, a snapshot, a volume
// from the snapshot, a clone, and the deletion of everything, with the images checked over
// NBD. testdata/cinder_storwize.py does the work; it prints "CINDER OK" when every step passed.
// The transport is --local (fcnbd runs each command without its svcinfo/svctask prefix);
// the script's --ssh transport is the driver's SSHPool, for the SSH front-end.
func TestCinderStorwize(t *testing.T) {
	needTools(t, "qemu-io", cinderPython)
	if err := exec.Command(cinderPython, "-c", "import cinder.volume.drivers.ibm.storwize_svc.storwize_svc_common").Run(); err != nil {
		need(t, "python3-cinder is not installed", false)
	}
	d := startDaemon(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, cinderPython, "testdata/cinder_storwize.py",
		"--local", d.bin, d.ctl, "--nbd-unix", d.nbdSock)
	cmd.Env = append(os.Environ(), "PYTHONDONTWRITEBYTECODE=1")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.HasSuffix(strings.TrimSpace(string(out)), "CINDER OK") {
		t.Fatalf("cinder_storwize.py: %v\n%s\ndaemon log:\n%s", err, out, d.logs.String())
	}
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, "ok: ") {
			t.Log(line)
		}
	}
	// Nothing is left behind.
	if out := d.cli("lsvdisk", "-nohdr"); out != "" {
		t.Errorf("volumes left: %q", out)
	}
}
