package integration

// The VM harness: runs a guest script in a throwaway VM (a stock Debian kernel under qemu, built
// by scripts/vm-build.sh, booted by scripts/vm-run.sh) so that tests can use the real kernel NBD
// driver although the host kernel has none. Guest scripts live in test/integration/guest/; every
// run gets guest/lib.sh as /guest/lib.sh. The guest reaches host endpoints only through
// VMForward (10.0.2.100:PORT inside the guest).

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// VMOption configures one runVM call.
type VMOption func(*vmConfig)

type vmConfig struct {
	args    []string
	timeout time.Duration
	onLine  func(string)
}

// VMForward makes hostSpec (PORT, 127.0.0.1:PORT or unix:/path) reachable from the guest at
// 10.0.2.100:guestPort.
func VMForward(guestPort int, hostSpec string) VMOption {
	return func(c *vmConfig) { c.args = append(c.args, "--fwd", fmt.Sprintf("%d=%s", guestPort, hostSpec)) }
}

// VMFile copies a host file into the guest (a relative guestPath is under /guest).
func VMFile(guestPath, hostPath string) VMOption {
	return func(c *vmConfig) { c.args = append(c.args, "--file", guestPath+"="+hostPath) }
}

// VMEnv exports NAME=VALUE to the guest script.
func VMEnv(name, value string) VMOption {
	return func(c *vmConfig) { c.args = append(c.args, "--env", name+"="+value) }
}

// VMTimeout bounds the whole VM run (default 4 minutes).
func VMTimeout(d time.Duration) VMOption {
	return func(c *vmConfig) { c.timeout = d }
}

// VMConnectWait lets guest connections to a forwarded endpoint that is not accepting (a daemon
// being restarted) wait up to d for it instead of being closed at once.
func VMConnectWait(d time.Duration) VMOption {
	return func(c *vmConfig) {
		c.args = append(c.args, "--connect-wait", strconv.Itoa(int(d.Round(time.Second)/time.Second)))
	}
}

// VMOnLine calls f with every console line as it arrives (from another goroutine).
func VMOnLine(f func(line string)) VMOption {
	return func(c *vmConfig) { c.onLine = f }
}

// VMResult is the outcome of a guest script that ran to completion.
type VMResult struct {
	ExitCode int
	Console  string
	Elapsed  time.Duration
}

// Lines returns the console lines that start with prefix, prefix removed and trimmed.
func (r VMResult) Lines(prefix string) []string {
	var out []string
	for _, l := range strings.Split(r.Console, "\n") {
		l = strings.TrimRight(l, "\r")
		if strings.HasPrefix(l, prefix) {
			out = append(out, strings.TrimSpace(strings.TrimPrefix(l, prefix)))
		}
	}
	return out
}

var (
	vmBuildOnce sync.Once
	vmBuildErr  error
	vmBuildSkip string // non-empty: the VM cannot be built here (no mirror), with the reason
	vmMu        sync.Mutex
)

// vmRepoRoot is the repository root (tests run in test/integration).
func vmRepoRoot(t testing.TB) string {
	t.Helper()
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "scripts", "vm-run.sh")); err != nil {
		t.Fatalf("scripts/vm-run.sh not found under %s", root)
	}
	return root
}

