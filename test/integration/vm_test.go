package integration

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestVMKernelNBDSmoke checks the VM harness itself against nbdkit: the guest kernel's NBD driver
// attaches an export, makes ext4, writes files, flushes, detaches, reattaches, e2fsck is clean and
// the files are intact.
func TestVMKernelNBDSmoke(t *testing.T) {
	vmRequire(t)
	needTools(t, "nbdkit")
	sock := vmStartNbdkit(t)
	r := runVM(t, vmGuestScript(t, "kernel-nbd-smoke.sh"),
		VMForward(10809, "unix:"+sock), VMEnv("NBD_EXPORT", "smoke"), VMTimeout(3*time.Minute))
	requireVMOK(t, r)
	if len(r.Lines("GUEST-STEP: ok ")) != 1 {
		t.Fatalf("guest script did not reach its end")
	}
}

// TestVMKernelNBDFcnbd runs the kernel NBD driver against fcnbd: ext4 on a volume survives
// detach/reattach (e2fsck clean, checksums equal) and the host reads through NBD the same bytes
// the guest's block device had.
func TestVMKernelNBDFcnbd(t *testing.T) {
	vmRequire(t)
	needTools(t, "nbdcopy")
	d := startDaemon(t)
	d.cli("mkvolume", "-name", "vol", "-size", "64M")
	r := runVM(t, vmGuestScript(t, "kernel-nbd-smoke.sh"),
		VMForward(10809, "unix:"+d.nbdSock), VMEnv("NBD_EXPORT", "vol"), VMEnv("DEVSHA", "1"),
		VMTimeout(3*time.Minute))
	requireVMOK(t, r)
	dev := r.Lines("GUEST-DEVSHA256 ")
	if len(dev) != 1 {
		t.Fatalf("guest printed %d GUEST-DEVSHA256 lines", len(dev))
	}
	img := filepath.Join(t.TempDir(), "vol.img")
	sh(t, "nbdcopy", d.uri("vol"), img)
	got := vmFileSHA256(t, img)
	if want := strings.Fields(dev[0])[0]; got != want {
		t.Fatalf("host reads sha256 %s through NBD, the guest's device had %s", got, want)
	}
}

// TestVMKernelNBDFcnbdRestart restarts the daemon (SIGTERM, start again on the same data
// directory) while the guest's ext4 on a volume is mounted and idle. The guest's NBD connections
// are reconnected through the kernel's netlink reconfigure (nbdpersist); the filesystem then takes
// more writes and stays clean.
func TestVMKernelNBDFcnbdRestart(t *testing.T) {
	vmRequire(t)
	d := startDaemon(t)
	d.cli("mkvolume", "-name", "vol", "-size", "64M")
	persist := vmBuildNbdpersist(t)

	ctlPath := filepath.Join(t.TempDir(), "ctl.sock")
	ln, err := net.Listen("unix", ctlPath)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var (
		wg          sync.WaitGroup
		restartErr  error
		restarts    int
		restartTook time.Duration
	)
	wg.Add(1)
	go func() { // the host side of the guest's control port: one restart per request
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			line, _ := bufio.NewReader(c).ReadString('\n')
			if strings.TrimSpace(line) == "READY-FOR-RESTART" {
				start := time.Now()
				err := vmRestartDaemon(d)
				restartTook = time.Since(start)
				if err != nil {
					restartErr = err
					fmt.Fprintf(c, "FAILED %v\n", err)
				} else {
					restarts++
					fmt.Fprintf(c, "RESTARTED\n")
				}
			}
			c.Close()
		}
	}()
	r := runVM(t, vmGuestScript(t, "fcnbd-restart.sh"),
		VMForward(10809, "unix:"+d.nbdSock), VMForward(10810, "unix:"+ctlPath),
		VMConnectWait(60*time.Second), VMFile("/usr/sbin/nbdpersist", persist),
		VMEnv("NBD_EXPORT", "vol"), VMTimeout(3*time.Minute))
	ln.Close()
	wg.Wait()
	if restartErr != nil {
		t.Fatalf("restarting the daemon: %v", restartErr)
	}
	t.Logf("daemon restart took %.1fs", restartTook.Seconds())
	requireVMOK(t, r)
	if restarts != 1 {
		t.Fatalf("the daemon was restarted %d times, want 1", restarts)
	}
}

// vmRestartDaemon stops d with SIGTERM (a clean exit is required) and starts it again on the same
// data directory and sockets. Unlike daemon.stop/start it reports errors instead of failing the
// test, so it can run on the control-port goroutine.
func vmRestartDaemon(d *daemon) error {
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-d.done:
		d.cmd = nil
		if err != nil {
			return fmt.Errorf("fcnbd serve exited with %v after SIGTERM", err)
		}
	case <-time.After(20 * time.Second):
		return errors.New("fcnbd serve did not exit within 20s of SIGTERM")
	}
	args := append([]string{"serve", "--data-dir", d.dir, "--socket", d.ctl, "--nbd-unix", d.nbdSock,
		"--nbd-tcp", d.tcp, "--log-level", "debug"}, d.extra...)
	cmd := exec.Command(d.bin, args...)
	cmd.Stdout, cmd.Stderr = d.logs, d.logs
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	d.cmd, d.done = cmd, done
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
		if c, err := net.Dial("unix", d.nbdSock); err == nil {
			c.Close()
			return nil
		}
		select {
		case err := <-done:
			d.done <- err // for the test's cleanup
			return fmt.Errorf("fcnbd serve exited at restart: %v", err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	return errors.New("fcnbd serve did not listen within 10s of its restart")
}

// vmBuildNbdpersist builds the guest helper test/integration/vm/nbdpersist (static) into the
// test's temporary directory.
func vmBuildNbdpersist(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "nbdpersist")
	cmd := exec.Command("go", "build", "-o", bin, "fcnbd/test/integration/vm/nbdpersist")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build nbdpersist: %v\n%s", err, out)
	}
	return bin
}

// vmStartNbdkit serves a 64 MiB memory disk on a Unix socket for the test's duration.
func vmStartNbdkit(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "fcnbd-vm-nbdkit-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "nbd.sock")
	cmd := exec.Command("nbdkit", "--exit-with-parent", "-f", "-U", sock, "memory", "64M")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for i := 0; i < 100; i++ {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return sock
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("nbdkit did not listen on %s", sock)
	return ""
}

func vmFileSHA256(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}
