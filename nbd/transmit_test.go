package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
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

	"golang.org/x/sys/unix"

	"fcnbd/internal/memdev"
)

func TestCommands(t *testing.T) {
	exports, dev := newTestExports()
	ts := startServer(t, exports, Options{})
	c := ts.open(t, "a")

	data := pattern(64<<10, 1)
	c.mustDo(cmdWrite, 0, 4096, uint32(len(data)), data)
	if got := c.mustDo(cmdRead, 0, 4096, uint32(len(data)), nil); !bytes.Equal(got, data) {
		t.Fatal("read back differs")
	}
	// Unaligned, FUA, at the very end of the device.
	c.mustDo(cmdWrite, cmdFlagFUA, testDevSize-3, 3, []byte("end"))
	if got := c.mustDo(cmdRead, 0, testDevSize-3, 3, nil); string(got) != "end" {
		t.Fatalf("read %q", got)
	}
	// FUA is accepted (and ignored) on every command.
	c.mustDo(cmdRead, cmdFlagFUA, 0, 1, nil)

	flushes := dev.Flushes()
	c.mustDo(cmdFlush, 0, 0, 0, nil)
	if dev.Flushes() != flushes+1 {
		t.Errorf("FLUSH did not flush the device")
	}

	c.mustDo(cmdTrim, 0, 4096, 4096, nil)
	if got := c.mustDo(cmdRead, 0, 4096, 4096, nil); !bytes.Equal(got, make([]byte, 4096)) {
		t.Errorf("trimmed range not zero")
	}
	flushes = dev.Flushes()
	c.mustDo(cmdTrim, cmdFlagFUA, 8192, 4096, nil)
	if dev.Flushes() != flushes+1 {
		t.Errorf("TRIM+FUA did not flush")
	}

	// WRITE_ZEROES without NO_HOLE may punch (memdev frees pages); with NO_HOLE it must not.
	c.mustDo(cmdWrite, 0, 0, 16384, pattern(16384, 9))
	alloc := dev.Allocated()
	c.mustDo(cmdWriteZeroes, cmdFlagNoHole|cmdFlagFUA, 0, 8192, nil)
	if dev.Allocated() != alloc {
		t.Errorf("NO_HOLE write zeroes deallocated: %d → %d", alloc, dev.Allocated())
	}
	c.mustDo(cmdWriteZeroes, 0, 8192, 8192, nil)
	if dev.Allocated() != alloc-8192 {
		t.Errorf("write zeroes without NO_HOLE did not punch: %d → %d", alloc, dev.Allocated())
	}
	if got := c.mustDo(cmdRead, 0, 0, 16384, nil); !bytes.Equal(got, make([]byte, 16384)) {
		t.Errorf("zeroed range not zero")
	}
	// Zero-length requests inside the device succeed.
	c.mustDo(cmdRead, 0, testDevSize, 0, nil)
	c.mustDo(cmdWrite, 0, 0, 0, nil)

	// DISC: no reply, the connection closes.
	c.request(cmdDisc, 0, 1, 0, 0, nil)
	c.expectClosed()
}

func TestLargeTrimAndWriteZeroes(t *testing.T) {
	dev := memdev.New(8 << 30)
	ts := startServer(t, StaticExports{{Name: "big", Device: dev}}, Options{})
	c := ts.open(t, "big")
	c.mustDo(cmdWrite, 0, 4<<30, 4096, pattern(4096, 3))
	c.mustDo(cmdTrim, 0, 1<<30, 0xffffffff, nil)
	c.mustDo(cmdWriteZeroes, 0, 4<<30, 0xffffffff, nil)
	if dev.Allocated() != 0 {
		t.Errorf("allocated %d after zeroing", dev.Allocated())
	}
}

