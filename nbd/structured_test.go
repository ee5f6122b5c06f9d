package nbd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"syscall"
	"testing"

	"fcnbd/internal/blockdev"
	"fcnbd/internal/memdev"
)

// metaData builds NBD_OPT_LIST/SET_META_CONTEXT data.
func metaData(name string, queries ...string) []byte {
	b := be32(uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

type metaCtx struct {
	id   uint32
	name string
}

// metaReplies collects NBD_REP_META_CONTEXT replies up to the final reply.
func (c *client) metaReplies(opt uint32) (ctxs []metaCtx, final optReply) {
	c.t.Helper()
	for {
		r := c.optReply()
		if r.opt != opt {
			c.t.Fatalf("reply for option %d, want %d", r.opt, opt)
		}
		if r.typ != repMetaContext {
			return ctxs, r
		}
		ctxs = append(ctxs, metaCtx{binary.BigEndian.Uint32(r.data), string(r.data[4:])})
	}
}

func (c *client) structuredReply() {
	c.t.Helper()
	c.option(optStructured, nil)
	if r := c.optReply(); r.opt != optStructured || r.typ != repAck {
		c.t.Fatalf("STRUCTURED_REPLY: %+v", r)
	}
}

// openStructured negotiates structured replies, selects queries (if any) for name, and enters
// name with GO.
func (ts *testServer) openStructured(t *testing.T, name string, queries ...string) *client {
	t.Helper()
	c := ts.dial(t)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.structuredReply()
	if len(queries) > 0 {
		c.option(optSetMeta, metaData(name, queries...))
		if _, final := c.metaReplies(optSetMeta); final.typ != repAck {
			t.Fatalf("SET_META_CONTEXT: %#x", final.typ)
		}
	}
	c.option(optGo, infoData(name))
	if _, final := c.infoReplies(optGo); final.typ != repAck {
		t.Fatalf("GO %q: reply %#x", name, final.typ)
	}
	return c
}

type chunk struct {
	flags, typ uint16
	payload    []byte
}

// chunks reads the structured reply to cookie, up to its DONE chunk.
func (c *client) chunks(cookie uint64) []chunk {
	c.t.Helper()
	var out []chunk
	for {
		h := c.read(chunkHdrSize)
		if m := binary.BigEndian.Uint32(h); m != chunkMagic {
			c.t.Fatalf("chunk magic %#x", m)
		}
		if got := binary.BigEndian.Uint64(h[8:]); got != cookie {
			c.t.Fatalf("chunk cookie %#x, want %#x", got, cookie)
		}
		ch := chunk{flags: binary.BigEndian.Uint16(h[4:]), typ: binary.BigEndian.Uint16(h[6:])}
		ch.payload = c.read(int(binary.BigEndian.Uint32(h[16:])))
		out = append(out, ch)
		if ch.flags&chunkFlagDone != 0 {
			return out
		}
	}
}

// replyError returns the error of a reply made of one error chunk, or 0 if its chunks carry no
// error; errOff is the offset of an ERROR_OFFSET chunk.
func replyError(t *testing.T, chs []chunk) (errno uint32, errOff uint64, withOff bool) {
	t.Helper()
	for _, ch := range chs {
		if ch.typ&(1<<15) == 0 {
			continue
		}
		if len(chs) != 1 {
			t.Fatalf("error chunk among %d chunks", len(chs))
		}
		p := ch.payload
		errno = binary.BigEndian.Uint32(p)
		n := int(binary.BigEndian.Uint16(p[4:]))
		switch ch.typ {
		case chunkError:
			if len(p) != 6+n {
				t.Fatalf("ERROR chunk of %d bytes, message of %d", len(p), n)
			}
		case chunkErrorOffset:
			if len(p) != 6+n+8 {
				t.Fatalf("ERROR_OFFSET chunk of %d bytes, message of %d", len(p), n)
			}
			return errno, binary.BigEndian.Uint64(p[6+n:]), true
		default:
			t.Fatalf("error chunk type %#x", ch.typ)
		}
		return errno, 0, false
	}
	return 0, 0, false
}

// structuredRead reads [off, off+length) and reassembles the chunks, checking that they cover
// the range exactly once; holes are the ranges sent as OFFSET_HOLE.
func (c *client) structuredRead(off uint64, length uint32) (data []byte, holes [][2]uint64, nchunks int) {
	c.t.Helper()
	const cookie = 0xbeef
	c.request(cmdRead, 0, cookie, off, length, nil)
	chs := c.chunks(cookie)
	if errno, _, _ := replyError(c.t.(*testing.T), chs); errno != 0 {
		c.t.Fatalf("READ %d+%d: error %d", off, length, errno)
	}
	data = make([]byte, length)
	covered := make([]bool, length)
	mark := func(at uint64, n int) {
		if at < off || at+uint64(n) > off+uint64(length) || n == 0 {
			c.t.Fatalf("chunk [%d,+%d) outside the read [%d,+%d)", at, n, off, length)
		}
		for i := range n {
			if covered[at-off+uint64(i)] {
				c.t.Fatalf("byte %d sent twice", at+uint64(i))
			}
			covered[at-off+uint64(i)] = true
		}
	}
	for _, ch := range chs {
		if ch.typ == chunkNone {
			if len(ch.payload) != 0 || ch.flags&chunkFlagDone == 0 {
				c.t.Fatalf("NONE chunk with %d bytes, flags %d", len(ch.payload), ch.flags)
			}
			continue
		}
		at := binary.BigEndian.Uint64(ch.payload)
		switch ch.typ {
		case chunkOffsetData:
			mark(at, len(ch.payload)-8)
			copy(data[at-off:], ch.payload[8:])
		case chunkOffsetHole:
			n := binary.BigEndian.Uint32(ch.payload[8:])
			if len(ch.payload) != 12 {
				c.t.Fatalf("OFFSET_HOLE payload of %d bytes", len(ch.payload))
			}
			mark(at, int(n))
			holes = append(holes, [2]uint64{at, at + uint64(n)})
		default:
			c.t.Fatalf("READ chunk type %d", ch.typ)
		}
	}
	if i := bytes.IndexByte(boolBytes(covered), 0); i >= 0 {
		c.t.Fatalf("byte %d of the read not sent", off+uint64(i))
	}
	return data, holes, len(chs)
}

func boolBytes(b []bool) []byte {
	out := make([]byte, len(b))
	for i, v := range b {
		if v {
			out[i] = 1
		}
	}
	return out
}

type descriptor struct{ length, state uint32 }

// blockStatus sends BLOCK_STATUS and returns its descriptors, or the error of its reply.
func (c *client) blockStatus(flags uint16, off uint64, length uint32) ([]descriptor, uint32) {
	c.t.Helper()
	const cookie = 0xb5
	c.request(cmdBlockStatus, flags, cookie, off, length, nil)
	chs := c.chunks(cookie)
	if errno, _, withOff := replyError(c.t.(*testing.T), chs); errno != 0 {
		if withOff {
			c.t.Fatalf("BLOCK_STATUS error with an offset")
		}
		return nil, errno
	}
	if len(chs) != 1 || chs[0].typ != chunkBlockStatus {
		c.t.Fatalf("BLOCK_STATUS reply: %d chunks, first of type %d", len(chs), chs[0].typ)
	}
	p := chs[0].payload
	if len(p) < 12 || (len(p)-4)%8 != 0 {
		c.t.Fatalf("BLOCK_STATUS payload of %d bytes", len(p))
	}
	if id := binary.BigEndian.Uint32(p); id != ctxAllocationID {
		c.t.Fatalf("context id %d", id)
	}
	var ds []descriptor
	for p = p[4:]; len(p) > 0; p = p[8:] {
		ds = append(ds, descriptor{binary.BigEndian.Uint32(p), binary.BigEndian.Uint32(p[4:])})
	}
	return ds, 0
}

func TestMetaContextNegotiation(t *testing.T) {
	exports, _ := newTestExports()
	ts := startServer(t, exports, Options{})
	c := ts.dial(t)
	c.greet(flagFixedNewstyle | flagNoZeroes)

	for _, opt := range []uint32{optListMeta, optSetMeta} {
		c.option(opt, metaData("a", ctxAllocationName))
		if ctxs, final := c.metaReplies(opt); len(ctxs) != 0 || final.typ != repErrInvalid {
			t.Fatalf("option %d before STRUCTURED_REPLY: %v, %#x; want ERR_INVALID", opt, ctxs, final.typ)
		}
	}
	c.option(optStructured, []byte("junk"))
	if r := c.optReply(); r.typ != repErrInvalid {
		t.Fatalf("STRUCTURED_REPLY with data: %#x, want ERR_INVALID", r.typ)
	}
	c.structuredReply()
	c.structuredReply() // again: still fine

	alloc := []metaCtx{{0, ctxAllocationName}}
	for _, tc := range []struct {
		name  string
		opt   uint32
		data  []byte
		want  []metaCtx
		final uint32
	}{
		{"list all", optListMeta, metaData("a"), alloc, repAck},
		{"list namespace", optListMeta, metaData("a", "base:"), alloc, repAck},
		{"list by name", optListMeta, metaData("a", "qemu:dirty-bitmap:x", ctxAllocationName), alloc, repAck},
		{"list unknown", optListMeta, metaData("a", "qemu:dirty-bitmap:x", "nope", ""), nil, repAck},
		{"list unknown export", optListMeta, metaData("zz"), nil, repErrUnknown},
		{"list truncated query", optListMeta, metaData("a", "base:allocation")[:20], nil, repErrInvalid},
		{"list extra data", optListMeta, append(metaData("a"), 0), nil, repErrInvalid},
		{"list short", optListMeta, []byte{0, 0, 0}, nil, repErrInvalid},
		{"list query count too high", optListMeta, metaData("a", "base:allocation")[:9], nil, repErrInvalid},
		{"set none", optSetMeta, metaData("a"), nil, repAck},
		{"set namespace only", optSetMeta, metaData("a", "base:"), nil, repAck},
		{"set unknown", optSetMeta, metaData("b", "x-y:z"), nil, repAck},
		{"set unknown export", optSetMeta, metaData("zz", ctxAllocationName), nil, repErrUnknown},
		{"set", optSetMeta, metaData("a", "x-y:z", ctxAllocationName, ctxAllocationName), []metaCtx{{ctxAllocationID, ctxAllocationName}}, repAck},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c.option(tc.opt, tc.data)
			ctxs, final := c.metaReplies(tc.opt)
			if fmt.Sprint(ctxs) != fmt.Sprint(tc.want) || final.typ != tc.final {
				t.Fatalf("contexts %v, final %#x; want %v, %#x", ctxs, final.typ, tc.want, tc.final)
			}
		})
	}
	// The last SET selected base:allocation for "a": GO "a" gets it.
	c.option(optGo, infoData("a"))
	if _, final := c.infoReplies(optGo); final.typ != repAck {
		t.Fatalf("GO: %#x", final.typ)
	}
	if ds, errno := c.blockStatus(0, 0, 4096); errno != 0 || len(ds) != 1 {
		t.Fatalf("BLOCK_STATUS after SET: %v, error %d", ds, errno)
	}
}

