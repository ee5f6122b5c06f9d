package nbd

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// testPKI is a CA with a server certificate for 127.0.0.1/localhost and client
// certificates, written as a server certificate directory.
type testPKI struct {
	dir    string // ca-cert.pem, server-cert.pem, server-key.pem
	ca     *x509.Certificate
	caKey  *ecdsa.PrivateKey
	caPool *x509.CertPool
}

func newTestPKI(t *testing.T) *testPKI {
	t.Helper()
	p := &testPKI{dir: t.TempDir()}
	p.caKey = newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &p.caKey.PublicKey, p.caKey)
	if err != nil {
		t.Fatal(err)
	}
	if p.ca, err = x509.ParseCertificate(der); err != nil {
		t.Fatal(err)
	}
	p.caPool = x509.NewCertPool()
	p.caPool.AddCert(p.ca)
	writePEM(t, filepath.Join(p.dir, TLSCACertFile), "CERTIFICATE", der)
	cert, key := p.issue(t, "localhost", x509.ExtKeyUsageServerAuth)
	writePEM(t, filepath.Join(p.dir, TLSServerCertFile), "CERTIFICATE", cert.Certificate[0])
	writeKey(t, filepath.Join(p.dir, TLSServerKeyFile), key)
	return p
}

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

var serial = struct {
	sync.Mutex
	n int64
}{n: 100}

// issue returns a certificate for cn signed by the CA.
func (p *testPKI) issue(t *testing.T, cn string, usage x509.ExtKeyUsage) (tls.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key := newKey(t)
	serial.Lock()
	serial.n++
	sn := serial.n
	serial.Unlock()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(sn), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
	}
	if usage == x509.ExtKeyUsageServerAuth {
		tmpl.DNSNames = []string{"localhost"}
		tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, &key.PublicKey, p.caKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, key
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

func writeKey(t *testing.T, path string, key *ecdsa.PrivateKey) {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, path, "PRIVATE KEY", der)
}