// vmRequire checks the prerequisites of the VM tests and builds the VM image once per test
// binary. Skip/fail policy: not root → skip; a missing tool or an image that cannot be built
// because the Debian mirror is unreachable → fail when CI is set, skip otherwise.
func vmRequire(t testing.TB) {
	t.Helper()
	if os.Getenv("FCNBD_SKIP_VM") != "" {
		t.Skip("skipped: FCNBD_SKIP_VM is set")
	}
	if os.Geteuid() != 0 {
		t.Skip("skipped: the kernel NBD VM tests need root")
	}
	needTools(t, "qemu-system-x86_64", "socat", "cpio", "apt-get", "dpkg-deb", "xz")
	root := vmRepoRoot(t)
	vmBuildOnce.Do(func() {
		start := time.Now()
		cmd := exec.Command(filepath.Join(root, "scripts", "vm-build.sh"))
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		err := cmd.Run()
		var ee *exec.ExitError
		switch {
		case err == nil:
			t.Logf("vm-build.sh: %s (%.1fs)", strings.TrimSpace(lastLine(out.String())), time.Since(start).Seconds())
		case errors.As(err, &ee) && ee.ExitCode() == 3:
			vmBuildSkip = "the test VM cannot be built: " + strings.TrimPrefix(strings.TrimSpace(lastLine(out.String())), "vm-build: ")
		default:
			vmBuildErr = fmt.Errorf("scripts/vm-build.sh: %v\n%s", err, out.String())
		}
	})
	if vmBuildSkip != "" {
		need(t, vmBuildSkip, false)
	}
	if vmBuildErr != nil {
		t.Fatal(vmBuildErr)
	}
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

// vmGuestScript returns the text of test/integration/guest/NAME.
func vmGuestScript(t testing.TB, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("guest", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// runVM boots the test VM, runs script (bash source text) as root in it and returns its result.
// A timeout, a boot failure or a harness error fails the test; the guest script's exit code is
// returned for the caller to judge. VMs run one at a time.
func runVM(t *testing.T, script string, opts ...VMOption) VMResult {
	t.Helper()
	vmRequire(t)
	cfg := vmConfig{timeout: 4 * time.Minute}
	for _, o := range opts {
		o(&cfg)
	}
	root := vmRepoRoot(t)
	dir := t.TempDir()
	scriptPath := filepath.Join(dir, "script.sh")
	if err := os.WriteFile(scriptPath, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, "console.log")
	resultPath := filepath.Join(dir, "result")
	secs := int(cfg.timeout.Round(time.Second) / time.Second)
	args := append([]string{filepath.Join(root, "scripts", "vm-run.sh"), scriptPath,
		"--file", "lib.sh=" + filepath.Join(root, "test", "integration", "guest", "lib.sh"),
		"--timeout", strconv.Itoa(secs), "--log", logPath, "--result-file", resultPath},
		cfg.args...)

	vmMu.Lock()
	defer vmMu.Unlock()

	cmd := exec.Command("bash", args...)
	// Its own process group, so that qemu and the socat relays go with it whatever happens.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pgid := cmd.Process.Pid
	killGroup := func() {
		syscall.Kill(-pgid, syscall.SIGTERM)
		time.Sleep(3 * time.Second)
		syscall.Kill(-pgid, syscall.SIGKILL)
	}
	// Backstop beyond vm-run.sh's own timeout, and whatever ends the test early.
	ctx, cancel := context.WithTimeout(context.Background(), cfg.timeout+time.Minute)
	defer cancel()
	stopped := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			if ctx.Err() == context.DeadlineExceeded {
				killGroup()
			}
		case <-stopped:
		}
	}()
	defer func() {
		close(stopped)
		syscall.Kill(-pgid, syscall.SIGKILL) // nothing of this run may outlive it
	}()

	sc := bufio.NewScanner(stdout)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		if cfg.onLine != nil {
			cfg.onLine(line)
		}
		if testing.Verbose() && strings.HasPrefix(line, "GUEST-") {
			t.Logf("guest: %s", line)
		}
	}
	waitErr := cmd.Wait()
	elapsed := time.Since(start)
	console, _ := os.ReadFile(logPath)
	res := VMResult{Console: string(console), Elapsed: elapsed}
	verdict, _ := os.ReadFile(resultPath)
	v := strings.TrimSpace(string(verdict))
	t.Logf("VM run: %s in %.1fs", v, elapsed.Seconds())
	var ee *exec.ExitError
	if errors.As(waitErr, &ee) && ee.ExitCode() == 127 && v == "error" {
		need(t, "the test VM cannot be built: its packages could not be downloaded", false)
	}
	if n, ok := strings.CutPrefix(v, "guest "); ok {
		res.ExitCode, err = strconv.Atoi(n)
		if err == nil {
			if res.ExitCode != 0 {
				t.Logf("guest console:\n%s", res.Console)
			}
			return res
		}
	}
	t.Fatalf("VM run failed (%s, %v): %s\nconsole:\n%s", v, waitErr, strings.TrimSpace(stderr.String()), res.Console)
	return res
}

// requireVMOK fails the test unless the guest script exited 0.
func requireVMOK(t *testing.T, r VMResult) {
	t.Helper()
	if r.ExitCode != 0 {
		var fails []string
		fails = append(fails, r.Lines("GUEST-FAIL:")...)
		t.Fatalf("guest script exited %d: %s", r.ExitCode, strings.Join(fails, "; "))
	}
}
