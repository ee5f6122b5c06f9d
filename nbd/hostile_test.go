package nbd

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"fcnbd/internal/memdev"
)

// Hostile clients: garbage at every stage, truncated messages, oversized lengths, clients that
// stop reading, and floods of connections. The server must answer or close, never hang, never
// grow without bound, never let one client stall another, and leave no goroutine behind.

// connCount is how many connections the server holds.
func (ts *testServer) connCount() int {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return len(ts.conns)
}

// waitConns waits until the server holds at most n connections.
func (ts *testServer) waitConns(t *testing.T, n int, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for ts.connCount() > n {
		if time.Now().After(deadline) {
			t.Fatalf("server still holds %d connections after %v, want ≤ %d", ts.connCount(), within, n)
		}
		time.Sleep(time.Millisecond)
	}
}

// waitGoroutines waits until at most limit goroutines run, and fails with a dump otherwise.
func waitGoroutines(t *testing.T, limit int, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for runtime.NumGoroutine() > limit {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Fatalf("%d goroutines after %v, want ≤ %d:\n%s", runtime.NumGoroutine(), within, limit, buf)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// dialRaw connects without reading anything.
func (ts *testServer) dialRaw(t *testing.T) *net.TCPConn {
	t.Helper()
	nc, err := net.DialTimeout("tcp", ts.addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	return nc.(*net.TCPConn)
}

// untilClosed reads and discards until the server closes the connection, returning what it
// read; it fails the test if the server keeps it open for 10 s.
func untilClosed(t *testing.T, nc net.Conn) []byte {
	t.Helper()
	nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := io.ReadAll(nc)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("server kept the connection open (read %d bytes)", len(b))
	}
	return b
}

// goodRoundTrip writes a pattern and reads it back on c, failing if that takes over 5 s.
func goodRoundTrip(t *testing.T, c *client, i int) {
	t.Helper()
	start := time.Now()
	data := pattern(4096, byte(i))
	off := uint64(i%200) * 4096
	c.mustDo(cmdWrite, 0, off, 4096, data)
	if got := c.mustDo(cmdRead, 0, off, 4096, nil); !bytes.Equal(got, data) {
		t.Fatalf("round trip %d: read back differs", i)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("round trip %d took %v", i, d)
	}
}

// greetingAndGo is a client's bytes up to and including a GO to export name (no reading).
func greetingAndGo(name string) []byte {
	return append(be32(flagFixedNewstyle|flagNoZeroes), optBytes(optGo, infoData(name))...)
}

// TestHostileGarbage sends seeded random bytes at each stage of a session, then half-closes:
// the server must close the connection every time, and still serve a well-behaved client.
func TestHostileGarbage(t *testing.T) {
	exports, _ := newTestExports()
	ts := startServer(t, exports, Options{HandshakeTimeout: time.Minute})
	good := ts.open(t, "a")
	goodRoundTrip(t, good, 0) // the good connection's goroutines are all running
	base := runtime.NumGoroutine()

	stages := []struct {
		name   string
		prefix []byte
	}{
		{"instead of client flags", nil},
		{"instead of an option header", be32(flagFixedNewstyle | flagNoZeroes)},
		{"as GO data", append(be32(flagFixedNewstyle), be64(optMagic)...)}, // then opt, len, data: all garbage
		{"as option data of LIST", append(be32(flagFixedNewstyle|flagNoZeroes), optBytes(optList, nil)[:12]...)},
		{"instead of a request", greetingAndGo("a")},
		{"after a request header", append(greetingAndGo("a"), reqBytes(cmdWrite, 0, 1, 0, 4096, nil)...)},
	}
	for _, st := range stages {
		t.Run(st.name, func(t *testing.T) {
			for seed := range uint64(40) {
				rng := rand.New(rand.NewPCG(seed, 99))
				garbage := make([]byte, 1+rng.IntN(8192))
				for i := range garbage {
					garbage[i] = byte(rng.Uint32())
				}
				nc := ts.dialRaw(t)
				go func() {
					nc.Write(append(bytes.Clone(st.prefix), garbage...)) // fails if the server hung up first: fine
					nc.CloseWrite()
				}()
				untilClosed(t, nc)
				nc.Close()
			}
		})
	}
	ts.waitConns(t, 1, 10*time.Second)
	goodRoundTrip(t, good, 1)
	waitGoroutines(t, base, 10*time.Second)
	if strings.Contains(ts.logs.String(), `"level":"error"`) {
		t.Errorf("garbage logged at error level:\n%s", ts.logs.String())
	}
}

// hostileRequest is one request of a random stream, and whether the server must answer it.
type hostileRequest struct {
	typ    uint16
	length uint32
	wire   []byte
}

// TestHostileRequestStream sends seeded random but well-framed requests (valid magic; random
// types, flags, offsets, lengths, with WRITE payloads) ended by a bad magic, a DISC or EOF,
// then parses everything the server sent: every reply is well formed, answers a request sent,
// exactly once, a successful READ carries its length of data, and every request sent before
// the end was answered.
func TestHostileRequestStream(t *testing.T) {
	exports, dev := newTestExports()
	dev.SetHook(func(op memdev.Op, off, length int64) error {
		if off >= 512<<10 && off < 516<<10 {
			return syscall.EIO
		}
		return nil
	})
	ts := startServer(t, exports, Options{MaxInFlight: 8, MaxInFlightBytes: 256 << 10})
	base := runtime.NumGoroutine()
	for seed := range uint64(60) {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 7))
			c := ts.open(t, "a")
			var stream []byte
			sent := map[uint64]hostileRequest{}
			n := 1 + rng.IntN(200)
			for i := range n {
				cookie := uint64(i) + 1000*seed
				typ := uint16(rng.IntN(8))
				if typ == cmdDisc {
					typ = cmdRead
				}
				if rng.IntN(20) == 0 {
					typ = uint16(rng.Uint32())
					if typ == cmdDisc {
						typ = 0x7777
					}
				}
				var flags uint16
				if rng.IntN(4) == 0 {
					flags = uint16(rng.IntN(8))
				}
				off := uint64(rng.IntN(testDevSize + 8192))
				if rng.IntN(30) == 0 {
					off = rng.Uint64()
				}
				length := uint32(rng.IntN(16 << 10))
				if typ != cmdWrite && rng.IntN(30) == 0 {
					length = uint32(MaxPayload + rng.IntN(1024))
				}
				var payload []byte
				if typ == cmdWrite {
					payload = pattern(int(length), byte(i))
				}
				r := hostileRequest{typ: typ, length: length, wire: reqBytes(typ, flags, cookie, off, length, payload)}
				sent[cookie] = r
				stream = append(stream, r.wire...)
			}
			switch rng.IntN(3) {
			case 0:
				bad := reqBytes(cmdFlush, 0, 1, 0, 0, nil)
				bad[0] ^= 0x80
				stream = append(stream, bad...)
			case 1:
				stream = append(stream, reqBytes(cmdDisc, 0, 2, 0, 0, nil)...)
			}
			go func() {
				c.nc.Write(stream)
				c.nc.(*net.TCPConn).CloseWrite()
			}()
			out := bufio.NewReader(bytes.NewReader(untilClosed(t, c.nc)))
			replied := map[uint64]bool{}
			for {
				var h [replyHdrSize]byte
				if _, err := io.ReadFull(out, h[:]); err != nil {
					if err != io.EOF {
						t.Fatalf("reply stream ends in a partial header (%v)", err)
					}
					break
				}
				if m := binary.BigEndian.Uint32(h[:]); m != simpleReplyMagic {
					t.Fatalf("reply magic %#x", m)
				}
				errno := binary.BigEndian.Uint32(h[4:])
				cookie := binary.BigEndian.Uint64(h[8:])
				r, ok := sent[cookie]
				if !ok || replied[cookie] {
					t.Fatalf("reply for cookie %d: sent %v, replied before %v", cookie, ok, replied[cookie])
				}
				replied[cookie] = true
				switch errno {
				case 0:
					if r.typ == cmdRead {
						if _, err := out.Discard(int(r.length)); err != nil {
							t.Fatalf("READ %d: data truncated", cookie)
						}
					}
				case errIO, errInval, errNoSpc:
				default:
					t.Fatalf("cookie %d: unexpected NBD error %d", cookie, errno)
				}
			}
			if len(replied) != len(sent) {
				t.Fatalf("%d of %d requests answered", len(replied), len(sent))
			}
		})
	}
	ts.waitConns(t, 0, 10*time.Second)
	waitGoroutines(t, base, 10*time.Second)
}

