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
// from the snapshot, a clone, the clone extended (and the source's extension refused while its
// snapshot exists), and the deletion of everything, with the images checked over
// NBD. testdata/cinder_storwize.py does the work; it prints "CINDER OK" when every step passed.
// The commands go where Cinder sends them in production: over SSH (the driver's own SSHPool
// and processutils.ssh_execute, paramiko) to a real sshd and the restricted SVC account that
// `fcnbd sshsetup install` made (startSVCSSH).
func TestCinderStorwize(t *testing.T) {
	needTools(t, "qemu-io", cinderPython)
	if err := exec.Command(cinderPython, "-c", "import cinder.volume.drivers.ibm.storwize_svc.storwize_svc_common").Run(); err != nil {
		need(t, "python3-cinder is not installed", false)
	}
	d := startDaemon(t)
	_, host, port, user, key := startSVCSSH(t, d)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, cinderPython, "testdata/cinder_storwize.py",
		"--ssh", host, port, user, key, "--nbd-unix", d.nbdSock)
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
