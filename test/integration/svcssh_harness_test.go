package integration

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// svcSSH is the SVC command line over SSH for one test: an account installed by
// `fcnbd sshsetup install` and a private sshd on a loopback port that reads the real
// /etc/ssh/sshd_config, so the installed drop-in is what is tested.
type svcSSH struct {
	host, port, user, key string
	dir                   string // a directory for the test's files
	bin                   string // the fcnbd the account runs
}

// sshArgs are the client options for this server, before the destination.
func (s *svcSSH) sshArgs() []string {
	return []string{"-i", s.key, "-p", s.port, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
		"-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"}
}

// run runs one command line over SSH and returns its stdout, stderr and exit status (255:
// ssh itself failed).
func (s *svcSSH) run(t testing.TB, line string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ssh", append(s.sshArgs(), "--", s.user+"@"+s.host, line)...)
	var out, errb bytes.Buffer
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, &out, &errb
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		t.Fatalf("ssh %q: %v", line, err)
	}
	return out.String(), errb.String(), code
}

// startSVCSSH installs an SVC SSH account for the daemon d and starts a private sshd for it.
// d may be running (install gives its socket to the fcnbd group) or, from newDaemon, not yet
// started: then startSVCSSH starts it after the install (and the daemon gives the group its
// socket itself). It returns
// run (one command line over a real ssh client), the server's host and port, the account
// and its private key file. Everything is removed when the test ends.
func startSVCSSH(t *testing.T, d *daemon) (run func(line string) (stdout, stderr string, code int), host, port, user, keyfile string) {
	s := startSVCSSHServer(t, d)
	return func(line string) (string, string, int) { return s.run(t, line) }, s.host, s.port, s.user, s.key
}

func startSVCSSHServer(t *testing.T, d *daemon) *svcSSH {
	t.Helper()
	needRoot(t)
	needTools(t, "sshd", "ssh", "ssh-keygen", "useradd", "runuser")
	// The account must be able to run the binary and reach the socket: a world-readable copy
	// of the binary, and the daemon's (private) temporary directory opened for traversal.
	dir, err := os.MkdirTemp("", "fcnbd-ssh-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "fcnbd")
	data, err := os.ReadFile(d.bin)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Dir(d.ctl), 0o755); err != nil {
		t.Fatal(err)
	}
	var rnd [3]byte
	rand.Read(rnd[:])
	s := &svcSSH{host: "127.0.0.1", user: "fcsvc" + hex.EncodeToString(rnd[:]), key: filepath.Join(dir, "id"), dir: dir, bin: bin}
	// An RSA key in PEM form: Cinder's SSHPool reads the key file with paramiko.RSAKey, as
	// automation for SVC commonly does.
	sh(t, "ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-m", "PEM", "-N", "", "-C", "fcnbd-test", "-f", s.key)
	sh(t, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", filepath.Join(dir, "hostkey"))

	t.Cleanup(func() {
		if out, err := exec.Command(bin, "sshsetup", "remove", "--user", s.user).CombinedOutput(); err != nil {
			t.Errorf("sshsetup remove: %v\n%s", err, out)
		}
	})
	sh(t, bin, "sshsetup", "install", "--user", s.user, "--key", s.key+".pub", "--socket", d.ctl)
	if d.cmd == nil {
		d.start()
	}

	addr := freeTCPAddr(t)
	_, s.port, _ = net.SplitHostPort(addr)
	logs := &syncBuffer{}
	sshd := exec.Command("/usr/sbin/sshd", "-D", "-e", "-f", "/etc/ssh/sshd_config",
		"-o", "Port="+s.port, "-o", "ListenAddress=127.0.0.1", "-o", "PidFile="+filepath.Join(dir, "sshd.pid"),
		"-o", "HostKey="+filepath.Join(dir, "hostkey"))
	sshd.Stdout, sshd.Stderr = logs, logs
	if err := sshd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { sshd.Wait(); close(exited) }()
	t.Cleanup(func() {
		sshd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("sshd log:\n%s", logs.String())
		}
	})
	for deadline := time.Now().Add(10 * time.Second); ; {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			break
		}
		select {
		case <-exited:
			t.Fatalf("sshd exited at start:\n%s", logs.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("sshd did not listen on %s within 10s:\n%s", addr, logs.String())
		}
	}
	return s
}