// truncationPoints returns the bytes a client sends in a whole valid session and the points
// to cut it at.
func truncationPoints() (stream []byte, cuts []int) {
	stream = be32(flagFixedNewstyle | flagNoZeroes)
	for i := range len(stream) {
		cuts = append(cuts, i) // inside the client flags
	}
	mark := func(b []byte, every int) {
		start := len(stream)
		stream = append(stream, b...)
		for i := 0; i < len(b); i += every {
			cuts = append(cuts, start+i)
		}
	}
	mark(optBytes(optInfo, infoData("a", infoName)), 1) // inside an option header and its data
	mark(optBytes(optGo, infoData("a")), 1)
	mark(reqBytes(cmdWrite, 0, 1, 0, 64<<10, nil), 1) // inside a WRITE header…
	mark(pattern(64<<10, 5), 997)                     // …and its payload
	mark(reqBytes(cmdRead, 0, 2, 0, 4096, nil), 1)
	mark(reqBytes(cmdWriteZeroes, 0, 3, 0, 8192, nil), 3)
	cuts = append(cuts, len(stream)) // complete, then EOF without DISC
	return stream, cuts
}

// TestHostileTruncated cuts a valid session at many points — inside the client flags, an
// option header, option data, a request header, a WRITE payload — and closes the connection
// there: the server must drop the connection each time and leave nothing behind.
func TestHostileTruncated(t *testing.T) {
	exports, _ := newTestExports()
	ts := startServer(t, exports, Options{HandshakeTimeout: time.Minute})
	base := runtime.NumGoroutine()
	stream, cuts := truncationPoints()
	for _, halfClose := range []bool{true, false} {
		for _, cut := range cuts {
			nc := ts.dialRaw(t)
			if _, err := nc.Write(stream[:cut]); err != nil {
				t.Fatalf("cut %d: %v", cut, err)
			}
			if halfClose {
				// The server sees EOF and must close its side.
				nc.CloseWrite()
				untilClosed(t, nc)
			}
			nc.Close()
			ts.waitConns(t, 0, 5*time.Second)
		}
	}
	waitGoroutines(t, base, 10*time.Second)
	if !strings.Contains(ts.logs.String(), "option data truncated") {
		t.Errorf("no truncated option logged")
	}
}

