package nbd

import (
	"bytes"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"fcnbd/internal/memdev"
)

// fuzzServer returns a server over small memdev exports whose device fails a few ranges, so
// that error paths are reached too.
func fuzzServer() *Server {
	a := memdev.New(256 << 10)
	a.SetHook(func(op memdev.Op, off, length int64) error {
		if off >= 128<<10 && off < 132<<10 {
			return syscall.EIO
		}
		if op == memdev.OpFlush && length == 0 && off == 0 && a.Flushes()%7 == 3 {
			return syscall.ENOSPC
		}
		return nil
	})
	return NewServer(StaticExports{
		{Name: "a", Description: "fuzz", Device: a},
		{Name: "", Device: memdev.New(4096)},
		{Name: "d", Device: &dirtyDev{Device: memdev.New(256 << 10), bitmaps: map[string][]int{"m": {1, 3}, "broken": nil}}},
	}, Options{MaxInFlight: 8, HandshakeTimeout: 5 * time.Second})
}

// runSession feeds input to one server connection as a client would, draining the server's
// output, and fails if the connection does not end once the input is exhausted.
func runSession(t *testing.T, s *Server, input []byte) {
	cli, srv := net.Pipe()
	c := newConn(s, srv)
	served := make(chan struct{})
	go func() {
		defer close(served)
		c.serve()
	}()
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		io.Copy(io.Discard, cli)
	}()
	cli.Write(input) // fails early if the server hangs up: fine
	cli.Close()
	select {
	case <-served:
	case <-time.After(10 * time.Second):
		t.Fatal("connection did not end after the input was exhausted")
	}
	<-drained
}

// handshake is a client's side of a valid negotiation ending in GO to "a".
func handshake() []byte {
	b := be32(flagFixedNewstyle | flagNoZeroes)
	return append(b, optBytes(optGo, infoData("a", infoBlockSize))...)
}

func FuzzNegotiation(f *testing.F) {
	flags := be32(flagFixedNewstyle | flagNoZeroes)
	seq := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	f.Add(handshake())
	f.Add(seq(be32(flagFixedNewstyle), optBytes(optExportName, []byte("a")), reqBytes(cmdFlush, 0, 1, 0, 0, nil)))
	f.Add(seq(flags, optBytes(optExportName, nil)))
	f.Add(seq(flags, optBytes(optList, nil), optBytes(optAbort, nil)))
	f.Add(seq(flags, optBytes(optInfo, infoData("a", infoName, infoDescription, infoBlockSize)),
		optBytes(optInfo, infoData("nope")), optBytes(optGo, infoData(""))))
	f.Add(seq(flags, optBytes(8, nil), optBytes(10, []byte("base:allocation")), optBytes(optGo, infoData("a"))))
	f.Add(seq(flags, optBytes(optListMeta, metaData("a")), optBytes(optStructured, nil),
		optBytes(optListMeta, metaData("a", "base:")), optBytes(optSetMeta, metaData("b", ctxAllocationName)),
		optBytes(optSetMeta, metaData("a", ctxAllocationName)), optBytes(optGo, infoData("a")),
		reqBytes(cmdBlockStatus, cmdFlagReqOne, 1, 3, 5000, nil), reqBytes(cmdRead, 0, 2, 100, 300<<10, nil)))
	f.Add(seq(flags, optBytes(optStructured, nil), optBytes(optListMeta, metaData("d", "qemu:")),
		optBytes(optSetMeta, metaData("d", ctxDirtyPrefix+"m", ctxAllocationName, ctxDirtyPrefix+"broken")),
		optBytes(optSetMeta, metaData("d", ctxDirtyPrefix+"m", ctxAllocationName)), optBytes(optGo, infoData("d")),
		reqBytes(cmdBlockStatus, 0, 1, 3, 200<<10, nil), reqBytes(cmdBlockStatus, cmdFlagReqOne, 2, 64<<10, 1, nil)))
	f.Add(seq(flags, optBytes(optList, []byte("x")), optBytes(optInfo, []byte{0, 0, 0, 9, 'a', 0, 0})))
	f.Add(seq(flags, optBytes(0x77, bytes.Repeat([]byte{'I'}, 9000)), optBytes(optAbort, nil)))
	f.Add(seq(be32(0)))
	f.Fuzz(func(t *testing.T, input []byte) {
		runSession(t, fuzzServer(), input)
	})
}

