// Package integration runs fcnbd as users do: the real binary, real NBD clients we did not write
// (libnbd's tools, qemu, fio), and real kernel block devices.
package integration

import (
	"bytes"
	"context"
	"fmt"
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

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
)

// fcnbdBin returns the fcnbd binary under test: $FCNBD_BIN (set by the Makefile), else one
// built once for this test run.
func fcnbdBin(t testing.TB) string {
	t.Helper()
	if b := os.Getenv("FCNBD_BIN"); b != "" {
		if _, err := os.Stat(b); err == nil {
			return b
		}
	}
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "fcnbd-bin-")
		if err != nil {
			buildErr = err
			return
		}
		builtBin = filepath.Join(dir, "fcnbd")
		out, err := exec.Command("go", "build", "-o", builtBin, "fcnbd/cmd/fcnbd").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return builtBin
}

// need skips the test when a tool or privilege is missing, with a one-line reason, except in
// CI (CI set), where a missing prerequisite is a failure: scripts/install-deps.sh should have
// provided it.
func need(t testing.TB, reason string, ok bool) {
	t.Helper()
	if ok {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("prerequisite missing in CI: %s", reason)
	}
	t.Skipf("skipped: %s", reason)
}

func needTools(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		_, err := exec.LookPath(tool)
		need(t, tool+" is not installed (scripts/install-deps.sh installs it)", err == nil)
	}
}

func needRoot(t testing.TB) {
	t.Helper()
	need(t, "needs root", os.Geteuid() == 0)
}

// daemon is one `fcnbd serve` with its own data directory and sockets.
type daemon struct {
	t       testing.TB
	bin     string
	dir     string // data directory
	ctl     string // control socket
	nbdSock string // NBD Unix socket
	tcp     string // NBD TCP address
	extra   []string
	cmd     *exec.Cmd
	logs    *syncBuffer
	done    chan error
	// exited is closed when the process started last has exited, with its status in exitErr;
	// unlike done it can be waited on by any number of goroutines.
	exited  chan struct{}
	exitErr error

	// Set before start to take effect: env is added to the daemon's environment; with logPath,
	// the daemon's stdout and stderr are appended to that file instead of kept in logs.
	env     []string
	logPath string
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startDaemon starts fcnbd serve in a fresh directory and stops it when the test ends.
func startDaemon(t testing.TB, extra ...string) *daemon {
	t.Helper()
	d := newDaemon(t, extra...)
	d.start()
	return d
}

// newDaemon is startDaemon without the start, for a test that sets env or logPath first.
func newDaemon(t testing.TB, extra ...string) *daemon {
	t.Helper()
	// Unix socket paths are limited to 108 bytes: keep them short.
	dir, err := os.MkdirTemp("", "fcnbd-it-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	d := &daemon{
		t: t, bin: fcnbdBin(t), dir: filepath.Join(dir, "data"),
		ctl: filepath.Join(dir, "c.sock"), nbdSock: filepath.Join(dir, "n.sock"),
		tcp: freeTCPAddr(t), extra: extra,
	}
	t.Cleanup(func() {
		if d.cmd != nil {
			d.kill()
		}
		if t.Failed() && d.logPath == "" {
			t.Logf("daemon log:\n%s", d.logs.String())
		}
	})
	return d
}

func freeTCPAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func (d *daemon) start() {
	d.t.Helper()
	args := append([]string{"serve", "--data-dir", d.dir, "--socket", d.ctl, "--nbd-unix", d.nbdSock,
		"--nbd-tcp", d.tcp, "--log-level", "debug"}, d.extra...)
	d.cmd = exec.Command(d.bin, args...)
	if d.logs == nil {
		d.logs = &syncBuffer{}
	}
	d.cmd.Stdout, d.cmd.Stderr = d.logs, d.logs
	if len(d.env) > 0 {
		d.cmd.Env = append(os.Environ(), d.env...)
	}
	if d.logPath != "" {
		f, err := os.OpenFile(d.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			d.t.Fatal(err)
		}
		defer f.Close() // the child has its own descriptor
		d.cmd.Stdout, d.cmd.Stderr = f, f
	}
	if err := d.cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	done, exited := make(chan error, 1), make(chan struct{})
	d.done, d.exited = done, exited
	go func(c *exec.Cmd) {
		err := c.Wait()
		d.exitErr = err
		close(exited)
		done <- err
	}(d.cmd)
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("unix", d.ctl); err == nil {
			c.Close()
			if c, err := net.Dial("unix", d.nbdSock); err == nil {
				c.Close()
				return
			}
		}
		select {
		case err := <-d.done:
			d.cmd = nil
			d.t.Fatalf("fcnbd serve exited at start: %v\n%s", err, d.output())
		case <-time.After(50 * time.Millisecond):
		}
	}
	// SIGQUIT: the Go runtime prints every goroutine's stack, which says where it waits.
	d.cmd.Process.Signal(syscall.SIGQUIT)
	select {
	case <-d.exited:
	case <-time.After(10 * time.Second):
		d.cmd.Process.Kill()
		<-d.exited
	}
	d.t.Fatalf("fcnbd serve did not listen within 10s; its output after SIGQUIT:\n%s", d.output())
}