// TestHostileOversizedLengths: lengths far beyond the limits are refused with an error reply and
// the connection goes on, or (when the payload can't be skipped) the connection closes.
func TestHostileOversizedLengths(t *testing.T) {
	exports, _ := newTestExports()
	ts := startServer(t, exports, Options{})
	base := runtime.NumGoroutine()

	t.Run("error reply, connection goes on", func(t *testing.T) {
		c := ts.open(t, "a")
		tests := []struct {
			name   string
			typ    uint16
			off    uint64
			length uint32
			send   int // payload bytes sent (WRITE)
			want   uint32
		}{
			{"read max+1", cmdRead, 0, MaxPayload + 1, 0, errInval},
			{"read 4GiB-1", cmdRead, 0, 0xffffffff, 0, errInval},
			{"read offset wraps", cmdRead, 1<<64 - 4096, 8192, 0, errInval},
			{"read past end", cmdRead, testDevSize, 1, 0, errInval},
			{"write max+1 with payload", cmdWrite, 0, MaxPayload + 1, MaxPayload + 1, errInval},
			{"write offset wraps", cmdWrite, 1<<64 - 4096, 8192, 8192, errNoSpc},
			{"trim 4GiB-1", cmdTrim, 0, 0xffffffff, 0, errInval},
			{"write zeroes offset wraps", cmdWriteZeroes, 1<<64 - 1, 2, 0, errInval},
			{"flush with length", cmdFlush, 1<<64 - 1, 0xffffffff, 0, 0},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				errno, _ := c.do(tc.typ, 0, tc.off, tc.length, make([]byte, tc.send))
				if errno != tc.want {
					t.Fatalf("error %d, want %d", errno, tc.want)
				}
				goodRoundTrip(t, c, 3)
			})
		}
	})
	t.Run("write of 4GiB-1 then hang up", func(t *testing.T) {
		c := ts.open(t, "a")
		c.request(cmdWrite, 0, 1, 0, 0xffffffff, make([]byte, 1<<20))
		c.nc.(*net.TCPConn).CloseWrite()
		if b := untilClosed(t, c.nc); len(b) != 0 {
			t.Fatalf("server replied %d bytes to a request whose payload never came", len(b))
		}
	})
	t.Run("option lengths", func(t *testing.T) {
		for _, n := range []uint32{maxOptionDiscard + 1, 0xffffffff} {
			nc := ts.dialRaw(t)
			h := optBytes(0x1234, nil)
			binary.BigEndian.PutUint32(h[12:], n)
			nc.Write(append(be32(flagFixedNewstyle|flagNoZeroes), h...))
			if b := untilClosed(t, nc); len(b) != 18 {
				t.Fatalf("option length %d: got %d bytes, want the greeting only", n, len(b))
			}
		}
	})
	ts.waitConns(t, 0, 10*time.Second)
	waitGoroutines(t, base, 10*time.Second)
}