func FuzzTransmission(f *testing.F) {
	seq := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	f.Add(seq(reqBytes(cmdWrite, cmdFlagFUA, 1, 0, 4, []byte("abcd")), reqBytes(cmdRead, 0, 2, 0, 4, nil),
		reqBytes(cmdFlush, 0, 3, 0, 0, nil), reqBytes(cmdDisc, 0, 4, 0, 0, nil)))
	f.Add(seq(reqBytes(cmdTrim, 0, 1, 4096, 8192, nil), reqBytes(cmdWriteZeroes, cmdFlagNoHole, 2, 0, 100, nil),
		reqBytes(cmdWriteZeroes, 0, 3, 0, 0xffffffff, nil)))
	f.Add(seq(reqBytes(cmdRead, 0, 1, 128<<10, 4096, nil), reqBytes(cmdWrite, 0, 2, 130<<10, 8, []byte("failfail"))))
	f.Add(seq(reqBytes(cmdWrite, cmdFlagNoHole, 1, 0, 8, []byte("badflags")), reqBytes(cmdWrite, 0, 2, 1<<40, 3, []byte("end"))))
	f.Add(seq(reqBytes(cmdRead, 0, 1, 0, 64<<20, nil), reqBytes(5, 0, 2, 0, 1, nil), reqBytes(0xffff, 0xffff, 3, 0, 0, nil)))
	f.Add(seq(reqBytes(cmdWrite, 0, 1, 0, 1000, []byte("short"))))
	f.Add(seq(reqBytes(cmdFlush, 0, 1, 0, 0, nil), []byte{0x25, 0x60, 0x95, 0x14}))
	hs := handshake()
	f.Fuzz(func(t *testing.T, requests []byte) {
		runSession(t, fuzzServer(), append(hs[:len(hs):len(hs)], requests...))
	})
}

// structuredHandshake negotiates structured replies and base:allocation, then GO to "a".
func structuredHandshake() []byte {
	b := be32(flagFixedNewstyle | flagNoZeroes)
	b = append(b, optBytes(optStructured, nil)...)
	b = append(b, optBytes(optSetMeta, metaData("a", ctxAllocationName))...)
	return append(b, optBytes(optGo, infoData("a"))...)
}

func FuzzStructuredTransmission(f *testing.F) {
	seq := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	f.Add(seq(reqBytes(cmdWrite, 0, 1, 8192, 4, []byte("abcd")), reqBytes(cmdRead, 0, 2, 0, 256<<10, nil),
		reqBytes(cmdBlockStatus, 0, 3, 1, 0xffffffff, nil), reqBytes(cmdDisc, 0, 4, 0, 0, nil)))
	f.Add(seq(reqBytes(cmdRead, 0, 1, 120<<10, 64<<10, nil), reqBytes(cmdRead, 1<<2, 2, 0, 1, nil),
		reqBytes(cmdRead, 0, 3, 0, 0, nil), reqBytes(cmdBlockStatus, cmdFlagReqOne, 4, 255<<10, 1<<10, nil)))
	f.Add(seq(reqBytes(cmdBlockStatus, 0, 1, 0, 0, nil), reqBytes(cmdBlockStatus, 0xffff, 2, 1<<62, 1, nil)))
	hs := structuredHandshake()
	f.Fuzz(func(t *testing.T, requests []byte) {
		runSession(t, fuzzServer(), append(hs[:len(hs):len(hs)], requests...))
	})
}
