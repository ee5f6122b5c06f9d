package nbd

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
)

// TLSMode is the server's TLS policy, with nbdkit's --tls semantics.
type TLSMode int

const (
	// TLSOff: NBD_OPT_STARTTLS is refused (NBD_REP_ERR_POLICY).
	TLSOff TLSMode = iota
	// TLSOn: a client may switch to TLS with NBD_OPT_STARTTLS, or stay in plain text.
	TLSOn
	// TLSRequire: before NBD_OPT_STARTTLS every option but NBD_OPT_ABORT is answered
	// NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME closes the connection. It applies to TCP
	// connections; a Unix-socket connection is treated as TLSOn (see Options.TLSMode).
	TLSRequire
)

// ParseTLSMode parses "off", "on" or "require".
func ParseTLSMode(s string) (TLSMode, error) {
	switch s {
	case "off":
		return TLSOff, nil
	case "on":
		return TLSOn, nil
	case "require":
		return TLSRequire, nil
	}
	return TLSOff, fmt.Errorf("bad TLS mode %q: want off, on or require", s)
}

func (m TLSMode) String() string {
	switch m {
	case TLSOff:
		return "off"
	case TLSOn:
		return "on"
	case TLSRequire:
		return "require"
	}
	return fmt.Sprintf("TLSMode(%d)", int(m))
}

// The files of a TLS certificate directory, named as nbdkit's --tls-certificates and
// qemu-nbd's tls-creds-x509 name them.
const (
	TLSCACertFile     = "ca-cert.pem"
	TLSServerCertFile = "server-cert.pem"
	TLSServerKeyFile  = "server-key.pem"
)

// LoadTLSConfig reads a certificate directory: server-cert.pem (the server's certificate,
// followed by any intermediates) and server-key.pem are required; when ca-cert.pem is there
// too, every client must present a certificate that it signed (the server verifies its peers,
// as qemu-nbd's default verify-peer=on does), and the verified certificate identifies the
// client (Client.CommonName). Without ca-cert.pem clients are not asked for certificates.
// Errors name the file at fault.
func LoadTLSConfig(dir string) (*tls.Config, error) {
	if st, err := os.Stat(dir); err != nil {
		return nil, fmt.Errorf("TLS certificate directory: %w", err)
	} else if !st.IsDir() {
		return nil, fmt.Errorf("TLS certificate directory %s is not a directory", dir)
	}
	certPath := filepath.Join(dir, TLSServerCertFile)
	keyPath := filepath.Join(dir, TLSServerKeyFile)
	certPEM, err := readPEM(certPath, "CERTIFICATE")
	if err != nil {
		return nil, err
	}
	keyPEM, err := readPEM(keyPath, "PRIVATE KEY")
	if err != nil {
		return nil, err
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("TLS: %s with %s: %w", certPath, keyPath, err)
	}
	cfg := &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cert},
		// Full-size records from the first byte: NBD moves bulk data, not web pages.
		DynamicRecordSizingDisabled: true,
	}

	caPath := filepath.Join(dir, TLSCACertFile)
	caPEM, err := readPEM(caPath, "CERTIFICATE")
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return cfg, nil
	case err != nil:
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("TLS: %s: no usable CA certificate in it", caPath)
	}
	cfg.ClientCAs = pool
	cfg.ClientAuth = tls.RequireAndVerifyClientCert
	return cfg, nil
}

// readPEM reads path and checks that it holds at least one PEM block whose type ends in kind.
func readPEM(path, kind string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("TLS: %w", err)
	}
	for rest := b; ; {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			return nil, fmt.Errorf("TLS: %s: no PEM %s block in it", path, kind)
		}
		if strings.HasSuffix(blk.Type, kind) {
			return b, nil
		}
	}
}

// connTLS is a connection's TLS state.
type connTLS struct {
	mode TLSMode       // the policy for this connection
	conn *tls.Conn     // nil until NBD_OPT_STARTTLS succeeded
	out  *bufio.Writer // over conn: gathers a batch of replies into full records
	cork *corkConn     // under conn: gathers the records into large writes
}

// refuseBeforeTLS applies TLSRequire to option opt received in plain text. It returns
// handled=false if opt may go on; else the option was refused, and ok reports whether the
// connection goes on.
func (c *conn) refuseBeforeTLS(bw *bufio.Writer, opt uint32) (handled, ok bool) {
	if c.tls.mode != TLSRequire || c.tls.conn != nil || opt == optStartTLS || opt == optAbort {
		return false, true
	}
	if opt == optExportName {
		// EXPORT_NAME has no error reply.
		c.log.Debug().Msg("EXPORT_NAME before STARTTLS while TLS is required; closing")
		return true, false
	}
	c.log.Debug().Uint32("option", opt).Msg("option refused: TLS is required")
	return true, c.optReply(bw, opt, repErrTLSReqd, []byte("TLS is required: send NBD_OPT_STARTTLS first"))
}

