//go:build hostilebug

package nbd

// Tests that fail on the current server: each documents a bug found by the hostile tests. Run
// them with `go test -tags hostilebug -run HostileBug ./nbd`; move them into hostile_test.go
// once fixed.

import (
	"net"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"fcnbd/internal/memdev"
)

// TestHostileBugWorkAfterHangUp: a client sends READ headers and hangs up without reading a
// reply. The server notices (its reply write fails and it closes the socket) but its reader
// goes on dispatching every request already in its 64 KiB bufio.Reader — up to ~2340 headers —
// and each one runs on the device. With 32 MiB READs that is ~73 GiB of backing-store reads
// for a connection that is already dead, from 64 KiB sent. Expected: once the connection has
// failed, requests not yet started are dropped (at most the MaxInFlight already started run).
func TestHostileBugWorkAfterHangUp(t *testing.T) {
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

// TestHostileBugRefusalsUnreported: Server.refuse logs at most one refusal a second and counts
// the others in also_refused, but that count is only written with the next logged refusal. A
// burst of refusals followed by quiet leaves all but the first one out of the log for good:
// 3000 connections against MaxConnections 1000 refuse 2001 and the log reports 1. Expected: the
// silent count is flushed (e.g. by a timer, or when the burst ends), so the log adds up.
func TestHostileBugRefusalsUnreported(t *testing.T) {
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