func TestRequestErrors(t *testing.T) {
	exports, _ := newTestExports()
	ts := startServer(t, exports, Options{})
	c := ts.open(t, "a")
	const size = testDevSize
	for _, tc := range []struct {
		name           string
		typ, flags     uint16
		off            uint64
		length         uint32
		payload        []byte
		want           uint32
		nonEmptyDataOK bool
	}{
		{name: "read past end", typ: cmdRead, off: size - 1, length: 2, want: errInval},
		{name: "read offset past end", typ: cmdRead, off: size + 4096, length: 0, want: errInval},
		{name: "read huge offset", typ: cmdRead, off: 1<<64 - 1, length: 1, want: errInval},
		{name: "read too long", typ: cmdRead, off: 0, length: 32<<20 + 1, want: errInval},
		{name: "read with NO_HOLE", typ: cmdRead, flags: cmdFlagNoHole, length: 1, want: errInval},
		{name: "read with DF", typ: cmdRead, flags: 1 << 2, length: 1, want: errInval},
		{name: "write past end", typ: cmdWrite, off: size - 1, length: 2, payload: []byte("xy"), want: errNoSpc},
		{name: "write far past end", typ: cmdWrite, off: 1 << 62, length: 5, payload: []byte("IHAVE"), want: errNoSpc},
		{name: "write with NO_HOLE", typ: cmdWrite, flags: cmdFlagNoHole, length: 28, payload: reqBytes(cmdFlush, 0, 7, 0, 0, nil), want: errInval},
		{name: "write with unknown flag", typ: cmdWrite, flags: 1 << 15, length: 4, payload: []byte{0x25, 0x60, 0x95, 0x13}, want: errInval},
		{name: "write too long", typ: cmdWrite, length: 32<<20 + 1, payload: make([]byte, 32<<20+1), want: errInval},
		{name: "trim past end", typ: cmdTrim, off: size - 4096, length: 8192, want: errInval},
		{name: "trim with NO_HOLE", typ: cmdTrim, flags: cmdFlagNoHole, length: 1, want: errInval},
		{name: "write zeroes past end", typ: cmdWriteZeroes, off: size, length: 1, want: errInval},
		{name: "write zeroes with unknown flag", typ: cmdWriteZeroes, flags: 1 << 4, length: 1, want: errInval},
		{name: "flush with unknown flag", typ: cmdFlush, flags: 1 << 3, want: errInval},
		{name: "CACHE", typ: 5, length: 1, want: errInval},
		{name: "BLOCK_STATUS", typ: 7, length: 1, want: errInval},
		{name: "unknown command", typ: 0xffff, length: 100, want: errInval},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if errno, _ := c.do(tc.typ, tc.flags, tc.off, tc.length, tc.payload); errno != tc.want {
				t.Fatalf("error %d, want %d", errno, tc.want)
			}
			// The connection is still in step: a write/read round trip works.
			c.mustDo(cmdWrite, 0, 0, 4, []byte("okay"))
			if got := c.mustDo(cmdRead, 0, 0, 4, nil); string(got) != "okay" {
				t.Fatalf("read %q after error", got)
			}
		})
	}
}

func TestBackendErrors(t *testing.T) {
	exports, dev := newTestExports()
	ts := startServer(t, exports, Options{})
	c := ts.open(t, "a")
	var injected atomic.Pointer[error]
	dev.SetHook(func(op memdev.Op, off, length int64) error {
		if off == 4096 || op == memdev.OpFlush {
			if e := injected.Load(); e != nil {
				return *e
			}
		}
		return nil
	})
	for _, tc := range []struct {
		err  error
		want uint32
	}{
		{syscall.EPERM, 1},
		{syscall.EIO, 5},
		{syscall.ENOMEM, 12},
		{syscall.EINVAL, 22},
		{syscall.ENOSPC, 28},
		{syscall.EOVERFLOW, 75},
		{syscall.ENOTSUP, 95},
		{syscall.ESHUTDOWN, 108},
		{syscall.EROFS, 5},
		{syscall.EAGAIN, 5},
		{errors.New("no errno"), 5},
		{fmt.Errorf("wrapped: %w", syscall.EPERM), 1},
	} {
		injected.Store(&tc.err)
		for _, cmd := range []struct {
			typ     uint16
			length  uint32
			payload []byte
		}{
			{cmdRead, 4096, nil},
			{cmdWrite, 4, []byte("IHAV")},
			{cmdWrite, inlineWriteMin, make([]byte, inlineWriteMin)}, // run on the reader
			{cmdFlush, 0, nil},
			{cmdTrim, 4096, nil},
			{cmdWriteZeroes, 4096, nil},
		} {
			off := uint64(4096)
			if cmd.typ == cmdFlush {
				off = 0
			}
			// do reads the data only on success, so an error reply with data would desync
			// the following request.
			if errno, _ := c.do(cmd.typ, 0, off, cmd.length, cmd.payload); errno != tc.want {
				t.Errorf("%v on command %d: NBD error %d, want %d", tc.err, cmd.typ, errno, tc.want)
			}
			c.mustDo(cmdRead, 0, 0, 8, nil)
		}
	}
	injected.Store(nil)
	c.mustDo(cmdRead, 0, 4096, 4096, nil)
}

