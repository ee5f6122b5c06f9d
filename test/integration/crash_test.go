package integration

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The crash layer of docs/architecture.md: kill -9 of the daemon at random moments under load,
// restart, verify (docs/flashcopy.md §7: a crash loses no acknowledged-and-flushed data and
// never lets a target show data from after its start).
//
// What is verified, and with what:
//   - Durability: a libnbd client (nbdsh) writes checksummed 4 KiB records with FUA to a
//     source and to a target and prints each one as it is acknowledged; after the restart every
//     acknowledged record (or a later one of the same run) must be there. fio's verify state
//     records writes when they complete, not when they are flushed, so fio --verify_only after
//     a kill -9 would flag writes that were legitimately lost from the write-back cache; fio is
//     used as the load instead, verifying its own blocks online while the daemon lives
//     (verify=crc32c with verify_backlog; verify_state_save=1 keeps its state, in a temporary
//     directory, for post-mortems).
//   - Point in time: with all writes paused, nbdcopy takes a copy of each source right before
//     the group is started; after the restart each target, outside the ranges written to it,
//     must equal that copy.
//
// FCNBD_KILL_ITERATIONS sets the number of kills (default 20).

const killVolSize = 8 << 20

func TestRandomKill(t *testing.T) {
	needTools(t, "fio", "nbdsh", "nbdcopy")
	iters := 20
	if s := os.Getenv("FCNBD_KILL_ITERATIONS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil {
			t.Fatalf("FCNBD_KILL_ITERATIONS: %v", err)
		}
		iters = n
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 3))
	work := t.TempDir()
	d := startDaemon(t)
	for _, v := range []string{"s1", "s2", "t1", "t2"} {
		d.cli("mkvolume", "-name", v, "-size", "8M")
	}
	d.cli("mkfcconsistgrp", "-name", "g")
	d.cli("mkfcmap", "-source", "s1", "-target", "t1", "-name", "m1", "-copyrate", "0", "-grainsize", "64", "-consistgrp", "g")
	d.cli("mkfcmap", "-source", "s2", "-target", "t2", "-name", "m2", "-copyrate", "50", "-grainsize", "64", "-consistgrp", "g")

	start := time.Now()
	totalAcked := 0
	for i := 0; i < iters; i++ {
		if i > 0 {
			d.cli("stopfcconsistgrp", "-force", "g")
		}
		// Writes are paused: the copies are the images the targets must show.
		img1 := filepath.Join(work, "img1")
		img2 := filepath.Join(work, "img2")
		sh(t, "nbdcopy", d.uri("s1"), img1)
		sh(t, "nbdcopy", d.uri("s2"), img2)
		d.cli("startfcconsistgrp", "-prep", "g")

		run := uint32(i + 1)
		recs := []*recordWriter{
			startRecordWriter(t, d.uri("s1"), run, 0, 256),
			startRecordWriter(t, d.uri("t2"), run+1000, 0, 256),
		}
		var fios []*exec.Cmd
		var fioOut []*syncBuffer
		for _, job := range []struct{ vol, off, size string }{
			{"s1", "1M", "7M"}, {"s2", "0", "8M"}, {"t1", "4M", "4M"},
		} {
			cmd := exec.Command("fio", "--name=load-"+job.vol, "--ioengine=nbd", "--uri="+d.uri(job.vol),
				"--rw=randwrite", "--bs=4k", "--iodepth=16", "--offset="+job.off, "--size="+job.size,
				"--time_based", "--runtime=60", "--verify=crc32c", "--verify_backlog=256",
				"--verify_state_save=1", "--verify_fatal=1")
			cmd.Dir = t.TempDir()
			out := &syncBuffer{}
			cmd.Stdout, cmd.Stderr = out, out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			fios = append(fios, cmd)
			fioOut = append(fioOut, out)
		}
		time.Sleep(time.Duration(200+rng.IntN(1300)) * time.Millisecond)
		d.kill()
		for j, c := range fios {
			c.Wait()
			if o := fioOut[j].String(); strings.Contains(o, "verify failed") || strings.Contains(o, "bad magic") || strings.Contains(o, "bad header") {
				t.Fatalf("iteration %d: fio's online verification failed before the kill:\n%s", i, o)
			}
		}
		acked := make([]map[int]uint64, len(recs))
		for j, r := range recs {
			acked[j] = r.wait()
			totalAcked += len(acked[j])
			if len(acked[j]) == 0 {
				t.Logf("iteration %d: record writer %d: nothing acknowledged before the kill; its stderr:\n%s", i, j, r.stderr.String())
			}
		}
		d.start()

		for _, m := range []string{"m1", "m2"} {
			if s := field(t, d, "lsfcmap", m, "status"); s != "copying" && s != "idle_or_copied" {
				t.Fatalf("iteration %d: %s is %s after the restart", i, m, s)
			}
		}
		checkRecords(t, d, "s1", run, acked[0], i)
		checkRecords(t, d, "t2", run+1000, acked[1], i)
		compareImage(t, d, "t1", img1, 0, 4<<20, i)
		compareImage(t, d, "t2", img2, 1<<20, killVolSize, i)
	}
	if totalAcked == 0 {
		t.Fatal("no FUA record was ever acknowledged: the durability check checked nothing")
	}
	t.Logf("%d kills in %s; %d acknowledged FUA records checked", iters, time.Since(start).Round(time.Millisecond), totalAcked)
}