// TestMetaContextNotCarriedOver: contexts set for one export are not those of another, and a
// later SET that selects nothing replaces an earlier one.
func TestMetaContextNotCarriedOver(t *testing.T) {
	exports, _ := newTestExports()
	ts := startServer(t, exports, Options{})
	for _, tc := range []struct {
		name string
		sets [][]byte
	}{
		{"other export", [][]byte{metaData("b", ctxAllocationName)}},
		{"replaced", [][]byte{metaData("a", ctxAllocationName), metaData("a", "x-y:z")}},
		{"replaced by a failed SET", [][]byte{metaData("a", ctxAllocationName), metaData("zz", ctxAllocationName)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := ts.dial(t)
			c.greet(flagFixedNewstyle | flagNoZeroes)
			c.structuredReply()
			for _, d := range tc.sets {
				c.option(optSetMeta, d)
				c.metaReplies(optSetMeta)
			}
			c.option(optGo, infoData("a"))
			if _, final := c.infoReplies(optGo); final.typ != repAck {
				t.Fatalf("GO: %#x", final.typ)
			}
			if _, errno := c.blockStatus(0, 0, 4096); errno != errInval {
				t.Fatalf("BLOCK_STATUS without a context: error %d, want EINVAL", errno)
			}
			c.mustDo(cmdFlush, 0, 0, 0, nil) // the connection goes on
		})
	}
}

