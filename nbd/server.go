package nbd

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"fcnbd/internal/blockdev"
)

// Export is one named device offered to clients.
type Export struct {
	Name        string
	Description string
	Device      blockdev.Device
}

// Exports is what the server serves. It is consulted at negotiation time, so exports added or
// removed later are seen by new connections.
type Exports interface {
	// Lookup returns the export called name.
	Lookup(name string) (Export, bool)
	// List returns every export, for NBD_OPT_LIST.
	List() []Export
}

// ClientExports is implemented by Exports that decide per client which exports it may see
// (access control). When the server's Exports implements it, negotiation calls LookupFor and
// ListFor with the client of the connection instead of Lookup and List; otherwise every
// client sees every export.
type ClientExports interface {
	Exports
	// LookupFor returns the export called name if client may use it.
	LookupFor(client Client, name string) (Export, bool)
	// ListFor returns the exports client may see, for NBD_OPT_LIST.
	ListFor(client Client) []Export
}

// ErrRevoked, wrapped in a device's error, says that the client's access to the export was
// revoked (ClientExports decided so after the export was opened): the request fails (with the
// errno the error also wraps, EPERM for fcnbd's hosts) and the server closes the connection
// once the requests in progress are answered.
var ErrRevoked = errors.New("access to the export was revoked")

// Client is who is at the other end of a connection, as far as the server knows. It changes
// once during negotiation, when the client switches to TLS.
type Client struct {
	// Network is "tcp" or "unix".
	Network string
	// Addr is the peer's address: "IP:port" over TCP, "unix" over a Unix socket.
	Addr string
	// UID is a Unix-socket peer's user id (SO_PEERCRED); -1 over TCP or if unknown.
	UID int
	// TLS reports that the connection switched to TLS (NBD_OPT_STARTTLS).
	TLS bool
	// CommonName is the subject CN of the client's certificate once verified against the
	// CA (ca-cert.pem); "" without TLS or without client verification.
	CommonName string
	// VerifiedChains are the client certificate's verified chains, leaf first; nil unless
	// CommonName is meaningful.
	VerifiedChains [][]*x509.Certificate
}

// String names the client for logs: its verified CN, or its address.
func (c Client) String() string {
	switch {
	case c.CommonName != "":
		return "cn=" + c.CommonName
	case c.Network == "unix" && c.UID >= 0:
		return "unix uid=" + strconv.Itoa(c.UID)
	}
	return c.Addr
}

// clientOf is what is known of nc's peer before negotiation.
func clientOf(nc net.Conn) Client {
	cl := Client{Network: nc.RemoteAddr().Network(), Addr: nc.RemoteAddr().String(), UID: -1}
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		return cl
	}
	cl.Network, cl.Addr = "unix", "unix"
	if rc, err := uc.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) {
			if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
				cl.UID = int(cred.Uid)
			}
		})
	}
	return cl
}

// StaticExports is a fixed list of exports.
type StaticExports []Export

// Lookup returns the first export called name.
func (e StaticExports) Lookup(name string) (Export, bool) {
	for _, x := range e {
		if x.Name == name {
			return x, true
		}
	}
	return Export{}, false
}

// List returns e.
func (e StaticExports) List() []Export { return e }

// Options tunes a Server. Zero values mean the defaults.
type Options struct {
	Logger zerolog.Logger
	// MaxConnections caps concurrent connections across all listeners (default 1024).
	MaxConnections int
	// MaxInFlight caps requests executing at once per connection (default 128).
	MaxInFlight int
	// MaxInFlightBytes caps the READ and WRITE payload bytes a connection holds in memory at
	// once (default 64 MiB); a single request of up to 32 MiB is always admitted.
	MaxInFlightBytes int
	// HandshakeTimeout bounds the whole negotiation phase of a connection (default 30s).
	HandshakeTimeout time.Duration
	// TLSMode is the NBD_OPT_STARTTLS policy (default TLSOff). TLSRequire applies to TCP
	// connections only: a Unix-socket connection is local and guarded by the socket file's
	// permissions, so it may use TLS but need not (fcnbd attach's kernel client does not).
	TLSMode TLSMode
	// TLSConfig is the server side of TLS (see LoadTLSConfig); required unless TLSMode is
	// TLSOff.
	TLSConfig *tls.Config
	// Gate, if set, is asked before each batch of replies is sent; if it returns an error,
	// the connection is closed instead and its replies are dropped. Cluster mode gates on the
	// node's lease, so that an owner that was paused past it answers nothing it read, wrote or
	// flushed meanwhile, not even from its cache.
	Gate func() error

	// unixSendBuffer is the send buffer of a Unix-socket connection (default unixSendBuffer);
	// tests make it small to fill it with a few replies.
	unixSendBuffer int
}

// Defaults for Options.
const (
	DefaultMaxConnections   = 1024
	DefaultMaxInFlight      = 128
	DefaultMaxInFlightBytes = 64 << 20
	DefaultHandshakeTimeout = 30 * time.Second
)

// Server serves Exports over any number of listeners.
type Server struct {
	exports Exports
	opts    Options
	log     zerolog.Logger

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	shutdown  bool
	connWG    sync.WaitGroup // one per entry ever put in conns

	// Refusals are logged at most once per refuseLogEvery; the others are counted and reported
	// with the next line, or by refuseTimer when the window ends, so that a burst followed by
	// quiet still adds up.
	refuseMu      sync.Mutex
	refuseLogged  time.Time
	refusedSilent int
	refuseLast    string      // remote of the latest refusal not logged
	refuseTimer   *time.Timer // pending report of refusedSilent, nil if none
}

