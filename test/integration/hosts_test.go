package integration

import (
	"crypto/x509"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// makeHostCerts generates a CA, a server certificate for 127.0.0.1 in dir/server, and for each
// cn a client certificate in dir/<cn> (ca-cert.pem, client-cert.pem, client-key.pem).
func makeHostCerts(t *testing.T, cns ...string) (server string, clients map[string]string) {
	t.Helper()
	root := t.TempDir()
	ca := newTestCA(t, "fcnbd hosts test CA")
	issue := func(serial int64, cn string, usage x509.ExtKeyUsage, prefix string) string {
		dir := filepath.Join(root, cn)
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		ca.issue(t, serial, cn, usage, dir, prefix)
		writePEMFile(t, filepath.Join(dir, "ca-cert.pem"), "CERTIFICATE", ca.der)
		return dir
	}
	server = issue(2, "server", x509.ExtKeyUsageServerAuth, "server")
	clients = map[string]string{}
	for i, cn := range cns {
		clients[cn] = issue(int64(10+i), cn, x509.ExtKeyUsageClientAuth, "client")
	}
	return server, clients
}

// nbdinfoErr runs nbdinfo, which must fail, and returns its output.
func nbdinfoErr(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("nbdinfo", args...).CombinedOutput()
	if err == nil {
		t.Fatalf("nbdinfo %s succeeded:\n%s", strings.Join(args, " "), out)
	}
	return string(out)
}

// listed returns the export names nbdinfo --list shows at uri.
func listed(t *testing.T, uri string) []string {
	t.Helper()
	out := sh(t, "nbdinfo", "--list", "--json", uri)
	var names []string
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		if v, ok := strings.CutPrefix(line, `"export-name": "`); ok {
			names = append(names, strings.TrimSuffix(strings.TrimSuffix(v, ","), `"`))
		}
	}
	return names
}

func sameNames(got []string, want ...string) bool {
	if len(got) != len(want) {
		return false
	}
	for i := range got {
		if got[i] != want[i] {
			return false
		}
	}
	return true
}

// nbdshRevoke connects as a TLS client to EXPORT, reads, writes READY and waits for GO, then
// expects its next read to fail and the connection to be closed: the host mapping was removed
// meanwhile.
const nbdshRevoke = `
import nbd, os, time
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(CERTS)
h.set_export_name(EXPORT)
h.connect_tcp(HOST, PORT)
h.pread(4096, 0)
open(READY, "w").close()
for _ in range(600):
    if os.path.exists(GO):
        break
    time.sleep(0.05)
try:
    h.pread(4096, 0)
    print("read-after-revoke-succeeded")
except nbd.Error as e:
    print("revoked-ok", e.errno)
# The server closes the connection: the next request can't even be sent.
try:
    h.pread(4096, 0)
    print("second-read-succeeded")
except nbd.Error as e:
    pass
print("closed" if h.aio_is_dead() or h.aio_is_closed() else "still-open")
`

