package integration

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// tlsDirs are certificate directories as the daemon and the clients expect them: the server's
// (ca-cert.pem, server-cert.pem, server-key.pem), a client's with a certificate the CA signed
// (ca-cert.pem, client-cert.pem, client-key.pem, as libnbd's tls-certificates and qemu's
// tls-creds-x509 read them), and a client's with the CA only.
type tlsDirs struct {
	server, client, noCert string
}

const tlsClientCN = "fcnbd-test-client"

// makeTLSDirs generates a CA, a server certificate for 127.0.0.1 and localhost and a client
// certificate, ECDSA P-256, valid for a day.
func makeTLSDirs(t *testing.T) tlsDirs {
	t.Helper()
	root := t.TempDir()
	dirs := tlsDirs{server: filepath.Join(root, "server"), client: filepath.Join(root, "client"),
		noCert: filepath.Join(root, "nocert")}
	for _, d := range []string{dirs.server, dirs.client, dirs.noCert} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	ca := newTestCA(t, "fcnbd test CA")
	ca.issue(t, 2, "localhost", x509.ExtKeyUsageServerAuth, dirs.server, "server")
	ca.issue(t, 3, tlsClientCN, x509.ExtKeyUsageClientAuth, dirs.client, "client")
	for _, d := range []string{dirs.server, dirs.client, dirs.noCert} {
		writePEMFile(t, filepath.Join(d, "ca-cert.pem"), "CERTIFICATE", ca.der)
	}
	return dirs
}

// testCA is a certificate authority for tests, ECDSA P-256, valid for a day.
type testCA struct {
	cert *x509.Certificate
	der  []byte
	key  *ecdsa.PrivateKey
}

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	key := tlsKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: cert, der: der, key: key}
}

// issue writes a certificate for cn that the CA signs, and its key, as dir/PREFIX-cert.pem and
// dir/PREFIX-key.pem. A server certificate is for localhost and 127.0.0.1.
func (ca *testCA) issue(t *testing.T, serial int64, cn string, usage x509.ExtKeyUsage, dir, prefix string) {
	t.Helper()
	key := tlsKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		BasicConstraintsValid: true,
		// GnuTLS-based clients (qemu) check key usage when it is critical, as Go marks it.
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{usage},
	}
	if usage == x509.ExtKeyUsageServerAuth {
		tmpl.DNSNames = []string{"localhost"}
		tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	writePEMFile(t, filepath.Join(dir, prefix+"-cert.pem"), "CERTIFICATE", der)
	writePEMFile(t, filepath.Join(dir, prefix+"-key.pem"), "PRIVATE KEY", kder)
}

func tlsKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func writePEMFile(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// tlsURI is an nbds:// URI for libnbd with the client certificates in dir.
func (d *daemon) tlsURI(vol, dir string) string {
	return fmt.Sprintf("nbds://%s/%s?tls-certificates=%s", d.tcp, vol, dir)
}

// qemuTLS is qemu's --object for the client certificates in dir and the --image-opts of vol
// over TLS.
func (d *daemon) qemuTLS(vol, dir string) (object, imageOpts string) {
	host, port, _ := net.SplitHostPort(d.tcp)
	return "tls-creds-x509,id=tls0,endpoint=client,dir=" + dir,
		fmt.Sprintf("driver=nbd,server.type=inet,server.host=%s,server.port=%s,export=%s,tls-creds=tls0", host, port, vol)
}

// TestTLSNbdinfo: with --tls require and a CA, libnbd lists the exports over TLS with a client
// certificate; a plain-text client, and a TLS client without a certificate, are refused; the
// Unix socket stays plain text.
func TestTLSNbdinfo(t *testing.T) {
	needTools(t, "nbdinfo")
	dirs := makeTLSDirs(t)
	d := startDaemon(t, "--tls", "require", "--tls-certs", dirs.server)
	d.cli("mkvolume", "-name", "alpha", "-size", "16M")
	d.cli("mkvolume", "-name", "beta", "-size", "8M")

	list := sh(t, "nbdinfo", "--list", "--json", d.tlsURI("", dirs.client))
	for _, name := range []string{"alpha", "beta"} {
		if !strings.Contains(list, `"`+name+`"`) {
			t.Errorf("nbdinfo --list over TLS misses %s:\n%s", name, list)
		}
	}
	if !strings.Contains(d.output(), `"client_cn":"`+tlsClientCN+`"`) {
		t.Errorf("the daemon's log does not name the client certificate's CN")
	}
	if out := sh(t, "nbdinfo", "--size", d.tlsURI("alpha", dirs.client)); strings.TrimSpace(out) != "16777216" {
		t.Errorf("nbdinfo --size over TLS: %q", out)
	}

	refused := func(what string, args ...string) {
		t.Helper()
		out, err := exec.Command("nbdinfo", args...).CombinedOutput()
		if err == nil {
			t.Errorf("%s: nbdinfo succeeded:\n%s", what, out)
		}
		t.Logf("%s: %s", what, bytes.TrimSpace(out))
	}
	refused("plain text", "--list", "nbd://"+d.tcp+"/")
	if !strings.Contains(d.output(), "option refused: TLS is required") {
		t.Errorf("the plain-text client was not refused with TLS_REQD")
	}
	refused("no client certificate", "--list", d.tlsURI("", dirs.noCert))
	if !strings.Contains(d.output(), "TLS handshake failed") {
		t.Errorf("the refused handshake is not in the daemon's log")
	}
	// The Unix socket (0600, root's) is exempt from require, and offers TLS all the same.
	sh(t, "nbdinfo", "--list", "nbd+unix:///?socket="+d.nbdSock)
	sh(t, "nbdinfo", "--list", "nbds+unix:///?socket="+d.nbdSock+"&tls-certificates="+dirs.client)
}

// TestTLSQemu: qemu-img convert writes an image over TLS and reads it back, and qemu-img map
// sees its allocation, with qemu's x509 credentials.
func TestTLSQemu(t *testing.T) {
	needTools(t, "qemu-img", "cmp")
	dirs := makeTLSDirs(t)
	d := startDaemon(t, "--tls", "require", "--tls-certs", dirs.server)
	d.cli("mkvolume", "-name", "v", "-size", "16M")

	img := filepath.Join(t.TempDir(), "src.img")
	data := make([]byte, 16<<20)
	rand.Read(data[:4<<20]) // 4 MiB of data, 12 MiB of zeroes
	if err := os.WriteFile(img, data, 0o600); err != nil {
		t.Fatal(err)
	}
	obj, opts := d.qemuTLS("v", dirs.client)
	sh(t, "qemu-img", "convert", "-n", "-f", "raw", "--object", obj, img, "--target-image-opts", opts)

	back := filepath.Join(t.TempDir(), "back.img")
	sh(t, "qemu-img", "convert", "-O", "raw", "--object", obj, "--image-opts", opts, back)
	sh(t, "cmp", img, back)

	out := sh(t, "qemu-img", "map", "--output=json", "--object", obj, "--image-opts", opts)
	var m []struct {
		Start, Length int64
		Data, Zero    bool
	}
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("qemu-img map: %v\n%s", err, out)
	}
	at := func(off int64) (data, zero bool) {
		for _, e := range m {
			if e.Start <= off && off < e.Start+e.Length {
				return e.Data, e.Zero
			}
		}
		t.Fatalf("qemu-img map has no entry for %d:\n%s", off, out)
		return
	}
	if data, _ := at(0); !data {
		t.Errorf("qemu-img map: the written start is not data:\n%s", out)
	}
	if _, zero := at(12 << 20); !zero {
		t.Errorf("qemu-img map: the zero tail does not read as zero:\n%s", out)
	}

	// Without a client certificate qemu is refused.
	obj, opts = d.qemuTLS("v", dirs.noCert)
	if out, err := exec.Command("qemu-img", "info", "--object", obj, "--image-opts", opts).CombinedOutput(); err == nil {
		t.Errorf("qemu-img without a client certificate was let in:\n%s", out)
	}
}

