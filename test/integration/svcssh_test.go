package integration

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// The SVC command line over a real sshd and a real ssh client, through the account and the
// drop-in `fcnbd sshsetup install` wrote: the same lines give the same output as the local
// `fcnbd svcinfo|svctask`, in both views, with -delim ! and :, -nohdr and -filtervalue.
func TestSVCSSHCommands(t *testing.T) {
	d := startDaemon(t) // running already: install gives its socket to the group
	run, _, _, _, _ := startSVCSSH(t, d)
	ok := func(line string) string {
		t.Helper()
		out, errs, code := run(line)
		if code != 0 || errs != "" {
			t.Fatalf("ssh %q: exit %d\nstdout: %s\nstderr: %s", line, code, out, errs)
		}
		return out
	}
	// The local front-end, for comparison.
	local := func(line string) string {
		t.Helper()
		words := strings.Fields(line)
		prefix := "svctask"
		if strings.HasPrefix(words[0], "ls") {
			prefix = "svcinfo"
		}
		return d.cli(append([]string{prefix}, words...)...)
	}

	if out := ok(`svctask mkvolume -name "volume-1f3e" -size 4M`); out != "Volume, id [0], successfully created\n" {
		t.Fatalf("mkvolume: %q", out)
	}
	if out := ok(`mkvolume -name 'volume-2b' -size 4M`); out != "Volume, id [1], successfully created\n" {
		t.Fatalf("bare mkvolume: %q", out)
	}
	ok(`svctask mkvolume -name vol\-other -size 4M`)
	for _, line := range []string{
		"lsvolume -delim !", "lsvolume -delim :", "lsvolume -nohdr -delim :", "lsvolume -bytes -delim !",
		"lsvolume", "lsvolume -delim : volume-1f3e", "lsvolume -delim ! -bytes 1",
	} {
		if got, want := ok("svcinfo "+line), local(line); got != want {
			t.Errorf("%q over SSH:\n%s\nlocally:\n%s", line, got, want)
		}
	}
	if out := ok(`svcinfo lsvolume -nohdr -delim : -filtervalue "name=volume-*"`); !regexp.MustCompile(`^0:volume-1f3e:online:4\.00MB:0\n1:volume-2b:online:4\.00MB:0\n$`).MatchString(out) {
		t.Errorf("filtered lsvolume: %q", out)
	}
	if out := ok("lsvolume -delim ! volume-1f3e"); !strings.Contains(out, "name!volume-1f3e\n") || !strings.Contains(out, "capacity!4.00MB\n") {
		t.Errorf("detailed lsvolume: %q", out)
	}

	// The FlashCopy lifecycle.
	if out := ok(`svctask mkfcmap -source "volume-1f3e" -target volume-2b -name snap-1 -copyrate 0`); out != "FlashCopy Mapping, id [0], successfully created\n" {
		t.Fatalf("mkfcmap: %q", out)
	}
	ok("svctask chfcmap -autodelete off snap-1")
	ok("chfcmap -copyrate 100 0")
	for _, line := range []string{"lsfcmap -delim !", "lsfcmap -delim :", "lsfcmap -nohdr -delim ! -filtervalue status=idle_or_copied", "lsfcmap -delim : snap-1"} {
		if got, want := ok("svcinfo "+line), local(line); got != want {
			t.Errorf("%q over SSH:\n%s\nlocally:\n%s", line, got, want)
		}
	}
	ok("svctask startfcmap -prep snap-1")
	if out := ok("svcinfo lsfcmap -delim : -nohdr -filtervalue name=snap*"); !strings.Contains(out, ":snap-1:0:volume-1f3e:1:volume-2b:") {
		t.Errorf("lsfcmap after start: %q", out)
	}
	ok("svcinfo lsfcmapprogress -delim : snap-1")
	ok("svctask stopfcmap -force snap-1")
	ok("svctask rmfcmap -force snap-1")
	if out := ok("svcinfo lsfcmap -nohdr -delim :"); out != "" {
		t.Errorf("lsfcmap after rmfcmap: %q", out)
	}
	// Flags after the first positional argument are the command's, not the shell's.
	ok(`svctask rmvolume -force "vol-other"`)
	if out := ok("svcinfo lsvolume -nohdr -delim : -filtervalue name=vol-*"); out != "" {
		t.Errorf("vol-other survived rmvolume: %q", out)
	}
}