// refuseLogEvery is the least time between two log lines about refused connections.
const refuseLogEvery = time.Second

// NewServer returns a server for exports.
func NewServer(exports Exports, opts Options) *Server {
	if opts.MaxConnections <= 0 {
		opts.MaxConnections = DefaultMaxConnections
	}
	if opts.MaxInFlight <= 0 {
		opts.MaxInFlight = DefaultMaxInFlight
	}
	if opts.MaxInFlightBytes <= 0 {
		opts.MaxInFlightBytes = DefaultMaxInFlightBytes
	}
	if opts.HandshakeTimeout <= 0 {
		opts.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if opts.TLSMode != TLSOff && opts.TLSConfig == nil {
		panic("nbd: TLSMode " + opts.TLSMode.String() + " without a TLSConfig")
	}
	if opts.unixSendBuffer <= 0 {
		opts.unixSendBuffer = unixSendBuffer
	}
	return &Server{
		exports:   exports,
		opts:      opts,
		log:       opts.Logger.With().Str("component", "nbd").Logger(),
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[*conn]struct{}),
	}
}

// lookup returns the export called name if client may use it.
func (s *Server) lookup(client Client, name string) (Export, bool) {
	if ce, ok := s.exports.(ClientExports); ok {
		return ce.LookupFor(client, name)
	}
	return s.exports.Lookup(name)
}

// list returns the exports client may see.
func (s *Server) list(client Client) []Export {
	if ce, ok := s.exports.(ClientExports); ok {
		return ce.ListFor(client)
	}
	return s.exports.List()
}

// Serve accepts connections on l until Shutdown is called (then it returns nil) or l fails.
// Serve closes l before returning.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.shutdown {
		s.mu.Unlock()
		l.Close()
		return nil
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
		l.Close()
	}()

	var backoff time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			if s.isShutdown() {
				return nil
			}
			if !temporaryAcceptError(err) {
				return err
			}
			// Out of descriptors or memory: wait rather than spin, as net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn().Err(err).Dur("retry_in", backoff).Msg("accept failed")
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		s.startConn(nc)
	}
}

func temporaryAcceptError(err error) bool {
	for _, e := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS,
		syscall.ENOMEM, syscall.ECONNABORTED, syscall.EINTR} {
		if errors.Is(err, e) {
			return true
		}
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func (s *Server) isShutdown() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.shutdown
}

// startConn registers nc and serves it on its own goroutine, or refuses it.
func (s *Server) startConn(nc net.Conn) {
	s.mu.Lock()
	if s.shutdown {
		s.mu.Unlock()
		nc.Close()
		return
	}
	if len(s.conns) >= s.opts.MaxConnections {
		s.mu.Unlock()
		s.refuse(nc)
		return
	}
	c := newConn(s, nc)
	s.conns[c] = struct{}{}
	s.connWG.Add(1)
	s.mu.Unlock()

	go func() {
		defer s.connWG.Done()
		c.serve()
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
	}()
}

// refuse closes a connection over MaxConnections, logging at most once per refuseLogEvery.
func (s *Server) refuse(nc net.Conn) {
	remote := nc.RemoteAddr().String()
	defer nc.Close() // after the log line: a client that sees the close can find it logged
	s.refuseMu.Lock()
	defer s.refuseMu.Unlock()
	now := time.Now()
	if wait := refuseLogEvery - now.Sub(s.refuseLogged); wait > 0 {
		s.refusedSilent++
		s.refuseLast = remote
		if s.refuseTimer == nil {
			s.refuseTimer = time.AfterFunc(wait, s.reportRefusals)
		}
		return
	}
	s.logRefusal(remote, s.refusedSilent, now)
}

// logRefusal writes one refusal line for remote that also accounts for also others. Called
// with refuseMu held.
func (s *Server) logRefusal(remote string, also int, now time.Time) {
	s.log.Warn().Str("remote", remote).Int("max_connections", s.opts.MaxConnections).
		Int("also_refused", also).
		Msg("connection refused: too many connections")
	s.refuseLogged, s.refusedSilent, s.refuseLast = now, 0, ""
	if s.refuseTimer != nil {
		s.refuseTimer.Stop()
		s.refuseTimer = nil
	}
}

// reportRefusals logs the refusals counted since the last line: the latest one, with the
// others as also_refused.
func (s *Server) reportRefusals() {
	s.refuseMu.Lock()
	defer s.refuseMu.Unlock()
	if s.refusedSilent > 0 {
		s.logRefusal(s.refuseLast, s.refusedSilent-1, time.Now())
	}
	if s.refuseTimer != nil {
		s.refuseTimer.Stop()
		s.refuseTimer = nil
	}
}

// Shutdown stops accepting, lets every request already read finish and be replied to, then
// closes all connections. It returns ctx.Err() if ctx ends first (connections are then closed
// forcibly).
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.shutdown = true
	for l := range s.listeners {
		l.Close()
	}
	for c := range s.conns {
		c.stop()
	}
	s.mu.Unlock()
	s.reportRefusals()

	done := make(chan struct{})
	go func() {
		s.connWG.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		s.mu.Lock()
		for c := range s.conns {
			c.nc.Close()
		}
		s.mu.Unlock()
		return ctx.Err()
	}
}