func (p *testPKI) serverConfig(t *testing.T) *tls.Config {
	t.Helper()
	cfg, err := LoadTLSConfig(p.dir)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// startTLS sends NBD_OPT_STARTTLS, expects its ACK and switches c to TLS with cert (nil:
// none). It returns the handshake's error; c is usable only if it is nil.
func (c *client) startTLS(p *testPKI, cert *tls.Certificate) error {
	c.t.Helper()
	c.option(optStartTLS, nil)
	if r := c.optReply(); r.opt != optStartTLS || r.typ != repAck {
		c.t.Fatalf("STARTTLS: reply %#x for option %d", r.typ, r.opt)
	}
	if c.br.Buffered() != 0 {
		c.t.Fatalf("server sent %d bytes after the STARTTLS ACK", c.br.Buffered())
	}
	cfg := &tls.Config{RootCAs: p.caPool, ServerName: "localhost"}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	tc := tls.Client(c.nc, cfg)
	if err := tc.Handshake(); err != nil {
		return err
	}
	c.nc, c.br = tc, bufio.NewReader(tc)
	return nil
}

// goExport negotiates GO for name and fails unless it is acknowledged.
func (c *client) goExport(name string) {
	c.t.Helper()
	c.option(optGo, infoData(name))
	if _, final := c.infoReplies(optGo); final.typ != repAck {
		c.t.Fatalf("GO %q: reply %#x", name, final.typ)
	}
}

// TestTLSStartThenGo: STARTTLS, a verified client certificate, GO, then transmission over
// TLS with many requests in flight (the writer's batches) and large reads and writes (the
// reader's direct reads, the inline-write path, which must not write around TLS).
func TestTLSStartThenGo(t *testing.T) {
	p := newTestPKI(t)
	exports, _ := newTestExports()
	ts := startServer(t, exports, Options{TLSMode: TLSRequire, TLSConfig: p.serverConfig(t)})
	cert, _ := p.issue(t, "client1", x509.ExtKeyUsageClientAuth)

	c := ts.dial(t)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	// Negotiated before TLS, then forgotten: replies below must be simple.
	c.option(optStructured, nil)
	if r := c.optReply(); r.typ != repErrTLSReqd {
		t.Fatalf("STRUCTURED_REPLY before TLS: reply %#x, want TLS_REQD", r.typ)
	}
	if err := c.startTLS(p, &cert); err != nil {
		t.Fatalf("TLS handshake: %v", err)
	}
	c.goExport("a")

	big := pattern(1<<20, 3)
	c.mustDo(cmdWrite, 0, 0, uint32(len(big)), big) // >= inlineWriteMin: the reader's inline path
	if got := c.mustDo(cmdRead, 0, 0, uint32(len(big)), nil); !bytes.Equal(got, big) {
		t.Fatal("1 MiB read back over TLS differs")
	}
	// 64 small writes, then 64 reads, each batch sent at once: the server batches replies.
	var reqs []byte
	for i := range 64 {
		reqs = append(reqs, reqBytes(cmdWrite, 0, uint64(i), uint64(i)*4096, 4096, pattern(4096, byte(i)))...)
	}
	c.write(reqs)
	for range 64 {
		if cookie, errno := c.reply(); errno != 0 {
			t.Fatalf("write %d: error %d", cookie, errno)
		}
	}
	reqs = reqs[:0]
	for i := range 64 {
		reqs = append(reqs, reqBytes(cmdRead, 0, uint64(i), uint64(i)*4096, 4096, nil)...)
	}
	c.write(reqs)
	for range 64 {
		cookie, errno := c.reply()
		if errno != 0 {
			t.Fatalf("read %d: error %d", cookie, errno)
		}
		if got := c.read(4096); !bytes.Equal(got, pattern(4096, byte(cookie))) {
			t.Fatalf("read %d: wrong data", cookie)
		}
	}
	c.request(cmdDisc, 0, 0, 0, 0, nil)
	c.expectClosed()
	if !strings.Contains(ts.logs.String(), `"client_cn":"client1"`) {
		t.Errorf("log does not name the client's CN:\n%s", ts.logs.String())
	}
}

func TestTLSRequireRefusals(t *testing.T) {
	p := newTestPKI(t)
	exports, _ := newTestExports()
	ts := startServer(t, exports, Options{TLSMode: TLSRequire, TLSConfig: p.serverConfig(t)})

	c := ts.dial(t)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	for _, o := range []struct {
		opt  uint32
		data []byte
	}{
		{optList, nil}, {optInfo, infoData("a")}, {optGo, infoData("a")}, {optStructured, nil},
		{optListMeta, nil}, {optSetMeta, nil}, {99, []byte("unknown")},
	} {
		c.option(o.opt, o.data)
		if r := c.optReply(); r.opt != o.opt || r.typ != repErrTLSReqd {
			t.Errorf("option %d before TLS: reply %#x for %d, want TLS_REQD", o.opt, r.typ, r.opt)
		}
	}
	c.option(optAbort, nil)
	if r := c.optReply(); r.typ != repAck {
		t.Errorf("ABORT before TLS: reply %#x", r.typ)
	}
	c.expectClosed()

	// EXPORT_NAME can't be refused with a reply: the server closes.
	c = ts.dial(t)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.option(optExportName, []byte("a"))
	c.expectClosed()

	// The Unix socket is exempt from require: plain text works there.
	us := startUnixServer(t, exports, Options{TLSMode: TLSRequire, TLSConfig: p.serverConfig(t)})
	c = us.open(t, "a")
	c.mustDo(cmdFlush, 0, 0, 0, nil)
}

func TestTLSOptionErrors(t *testing.T) {
	p := newTestPKI(t)
	exports, _ := newTestExports()
	cert, _ := p.issue(t, "client1", x509.ExtKeyUsageClientAuth)

	t.Run("off", func(t *testing.T) {
		ts := startServer(t, exports, Options{})
		c := ts.dial(t)
		c.greet(flagFixedNewstyle | flagNoZeroes)
		c.option(optStartTLS, nil)
		if r := c.optReply(); r.typ != repErrPolicy {
			t.Fatalf("STARTTLS with TLS off: reply %#x, want POLICY", r.typ)
		}
		c.goExport("a") // the connection goes on in plain text
	})

	ts := startServer(t, exports, Options{TLSMode: TLSOn, TLSConfig: p.serverConfig(t)})
	t.Run("twice", func(t *testing.T) {
		c := ts.dial(t)
		c.greet(flagFixedNewstyle | flagNoZeroes)
		if err := c.startTLS(p, &cert); err != nil {
			t.Fatal(err)
		}
		c.option(optStartTLS, nil)
		if r := c.optReply(); r.typ != repErrInvalid {
			t.Fatalf("second STARTTLS: reply %#x, want INVALID", r.typ)
		}
		c.goExport("a")
		c.mustDo(cmdFlush, 0, 0, 0, nil)
	})
	t.Run("with data", func(t *testing.T) {
		c := ts.dial(t)
		c.greet(flagFixedNewstyle | flagNoZeroes)
		c.option(optStartTLS, []byte("x"))
		if r := c.optReply(); r.typ != repErrInvalid {
			t.Fatalf("STARTTLS with data: reply %#x, want INVALID", r.typ)
		}
	})
	t.Run("pipelined", func(t *testing.T) {
		// A client that doesn't wait for the ACK before sending more is not speaking NBD.
		c := ts.dial(t)
		c.greet(flagFixedNewstyle | flagNoZeroes)
		c.write(append(optBytes(optStartTLS, nil), optBytes(optList, nil)...))
		c.expectClosed()
	})
	t.Run("optional", func(t *testing.T) {
		// TLSOn: plain text is allowed, and structured replies negotiated before TLS are
		// forgotten by it.
		c := ts.open(t, "a")
		c.mustDo(cmdFlush, 0, 0, 0, nil)

		c = ts.dial(t)
		c.greet(flagFixedNewstyle | flagNoZeroes)
		c.option(optStructured, nil)
		if r := c.optReply(); r.typ != repAck {
			t.Fatalf("STRUCTURED_REPLY: %#x", r.typ)
		}
		if err := c.startTLS(p, &cert); err != nil {
			t.Fatal(err)
		}
		c.goExport("a")
		c.mustDo(cmdRead, 0, 0, 512, nil) // reads a simple reply header
	})
}

// TestTLSClientVerification: with ca-cert.pem the server wants a certificate its CA signed.
func TestTLSClientVerification(t *testing.T) {
	p := newTestPKI(t)
	other := newTestPKI(t)
	exports, _ := newTestExports()
	ts := startServer(t, exports, Options{TLSMode: TLSRequire, TLSConfig: p.serverConfig(t)})
	strange, _ := other.issue(t, "intruder", x509.ExtKeyUsageClientAuth)
	for name, cert := range map[string]*tls.Certificate{"none": nil, "other CA": &strange} {
		t.Run(name, func(t *testing.T) {
			c := ts.dial(t)
			c.greet(flagFixedNewstyle | flagNoZeroes)
			if err := c.startTLS(p, cert); err != nil {
				return // refused during the handshake (TLS 1.2)
			}
			// TLS 1.3: the client's handshake ends before the server checks its certificate;
			// the refusal comes as an alert on the next read.
			c.option(optList, nil)
			if _, err := c.br.ReadByte(); err == nil {
				t.Fatal("server answered a client whose certificate it should refuse")
			}
		})
	}
	if !strings.Contains(ts.logs.String(), "TLS handshake failed") {
		t.Errorf("refusal not logged:\n%s", ts.logs.String())
	}

	// Without ca-cert.pem no certificate is asked for.
	os.Remove(filepath.Join(p.dir, TLSCACertFile))
	ts = startServer(t, exports, Options{TLSMode: TLSRequire, TLSConfig: p.serverConfig(t)})
	c := ts.dial(t)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	if err := c.startTLS(p, nil); err != nil {
		t.Fatal(err)
	}
	c.goExport("a")
}

// recordingExports is ClientExports that shows export "a" only to the client with CN
// "client1", and remembers every client asking.
type recordingExports struct {
	StaticExports
	mu      sync.Mutex
	clients []Client
}

func (e *recordingExports) seen(c Client) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.clients = append(e.clients, c)
}