func TestOutOfOrderReplies(t *testing.T) {
	exports, dev := newTestExports()
	ts := startServer(t, exports, Options{})
	c := ts.open(t, "a")
	release := make(chan struct{})
	entered := make(chan struct{})
	dev.SetHook(func(op memdev.Op, off, length int64) error {
		if op == memdev.OpRead && off == 0 {
			close(entered)
			<-release
			return syscall.EIO // and a failing slow read sends no data
		}
		return nil
	})
	c.request(cmdRead, 0, 1, 0, 4096, nil)
	<-entered
	c.request(cmdRead, 0, 2, 4096, 4096, nil)
	c.request(cmdWrite, 0, 3, 8192, 4, []byte("fast"))
	c.request(cmdFlush, 0, 4, 0, 0, nil)
	got := map[uint64]bool{}
	for range 3 {
		cookie, errno := c.reply()
		if errno != 0 {
			t.Fatalf("cookie %d: error %d", cookie, errno)
		}
		if cookie == 2 {
			c.read(4096)
		}
		got[cookie] = true
	}
	if !got[2] || !got[3] || !got[4] {
		t.Fatalf("fast replies %v", got)
	}
	close(release)
	if cookie, errno := c.reply(); cookie != 1 || errno != errIO {
		t.Fatalf("slow reply cookie %d error %d", cookie, errno)
	}
	c.mustDo(cmdFlush, 0, 0, 0, nil)
}

func TestManyInFlight(t *testing.T) {
	for _, maxInFlight := range []int{0, 4} {
		t.Run(fmt.Sprint("MaxInFlight=", maxInFlight), func(t *testing.T) {
			exports, dev := newTestExports()
			ts := startServer(t, exports, Options{MaxInFlight: maxInFlight})
			c := ts.open(t, "a")
			limit := maxInFlight
			if limit == 0 {
				limit = DefaultMaxInFlight
			}
			var running, peak atomic.Int64
			all := make(chan struct{})
			var once sync.Once
			dev.SetHook(func(op memdev.Op, off, length int64) error {
				n := running.Add(1)
				defer running.Add(-1)
				for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
				}
				if n == int64(limit) {
					once.Do(func() { close(all) })
				}
				select { // wait until the limit is reached, proving that many run at once
				case <-all:
				case <-time.After(5 * time.Second):
				}
				return nil
			})
			const total = 300
			go func() {
				var b []byte
				for i := range total {
					b = append(b, reqBytes(cmdWrite, 0, uint64(i), uint64(i)*8, 8, []byte(fmt.Sprintf("%8d", i)))...)
				}
				c.nc.Write(b)
			}()
			seen := map[uint64]bool{}
			for range total {
				cookie, errno := c.reply()
				if errno != 0 || seen[cookie] {
					t.Fatalf("cookie %d errno %d dup %v", cookie, errno, seen[cookie])
				}
				seen[cookie] = true
			}
			if p := peak.Load(); p != int64(limit) {
				t.Errorf("peak concurrency %d, want %d", p, limit)
			}
			dev.SetHook(nil)
			got := c.mustDo(cmdRead, 0, 0, total*8, nil)
			for i := range total {
				if string(got[i*8:i*8+8]) != fmt.Sprintf("%8d", i) {
					t.Fatalf("slot %d holds %q", i, got[i*8:i*8+8])
				}
			}
		})
	}
}

func TestBadMagicCloses(t *testing.T) {
	exports, _ := newTestExports()
	ts := startServer(t, exports, Options{})
	c := ts.open(t, "a")
	bad := reqBytes(cmdFlush, 0, 2, 0, 0, nil)
	bad[3] ^= 0xff
	// A request read before the violation is still answered.
	c.write(reqBytes(cmdWrite, 0, 1, 0, 4, []byte("last")), bad)
	if cookie, errno := c.reply(); cookie != 1 || errno != 0 {
		t.Fatalf("cookie %d errno %d", cookie, errno)
	}
	c.expectClosed()
	if !strings.Contains(ts.logs.String(), "bad request magic") {
		t.Errorf("violation not logged: %s", ts.logs.String())
	}
}

