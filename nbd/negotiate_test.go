package nbd

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"

	"fcnbd/internal/memdev"
)

const wantTransmissionFlags = 1 | 4 | 8 | 32 | 64 | 256 // HAS_FLAGS SEND_FLUSH SEND_FUA SEND_TRIM SEND_WRITE_ZEROES CAN_MULTI_CONN

func TestClientFlags(t *testing.T) {
	exports, _ := newTestExports()
	ts := startServer(t, exports, Options{})
	for _, tc := range []struct {
		name  string
		flags uint32
	}{
		{"not fixed newstyle", 0},
		{"no zeroes only", flagNoZeroes},
		{"unknown bit", flagFixedNewstyle | 1<<7},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := ts.dial(t)
			c.greet(tc.flags)
			c.expectClosed()
		})
	}
}

func TestExportName(t *testing.T) {
	exports, dev := newTestExports()
	ts := startServer(t, exports, Options{})
	for _, noZeroes := range []bool{false, true} {
		t.Run(map[bool]string{false: "zeroes", true: "no zeroes"}[noZeroes], func(t *testing.T) {
			c := ts.dial(t)
			flags := uint32(flagFixedNewstyle)
			if noZeroes {
				flags |= flagNoZeroes
			}
			c.greet(flags)
			c.option(optExportName, []byte("a"))
			r := c.read(10)
			if size := binary.BigEndian.Uint64(r); size != uint64(dev.Size()) {
				t.Errorf("size %d, want %d", size, dev.Size())
			}
			if f := binary.BigEndian.Uint16(r[8:]); f != wantTransmissionFlags {
				t.Errorf("transmission flags %#x, want %#x", f, wantTransmissionFlags)
			}
			if !noZeroes {
				if z := c.read(124); !bytes.Equal(z, make([]byte, 124)) {
					t.Errorf("padding not zero: %x", z)
				}
			}
			// The next bytes must be a reply header: proves the padding was exactly right.
			c.mustDo(cmdFlush, 0, 0, 0, nil)
		})
	}
}

func TestExportNameUnknown(t *testing.T) {
	exports, _ := newTestExports()
	ts := startServer(t, exports, Options{})
	for _, name := range []string{"nope", ""} {
		c := ts.dial(t)
		c.greet(flagFixedNewstyle)
		c.option(optExportName, []byte(name))
		c.expectClosed()
	}
}

func TestEmptyNameExport(t *testing.T) {
	dev := memdev.New(8192)
	ts := startServer(t, StaticExports{{Name: "", Device: dev}}, Options{})
	c := ts.dial(t)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.option(optExportName, nil)
	if size := binary.BigEndian.Uint64(c.read(10)); size != 8192 {
		t.Fatalf("size %d", size)
	}
}