// TestHostileHalfOpen: a client sends READs and never reads the replies. The server must stop
// reading that connection once its byte budget is held (not buffer every reply), keep serving
// other connections meanwhile, and release everything when the client goes away.
func TestHostileHalfOpen(t *testing.T) {
	const readLen = 4 << 20
	const budget = 8 << 20
	dev := memdev.New(64 << 20)
	var reads atomic.Int64
	dev.SetHook(func(op memdev.Op, off, length int64) error {
		if op == memdev.OpRead && length == readLen {
			reads.Add(1)
		}
		return nil
	})
	ts := startServer(t, StaticExports{{Name: "v", Device: dev}}, Options{MaxInFlightBytes: budget})
	base := runtime.NumGoroutine()
	good := ts.open(t, "v")
	bad := ts.open(t, "v")
	bad.nc.(*net.TCPConn).SetReadBuffer(64 << 10) // no autotuning: the stall comes early

	// Send READs until the server stops taking them (the write blocks for a second).
	var sent int
	stalled := make(chan struct{})
	go func() {
		defer close(stalled)
		var hdrs []byte
		for i := range 64 {
			hdrs = append(hdrs, reqBytes(cmdRead, 0, uint64(i), uint64(i%16)*readLen, readLen, nil)...)
		}
		for {
			bad.nc.SetWriteDeadline(time.Now().Add(time.Second))
			if _, err := bad.nc.Write(hdrs); err != nil {
				return
			}
			sent += 64
		}
	}()
	// Meanwhile, and after the stall, the well-behaved client is served promptly.
	for i := 0; ; i++ {
		goodRoundTrip(t, good, i)
		select {
		case <-stalled:
		default:
			continue
		}
		break
	}
	for i := range 20 {
		goodRoundTrip(t, good, i)
	}
	stuck := reads.Load()
	t.Logf("half-open client sent %d READs of %d MiB before the server stopped reading; %d executed", sent, readLen>>20, stuck)
	// Executed reads are held in the budget or sit in socket buffers (64 KiB receive, a few MiB
	// send): far fewer than MaxInFlight, which without the budget would be 128 × 4 MiB.
	if stuck > 16 {
		t.Errorf("%d READs of %d MiB executed for a client that reads nothing; the budget is %d MiB", stuck, readLen>>20, budget>>20)
	}
	time.Sleep(500 * time.Millisecond)
	if n := reads.Load(); n != stuck {
		t.Errorf("server went on executing READs for a stalled client: %d → %d", stuck, n)
	}

	bad.nc.Close()
	ts.waitConns(t, 1, 20*time.Second)
	goodRoundTrip(t, good, 7)
	good.request(cmdDisc, 0, 0, 0, 0, nil)
	good.expectClosed()
	ts.waitConns(t, 0, 5*time.Second)
	waitGoroutines(t, base, 10*time.Second)
	t.Logf("after the client hung up the server executed %d more READs", reads.Load()-stuck)
}

// loggedRefusals adds up the refusals the log reports: one per "too many connections" line
// plus its also_refused count.
func loggedRefusals(t *testing.T, logs string) int {
	t.Helper()
	n := 0
	for _, line := range strings.Split(logs, "\n") {
		if !strings.Contains(line, "too many connections") {
			continue
		}
		var e struct {
			AlsoRefused int `json:"also_refused"`
		}
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		n += 1 + e.AlsoRefused
	}
	return n
}

