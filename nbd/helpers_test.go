package nbd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"fcnbd/internal/memdev"
)

// testServer is a Server listening on loopback TCP or, from startUnixServer, a Unix socket.
type testServer struct {
	*Server
	network  string
	addr     string
	serveErr chan error
	logs     *syncBuffer
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

const testDevSize = 1 << 20

// newTestExports returns exports "a" (a memdev with a description), "b" and the memdev of "a".
func newTestExports() (StaticExports, *memdev.Device) {
	a := memdev.New(testDevSize)
	return StaticExports{
		{Name: "a", Description: "export a", Device: a},
		{Name: "b", Device: memdev.New(64 << 10)},
	}, a
}

func startServer(t *testing.T, exports Exports, opts Options) *testServer {
	t.Helper()
	return startServerOn(t, "tcp", "127.0.0.1:0", exports, opts)
}

func startUnixServer(t *testing.T, exports Exports, opts Options) *testServer {
	t.Helper()
	return startServerOn(t, "unix", t.TempDir()+"/nbd.sock", exports, opts)
}

func startServerOn(t *testing.T, network, addr string, exports Exports, opts Options) *testServer {
	t.Helper()
	logs := &syncBuffer{}
	opts.Logger = zerolog.New(logs).Level(zerolog.DebugLevel)
	l, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{Server: NewServer(exports, opts), network: network, addr: l.Addr().String(),
		serveErr: make(chan error, 1), logs: logs}
	go func() { ts.serveErr <- ts.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := ts.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		select {
		case err := <-ts.serveErr:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Serve did not return after Shutdown")
		}
	})
	return ts
}

// client speaks raw NBD to a server.
type client struct {
	t  testing.TB
	nc net.Conn
	br *bufio.Reader
}

func (ts *testServer) dial(t *testing.T) *client {
	t.Helper()
	nc, err := net.Dial(ts.network, ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	return &client{t: t, nc: nc, br: bufio.NewReader(nc)}
}

func (c *client) write(b ...[]byte) {
	c.t.Helper()
	for _, p := range b {
		if _, err := c.nc.Write(p); err != nil {
			c.t.Fatalf("write: %v", err)
		}
	}
}

func (c *client) read(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.br, b); err != nil {
		c.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

// expectClosed asserts that the server closes the connection without sending anything more.
func (c *client) expectClosed() {
	c.t.Helper()
	c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c.br)
	if len(b) != 0 {
		c.t.Fatalf("expected close, got %d more bytes: %x", len(b), b[:min(len(b), 64)])
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		c.t.Fatalf("connection not closed by server")
	}
}

// greet reads the server greeting and sends the client flags.
func (c *client) greet(clientFlags uint32) {
	c.t.Helper()
	g := c.read(18)
	if binary.BigEndian.Uint64(g) != nbdMagic || binary.BigEndian.Uint64(g[8:]) != optMagic {
		c.t.Fatalf("bad greeting %x", g)
	}
	if f := binary.BigEndian.Uint16(g[16:]); f != flagFixedNewstyle|flagNoZeroes {
		c.t.Fatalf("handshake flags %#x", f)
	}
	c.write(be32(clientFlags))
}

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
func be64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

func optBytes(opt uint32, data []byte) []byte {
	b := be64(optMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func (c *client) option(opt uint32, data []byte) { c.t.Helper(); c.write(optBytes(opt, data)) }

type optReply struct {
	opt, typ uint32
	data     []byte
}

func (c *client) optReply() optReply {
	c.t.Helper()
	h := c.read(20)
	if m := binary.BigEndian.Uint64(h); m != optReplyMagic {
		c.t.Fatalf("option reply magic %#x", m)
	}
	r := optReply{opt: binary.BigEndian.Uint32(h[8:]), typ: binary.BigEndian.Uint32(h[12:])}
	r.data = c.read(int(binary.BigEndian.Uint32(h[16:])))
	return r
}

// infoData builds NBD_OPT_INFO/GO data.
func infoData(name string, reqs ...uint16) []byte {
	b := be32(uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(reqs)))
	for _, r := range reqs {
		b = binary.BigEndian.AppendUint16(b, r)
	}
	return b
}

// infoReplies collects NBD_REP_INFO replies up to the final ACK or error.
func (c *client) infoReplies(opt uint32) (infos map[uint16][]byte, final optReply) {
	c.t.Helper()
	infos = map[uint16][]byte{}
	for {
		r := c.optReply()
		if r.opt != opt {
			c.t.Fatalf("reply for option %d, want %d", r.opt, opt)
		}
		if r.typ != repInfo {
			return infos, r
		}
		typ := binary.BigEndian.Uint16(r.data)
		if _, dup := infos[typ]; dup {
			c.t.Fatalf("info %d sent twice", typ)
		}
		infos[typ] = r.data[2:]
	}
}

// open negotiates with GO and returns the export size.
func (ts *testServer) open(t *testing.T, name string) *client {
	t.Helper()
	c := ts.dial(t)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.option(optGo, infoData(name))
	_, final := c.infoReplies(optGo)
	if final.typ != repAck {
		t.Fatalf("GO %q: reply %#x", name, final.typ)
	}
	return c
}

func reqBytes(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) []byte {
	b := be32(requestMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	return append(b, payload...)
}

func (c *client) request(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) {
	c.t.Helper()
	c.write(reqBytes(typ, flags, cookie, off, length, payload))
}

// reply reads one simple reply header.
func (c *client) reply() (cookie uint64, errno uint32) {
	c.t.Helper()
	h := c.read(replyHdrSize)
	if m := binary.BigEndian.Uint32(h); m != simpleReplyMagic {
		c.t.Fatalf("reply magic %#x", m)
	}
	return binary.BigEndian.Uint64(h[8:]), binary.BigEndian.Uint32(h[4:])
}

// do sends one request and waits for its reply (and the data of a successful READ).
func (c *client) do(typ, flags uint16, off uint64, length uint32, payload []byte) (uint32, []byte) {
	c.t.Helper()
	const cookie = 0xc0ffee
	c.request(typ, flags, cookie, off, length, payload)
	got, errno := c.reply()
	if got != cookie {
		c.t.Fatalf("reply cookie %#x, want %#x", got, cookie)
	}
	if typ == cmdRead && errno == 0 {
		return 0, c.read(int(length))
	}
	return errno, nil
}

func (c *client) mustDo(typ, flags uint16, off uint64, length uint32, payload []byte) []byte {
	c.t.Helper()
	errno, data := c.do(typ, flags, off, length, payload)
	if errno != 0 {
		c.t.Fatalf("command %d at %d+%d: error %d", typ, off, length, errno)
	}
	return data
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}