func (e *recordingExports) LookupFor(c Client, name string) (Export, bool) {
	e.seen(c)
	if c.CommonName != "client1" {
		return Export{}, false
	}
	return e.Lookup(name)
}

func (e *recordingExports) ListFor(c Client) []Export {
	e.seen(c)
	if c.CommonName != "client1" {
		return nil
	}
	return e.List()
}

func (e *recordingExports) last(t *testing.T) Client {
	t.Helper()
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.clients) == 0 {
		t.Fatal("no call to LookupFor or ListFor")
	}
	c := e.clients[len(e.clients)-1]
	e.clients = nil
	return c
}

func listNames(c *client) []string {
	c.t.Helper()
	c.option(optList, nil)
	var names []string
	for {
		r := c.optReply()
		if r.typ != repServer {
			if r.typ != repAck {
				c.t.Fatalf("LIST: reply %#x", r.typ)
			}
			return names
		}
		n := binary.BigEndian.Uint32(r.data)
		names = append(names, string(r.data[4:4+n]))
	}
}

func TestTLSClientIdentity(t *testing.T) {
	p := newTestPKI(t)
	base, _ := newTestExports()
	exports := &recordingExports{StaticExports: base}
	opts := Options{TLSMode: TLSOn, TLSConfig: p.serverConfig(t)}
	ts := startServer(t, exports, opts)
	cert, _ := p.issue(t, "client1", x509.ExtKeyUsageClientAuth)
	cert2, _ := p.issue(t, "client2", x509.ExtKeyUsageClientAuth)

	// Plain TCP: the address, and nothing visible to this policy.
	c := ts.dial(t)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	if names := listNames(c); len(names) != 0 {
		t.Errorf("plain client sees %q", names)
	}
	if got := exports.last(t); got.Network != "tcp" || got.Addr != c.nc.LocalAddr().String() ||
		got.TLS || got.CommonName != "" || got.UID != -1 {
		t.Errorf("plain TCP client: %+v", got)
	}

	// TLS with client1's certificate: LIST and GO see its CN and chain.
	c.nc.SetDeadline(time.Now().Add(30 * time.Second))
	if err := c.startTLS(p, &cert); err != nil {
		t.Fatal(err)
	}
	if names := listNames(c); len(names) != 2 {
		t.Errorf("client1 sees %q", names)
	}
	got := exports.last(t)
	if !got.TLS || got.CommonName != "client1" || len(got.VerifiedChains) != 1 ||
		len(got.VerifiedChains[0]) != 2 || !got.VerifiedChains[0][1].Equal(p.ca) || got.String() != "cn=client1" {
		t.Errorf("TLS client: %+v", got)
	}
	c.goExport("a")
	if got := exports.last(t); got.CommonName != "client1" {
		t.Errorf("GO: client %+v", got)
	}

	// client2 is refused export a.
	c = ts.dial(t)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	if err := c.startTLS(p, &cert2); err != nil {
		t.Fatal(err)
	}
	c.option(optGo, infoData("a"))
	if _, final := c.infoReplies(optGo); final.typ != repErrUnknown {
		t.Errorf("GO a as client2: reply %#x, want UNKNOWN", final.typ)
	}
	if got := exports.last(t); got.CommonName != "client2" {
		t.Errorf("client2: %+v", got)
	}

	// Unix socket: "unix" and the peer's uid.
	us := startUnixServer(t, exports, opts)
	c = us.dial(t)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	listNames(c)
	if got := exports.last(t); got.Network != "unix" || got.Addr != "unix" || got.UID != os.Getuid() ||
		got.String() != "unix uid="+strconv.Itoa(os.Getuid()) {
		t.Errorf("Unix client: %+v", got)
	}
}

