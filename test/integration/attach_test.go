package integration

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestAttachErrors: `fcnbd attach` with the real daemon fails clearly and leaves nothing behind
// for a method the host cannot do (the kernel NBD driver where there is none), an unknown method,
// a connection count nbdfuse cannot take, and a daemon whose NBD socket is not there.
func TestAttachErrors(t *testing.T) {
	d := startDaemon(t)
	d.cli("mkvolume", "-name", "vol", "-size", "16M")
	dir := filepath.Join(t.TempDir(), "attach")
	type tc struct {
		name string
		args []string
		want string
	}
	cases := []tc{
		{"bad method", []string{"--method", "iscsi"}, "want one of nbd, nbd-client, nbdfuse"},
		{"nbdfuse, 2 connections", []string{"--method", "nbdfuse", "--connections", "2"}, "nbdfuse 1"},
		{"bad TCP address", []string{"--nbd-tcp", "localhost"}, "NBD TCP address"},
	}
	if _, err := os.Stat("/dev/nbd0"); err != nil {
		cases = append(cases, tc{"no kernel NBD driver", []string{"--method", "nbd"}, "the kernel has no NBD device"})
	}
	if os.Geteuid() == 0 && attachFileExists("/dev/fuse") && attachFileExists("/dev/loop-control") {
		cases = append(cases, tc{"NBD socket missing", []string{"--method", "nbdfuse", "--nbd-unix", filepath.Join(dir, "none.sock"), "--timeout", "3s"}, "nbdfuse"})
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			args := append(append([]string{"attach", "--attach-dir", dir, "--nbd-unix", d.nbdSock}, c.args...), "vol")
			out, errs, err := d.run(args...)
			if err == nil {
				t.Fatalf("fcnbd %s succeeded: %s", strings.Join(args, " "), out)
			}
			if !strings.Contains(errs, c.want) {
				t.Fatalf("fcnbd %s: %q, want it to say %q", strings.Join(args, " "), errs, c.want)
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				t.Fatalf("left in the attach directory: %v", ents)
			}
		})
	}
}

func attachFileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// TestAttachInterrupted: `fcnbd attach` (nbdfuse + loop on this host) interrupted with SIGINT at
// various points either completes (and is recorded, so detach undoes it) or leaves nothing: no
// nbdfuse mount, no loop device on it, nothing in the attach directory.
func TestAttachInterrupted(t *testing.T) {
	if os.Geteuid() != 0 || !attachFileExists("/dev/fuse") || !attachFileExists("/dev/loop-control") {
		t.Skip("needs root, FUSE and loop devices")
	}
	needTools(t, "nbdfuse", "losetup", "fusermount3")
	d := startDaemon(t)
	d.cli("mkvolume", "-name", "vol", "-size", "16M")
	for _, ms := range []int{0, 20, 40, 60, 80, 100, 120, 250} {
		delay := time.Duration(ms) * time.Millisecond
		dir := filepath.Join(t.TempDir(), "attach")
		cmd := exec.Command(d.bin, "--socket", d.ctl, "attach", "--attach-dir", dir, "--nbd-unix", d.nbdSock, "--method", "nbdfuse", "vol")
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(delay)
		cmd.Process.Signal(syscall.SIGINT)
		err := cmd.Wait()
		if err == nil {
			dev := strings.TrimSpace(out.String())
			t.Logf("SIGINT after %v: attach completed (%s)", delay, dev)
			d.cli("detach", "--attach-dir", dir, dev)
		} else {
			t.Logf("SIGINT after %v: %v: %s", delay, err, strings.TrimSpace(out.String()))
		}
		if ents, _ := os.ReadDir(dir); len(ents) != 0 {
			var names []string
			for _, e := range ents {
				names = append(names, e.Name())
			}
			t.Fatalf("SIGINT after %v: left in the attach directory: %v", delay, names)
		}
		mounts, _ := os.ReadFile("/proc/self/mounts")
		if strings.Contains(string(mounts), dir) {
			t.Fatalf("SIGINT after %v: a mount under %s is left", delay, dir)
		}
		if loops, _ := exec.Command("losetup", "-a").Output(); strings.Contains(string(loops), dir) {
			t.Fatalf("SIGINT after %v: a loop device on %s is left: %s", delay, dir, loops)
		}
	}
}