// startTLS answers NBD_OPT_STARTTLS with n bytes of (already read) data. On success the
// connection continues over TLS: *bw, c.br and c.nc are replaced, and what was negotiated in
// plain text is forgotten. It returns false if the connection must close.
func (c *conn) startTLS(bw **bufio.Writer, n uint32) bool {
	switch {
	case c.tls.mode == TLSOff:
		return c.optReply(*bw, optStartTLS, repErrPolicy, []byte("TLS is not enabled on this server"))
	case c.tls.conn != nil:
		return c.optReply(*bw, optStartTLS, repErrInvalid, []byte("TLS is already in use"))
	case n != 0:
		return c.optReply(*bw, optStartTLS, repErrInvalid, []byte("STARTTLS takes no data"))
	}
	// The client must wait for our reply before its TLS handshake: plain text read ahead of
	// the handshake can't be handed to it, and is not NBD.
	if c.br.Buffered() > 0 {
		c.log.Warn().Int("bytes", c.br.Buffered()).
			Msg("protocol violation: data sent after STARTTLS before its reply; closing")
		return false
	}
	if !c.optReply(*bw, optStartTLS, repAck) {
		return false
	}
	cork := &corkConn{Conn: c.nc}
	tc := tls.Server(cork, c.s.opts.TLSConfig)
	if err := tc.Handshake(); err != nil {
		c.log.Warn().Err(err).Msg("TLS handshake failed; closing")
		return false
	}

	// From now on everything goes through tc. Shutdown reads c.nc under both locks.
	c.s.mu.Lock()
	c.mu.Lock()
	c.nc = tc
	c.rc = nil // no direct writes to the descriptor: they would bypass TLS
	c.mu.Unlock()
	c.s.mu.Unlock()
	c.tls.conn = tc
	c.tls.cork = cork
	c.tls.out = bufio.NewWriterSize(tc, readBufferSize)
	c.br.Reset(tc)
	*bw = bufio.NewWriterSize(tc, 4096)

	// State negotiated in plain text could have been chosen by an attacker in the middle: the
	// client negotiates again (CVE-2021-3716 was nbdkit keeping it).
	c.structured, c.metaAlloc, c.metaExport, c.metaDirty = false, false, "", nil

	st := tc.ConnectionState()
	c.client.TLS = true
	if len(st.VerifiedChains) > 0 {
		c.client.VerifiedChains = st.VerifiedChains
		c.client.CommonName = st.VerifiedChains[0][0].Subject.CommonName
	}
	lc := c.log.With().Bool("tls", true)
	if c.client.CommonName != "" {
		lc = lc.Str("client_cn", c.client.CommonName)
	}
	c.log = lc.Logger()
	c.log.Debug().Uint16("tls_version", st.Version).
		Str("cipher", tls.CipherSuiteName(st.CipherSuite)).Msg("TLS started")
	return true
}

// sendTLS writes bufs over TLS, gathered into as few records as their sizes allow, and the
// records into as few system calls.
func (c *conn) sendTLS(bufs net.Buffers) error {
	c.tls.cork.setCorked(true)
	for _, b := range bufs {
		if _, err := c.tls.out.Write(b); err != nil {
			c.tls.cork.setCorked(false)
			return err
		}
	}
	err := c.tls.out.Flush()
	return errors.Join(err, c.tls.cork.setCorked(false))
}

// corkMax is the most a corked connection holds before writing it out.
const corkMax = 256 << 10

// corkConn is the connection under a tls.Conn. crypto/tls writes each record (16 KiB at most)
// with a system call of its own, which for a 1 MiB read reply is 64 of them; while corked,
// records are gathered and written corkMax at a time instead. Writes are serialized by
// crypto/tls, but the reader may write (an alert, a key update) while the writer corks, hence
// mu.
type corkConn struct {
	net.Conn
	mu     sync.Mutex
	corked bool
	buf    *[]byte // pooled while corked, nil otherwise
	err    error   // the first write error; every later write fails with it
}

func (c *corkConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return 0, c.err
	}
	if !c.corked {
		return c.Conn.Write(p)
	}
	if c.buf == nil {
		c.buf = getBuf(corkMax)
		*c.buf = (*c.buf)[:0]
	}
	if len(*c.buf)+len(p) > corkMax {
		if err := c.flushLocked(); err != nil {
			return 0, err
		}
	}
	if len(p) >= corkMax {
		return c.Conn.Write(p)
	}
	*c.buf = append(*c.buf, p...)
	return len(p), nil
}

// setCorked corks or uncorks c; uncorking writes out what is held.
func (c *corkConn) setCorked(on bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.corked = on
	if on {
		return nil
	}
	err := c.flushLocked()
	putBuf(c.buf)
	c.buf = nil
	return err
}

func (c *corkConn) flushLocked() error {
	if c.err != nil {
		return c.err
	}
	if c.buf == nil || len(*c.buf) == 0 {
		return nil
	}
	_, c.err = c.Conn.Write(*c.buf)
	*c.buf = (*c.buf)[:0]
	return c.err
}