// sparseExport is export "a" (testDevSize) with data in pages 1, 2, 5 and 100..163, and the
// bytes it reads as.
func sparseExport(t *testing.T) (StaticExports, *memdev.Device, []byte) {
	exports, dev := newTestExports()
	want := make([]byte, testDevSize)
	for _, w := range [][2]int{{4096, 8192}, {5 * 4096, 4096}, {100 * 4096, 64 * 4096}} {
		p := pattern(w[1], byte(w[0]))
		if err := dev.WriteAt(p, int64(w[0]), false); err != nil {
			t.Fatal(err)
		}
		copy(want[w[0]:], p)
	}
	return exports, dev, want
}

func TestStructuredRead(t *testing.T) {
	exports, dev, want := sparseExport(t)
	ts := startServer(t, exports, Options{})
	c := ts.openStructured(t, "a")

	for _, tc := range []struct {
		name        string
		off         uint64
		length      uint32
		wantChunks  int // 0: don't check
		wantNoHoles bool
	}{
		{"small read over a hole is data", 0, 16384, 1, true},
		{"small odd read", 4095, 3, 1, true},
		{"whole device", 0, testDevSize, 7, false},
		{"large odd read", 4097, holeProbeMin + 12345, 0, false},
		{"large read all hole", 180 * 4096, holeProbeMin, 1, false},
		{"large read all data", 100 * 4096, holeProbeMin, 1, true},
		{"empty", 10, 0, 1, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data, holes, n := c.structuredRead(tc.off, tc.length)
			if !bytes.Equal(data, want[tc.off:tc.off+uint64(tc.length)]) {
				t.Fatalf("data differs")
			}
			for _, h := range holes {
				if !bytes.Equal(want[h[0]:h[1]], make([]byte, h[1]-h[0])) {
					t.Fatalf("hole [%d,%d) has data", h[0], h[1])
				}
			}
			if tc.wantNoHoles && len(holes) > 0 {
				t.Errorf("holes %v sent for a read that should be one data chunk", holes)
			}
			if tc.wantChunks > 0 && n != tc.wantChunks {
				t.Errorf("%d chunks, want %d", n, tc.wantChunks)
			}
		})
	}

	t.Run("errors", func(t *testing.T) {
		for _, tc := range []struct {
			name        string
			flags       uint16
			off         uint64
			length      uint32
			hook        bool
			want        uint32
			wantOff     bool
			wantErrAtOf uint64
		}{
			{"DF not advertised", 1 << 2, 0, 4096, false, errInval, false, 0},
			{"past the end", 0, testDevSize - 10, 11, false, errInval, false, 0},
			{"too long", 0, 0, MaxPayload + 1, false, errInval, false, 0},
			{"device error", 0, 4096, 4096, true, errIO, true, 4096},
			{"device error in a large read", 0, 4096 + 100, holeProbeMin, true, errIO, true, 4096 + 100},
		} {
			t.Run(tc.name, func(t *testing.T) {
				if tc.hook {
					dev.SetHook(func(op memdev.Op, off, length int64) error {
						if op == memdev.OpRead {
							return fmt.Errorf("injected: %w", syscall.EIO)
						}
						return nil
					})
					defer dev.SetHook(nil)
				}
				c.request(cmdRead, tc.flags, 7, tc.off, tc.length, nil)
				errno, at, withOff := replyError(t, c.chunks(7))
				if errno != tc.want || withOff != tc.wantOff || at != tc.wantErrAtOf {
					t.Fatalf("error %d at %d (offset %v), want %d at %d (offset %v)", errno, at, withOff, tc.want, tc.wantErrAtOf, tc.wantOff)
				}
			})
		}
		// The connection goes on after each.
		if data, _, _ := c.structuredRead(4096, 8192); !bytes.Equal(data, want[4096:3*4096]) {
			t.Fatalf("read after the errors differs")
		}
	})

	t.Run("other commands keep simple replies", func(t *testing.T) {
		c.mustDo(cmdWrite, 0, 200*4096, 4096, pattern(4096, 9))
		c.mustDo(cmdFlush, 0, 0, 0, nil)
		if errno, _ := c.do(cmdTrim, 0, testDevSize, 1, nil); errno != errInval {
			t.Fatalf("TRIM past the end: %d", errno)
		}
	})
}