func TestMaxConnections(t *testing.T) {
	exports, _ := newTestExports()
	ts := startServer(t, exports, Options{MaxConnections: 2})
	c1 := ts.open(t, "a")
	c2 := ts.open(t, "b")
	c3 := ts.dial(t)
	c3.expectClosed()
	if !strings.Contains(ts.logs.String(), "too many connections") {
		t.Errorf("refusal not logged: %s", ts.logs.String())
	}
	c1.mustDo(cmdFlush, 0, 0, 0, nil)
	c2.request(cmdDisc, 0, 0, 0, 0, nil)
	c2.expectClosed()
	// A slot is free again once the server has noticed.
	deadline := time.Now().Add(5 * time.Second)
	for {
		ts.mu.Lock()
		n := len(ts.conns)
		ts.mu.Unlock()
		if n == 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	ts.open(t, "a").mustDo(cmdFlush, 0, 0, 0, nil)
}

func TestShutdownFinishesInFlight(t *testing.T) {
	exports, dev := newTestExports()
	ts := startServer(t, exports, Options{})
	c := ts.open(t, "a")
	idle := ts.open(t, "b")
	negotiating := ts.dial(t)
	negotiating.greet(flagFixedNewstyle)

	release := make(chan struct{})
	entered := make(chan struct{}, 8)
	dev.SetHook(func(op memdev.Op, off, length int64) error {
		entered <- struct{}{}
		<-release
		return nil
	})
	c.request(cmdWrite, cmdFlagFUA, 1, 0, 5, []byte("hello"))
	c.request(cmdRead, 0, 2, 0, 5, nil)
	<-entered
	<-entered

	shutdownDone := make(chan error, 1)
	go func() { shutdownDone <- ts.Shutdown(context.Background()) }()
	select {
	case err := <-ts.serveErr:
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
		ts.serveErr <- nil // for the cleanup
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return")
	}
	idle.expectClosed()
	negotiating.expectClosed()
	select {
	case err := <-shutdownDone:
		t.Fatalf("Shutdown returned %v with requests in flight", err)
	case <-time.After(100 * time.Millisecond):
	}
	close(release)
	got := map[uint64]bool{}
	for range 2 {
		cookie, errno := c.reply()
		if errno != 0 {
			t.Fatalf("cookie %d errno %d", cookie, errno)
		}
		if cookie == 2 {
			c.read(5)
		}
		got[cookie] = true
	}
	c.expectClosed()
	if err := <-shutdownDone; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if !got[1] || !got[2] {
		t.Fatalf("replies %v", got)
	}
}

func TestShutdownTimeout(t *testing.T) {
	exports, dev := newTestExports()
	ts := startServer(t, exports, Options{})
	c := ts.open(t, "a")
	release := make(chan struct{})
	defer close(release)
	entered := make(chan struct{})
	dev.SetHook(func(op memdev.Op, off, length int64) error {
		close(entered)
		<-release
		return nil
	})
	c.request(cmdFlush, 0, 1, 0, 0, nil)
	<-entered
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := ts.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown: %v", err)
	}
	c.expectClosed()
}

// TestConcurrentClients checks data integrity with several connections issuing random
// overlapping-free I/O at once, against a model.
func TestConcurrentClients(t *testing.T) {
	exports, _ := newTestExports()
	ts := startServer(t, exports, Options{})
	const conns, region = 4, testDevSize / 4
	var wg sync.WaitGroup
	for i := range conns {
		c := ts.open(t, "a")
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(i), 1))
			model := make([]byte, region)
			base := uint64(i * region)
			// Pipeline batches of writes to disjoint blocks, then read everything back.
			for round := range 20 {
				var batch []byte
				n := 0
				for blk := range region / 4096 {
					if rng.IntN(3) != 0 {
						continue
					}
					ln := 1 + rng.IntN(4096)
					data := pattern(ln, byte(round*31+blk))
					copy(model[blk*4096:], data)
					batch = append(batch, reqBytes(cmdWrite, 0, uint64(blk), base+uint64(blk*4096), uint32(ln), data)...)
					n++
				}
				go c.nc.Write(batch)
				for range n {
					if _, errno := c.reply(); errno != 0 {
						t.Errorf("write error %d", errno)
						return
					}
				}
			}
			if got := c.mustDo(cmdRead, 0, base, region, nil); !bytes.Equal(got, model) {
				t.Errorf("connection %d: data differs from model", i)
			}
		}()
	}
	wg.Wait()
}