// TestTLSStartupErrors: bad TLS settings stop the daemon at once with the file or flag named.
func TestTLSStartupErrors(t *testing.T) {
	dirs := makeTLSDirs(t)
	os.Remove(filepath.Join(dirs.client, "client-key.pem"))
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--tls", "require", "--tls-certs", dirs.client}, filepath.Join(dirs.client, "server-cert.pem")},
		{[]string{"--tls", "on"}, "--tls on needs --tls-certs"},
		{[]string{"--tls", "require", "--tls-psk", "/nonexistent.psk"}, "pre-shared keys is not supported"},
	} {
		out, err := exec.Command(fcnbdBin(t), append([]string{"serve", "--data-dir", t.TempDir(),
			"--socket", filepath.Join(t.TempDir(), "c.sock")}, tc.args...)...).CombinedOutput()
		if err == nil || !strings.Contains(string(out), tc.want) {
			t.Errorf("fcnbd serve %s: %v, output %q; want an error with %q", strings.Join(tc.args, " "), err, out, tc.want)
		}
	}
}

// TestTLSNbdClient: Debian's nbd-client lists the exports over TLS with its -certfile,
// -keyfile and -cacertfile options (list mode needs no kernel driver).
func TestTLSNbdClient(t *testing.T) {
	needTools(t, "nbd-client")
	dirs := makeTLSDirs(t)
	d := startDaemon(t, "--tls", "require", "--tls-certs", dirs.server)
	d.cli("mkvolume", "-name", "db0", "-size", "8M")
	host, port, _ := net.SplitHostPort(d.tcp)
	out := sh(t, "nbd-client", "-certfile", filepath.Join(dirs.client, "client-cert.pem"),
		"-keyfile", filepath.Join(dirs.client, "client-key.pem"),
		"-cacertfile", filepath.Join(dirs.client, "ca-cert.pem"), "-tlshostname", "localhost",
		"-l", host, port)
	if !strings.Contains(out, "db0") {
		t.Errorf("nbd-client -l over TLS does not list db0:\n%s", out)
	}
	if out, err := exec.Command("nbd-client", "-l", host, port).CombinedOutput(); err == nil || strings.Contains(string(out), "db0:") {
		t.Errorf("nbd-client -l without TLS: %v\n%s", err, out)
	}
}

// TestTLSNonLoopbackWarning: a non-loopback --nbd-tcp is not warned about with --tls require
// and a CA, which authenticates every TCP client, and is with --tls on, which leaves TLS to the
// client, and with --tls require without a CA, which authenticates nobody.
func TestTLSNonLoopbackWarning(t *testing.T) {
	dirs := makeTLSDirs(t)
	_, port, _ := net.SplitHostPort(freeTCPAddr(t))
	d := startDaemon(t, "--nbd-tcp", "0.0.0.0:"+port, "--tls", "require", "--tls-certs", dirs.server)
	if ls := waitLog(t, d, "fcnbd serving"); len(ls) != 1 || ls[0]["tls"] != "require" || ls[0]["tls_verify_clients"] != true {
		t.Fatalf("serving lines %v", ls)
	}
	for _, msg := range []string{"no authentication", "TLS is optional"} {
		if ls := logLines(t, d.output(), msg); len(ls) != 0 {
			t.Errorf("warned with --tls require: %v", ls)
		}
	}
	d.stop()

	d = startDaemon(t, "--nbd-tcp", "0.0.0.0:"+port, "--tls", "on", "--tls-certs", dirs.server)
	if ls := waitLog(t, d, "TLS is optional"); len(ls) != 1 || ls[0]["level"] != "warn" {
		t.Errorf("--tls on on a non-loopback address: warning lines %v", ls)
	}
	d.stop()

	// Without ca-cert.pem TLS encrypts but authenticates no client: still a warning.
	os.Remove(filepath.Join(dirs.server, "ca-cert.pem"))
	d = startDaemon(t, "--nbd-tcp", "0.0.0.0:"+port, "--tls", "require", "--tls-certs", dirs.server)
	if ls := waitLog(t, d, "TLS without client certificates"); len(ls) != 1 || ls[0]["level"] != "warn" {
		t.Errorf("--tls require without a CA on a non-loopback address: warning lines %v", ls)
	}
}