// TestBlockStatus checks BLOCK_STATUS replies against the device's pages: descriptors in
// order from the offset, never empty, never past the request, a hole only where nothing is
// allocated.
func TestBlockStatus(t *testing.T) {
	exports, dev, _ := sparseExport(t)
	ts := startServer(t, exports, Options{})
	c := ts.openStructured(t, "a", ctxAllocationName)
	allocated := func(off int64) bool {
		exts, err := dev.Extents(off, 1)
		if err != nil {
			t.Fatal(err)
		}
		return !exts[0].Hole
	}
	for _, tc := range []struct {
		name   string
		flags  uint16
		off    uint64
		length uint32
		want   []descriptor // nil: check against the device only
	}{
		{"whole", 0, 0, testDevSize, []descriptor{{4096, 3}, {8192, 0}, {8192, 3}, {4096, 0}, {94 * 4096, 3}, {64 * 4096, 0}, {testDevSize - 164*4096, 3}}},
		{"odd in a hole", 0, 4095, 1, []descriptor{{1, 3}}},
		{"odd across", 0, 4000, 9000, []descriptor{{96, 3}, {8192, 0}, {712, 3}}},
		{"req one", cmdFlagReqOne, 4000, 9000, []descriptor{{96, 3}}},
		{"req one in data", cmdFlagReqOne, 4097, 100, []descriptor{{100, 0}}},
		{"to the end", 0, testDevSize - 7, 7, []descriptor{{7, 3}}},
		{"largest odd", 0, 1, testDevSize - 1, nil},
		{"with FUA", cmdFlagFUA, 5 * 4096, 1, []descriptor{{1, 0}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ds, errno := c.blockStatus(tc.flags, tc.off, tc.length)
			if errno != 0 {
				t.Fatalf("error %d", errno)
			}
			if tc.want != nil && fmt.Sprint(ds) != fmt.Sprint(tc.want) {
				t.Fatalf("descriptors %v, want %v", ds, tc.want)
			}
			pos := tc.off
			for _, d := range ds {
				if d.length == 0 || pos+uint64(d.length) > tc.off+uint64(tc.length) {
					t.Fatalf("descriptor %v at %d outside the request", d, pos)
				}
				if d.state&^3 != 0 || d.state == stateZero {
					t.Fatalf("state %d", d.state)
				}
				for p := pos; p < pos+uint64(d.length); p += 512 {
					if d.state&stateHole != 0 && allocated(int64(p)) {
						t.Fatalf("hole reported at %d, which is allocated", p)
					}
				}
				pos += uint64(d.length)
			}
		})
	}

	t.Run("refused", func(t *testing.T) {
		for _, tc := range []struct {
			name   string
			flags  uint16
			off    uint64
			length uint32
		}{
			{"empty", 0, 0, 0},
			{"past the end", 0, testDevSize - 1, 2},
			{"huge length", 0, 0, 0xffffffff},
			{"offset past the end", 0, testDevSize + 1, 1},
			{"huge offset", 0, 1 << 63, 1},
			{"unknown flag", 1 << 4, 0, 1},
			{"NO_HOLE", cmdFlagNoHole, 0, 1},
		} {
			t.Run(tc.name, func(t *testing.T) {
				if _, errno := c.blockStatus(tc.flags, tc.off, tc.length); errno != errInval {
					t.Fatalf("error %d, want EINVAL", errno)
				}
			})
		}
		c.mustDo(cmdFlush, 0, 0, 0, nil)
	})

	t.Run("device error", func(t *testing.T) {
		failing := StaticExports{{Name: "f", Device: failingExtents{dev}}}
		ts := startServer(t, failing, Options{})
		c := ts.openStructured(t, "f", ctxAllocationName)
		if _, errno := c.blockStatus(0, 0, 4096); errno != errIO {
			t.Fatalf("error %d, want EIO", errno)
		}
		c.mustDo(cmdFlush, 0, 0, 0, nil)
	})
}