// TestHostileConnectionFlood opens 3000 connections against MaxConnections 1000 while a
// well-behaved client works: 999 are held (the good client has the 1000th), the rest are
// refused at once and the refusal is logged, the good client's requests keep completing, and
// when the flood closes every connection goroutine ends.
func TestHostileConnectionFlood(t *testing.T) {
	if testing.Short() {
		t.Skip("skipped in -short: opens 3000 connections")
	}
	const maxConns, flood = 1000, 3000
	exports, _ := newTestExports()
	ts := startServer(t, exports, Options{MaxConnections: maxConns, HandshakeTimeout: 5 * time.Minute})
	base := runtime.NumGoroutine()
	good := ts.open(t, "a")

	conns := make([]net.Conn, flood)
	greeted := make([]bool, flood)
	var dialErrs atomic.Int64
	done := make(chan struct{})
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for i := range flood {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			nc, err := net.DialTimeout("tcp", ts.addr, 10*time.Second)
			if err != nil {
				dialErrs.Add(1)
				return
			}
			conns[i] = nc
			nc.SetReadDeadline(time.Now().Add(10 * time.Second))
			var g [18]byte
			_, err = io.ReadFull(nc, g[:])
			greeted[i] = err == nil && binary.BigEndian.Uint64(g[:]) == nbdMagic
		})
	}
	go func() { wg.Wait(); close(done) }()

	var slowest time.Duration
	for i := 0; ; i++ {
		start := time.Now()
		goodRoundTrip(t, good, i)
		slowest = max(slowest, time.Since(start))
		select {
		case <-done:
		default:
			continue
		}
		break
	}
	if n := dialErrs.Load(); n != 0 {
		t.Fatalf("%d dials failed", n)
	}
	held := 0
	for _, g := range greeted {
		if g {
			held++
		}
	}
	if held != maxConns-1 {
		t.Errorf("%d flood connections greeted, want %d", held, maxConns-1)
	}
	if n := ts.connCount(); n != maxConns {
		t.Errorf("server holds %d connections, want %d", n, maxConns)
	}
	if !strings.Contains(ts.logs.String(), "too many connections") {
		t.Errorf("refusals not logged")
	}
	t.Logf("%d held, %d refused (%d reported in the log so far); slowest good round trip during the flood %v",
		held, flood-held, loggedRefusals(t, ts.logs.String()), slowest)

	for _, nc := range conns {
		if nc != nil {
			nc.Close()
		}
	}
	ts.waitConns(t, 1, 20*time.Second)
	goodRoundTrip(t, good, 1)
	good.request(cmdDisc, 0, 0, 0, 0, nil)
	good.expectClosed()
	ts.waitConns(t, 0, 5*time.Second)
	waitGoroutines(t, base, 20*time.Second)
}

// TestHostileWorkAfterHangUp: a client sends READ headers and hangs up without reading a
// reply. Once the server's reply write fails, the requests already in its 64 KiB read buffer
// (up to ~2340 headers, ~73 GiB of reads at 32 MiB each) must be dropped, not run: at most the
// MaxInFlight already started may still reach the device.
func TestHostileWorkAfterHangUp(t *testing.T) {
	const readLen = 4 << 20
	dev := memdev.New(64 << 20)
	var reads atomic.Int64
	dev.SetHook(func(op memdev.Op, off, length int64) error {
		if op == memdev.OpRead && length == readLen {
			reads.Add(1)
		}
		return nil
	})
	ts := startServer(t, StaticExports{{Name: "v", Device: dev}}, Options{MaxInFlightBytes: 8 << 20})
	base := runtime.NumGoroutine()
	c := ts.open(t, "v")
	c.nc.(*net.TCPConn).SetReadBuffer(64 << 10)
	var hdrs []byte
	for i := range 4096 {
		hdrs = append(hdrs, reqBytes(cmdRead, 0, uint64(i), uint64(i%16)*readLen, readLen, nil)...)
	}
	c.nc.SetWriteDeadline(time.Now().Add(2 * time.Second))
	c.nc.Write(hdrs) // stalls once the server stops reading
	time.Sleep(200 * time.Millisecond)
	before := reads.Load()
	c.nc.Close()
	ts.waitConns(t, 0, 60*time.Second)
	waitGoroutines(t, base, 10*time.Second)
	if after := reads.Load() - before; after > DefaultMaxInFlight {
		t.Errorf("server ran %d READs of %d MiB after the client hung up (%d before)", after, readLen>>20, before)
	}
}

// TestHostileRefusalsReported: refusals are logged at most once a second with the others
// counted in also_refused; after a burst followed by quiet, the count must still reach the log
// (3000 connections against MaxConnections 1000 refuse 2000, and the log must say 2000).
func TestHostileRefusalsReported(t *testing.T) {
	if testing.Short() {
		t.Skip("skipped in -short: opens 3000 connections")
	}
	const maxConns, flood = 1000, 3000
	exports, _ := newTestExports()
	ts := startServer(t, exports, Options{MaxConnections: maxConns, HandshakeTimeout: 5 * time.Minute})
	var conns []net.Conn
	for range flood {
		nc, err := net.Dial("tcp", ts.addr)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, nc)
	}
	defer func() {
		for _, nc := range conns {
			nc.Close()
		}
	}()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) && ts.connCount() < maxConns {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(3 * time.Second) // well past the one-second log window
	if got, want := loggedRefusals(t, ts.logs.String()), flood-maxConns; got != want {
		t.Errorf("the log reports %d refusals, %d happened", got, want)
	}
}