// recordWriter is an nbdsh process writing records with FUA to slots [first, first+n) in
// passes, printing "slot gen" after each acknowledgement.
type recordWriter struct {
	cmd    *exec.Cmd
	mu     sync.Mutex
	acked  map[int]uint64
	done   chan struct{}
	stderr syncBuffer
}

const recordScript = `
import struct, zlib, sys
run, first, n = %d, %d, %d
gen = 1
while True:
    for s in range(first, first + n):
        head = struct.pack('<IIIQ', 0xfc0dbeef, run, s, gen)
        body = head + (struct.pack('<Q', gen * 2654435761 + s) * 510)[:4096 - 4 - len(head)]
        buf = body + struct.pack('<I', zlib.crc32(body) & 0xffffffff)
        h.pwrite(buf, s * 4096, nbd.CMD_FLAG_FUA)
        print(s, gen, flush=True)
    gen += 1
`

func startRecordWriter(t *testing.T, uri string, run uint32, first, n int) *recordWriter {
	t.Helper()
	w := &recordWriter{acked: map[int]uint64{}, done: make(chan struct{})}
	// nbdsh is `python3 -m nbd`; a python3 earlier on PATH (pyenv, venv) may lack the module.
	w.cmd = exec.Command("/usr/bin/python3", "-m", "nbd", "-u", uri, "-c", fmt.Sprintf(recordScript, run, first, n))
	w.cmd.Stderr = &w.stderr
	out, err := w.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := w.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(w.done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var s int
			var g uint64
			if _, err := fmt.Sscan(sc.Text(), &s, &g); err == nil {
				w.mu.Lock()
				w.acked[s] = g
				w.mu.Unlock()
			}
		}
	}()
	return w
}

// wait returns the acknowledged records once the writer has died with the daemon.
func (w *recordWriter) wait() map[int]uint64 {
	<-w.done
	w.cmd.Wait()
	return w.acked
}

// parseKillRecord returns run, slot and gen of an intact record, ok false otherwise.
func parseKillRecord(p []byte) (run, slot uint32, gen uint64, ok bool) {
	if binary.LittleEndian.Uint32(p[0:]) != 0xfc0dbeef ||
		binary.LittleEndian.Uint32(p[4092:]) != crc32.ChecksumIEEE(p[:4092]) {
		return 0, 0, 0, false
	}
	return binary.LittleEndian.Uint32(p[4:]), binary.LittleEndian.Uint32(p[8:]), binary.LittleEndian.Uint64(p[12:]), true
}

// checkRecords: every slot acknowledged in this run holds an intact record of the run, of that
// generation or a later one.
func checkRecords(t *testing.T, d *daemon, vol string, run uint32, acked map[int]uint64, iter int) {
	t.Helper()
	data := readVolume(t, d, vol)
	for s, g := range acked {
		r, slot, gen, ok := parseKillRecord(data[s*4096 : (s+1)*4096])
		if !ok || r != run || int(slot) != s || gen < g {
			t.Fatalf("iteration %d: %s slot %d: acknowledged (FUA) record gen %d of run %d lost: found ok=%v run %d slot %d gen %d",
				iter, vol, s, g, run, ok, r, slot, gen)
		}
	}
}

func readVolume(t *testing.T, d *daemon, vol string) []byte {
	t.Helper()
	f := filepath.Join(t.TempDir(), vol+".img")
	sh(t, "nbdcopy", d.uri(vol), f)
	data, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	// Not left for the test's end: a soak reads volumes thousands of times.
	if err := os.Remove(f); err != nil {
		t.Fatal(err)
	}
	return data
}

// compareImage: vol's bytes [from, to) equal the image file's.
func compareImage(t *testing.T, d *daemon, vol, image string, from, to int, iter int) {
	t.Helper()
	want, err := os.ReadFile(image)
	if err != nil {
		t.Fatal(err)
	}
	got := readVolume(t, d, vol)
	if !bytes.Equal(got[from:to], want[from:to]) {
		for off := from; off < to; off += 4096 {
			if !bytes.Equal(got[off:off+4096], want[off:off+4096]) {
				t.Fatalf("iteration %d: target %s differs from its source's image at the start at offset %d", iter, vol, off)
			}
		}
	}
}
