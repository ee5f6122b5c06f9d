package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestSoak (make soak; not in CI): mixed fio load on four source volumes of one consistency
// group for FCNBD_SOAK_DURATION (default 30m), with repeated group starts, stops and restores.
// Each round: writes paused, nbdcopy takes every source's image, the group starts, fio runs
// randrw of 4 KiB to 1 MiB (so writes run both on goroutines of their own and on the reader) on
// the sources (and the targets' upper halves); then the targets' lower halves must equal the
// images. Every third round restores: the restore group (target → source) starts with
// -restore and each source must read as its target's image again. At the end the daemon's peak
// RSS (VmHWM) is reported against the configured cache size.
//
// FCNBD_SOAK_ROUND sets one round's load time (default 20s).
func TestSoak(t *testing.T) {
	if os.Getenv("FCNBD_SOAK") == "" {
		t.Skip("skipped: soak test; run with make soak (FCNBD_SOAK=1)")
	}
	needTools(t, "fio", "nbdcopy")
	dur := envDuration(t, "FCNBD_SOAK_DURATION", 30*time.Minute)
	round := envDuration(t, "FCNBD_SOAK_ROUND", 20*time.Second)
	const cache = "64M"
	const cacheBytes = 64 << 20
	d := startDaemon(t, "--cache-size", cache, "--log-level", "info")
	const n = 4
	const size = 64 << 20
	d.cli("mkfcconsistgrp", "-name", "g")
	d.cli("mkfcconsistgrp", "-name", "r")
	for i := 0; i < n; i++ {
		d.cli("mkvolume", "-name", fmt.Sprintf("v%d", i), "-size", "64M")
		d.cli("mkvolume", "-name", fmt.Sprintf("t%d", i), "-size", "64M")
		d.cli("mkfcmap", "-source", fmt.Sprintf("v%d", i), "-target", fmt.Sprintf("t%d", i), "-name", fmt.Sprintf("m%d", i),
			"-copyrate", strconv.Itoa([]int{0, 50, 80, 100}[i]), "-consistgrp", "g")
		d.cli("mkfcmap", "-source", fmt.Sprintf("t%d", i), "-target", fmt.Sprintf("v%d", i), "-name", fmt.Sprintf("r%d", i),
			"-copyrate", "100", "-consistgrp", "r")
	}
	work := t.TempDir()
	img := func(i int) string { return filepath.Join(work, fmt.Sprintf("img%d", i)) }
	deadline := time.Now().Add(dur)
	var rounds, restores int
	for r := 0; time.Now().Before(deadline) || r == 0; r++ {
		for i := 0; i < n; i++ {
			sh(t, "nbdcopy", d.uri(fmt.Sprintf("v%d", i)), img(i))
		}
		d.cli("startfcconsistgrp", "-prep", "g")
		var fios []*exec.Cmd
		for i := 0; i < n; i++ {
			for _, job := range []struct{ vol, off, size string }{
				{fmt.Sprintf("v%d", i), "0", "64M"}, {fmt.Sprintf("t%d", i), "32M", "32M"},
			} {
				c := exec.Command("fio", "--name=soak-"+job.vol, "--ioengine=nbd", "--uri="+d.uri(job.vol),
					"--rw=randrw", "--rwmixread=40", "--bsrange=4k-1m", "--iodepth=8", "--offset="+job.off,
					"--size="+job.size, "--time_based", fmt.Sprintf("--runtime=%d", int(round.Seconds())),
					"--verify=crc32c", "--verify_backlog=512", "--verify_fatal=1")
				c.Dir = work
				fios = append(fios, c)
			}
		}
		outs := make([][]byte, len(fios))
		errs := make(chan error, len(fios))
		for j, c := range fios {
			go func() {
				var err error
				outs[j], err = c.CombinedOutput()
				errs <- err
			}()
		}
		for range fios {
			if err := <-errs; err != nil {
				for _, o := range outs {
					t.Log(string(o))
				}
				t.Fatalf("round %d: fio failed: %v", r, err)
			}
		}
		// Writes paused: each target's lower half is its source as at the start.
		for i := 0; i < n; i++ {
			compareImage(t, d, fmt.Sprintf("t%d", i), img(i), 0, size/2, r)
		}
		if r%3 == 2 {
			// Restore: the sources go back to the targets' images (their lower halves; the
			// upper halves hold the targets' own writes).
			d.cli("startfcconsistgrp", "-prep", "-restore", "r")
			for i := 0; i < n; i++ {
				compareImage(t, d, fmt.Sprintf("v%d", i), img(i), 0, size/2, r)
			}
			// A stopped restore would take the sources offline: let it complete instead.
			d.cli("wait", "-group", "-timeout", "10m", "r")
			for i := 0; i < n; i++ {
				compareImage(t, d, fmt.Sprintf("v%d", i), img(i), 0, size/2, r)
			}
			restores++
		}
		d.cli("stopfcconsistgrp", "-force", "g")
		rounds++
	}
	hwm := vmHWM(t, d.cmd.Process.Pid)
	t.Logf("%d rounds, %d restores in %s; peak RSS (VmHWM) %d MiB with a %s cache (%.1fx)",
		rounds, restores, dur, hwm>>20, cache, float64(hwm)/cacheBytes)
	d.stop()
}

func envDuration(t *testing.T, name string, def time.Duration) time.Duration {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return v
}

// vmHWM is a process's peak resident set size in bytes.
func vmHWM(t *testing.T, pid int) int64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmHWM in /proc status")
	return 0
}
