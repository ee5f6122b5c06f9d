package integration

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestRestartMixedGrainSizes is issue 13's reproduction: two unrelated mappings of different
// grain sizes, both copying, survive a SIGTERM and a restart of the daemon on the same data
// directory (the restart used to refuse them as one dependency tree and exit 1). Afterwards
// both are copying again, each target still reads its point-in-time image with its own writes,
// and copy-on-write still protects it from new writes to its source.
func TestRestartMixedGrainSizes(t *testing.T) {
	needTools(t, "qemu-io")
	d := startDaemon(t)
	for _, v := range []string{"a", "b", "c", "d"} {
		d.cli("mkvolume", "-name", v, "-size", "16M")
	}
	qemuIOClean(t, d, "a", "write -P 0x1a 0 16M", "flush")
	qemuIOClean(t, d, "c", "write -P 0x1c 0 16M", "flush")
	d.cli("mkfcmap", "-source", "a", "-target", "b", "-name", "m64", "-grainsize", "64", "-copyrate", "0")
	d.cli("mkfcmap", "-source", "c", "-target", "d", "-name", "m256", "-copyrate", "0")
	d.cli("startfcmap", "-prep", "m64")
	d.cli("startfcmap", "-prep", "m256")
	// Before the restart: sources move on (grains split into the targets), a target writes.
	qemuIOClean(t, d, "a", "write -P 0x2a 1M 3M", "flush")
	qemuIOClean(t, d, "c", "write -P 0x2c 5M 1M", "flush")
	qemuIOClean(t, d, "b", "write -P 0x3b 10M 64k", "flush")
	checkImages := func(when string) {
		t.Helper()
		for _, m := range []string{"m64", "m256"} {
			if s := field(t, d, "lsfcmap", m, "status"); s != "copying" && s != "idle_or_copied" {
				t.Fatalf("%s: %s is %s", when, m, s)
			}
		}
		qemuIOClean(t, d, "b", "read -P 0x1a 0 10M", "read -P 0x3b 10M 64k", "read -P 0x1a 10304k 6080k")
		qemuIOClean(t, d, "d", "read -P 0x1c 0 16M")
	}

	d.stop()
	d.start()
	for _, m := range []string{"m64", "m256"} {
		if s := field(t, d, "lsfcmap", m, "status"); s != "copying" {
			t.Fatalf("after the restart: %s is %s, want copying", m, s)
		}
		if r := field(t, d, "lsfcmap", m, "status_reason"); r != "" {
			t.Fatalf("after the restart: %s has status_reason %q", m, r)
		}
	}
	if g := field(t, d, "lsfcmap", "m64", "grain_size"); g != "64" {
		t.Fatalf("m64 grain_size %s", g)
	}
	checkImages("after the restart")
	qemuIOClean(t, d, "a", "read -P 0x2a 1M 3M", "write -P 0x4a 0 16M", "flush")
	qemuIOClean(t, d, "c", "read -P 0x2c 5M 1M", "write -P 0x4c 0 16M", "flush")
	checkImages("after new source writes")
	if strings.Contains(d.logs.String(), `"level":"error"`) {
		t.Fatalf("the daemon logged errors:\n%s", d.logs.String())
	}
}

// TestUnreadableCatalogue: a catalogue that can't be read is the one state of the data
// directory that stops the daemon: it exits non-zero at once with a message naming the file
// and what to do, and leaves the volumes' backing files alone.
func TestUnreadableCatalogue(t *testing.T) {
	d := startDaemon(t)
	d.cli("mkvolume", "-name", "a", "-size", "16M")
	d.stop()
	cat := filepath.Join(d.dir, "catalog.db")
	if err := os.WriteFile(cat, []byte(strings.Repeat("not a catalogue ", 512)), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, d.bin, "serve", "--data-dir", d.dir, "--socket", d.ctl,
		"--nbd-unix", d.nbdSock, "--nbd-tcp", d.tcp).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
		t.Fatalf("serve on an unreadable catalogue: %v, want exit status 1\n%s", err, out)
	}
	for _, want := range []string{cat + " can't be read", "from a backup"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("the message lacks %q:\n%s", want, out)
		}
	}
	if _, err := os.Stat(filepath.Join(d.dir, "vol-0.img")); err != nil {
		t.Errorf("the backing file after the failed start: %v", err)
	}
}