func TestInfoAndGo(t *testing.T) {
	exports, dev := newTestExports()
	ts := startServer(t, exports, Options{})

	checkExport := func(t *testing.T, infos map[uint16][]byte) {
		t.Helper()
		e, ok := infos[infoExport]
		if !ok || len(e) != 10 {
			t.Fatalf("NBD_INFO_EXPORT missing or wrong size: %x", e)
		}
		if size := binary.BigEndian.Uint64(e); size != uint64(dev.Size()) {
			t.Errorf("size %d", size)
		}
		if f := binary.BigEndian.Uint16(e[8:]); f != wantTransmissionFlags {
			t.Errorf("flags %#x", f)
		}
		bs, ok := infos[infoBlockSize]
		if !ok || len(bs) != 12 {
			t.Fatalf("NBD_INFO_BLOCK_SIZE missing or wrong size: %x", bs)
		}
		if mn, pr, mx := binary.BigEndian.Uint32(bs), binary.BigEndian.Uint32(bs[4:]), binary.BigEndian.Uint32(bs[8:]); mn != 1 || pr != 4096 || mx != 32<<20 {
			t.Errorf("block sizes %d %d %d", mn, pr, mx)
		}
	}

	t.Run("INFO with requests then GO", func(t *testing.T) {
		c := ts.dial(t)
		c.greet(flagFixedNewstyle | flagNoZeroes)
		c.option(optInfo, infoData("a", infoName, infoDescription, infoBlockSize, 0x7777))
		infos, final := c.infoReplies(optInfo)
		if final.typ != repAck {
			t.Fatalf("final reply %#x", final.typ)
		}
		checkExport(t, infos)
		if string(infos[infoName]) != "a" {
			t.Errorf("name %q", infos[infoName])
		}
		if string(infos[infoDescription]) != "export a" {
			t.Errorf("description %q", infos[infoDescription])
		}
		if len(infos) != 4 {
			t.Errorf("got infos %v", infos)
		}
		// INFO leaves the session in negotiation; GO then enters transmission.
		c.option(optGo, infoData("a"))
		infos, final = c.infoReplies(optGo)
		if final.typ != repAck {
			t.Fatalf("GO reply %#x", final.typ)
		}
		checkExport(t, infos)
		if _, ok := infos[infoName]; ok {
			t.Errorf("NAME sent without request")
		}
		c.mustDo(cmdWrite, 0, 0, 3, []byte("abc"))
		if got := c.mustDo(cmdRead, 0, 0, 3, nil); string(got) != "abc" {
			t.Errorf("read %q", got)
		}
	})

	t.Run("unknown export", func(t *testing.T) {
		for _, opt := range []uint32{optInfo, optGo} {
			for _, name := range []string{"nope", ""} {
				c := ts.dial(t)
				c.greet(flagFixedNewstyle | flagNoZeroes)
				c.option(opt, infoData(name, infoName))
				if _, final := c.infoReplies(opt); final.typ != repErrUnknown {
					t.Fatalf("opt %d %q: reply %#x, want ERR_UNKNOWN", opt, name, final.typ)
				}
				// The session goes on.
				c.option(optGo, infoData("b"))
				if _, final := c.infoReplies(optGo); final.typ != repAck {
					t.Fatalf("GO after unknown: %#x", final.typ)
				}
				c.mustDo(cmdFlush, 0, 0, 0, nil)
			}
		}
	})

	t.Run("malformed", func(t *testing.T) {
		c := ts.dial(t)
		c.greet(flagFixedNewstyle | flagNoZeroes)
		for _, data := range [][]byte{
			nil,
			{0, 0, 0},
			append(be32(100), 'a', 0, 0),        // name longer than data
			append(infoData("a", infoName), 0),  // trailing byte
			infoData("a", infoName)[:4+1+2+1],   // truncated request list
			append(be32(0xffffffff), 'a', 0, 0), // absurd name length
		} {
			c.option(optInfo, data)
			if _, final := c.infoReplies(optInfo); final.typ != repErrInvalid {
				t.Fatalf("data %x: reply %#x, want ERR_INVALID", data, final.typ)
			}
		}
		c.option(optInfo, infoData(strings.Repeat("x", 5000)))
		if _, final := c.infoReplies(optInfo); final.typ != repErrTooBig {
			t.Fatalf("long name: reply %#x, want ERR_TOO_BIG", final.typ)
		}
		c.option(optGo, infoData("a"))
		if _, final := c.infoReplies(optGo); final.typ != repAck {
			t.Fatalf("GO: %#x", final.typ)
		}
	})
}

func TestList(t *testing.T) {
	exports, _ := newTestExports()
	ts := startServer(t, exports, Options{})
	c := ts.dial(t)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.option(optList, nil)
	var got []string
	for {
		r := c.optReply()
		if r.opt != optList {
			t.Fatalf("reply for option %d", r.opt)
		}
		if r.typ == repAck {
			break
		}
		if r.typ != repServer {
			t.Fatalf("reply type %#x", r.typ)
		}
		n := binary.BigEndian.Uint32(r.data)
		got = append(got, string(r.data[4:4+n])+"|"+string(r.data[4+n:]))
	}
	if want := "a|export a,b|"; strings.Join(got, ",") != want {
		t.Errorf("list %q, want %q", strings.Join(got, ","), want)
	}
	c.option(optList, []byte("x"))
	if r := c.optReply(); r.typ != repErrInvalid {
		t.Errorf("LIST with data: %#x", r.typ)
	}
	c.option(optGo, infoData("a"))
	if _, final := c.infoReplies(optGo); final.typ != repAck {
		t.Fatalf("GO: %#x", final.typ)
	}
}

