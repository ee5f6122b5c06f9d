package nbd

import (
	"bytes"
	"encoding/binary"
	"sync/atomic"
	"testing"

	"fcnbd/internal/blockdev"
	"fcnbd/internal/memdev"
)

// fastDev is a memdev that zeroes fast except in [slowFrom, size), where it refuses as a
// copy-on-write would, and that records prefetches.
type fastDev struct {
	*memdev.Device
	slowFrom   int64
	prefetched atomic.Int64
}

func (d *fastDev) WriteZeroesFast(off, length int64, mayPunch, fua bool) error {
	if err := blockdev.CheckRange(d.Size(), off, length); err != nil {
		return err
	}
	if off+length > d.slowFrom {
		return blockdev.ErrNotFast
	}
	return d.Device.WriteZeroes(off, length, mayPunch, fua)
}

func (d *fastDev) Prefetch(off, length int64) error {
	if err := blockdev.CheckRange(d.Size(), off, length); err != nil {
		return err
	}
	d.prefetched.Add(length)
	return nil
}

func exportFlagsOf(t *testing.T, ts *testServer, name string) uint16 {
	t.Helper()
	c := ts.dial(t)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.option(optInfo, infoData(name))
	infos, final := c.infoReplies(optInfo)
	if final.typ != repAck || len(infos[infoExport]) < 10 {
		t.Fatalf("INFO %q: reply %#x, export info %x", name, final.typ, infos[infoExport])
	}
	return binary.BigEndian.Uint16(infos[infoExport][8:])
}

// TestFastZeroAndCache: FAST_ZERO and CACHE are advertised, and accepted, only for devices that
// implement them; a refused fast zero is NBD_ENOTSUP with the data unchanged; the flag on any
// other command, and CACHE outside the device, are EINVAL.
func TestFastZeroAndCache(t *testing.T) {
	dev := &fastDev{Device: memdev.New(testDevSize), slowFrom: testDevSize / 2}
	exports := StaticExports{{Name: "plain", Device: memdev.New(testDevSize)}, {Name: "fast", Device: dev}}
	ts := startServer(t, exports, Options{})

	if f := exportFlagsOf(t, ts, "plain"); f&(tflagSendCache|tflagSendFastZero) != 0 {
		t.Fatalf("plain memdev advertised %#x", f)
	}
	if f := exportFlagsOf(t, ts, "fast"); f&tflagSendCache == 0 || f&tflagSendFastZero == 0 {
		t.Fatalf("fast device's flags %#x lack CACHE or FAST_ZERO", f)
	}

	plain := ts.open(t, "plain")
	for _, tc := range []struct {
		typ, flags uint16
	}{{cmdWriteZeroes, cmdFlagFastZero}, {cmdCache, 0}} {
		if errno, _ := plain.do(tc.typ, tc.flags, 0, 4096, nil); errno != errInval {
			t.Fatalf("plain export: command %d flags %#x: error %d, want EINVAL", tc.typ, tc.flags, errno)
		}
	}

	c := ts.open(t, "fast")
	data := pattern(testDevSize, 3)
	c.mustDo(cmdWrite, 0, 0, testDevSize, data)
	c.mustDo(cmdWriteZeroes, cmdFlagFastZero, 4096, 8192, nil)
	clear(data[4096 : 4096+8192])
	c.mustDo(cmdWriteZeroes, cmdFlagFastZero|cmdFlagNoHole|cmdFlagFUA, 65536, 100, nil)
	clear(data[65536 : 65536+100])
	if errno, _ := c.do(cmdWriteZeroes, cmdFlagFastZero, testDevSize/2-4096, 8192, nil); errno != errNotSup {
		t.Fatalf("refused fast zero: error %d, want ENOTSUP (%d)", errno, errNotSup)
	}
	if got := c.mustDo(cmdRead, 0, 0, testDevSize, nil); !bytes.Equal(got, data) {
		t.Fatal("data after fast zeroes differs")
	}

	for _, tc := range []struct {
		name       string
		typ, flags uint16
		off        uint64
		length     uint32
		want       uint32
	}{
		{"FAST_ZERO on READ", cmdRead, cmdFlagFastZero, 0, 4096, errInval},
		{"FAST_ZERO on TRIM", cmdTrim, cmdFlagFastZero, 0, 4096, errInval},
		{"FAST_ZERO on CACHE", cmdCache, cmdFlagFastZero, 0, 4096, errInval},
		{"FAST_ZERO on FLUSH", cmdFlush, cmdFlagFastZero, 0, 0, errInval},
		{"fast zero past end", cmdWriteZeroes, cmdFlagFastZero, testDevSize - 4096, 8192, errInval},
		{"fast zero offset wraps", cmdWriteZeroes, cmdFlagFastZero, 1<<64 - 4096, 8192, errInval},
		{"CACHE past end", cmdCache, 0, testDevSize - 4096, 8192, errInval},
		{"CACHE 4GiB-1", cmdCache, 0, 0, 0xffffffff, errInval},
		{"CACHE offset wraps", cmdCache, 0, 1<<64 - 4096, 8192, errInval},
		{"CACHE beyond end, empty", cmdCache, 0, testDevSize + 1, 0, errInval},
		{"CACHE empty", cmdCache, 0, 4096, 0, 0},
		{"CACHE whole device", cmdCache, 0, 0, testDevSize, 0},
		{"CACHE with FUA", cmdCache, cmdFlagFUA, 0, 4096, 0},
	} {
		if errno, _ := c.do(tc.typ, tc.flags, tc.off, tc.length, nil); errno != tc.want {
			t.Errorf("%s: error %d, want %d", tc.name, errno, tc.want)
		}
	}
	if n := dev.prefetched.Load(); n != testDevSize+4096 {
		t.Errorf("device asked to prefetch %d bytes, want %d", n, testDevSize+4096)
	}
	goodRoundTrip(t, c, 3)
}