// TestHostsAccessControl: hosts and host mappings decide which NBD clients see which exports.
// TLS clients are identified by their certificate's CN, plain TCP clients by ip:ADDRESS, root
// on the Unix socket sees everything; an invisible export is refused exactly as an unknown
// one; removing a mapping revokes the open connection too; and with no host left, every
// client sees every export again. Hosts and mappings survive a restart.
func TestHostsAccessControl(t *testing.T) {
	needTools(t, "nbdinfo", "python3")
	server, certs := makeHostCerts(t, "hostA", "hostB")
	d := startDaemon(t, "--tls", "on", "--tls-certs", server)
	d.cli("mkvolume", "-name", "vol1", "-size", "8M")
	d.cli("mkvolume", "-name", "vol2", "-size", "8M")
	asA, asB := d.tlsURI("", certs["hostA"]), d.tlsURI("", certs["hostB"])
	plain := "nbd://" + d.tcp + "/"
	unix := "nbd+unix:///?socket=" + d.nbdSock

	// No host: every client sees every export.
	for _, uri := range []string{asA, asB, plain, unix} {
		if got := listed(t, uri); !sameNames(got, "vol1", "vol2") {
			t.Fatalf("no host defined: %s lists %v, want vol1 vol2", uri, got)
		}
	}

	if out := d.cli("mkhost", "-name", "hostA", "-nbdname", "hostA"); strings.TrimSpace(out) != "Host, id [0], successfully created" {
		t.Errorf("mkhost: %q", out)
	}
	waitLog(t, d, "first host defined: NBD access control is on; clients see only the volumes mapped to their host")
	if out := d.cli("mkvdiskhostmap", "-host", "hostA", "vol1"); strings.TrimSpace(out) != "Virtual Disk to Host map, id [0], successfully created" {
		t.Errorf("mkvdiskhostmap: %q", out)
	}

	// Persisted: the same after a restart.
	d.stop()
	d.start()
	if out := d.cli("lshostvdiskmap", "-delim", "!", "-nohdr", "hostA"); !strings.HasPrefix(out, "0!hostA!0!0!vol1!") {
		t.Errorf("after a restart lshostvdiskmap hostA: %q", out)
	}

	if got := listed(t, asA); !sameNames(got, "vol1") {
		t.Errorf("hostA lists %v, want vol1", got)
	}
	if out := sh(t, "nbdinfo", "--size", d.tlsURI("vol1", certs["hostA"])); strings.TrimSpace(out) != "8388608" {
		t.Errorf("hostA nbdinfo --size vol1: %q", out)
	}
	if got := listed(t, asB); len(got) != 0 {
		t.Errorf("hostB (no host of its own) lists %v, want nothing", got)
	}
	if got := listed(t, plain); len(got) != 0 {
		t.Errorf("a plain TCP client lists %v, want nothing", got)
	}
	if got := listed(t, unix); !sameNames(got, "vol1", "vol2") {
		t.Errorf("root on the Unix socket lists %v, want vol1 vol2", got)
	}

	// hostB is refused vol1 exactly as an export that does not exist.
	refused := nbdinfoErr(t, "--size", d.tlsURI("vol1", certs["hostB"]))
	unknown := nbdinfoErr(t, "--size", d.tlsURI("nosuchvol", certs["hostB"]))
	if strings.ReplaceAll(refused, "vol1", "X") != strings.ReplaceAll(unknown, "nosuchvol", "X") {
		t.Errorf("an invisible export is answered unlike an unknown one:\n%s\nvs\n%s", refused, unknown)
	}
	nbdinfoErr(t, "--size", d.tlsURI("vol2", certs["hostA"]))

	// Plain TCP clients are known by their address.
	d.cli("mkhost", "-name", "local", "-nbdname", "ip:127.0.0.1")
	d.cli("mkvdiskhostmap", "-host", "local", "vol2")
	if got := listed(t, plain); !sameNames(got, "vol2") {
		t.Errorf("ip:127.0.0.1 lists %v, want vol2", got)
	}
	if out := sh(t, "nbdinfo", "--size", "nbd://"+d.tcp+"/vol2"); strings.TrimSpace(out) != "8388608" {
		t.Errorf("plain nbdinfo --size vol2: %q", out)
	}
	nbdinfoErr(t, "--size", "nbd://"+d.tcp+"/vol1")

	// Refusals change nothing.
	before := d.cli("lshostvdiskmap", "-delim", "!")
	for _, args := range [][]string{
		{"rmhost", "hostA"},                                        // mapped
		{"rmvolume", "vol1"},                                       // mapped
		{"mkvdiskhostmap", "-host", "hostB", "vol1"},               // no such host
		{"mkvdiskhostmap", "-host", "local", "vol1"},               // mapped to another host, no -force
		{"mkvdiskhostmap", "-host", "hostA", "-scsi", "0", "vol2"}, // SCSI id in use... and mapped elsewhere
		{"mkhost", "-name", "hostC", "-nbdname", "hostA"},          // port name in use
		{"rmvdiskhostmap", "-host", "local", "vol1"},               // no such mapping
	} {
		_, errs, err := d.run(args...)
		if err == nil || !strings.HasPrefix(errs, "CMMVC") {
			t.Errorf("fcnbd %s: %v, stderr %q; want a CMMVC refusal", strings.Join(args, " "), err, errs)
		}
	}
	if after := d.cli("lshostvdiskmap", "-delim", "!"); after != before {
		t.Errorf("refusals changed the mappings:\n%s\nto\n%s", before, after)
	}
	if out := d.cli("lshost", "-nohdr", "-delim", ":"); strings.Count(out, "\n") != 2 {
		t.Errorf("refusals changed the hosts:\n%s", out)
	}

	// Revocation: hostA's open connection to vol1 fails and is closed once the mapping is removed.
	host, port, _ := net.SplitHostPort(d.tcp)
	tmp := t.TempDir()
	ready, goFile := filepath.Join(tmp, "ready"), filepath.Join(tmp, "go")
	script := "CERTS = " + pyString(certs["hostA"]) + "\nHOST = " + pyString(host) + "\nPORT = " + pyString(port) +
		"\nEXPORT = 'vol1'\nREADY = " + pyString(ready) + "\nGO = " + pyString(goFile) + "\n" + nbdshRevoke
	py := exec.Command("/usr/bin/python3", "-c", script)
	var pyOut syncBuffer
	py.Stdout, py.Stderr = &pyOut, &pyOut
	if err := py.Start(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(ready); err == nil {
			break
		}
		if time.Now().After(deadline) {
			py.Process.Kill()
			py.Wait()
			t.Fatalf("the nbdsh client did not connect:\n%s", pyOut.String())
		}
	}
	d.cli("rmvdiskhostmap", "-host", "hostA", "vol1")
	os.WriteFile(goFile, nil, 0o600)
	if err := py.Wait(); err != nil || !strings.Contains(pyOut.String(), "revoked-ok") || !strings.Contains(pyOut.String(), "closed") {
		t.Errorf("open connection after rmvdiskhostmap: %v\n%s", err, pyOut.String())
	}
	nbdinfoErr(t, "--size", d.tlsURI("vol1", certs["hostA"]))
	if got := listed(t, asA); len(got) != 0 {
		t.Errorf("after rmvdiskhostmap hostA lists %v, want nothing", got)
	}

	// No host left: open again.
	d.cli("rmhost", "hostA")
	d.cli("rmhost", "-force", "local")
	waitLog(t, d, "last host deleted: NBD access control is off; every client sees every volume")
	for _, uri := range []string{asA, asB, plain} {
		if got := listed(t, uri); !sameNames(got, "vol1", "vol2") {
			t.Errorf("no host left: %s lists %v, want vol1 vol2", uri, got)
		}
	}
	d.cli("rmvolume", "vol1")
}