type failingExtents struct{ *memdev.Device }

// lyingExtents describes every range as a hole twice its length.
type lyingExtents struct{ *memdev.Device }

func (lyingExtents) Extents(off, length int64) ([]blockdev.Extent, error) {
	return []blockdev.Extent{{Length: 2 * length, Hole: true}}, nil
}

// TestExtentsOutsideTheContract: a device whose extents do not add up to the range is not
// believed: its ranges are data.
func TestExtentsOutsideTheContract(t *testing.T) {
	_, dev, want := sparseExport(t)
	ts := startServer(t, StaticExports{{Name: "l", Device: lyingExtents{dev}}}, Options{})
	c := ts.openStructured(t, "l", ctxAllocationName)
	if ds, errno := c.blockStatus(0, 4096, 4096); errno != 0 || fmt.Sprint(ds) != "[{4096 0}]" {
		t.Fatalf("block status: %v, error %d; want one data descriptor", ds, errno)
	}
	data, holes, _ := c.structuredRead(0, holeProbeMin)
	if len(holes) != 0 || !bytes.Equal(data, want[:holeProbeMin]) {
		t.Fatalf("read: holes %v, data equal %v", holes, bytes.Equal(data, want[:holeProbeMin]))
	}
}

func (failingExtents) Extents(off, length int64) ([]blockdev.Extent, error) {
	return nil, errors.New("injected")
}

// TestBlockStatusWithoutNegotiation: a client that negotiated nothing gets a simple EINVAL
// for BLOCK_STATUS, as does one with structured replies but no context (as a structured
// error), and both connections go on.
func TestBlockStatusWithoutNegotiation(t *testing.T) {
	exports, _ := newTestExports()
	ts := startServer(t, exports, Options{})
	plain := ts.open(t, "a")
	if errno, _ := plain.do(cmdBlockStatus, 0, 0, 4096, nil); errno != errInval {
		t.Fatalf("simple: error %d, want EINVAL", errno)
	}
	plain.mustDo(cmdRead, 0, 0, 4096, nil) // READ replies stay simple
	sc := ts.openStructured(t, "a")
	if _, errno := sc.blockStatus(0, 0, 4096); errno != errInval {
		t.Fatalf("structured, no context: error %d, want EINVAL", errno)
	}
	sc.mustDo(cmdFlush, 0, 0, 0, nil)
}