// output is what the daemon printed: logs, or the end of the file at logPath.
func (d *daemon) output() string {
	if d.logPath == "" {
		return d.logs.String()
	}
	data, err := os.ReadFile(d.logPath)
	if err != nil {
		return err.Error()
	}
	const most = 64 << 10
	if len(data) > most {
		data = data[len(data)-most:]
	}
	return string(data)
}

// stop sends SIGTERM and requires a clean exit (status 0) within 20 s.
func (d *daemon) stop() {
	d.t.Helper()
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-d.done:
		d.cmd = nil
		if err != nil {
			d.t.Fatalf("fcnbd serve exited with %v after SIGTERM\n%s", err, d.logs.String())
		}
	case <-time.After(20 * time.Second):
		d.kill()
		d.t.Fatalf("fcnbd serve did not exit within 20s of SIGTERM")
	}
}

func (d *daemon) kill() {
	d.cmd.Process.Kill()
	<-d.done
	d.cmd = nil
}

// run runs the fcnbd CLI against this daemon and returns stdout, stderr and the error.
func (d *daemon) run(args ...string) (string, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, d.bin, append([]string{"--socket", d.ctl}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return out.String(), errb.String(), err
}

// cli runs the fcnbd CLI and fails the test if it fails.
func (d *daemon) cli(args ...string) string {
	d.t.Helper()
	out, errs, err := d.run(args...)
	if err != nil {
		d.t.Fatalf("fcnbd %s: %v\nstdout: %s\nstderr: %s", strings.Join(args, " "), err, out, errs)
	}
	return out
}

// uri is the NBD URI of a volume over the daemon's Unix socket.
func (d *daemon) uri(vol string) string {
	return fmt.Sprintf("nbd+unix:///%s?socket=%s", vol, d.nbdSock)
}

// sh runs a command (not fcnbd) and fails the test if it fails; it returns combined output.
func sh(t testing.TB, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// The daemon re-executes itself (keeping its PID) with the GODEBUG setting that keeps the Go
// runtime's monitor thread awake; an operator's own schedtrace is left alone.
func TestDaemonRuntimeSetting(t *testing.T) {
	godebug := func(d *daemon) string {
		env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", d.cmd.Process.Pid))
		if err != nil {
			t.Fatal(err)
		}
		for _, kv := range strings.Split(string(env), "\x00") {
			if v, ok := strings.CutPrefix(kv, "GODEBUG="); ok {
				return v
			}
		}
		return ""
	}
	t.Setenv("GODEBUG", "")
	d := startDaemon(t)
	if got := godebug(d); got != "schedtrace=2147483647" {
		t.Errorf("daemon runs with GODEBUG=%q, want schedtrace=2147483647", got)
	}
	d.stop()

	t.Setenv("GODEBUG", "schedtrace=0")
	d = startDaemon(t)
	if got := godebug(d); got != "schedtrace=0" {
		t.Errorf("daemon runs with GODEBUG=%q, want the operator's schedtrace=0", got)
	}
}