// TestHostsUnixUID: a Unix-socket client other than root is known as uid:N. (The socket is
// root's, 0600, in production; the test opens it to user nobody to show the rule.)
func TestHostsUnixUID(t *testing.T) {
	needRoot(t)
	needTools(t, "nbdinfo", "setpriv")
	d := startDaemon(t)
	d.cli("mkvolume", "-name", "vol1", "-size", "8M")
	d.cli("mkvolume", "-name", "vol2", "-size", "8M")
	if err := os.Chmod(filepath.Dir(d.nbdSock), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(d.nbdSock, 0o666); err != nil {
		t.Fatal(err)
	}
	unix := "nbd+unix:///?socket=" + d.nbdSock
	asNobody := func() []string {
		t.Helper()
		out := sh(t, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "nbdinfo", "--list", "--json", unix)
		var names []string
		for _, line := range strings.Split(out, "\n") {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), `"export-name": "`); ok {
				names = append(names, strings.TrimSuffix(strings.TrimSuffix(v, ","), `"`))
			}
		}
		return names
	}
	if got := asNobody(); !sameNames(got, "vol1", "vol2") {
		t.Fatalf("no host: uid 65534 lists %v", got)
	}
	d.cli("mkhost", "-name", "other", "-nbdname", "uid:1000")
	if got := asNobody(); len(got) != 0 {
		t.Errorf("uid 65534, no host of its own, lists %v", got)
	}
	d.cli("mkhost", "-name", "nobody", "-nbdname", "uid:65534")
	d.cli("mkvdiskhostmap", "-host", "nobody", "vol2")
	if got := asNobody(); !sameNames(got, "vol2") {
		t.Errorf("uid:65534 lists %v, want vol2", got)
	}
	if got := listed(t, unix); !sameNames(got, "vol1", "vol2") {
		t.Errorf("root lists %v, want vol1 vol2", got)
	}
	_, errs, err := d.run("mkhost", "-name", "root", "-nbdname", "uid:0")
	if err == nil || !strings.HasPrefix(errs, "CMMVC6581E") {
		t.Errorf("mkhost -nbdname uid:0: %v %q", err, errs)
	}
}