func TestInFlightBytesBudget(t *testing.T) {
	exports, dev := newTestExports()
	ts := startServer(t, exports, Options{MaxInFlightBytes: 16 << 10})
	c := ts.open(t, "a")
	var held, peak atomic.Int64
	dev.SetHook(func(op memdev.Op, off, length int64) error {
		n := held.Add(length)
		for p := peak.Load(); length == 8192 && n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		time.Sleep(time.Millisecond)
		held.Add(-length)
		return nil
	})
	var b []byte
	const n = 40
	for i := range n {
		typ := uint16(cmdRead)
		var payload []byte
		if i%2 == 1 {
			typ, payload = cmdWrite, pattern(8192, byte(i))
		}
		b = append(b, reqBytes(typ, 0, uint64(i), uint64(i)*8192, 8192, payload)...)
	}
	b = append(b, reqBytes(cmdRead, 0, n, 0, 64<<10, nil)...) // larger than the budget: alone
	go c.nc.Write(b)
	for range n + 1 {
		cookie, errno := c.reply()
		if errno != 0 {
			t.Fatalf("cookie %d: error %d", cookie, errno)
		}
		if cookie%2 == 0 {
			if cookie == n {
				c.read(64 << 10)
			} else {
				c.read(8192)
			}
		}
	}
	if p := peak.Load(); p > 16<<10 {
		t.Errorf("%d payload bytes in the device at once, budget 16 KiB", p)
	}
}

// On a Unix socket the server's send buffer is all that lies between it and the client, so a
// READ reply must fit in it whole: queued by one write, not in bursts that each wait for the
// client to drain the last.
func TestUnixReplyQueuedWhole(t *testing.T) {
	const size = 1 << 20
	exports := StaticExports{{Name: "big", Device: memdev.New(4 * size)}}
	ts := startUnixServer(t, exports, Options{})
	c := ts.open(t, "big")
	data := pattern(size, 3)
	c.mustDo(cmdWrite, 0, size, size, data)

	c.request(cmdRead, 0, 1, size, size, nil)
	rc, err := c.nc.(*net.UnixConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	// Without reading anything, wait for the whole reply to be queued at the client.
	want := replyHdrSize + size
	queued := 0
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		rc.Control(func(fd uintptr) { queued, err = unix.IoctlGetInt(int(fd), unix.SIOCINQ) })
		if err != nil {
			t.Fatal(err)
		}
		if queued >= want {
			break
		}
	}
	if queued < want {
		t.Fatalf("%d bytes of a %d-byte reply queued at the client; the rest waits for it to read", queued, want)
	}
	if cookie, errno := c.reply(); cookie != 1 || errno != 0 {
		t.Fatalf("reply cookie %d errno %d", cookie, errno)
	}
	if got := c.read(size); !bytes.Equal(got, data) {
		t.Fatal("read returned other data than written")
	}
}