func TestLoadTLSConfigErrors(t *testing.T) {
	p := newTestPKI(t)
	if cfg := p.serverConfig(t); cfg.ClientAuth != tls.RequireAndVerifyClientCert {
		t.Errorf("with ca-cert.pem: ClientAuth %v", cfg.ClientAuth)
	}
	for _, tc := range []struct {
		name, file string
		content    string // "" removes the file
		want       string
	}{
		{"no cert", TLSServerCertFile, "", TLSServerCertFile},
		{"no key", TLSServerKeyFile, "", TLSServerKeyFile},
		{"garbage cert", TLSServerCertFile, "hello", TLSServerCertFile},
		{"garbage key", TLSServerKeyFile, "hello", TLSServerKeyFile},
		{"garbage CA", TLSCACertFile, "hello", TLSCACertFile},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q := newTestPKI(t)
			path := filepath.Join(q.dir, tc.file)
			if tc.content == "" {
				os.Remove(path)
			} else {
				os.WriteFile(path, []byte(tc.content), 0o600)
			}
			_, err := LoadTLSConfig(q.dir)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want one naming %s", err, tc.want)
			}
		})
	}
	// A key that is not the certificate's.
	q := newTestPKI(t)
	writeKey(t, filepath.Join(q.dir, TLSServerKeyFile), newKey(t))
	if _, err := LoadTLSConfig(q.dir); err == nil || !strings.Contains(err.Error(), TLSServerKeyFile) {
		t.Errorf("mismatched key: %v", err)
	}
	if _, err := LoadTLSConfig(filepath.Join(q.dir, "nope")); err == nil || !strings.Contains(err.Error(), "nope") {
		t.Errorf("missing directory: %v", err)
	}
}