// Everything but one SVC command is refused, with a CMMVC code, and changes nothing: shell
// syntax, substitutions, control characters, long lines, unknown commands and paths, socket
// smuggling, interactive logins, forwarding, sftp and scp.
func TestSVCSSHRefusals(t *testing.T) {
	d := newDaemon(t)
	s := startSVCSSHServer(t, d)
	marker := filepath.Join(s.dir, "pwned")
	for _, line := range []string{"mkvolume -name keep -size 1M", "mkvolume -name keep2 -size 1M"} {
		if out, errs, code := s.run(t, line); code != 0 {
			t.Fatalf("%q: %d %s %s", line, code, out, errs)
		}
	}
	before := d.cli("lsvolume", "-delim", ":")
	other := filepath.Join(s.dir, "other.sock")

	refused := []struct{ line, code string }{
		{"lsvolume; touch " + marker, "CMMVC9040E"},
		{"lsvolume;touch " + marker, "CMMVC9040E"},
		{"rmvolume keep && touch " + marker, "CMMVC9040E"},
		{"lsvolume || touch " + marker, "CMMVC9040E"},
		{"lsvolume | tee " + marker, "CMMVC9040E"},
		{"lsvolume > " + marker, "CMMVC9040E"},
		{"lsvolume & touch " + marker, "CMMVC9040E"},
		{"rmvolume $(echo keep)", "CMMVC9040E"},
		{"rmvolume `echo keep`", "CMMVC9040E"},
		{`rmvolume "$(echo keep)"`, "CMMVC9040E"},
		{"rmvolume ${HOME}", "CMMVC9040E"},
		{"lsvolume\ntouch " + marker, "CMMVC9040E"},
		{"lsvolume\rtouch " + marker, "CMMVC9040E"},
		{"rmvolume keep\nrmvolume keep2", "CMMVC9040E"},
		{"lsvolume -filtervalue name=" + strings.Repeat("a", 100<<10), "CMMVC9040E"},
		{`rmvolume "keep`, "CMMVC9040E"},
		{"(rmvolume keep)", "CMMVC9040E"},
		{"nosuchcommand", "CMMVC7205E"},
		{"sh -c 'touch " + marker + "'", "CMMVC7205E"},
		{"/bin/sh -c id", "CMMVC7205E"},
		{"../../bin/sh", "CMMVC7205E"},
		{"./fcnbd serve", "CMMVC7205E"},
		{"serve --socket " + other, "CMMVC7205E"},
		{"sshsetup remove --user root", "CMMVC7205E"},
		{"svc-shell", "CMMVC7205E"},
		{"svcinfo rmvolume keep", "CMMVC7205E"},
		{"svctask lsvolume", "CMMVC7205E"},
		{"rmvolume -socket " + other + " keep", "CMMVC5709E"},
		{"rmvolume --socket=" + other + " keep", "CMMVC5709E"},
		{"--socket " + other + " rmvolume keep", "CMMVC7205E"},
		{"rmvolume -nosuchflag keep", "CMMVC5709E"},
		{"scp -t /tmp", "CMMVC7205E"},
		{"internal-sftp", "CMMVC7205E"},
	}
	for _, r := range refused {
		out, errs, code := s.run(t, r.line)
		name := r.line
		if len(name) > 60 {
			name = name[:60] + "…"
		}
		if code != 1 || out != "" || !strings.HasPrefix(errs, r.code+" ") || strings.Count(errs, "\n") != 1 {
			t.Errorf("%q: exit %d, stdout %q, stderr %q; want exit 1 and %s", name, code, out, errs, r.code)
		}
	}

	// Interactive logins: without a TTY, the shell refuses in one line; with one forced (-tt),
	// sshd refuses the TTY (PermitTTY no) and the client gives up; with one asked for (-t),
	// the login goes on without it and the shell refuses.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, opt := range []string{"-T", "-t", "-tt"} {
		cmd := exec.CommandContext(ctx, "ssh", append(append([]string{opt}, s.sshArgs()...), "--", s.user+"@"+s.host)...)
		cmd.Stdin = strings.NewReader("touch " + marker + "\nexit\n")
		out, err := cmd.CombinedOutput()
		ee, ok := err.(*exec.ExitError)
		switch {
		case !ok:
			t.Errorf("interactive login (ssh %s): %v\n%s", opt, err, out)
		case opt == "-tt" && (ee.ExitCode() != 255 || !strings.Contains(string(out), "PTY allocation request failed")):
			t.Errorf("interactive login (ssh -tt): %v\n%s", err, out)
		case opt != "-tt" && (ee.ExitCode() != 1 || !strings.HasPrefix(string(out), "CMMVC9041E ")):
			t.Errorf("interactive login (ssh %s): %v\n%s", opt, err, out)
		}
	}

	// sftp and scp (both protocols) fail.
	src := filepath.Join(s.dir, "src")
	os.WriteFile(src, []byte("x"), 0o644)
	sftp := exec.CommandContext(ctx, "sftp", "-b", "-", "-i", s.key, "-P", s.port, "-o", "BatchMode=yes",
		"-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", s.user+"@"+s.host)
	sftp.Stdin = strings.NewReader("put " + src + " " + marker + "\n")
	if out, err := sftp.CombinedOutput(); err == nil {
		t.Errorf("sftp succeeded:\n%s", out)
	}
	for _, proto := range [][]string{{"-O"}, {"-s"}} {
		scp := exec.CommandContext(ctx, "scp", append(proto, "-i", s.key, "-P", s.port, "-o", "BatchMode=yes",
			"-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", src, s.user+"@"+s.host+":"+marker)...)
		if out, err := scp.CombinedOutput(); err == nil {
			t.Errorf("scp %v succeeded:\n%s", proto, out)
		}
	}

	// Port forwarding: a remote forward is refused outright; a local one is set up by the
	// client but every connection through it is closed unanswered (sshd's banner never comes).
	rf := exec.CommandContext(ctx, "ssh", append(append([]string{"-N", "-o", "ExitOnForwardFailure=yes",
		"-R", "127.0.0.1:0:127.0.0.1:" + s.port}, s.sshArgs()...), "--", s.user+"@"+s.host)...)
	if out, err := rf.CombinedOutput(); err == nil {
		t.Errorf("remote forwarding accepted:\n%s", out)
	}
	lport := freeTCPAddr(t)
	_, lp, _ := net.SplitHostPort(lport)
	lf := exec.CommandContext(ctx, "ssh", append(append([]string{"-N", "-L", lp + ":127.0.0.1:" + s.port}, s.sshArgs()...), "--", s.user+"@"+s.host)...)
	lfOut := &syncBuffer{}
	lf.Stdout, lf.Stderr = lfOut, lfOut
	if err := lf.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { lf.Process.Kill(); lf.Wait() }()
	var got string
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		c, err := net.Dial("tcp", lport)
		if err != nil {
			continue // the client is not listening yet
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 64)
		n, _ := c.Read(buf)
		c.Close()
		got = fmt.Sprintf("connected, read %q", buf[:n])
		if n > 0 {
			t.Errorf("local forwarding reached sshd through the account: %s", got)
		}
		break
	}
	if got == "" {
		t.Logf("the ssh client never listened on %s (forwarding refused before): %s", lport, lfOut.String())
	}

	// The control socket is the account's, but only through svc-shell: neither a forwarded
	// Unix socket nor stdio forwarding (-W) reaches it or anything else.
	fwdSock := filepath.Join(s.dir, "fwd.sock")
	uf := exec.CommandContext(ctx, "ssh", append(append([]string{"-N", "-L", fwdSock + ":" + d.ctl}, s.sshArgs()...), "--", s.user+"@"+s.host)...)
	ufOut := &syncBuffer{}
	uf.Stdout, uf.Stderr = ufOut, ufOut
	if err := uf.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { uf.Process.Kill(); uf.Wait() }()
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		c, err := net.Dial("unix", fwdSock)
		if err != nil {
			continue
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		body := `{"name":"fwd","size":1048576}`
		fmt.Fprintf(c, "POST /volumes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
		buf := make([]byte, 64)
		n, _ := c.Read(buf)
		c.Close()
		if n > 0 {
			t.Errorf("a forwarded Unix socket reached the control socket: %q", buf[:n])
		}
		break
	}
	w := exec.CommandContext(ctx, "ssh", append(append([]string{"-W", "127.0.0.1:" + s.port}, s.sshArgs()...), "--", s.user+"@"+s.host)...)
	if out, err := w.Output(); err == nil || strings.Contains(string(out), "SSH-2.0") {
		t.Errorf("ssh -W reached sshd through the account: %v %q", err, out)
	}

	if _, err := os.Stat(marker); err == nil {
		t.Errorf("%s was created", marker)
	}
	if after := d.cli("lsvolume", "-delim", ":"); after != before {
		t.Errorf("refused commands changed the volumes:\n%s\nthen\n%s", before, after)
	}
	if out, errs, code := s.run(t, "lsvolume -delim :"); code != 0 || out != before {
		t.Errorf("the account stopped working: %d %q %q", code, out, errs)
	}
}