func TestAbort(t *testing.T) {
	exports, _ := newTestExports()
	ts := startServer(t, exports, Options{})
	c := ts.dial(t)
	c.greet(flagFixedNewstyle)
	c.option(optAbort, nil)
	if r := c.optReply(); r.opt != optAbort || r.typ != repAck || len(r.data) != 0 {
		t.Fatalf("abort reply %+v", r)
	}
	c.expectClosed()
}

func TestUnknownOptionsSkipped(t *testing.T) {
	exports, _ := newTestExports()
	ts := startServer(t, exports, Options{})
	c := ts.dial(t)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	for _, o := range []struct {
		opt  uint32
		data []byte
	}{
		// STRUCTURED_REPLY and the meta context options are tested in structured_test.go,
		// STARTTLS (POLICY when TLS is off) in tls_test.go.
		{11, nil},                   // EXTENDED_HEADERS
		{4, []byte{optMagic >> 56}}, // PEEK_EXPORT, data looks like a magic
		{0xdeadbeef, bytes.Repeat([]byte("IHAVEOPT"), 512)}, // 4 KiB of magic-looking data
	} {
		c.option(o.opt, o.data)
		if r := c.optReply(); r.opt != o.opt || r.typ != repErrUnsup {
			t.Fatalf("option %d: reply %+v, want ERR_UNSUP", o.opt, r)
		}
	}
	c.option(optGo, infoData("a"))
	if _, final := c.infoReplies(optGo); final.typ != repAck {
		t.Fatalf("GO: %#x", final.typ)
	}
	c.mustDo(cmdFlush, 0, 0, 0, nil)
}

func TestOversizedOptions(t *testing.T) {
	exports, _ := newTestExports()
	ts := startServer(t, exports, Options{})

	t.Run("discarded with TOO_BIG", func(t *testing.T) {
		c := ts.dial(t)
		c.greet(flagFixedNewstyle | flagNoZeroes)
		for _, opt := range []uint32{optInfo, optGo, optList, 8, 0x1234} {
			c.option(opt, bytes.Repeat([]byte("IHAVEOPT"), 2000)) // 16000 bytes
			if r := c.optReply(); r.opt != opt || r.typ != repErrTooBig {
				t.Fatalf("option %d: reply %+v, want ERR_TOO_BIG", opt, r)
			}
		}
		c.option(optGo, infoData("a"))
		if _, final := c.infoReplies(optGo); final.typ != repAck {
			t.Fatalf("GO: %#x", final.typ)
		}
	})
	t.Run("absurd length closes", func(t *testing.T) {
		c := ts.dial(t)
		c.greet(flagFixedNewstyle | flagNoZeroes)
		h := optBytes(optInfo, nil)
		binary.BigEndian.PutUint32(h[12:], 0xffffffff)
		c.write(h)
		c.expectClosed()
	})
	t.Run("long EXPORT_NAME closes", func(t *testing.T) {
		c := ts.dial(t)
		c.greet(flagFixedNewstyle | flagNoZeroes)
		c.option(optExportName, bytes.Repeat([]byte("a"), 10000))
		c.expectClosed()
	})
	t.Run("bad option magic closes", func(t *testing.T) {
		c := ts.dial(t)
		c.greet(flagFixedNewstyle | flagNoZeroes)
		h := optBytes(optList, nil)
		h[0] ^= 1
		c.write(h)
		c.expectClosed()
		if !strings.Contains(ts.logs.String(), `"level":"warn"`) {
			t.Errorf("no warning logged: %s", ts.logs.String())
		}
	})
}