// TestTLSShutdownAndTimeout: Shutdown ends a TLS connection in transmission cleanly, and a
// client that stalls its TLS handshake is cut off by HandshakeTimeout.
func TestTLSShutdownAndTimeout(t *testing.T) {
	p := newTestPKI(t)
	exports, _ := newTestExports()
	ts := startServer(t, exports, Options{TLSMode: TLSRequire, TLSConfig: p.serverConfig(t),
		HandshakeTimeout: 300 * time.Millisecond})
	cert, _ := p.issue(t, "client1", x509.ExtKeyUsageClientAuth)

	stalled := ts.dial(t)
	stalled.greet(flagFixedNewstyle | flagNoZeroes)
	stalled.option(optStartTLS, nil)
	if r := stalled.optReply(); r.typ != repAck {
		t.Fatalf("STARTTLS: %#x", r.typ)
	}
	stalled.expectClosed() // no ClientHello within HandshakeTimeout

	c := ts.dial(t)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	if err := c.startTLS(p, &cert); err != nil {
		t.Fatal(err)
	}
	c.goExport("a")
	c.mustDo(cmdWrite, 0, 0, 4096, pattern(4096, 1))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := ts.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown with a TLS client connected: %v", err)
	}
	// The server closed with close_notify (GnuTLS clients complain of a TLS connection "not
	// properly terminated" otherwise): one record, then EOF. Go's client accepts either, so
	// the record is looked for under TLS.
	raw := c.nc.(*tls.Conn).NetConn()
	raw.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, err := io.ReadAll(raw); err != nil || len(b) == 0 {
		t.Fatalf("after Shutdown the client reads %d bytes, then %v; want a close_notify record, then EOF", len(b), err)
	}
}
