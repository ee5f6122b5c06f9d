package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
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