// sshsetup install is idempotent and refuses what it must; remove undoes it.
func TestSVCSSHSetup(t *testing.T) {
	needRoot(t)
	needTools(t, "sshd", "ssh-keygen", "useradd")
	d := newDaemon(t)
	s := startSVCSSHServer(t, d)
	conf := "/etc/ssh/sshd_config.d/fcnbd-" + s.user + ".conf"
	data, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Match User " + s.user + "\n", "ForceCommand " + s.bin + " --socket " + d.ctl + " svc-shell\n",
		"AllowTcpForwarding no\n", "AllowStreamLocalForwarding no\n", "X11Forwarding no\n", "PermitTunnel no\n",
		"AllowAgentForwarding no\n", "PermitTTY no\n", "PermitUserRC no\n"} {
		if !strings.Contains(string(data), want) {
			t.Errorf("%s lacks %q:\n%s", conf, want, data)
		}
	}
	// Again: the same result.
	if out := sh(t, s.bin, "sshsetup", "install", "--user", s.user, "--key", s.key+".pub", "--socket", d.ctl); strings.Contains(out, "warning") {
		t.Errorf("a second install warns, with the daemon running:\n%s", out)
	}
	if again, _ := os.ReadFile(conf); string(again) != string(data) {
		t.Errorf("a second install changed %s:\n%s", conf, again)
	}
	if out, errs, code := s.run(t, "lsvolume"); code != 0 {
		t.Errorf("after a second install: %d %q %q", code, out, errs)
	}
	// Refusals: an account it did not create, a bad name, a bad key.
	for _, args := range [][]string{
		{"install", "--user", "root", "--key", s.key + ".pub"},
		{"install", "--user", "daemon", "--key", s.key + ".pub"},
		{"install", "--user", "a;b", "--key", s.key + ".pub"},
		{"install", "--user", s.user + "x", "--key", s.key},
		{"remove", "--user", "daemon"},
	} {
		if out, err := exec.Command(s.bin, append([]string{"sshsetup"}, args...)...).CombinedOutput(); err == nil {
			t.Errorf("sshsetup %q succeeded:\n%s", args, out)
		}
	}
	// A binary the account cannot run (in a private directory): refused, no account left.
	private := filepath.Join(s.dir, "private")
	os.Mkdir(private, 0o700)
	sh(t, "cp", s.bin, private+"/fcnbd")
	if out, err := exec.Command(private+"/fcnbd", "sshsetup", "install", "--user", s.user+"x", "--key", s.key+".pub", "--socket", d.ctl).CombinedOutput(); err == nil || !strings.Contains(string(out), "cannot run") {
		t.Errorf("install with a private binary: %v\n%s", err, out)
	}
	if _, err := os.Stat("/etc/ssh/sshd_config.d/fcnbd-" + s.user + "x.conf"); err == nil {
		t.Errorf("a refused install left a drop-in")
	}
	if out, err := exec.Command("id", s.user+"x").CombinedOutput(); err == nil {
		t.Errorf("a refused install left an account: %s", out)
	}
	// Remove, twice: the account and the drop-in are gone, and the key no longer logs in.
	sh(t, s.bin, "sshsetup", "remove", "--user", s.user)
	sh(t, s.bin, "sshsetup", "remove", "--user", s.user)
	if _, err := os.Stat(conf); err == nil {
		t.Errorf("%s survived remove", conf)
	}
	if out, err := exec.Command("id", s.user).CombinedOutput(); err == nil {
		t.Errorf("the account survived remove: %s", out)
	}
	if out, errs, code := s.run(t, "lsvolume"); code != 255 {
		t.Errorf("a removed account still logs in: %d %q %q", code, out, errs)
	}
}