// nbdshTLSOn connects with libnbd against --tls on twice: with TLS disabled (plain text is
// allowed), then with TLS allowed (the server accepts STARTTLS), each through option mode to
// LIST, GO and I/O. (This libnbd has no opt_starttls to send a second STARTTLS by hand; the
// unit tests do.)
const nbdshTLSOn = `
import nbd
for mode, want in ((nbd.TLS_DISABLE, False), (nbd.TLS_ALLOW, True)):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_tls(mode)
    h.set_tls_certificates(CERTS)
    h.connect_tcp(HOST, PORT)
    assert h.get_tls_negotiated() == want, (mode, h.get_tls_negotiated())
    names = []
    h.opt_list(lambda n, d: names.append(n))
    assert names == ["alpha"], names
    h.set_export_name("alpha")
    h.opt_go()
    h.pwrite(bytes([65 + mode]) * 65536, 4096)
    assert h.pread(65536, 4096) == bytes([65 + mode]) * 65536
    h.shutdown()
print("nbdsh-tls-on-ok")
`

func TestTLSNbdshOn(t *testing.T) {
	needTools(t, "nbdsh")
	dirs := makeTLSDirs(t)
	d := startDaemon(t, "--tls", "on", "--tls-certs", dirs.server)
	d.cli("mkvolume", "-name", "alpha", "-size", "8M")
	host, port, _ := net.SplitHostPort(d.tcp)
	script := "CERTS = " + pyString(dirs.client) + "\nHOST = " + pyString(host) + "\nPORT = " + pyString(port) + "\n" + nbdshTLSOn
	out := sh(t, "/usr/bin/python3", "-c", script)
	if !strings.Contains(out, "nbdsh-tls-on-ok") {
		t.Fatalf("nbdsh script did not finish:\n%s", out)
	}
}

// TestVMKernelNBDTLS: the kernel NBD driver over TLS. The daemon requires TLS and verifies
// client certificates; in the VM, nbd-client without TLS is refused, and with its TLS options
// (-certfile/-keyfile/-cacertfile, its TLS proxy in front of the kernel's socket) ext4 on the
// volume survives detach and reattach (kernel-nbd-smoke.sh), and the host reads the same bytes.
func TestVMKernelNBDTLS(t *testing.T) {
	vmRequire(t)
	needTools(t, "nbdcopy")
	dirs := makeTLSDirs(t)
	d := startDaemon(t, "--tls", "require", "--tls-certs", dirs.server)
	d.cli("mkvolume", "-name", "vol", "-size", "64M")
	opts := []VMOption{VMForward(10809, d.tcp), VMEnv("NBD_EXPORT", "vol"), VMEnv("DEVSHA", "1"),
		VMEnv("NBD_TLS", "/guest/tls"), VMFile("kernel-nbd-smoke.sh", filepath.Join("guest", "kernel-nbd-smoke.sh")),
		VMTimeout(4 * time.Minute)}
	for _, f := range []string{"ca-cert.pem", "client-cert.pem", "client-key.pem"} {
		opts = append(opts, VMFile("tls/"+f, filepath.Join(dirs.client, f)))
	}
	r := runVM(t, vmGuestScript(t, "kernel-nbd-tls.sh"), opts...)
	requireVMOK(t, r)
	dev := r.Lines("GUEST-DEVSHA256 ")
	if len(dev) != 1 {
		t.Fatalf("guest printed %d GUEST-DEVSHA256 lines", len(dev))
	}
	img := filepath.Join(t.TempDir(), "vol.img")
	sh(t, "nbdcopy", d.tlsURI("vol", dirs.client), img)
	if got, want := vmFileSHA256(t, img), strings.Fields(dev[0])[0]; got != want {
		t.Fatalf("host reads sha256 %s over TLS, the guest's device had %s", got, want)
	}
}