// A large WRITE runs on the reader, which must still never wait for the client: a client may
// read replies only once it has sent all its requests (up to MaxInFlight). With a send buffer
// that a few replies fill, the client sends large WRITEs, reading nothing until the last is
// sent: every WRITE must reach the device meanwhile, and then every reply must arrive.
func TestLargeWritesNeverWaitForClient(t *testing.T) {
	const writes, wlen = 100, inlineWriteMin
	dev := memdev.New(32 << 20)
	var written atomic.Int64
	dev.SetHook(func(op memdev.Op, off, length int64) error {
		if op == memdev.OpWrite {
			written.Add(1)
		}
		return nil
	})
	ts := startUnixServer(t, StaticExports{{Name: "v", Device: dev}}, Options{unixSendBuffer: 4096})
	c := ts.open(t, "v")
	sent := make(chan error, 1)
	go func() {
		var b []byte
		for i := range writes {
			b = append(b, reqBytes(cmdWrite, 0, uint64(i), uint64(i)*wlen, wlen, pattern(wlen, byte(i)))...)
		}
		_, err := c.nc.Write(b)
		sent <- err
	}()
	deadline := time.Now().Add(10 * time.Second)
	for written.Load() < writes && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if n := written.Load(); n < writes {
		t.Fatalf("the server stopped reading after %d of %d WRITEs while the client read no reply", n, writes)
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	seen := map[uint64]bool{}
	for range writes {
		cookie, errno := c.reply()
		if errno != 0 || cookie >= writes || seen[cookie] {
			t.Fatalf("reply cookie %d errno %d (seen before: %v)", cookie, errno, seen[cookie])
		}
		seen[cookie] = true
	}
	for i := range writes {
		if got := c.mustDo(cmdRead, 0, uint64(i)*wlen, wlen, nil); !bytes.Equal(got, pattern(wlen, byte(i))) {
			t.Fatalf("WRITE %d: other data read back", i)
		}
	}
}

// Large WRITEs (replied to by the reader) mixed with READs and small WRITEs (replied to by
// their own goroutines), the client reading replies as they come: no reply is lost, in
// particular none queued while the reader was writing its own.
func TestLargeWritesMixedReplies(t *testing.T) {
	const rounds, wlen, rlen = 300, inlineWriteMin, 4 << 10
	dev := memdev.New(32 << 20)
	ts := startUnixServer(t, StaticExports{{Name: "v", Device: dev}}, Options{})
	c := ts.open(t, "v")
	readArea := pattern(1<<20, 5)
	c.mustDo(cmdWrite, 0, 16<<20, uint32(len(readArea)), readArea)

	got := make(chan error, 1)
	go func() {
		seen := map[uint64]bool{}
		for len(seen) < 3*rounds {
			h := make([]byte, replyHdrSize)
			if _, err := io.ReadFull(c.br, h); err != nil {
				got <- fmt.Errorf("after %d replies: %w", len(seen), err)
				return
			}
			cookie, errno := binary.BigEndian.Uint64(h[8:]), binary.BigEndian.Uint32(h[4:])
			if errno != 0 || seen[cookie] {
				got <- fmt.Errorf("reply cookie %d errno %d (seen before: %v)", cookie, errno, seen[cookie])
				return
			}
			seen[cookie] = true
			if cookie%3 == 1 {
				data := make([]byte, rlen)
				if _, err := io.ReadFull(c.br, data); err != nil {
					got <- err
					return
				}
				j := int(cookie/3) % (len(readArea) / rlen)
				if !bytes.Equal(data, readArea[j*rlen:(j+1)*rlen]) {
					got <- fmt.Errorf("READ %d returned other data", cookie)
					return
				}
			}
		}
		got <- nil
	}()
	for i := range uint64(rounds) {
		j := i % uint64(len(readArea)/rlen)
		c.write(reqBytes(cmdWrite, 0, 3*i, (i%32)*wlen, wlen, pattern(wlen, byte(i))),
			reqBytes(cmdRead, 0, 3*i+1, 16<<20+j*rlen, rlen, nil),
			reqBytes(cmdWrite, 0, 3*i+2, 24<<20+(i%64)*512, 512, pattern(512, byte(i))))
	}
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("replies missing after 20 s")
	}
}

// A reply queued by another goroutine while the reader writes its own must still go out when
// nothing follows it. Each round is a READ whose execution is made to end at a varying moment
// around the reply of a large WRITE, and nothing else: both replies must arrive.
func TestReplyQueuedDuringReaderWrite(t *testing.T) {
	const wlen, rlen = inlineWriteMin, 4 << 10
	dev := memdev.New(8 << 20)
	var writeDone atomic.Int64 // time of the WRITE's arrival at the device, in ns since start
	var delay atomic.Int64
	start := time.Now()
	dev.SetHook(func(op memdev.Op, off, length int64) error {
		switch {
		case op == memdev.OpWrite && length == wlen:
			writeDone.Store(int64(time.Since(start)))
		case op == memdev.OpRead && length == rlen:
			for writeDone.Load() == 0 {
				runtime.Gosched()
			}
			for int64(time.Since(start))-writeDone.Load() < delay.Load() {
			}
		}
		return nil
	})
	ts := startUnixServer(t, StaticExports{{Name: "v", Device: dev}}, Options{})
	c := ts.open(t, "v")
	payload := pattern(wlen, 1)
	for i := range 300 {
		writeDone.Store(0)
		delay.Store(int64(i%60) * 1000) // 0–59 µs after the WRITE reached the device
		c.write(reqBytes(cmdRead, 0, 1, 4<<20, rlen, nil), reqBytes(cmdWrite, 0, 2, 0, wlen, payload))
		c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
		for range 2 {
			cookie, errno := c.reply()
			if errno != 0 {
				t.Fatalf("round %d: cookie %d errno %d", i, cookie, errno)
			}
			if cookie == 1 {
				c.read(rlen)
			}
		}
	}
}
