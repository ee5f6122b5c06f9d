package nbd

import (
	"encoding/binary"
	"fmt"
	"slices"
	"syscall"
	"testing"

	"fcnbd/internal/blockdev"
	"fcnbd/internal/memdev"
)

// dirtyDev is a memdev with dirty bitmaps: each name has a set of dirty grains of dirtyGrain
// bytes; "broken" fails, and "gone" is listed but no longer exists when asked.
type dirtyDev struct {
	*memdev.Device
	bitmaps map[string][]int
}

const dirtyGrain = 64 << 10

func (d *dirtyDev) DirtyBitmapNames() []string {
	var names []string
	for n := range d.bitmaps {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

func (d *dirtyDev) DirtyExtents(name string, off, length int64) ([]blockdev.DirtyExtent, error) {
	gs, ok := d.bitmaps[name]
	switch {
	case name == "broken":
		return nil, fmt.Errorf("test: %w", syscall.EIO)
	case !ok || name == "gone":
		return nil, fmt.Errorf("no bitmap %q: %w", name, syscall.ENOENT)
	}
	if err := blockdev.CheckRange(d.Size(), off, length); err != nil {
		return nil, err
	}
	return blockdev.GrainDirtyExtents(d.Size(), dirtyGrain, off, length, func(g int) bool {
		return slices.Contains(gs, g)
	}), nil
}

func dirtyExports() StaticExports {
	return StaticExports{
		{Name: "a", Device: &dirtyDev{Device: memdev.New(testDevSize), bitmaps: map[string][]int{
			"m1": {1, 2, 15}, "m2": {0}, "broken": nil, "gone": nil}}},
		{Name: "plain", Device: memdev.New(testDevSize)},
	}
}

// statusChunks sends BLOCK_STATUS and returns its descriptors per context ID, in reply order.
func (c *client) statusChunks(flags uint16, off uint64, length uint32) (ids []uint32, ds [][]descriptor, errno uint32) {
	c.t.Helper()
	const cookie = 0xd1
	c.request(cmdBlockStatus, flags, cookie, off, length, nil)
	chs := c.chunks(cookie)
	if errno, _, _ := replyError(c.t.(*testing.T), chs); errno != 0 {
		return nil, nil, errno
	}
	for _, ch := range chs {
		if ch.typ != chunkBlockStatus {
			c.t.Fatalf("chunk type %d", ch.typ)
		}
		p := ch.payload
		ids = append(ids, binary.BigEndian.Uint32(p))
		var d []descriptor
		for p = p[4:]; len(p) > 0; p = p[8:] {
			d = append(d, descriptor{binary.BigEndian.Uint32(p), binary.BigEndian.Uint32(p[4:])})
		}
		ds = append(ds, d)
	}
	return ids, ds, 0
}

func TestDirtyBitmapNegotiation(t *testing.T) {
	ts := startServer(t, dirtyExports(), Options{})
	c := ts.dial(t)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.structuredReply()
	const m1, m2 = ctxDirtyPrefix + "m1", ctxDirtyPrefix + "m2"
	all := []metaCtx{{0, ctxDirtyPrefix + "broken"}, {0, ctxDirtyPrefix + "gone"}, {0, m1}, {0, m2}}
	for _, tc := range []struct {
		name string
		opt  uint32
		data []byte
		want []metaCtx
	}{
		{"list all", optListMeta, metaData("a"), append([]metaCtx{{0, ctxAllocationName}}, all...)},
		{"list qemu:", optListMeta, metaData("a", "qemu:"), all},
		{"list dirty bitmaps", optListMeta, metaData("a", "qemu:dirty-bitmap:"), all},
		{"list one, twice", optListMeta, metaData("a", m2, m2, "qemu:dirty-bitmap:zz"), []metaCtx{{0, m2}}},
		{"list on a plain export", optListMeta, metaData("plain", "qemu:"), nil},
		{"set by namespace selects nothing", optSetMeta, metaData("a", "qemu:", "qemu:dirty-bitmap:"), nil},
		{"set unknown", optSetMeta, metaData("a", "qemu:dirty-bitmap:zz", "qemu:dirty-bitmap:"), nil},
		{"set", optSetMeta, metaData("a", m2, ctxAllocationName, m1, m2),
			[]metaCtx{{ctxAllocationID, ctxAllocationName}, {2, m2}, {3, m1}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c.option(tc.opt, tc.data)
			ctxs, final := c.metaReplies(tc.opt)
			if fmt.Sprint(ctxs) != fmt.Sprint(tc.want) || final.typ != repAck {
				t.Fatalf("contexts %v, final %#x; want %v, ACK", ctxs, final.typ, tc.want)
			}
		})
	}
	c.option(optGo, infoData("a"))
	if _, final := c.infoReplies(optGo); final.typ != repAck {
		t.Fatalf("GO: %#x", final.typ)
	}
	// Grains of 64 KiB: m2 has 0 dirty, m1 has 1, 2 and 15 (the last).
	const g = dirtyGrain
	for _, tc := range []struct {
		name   string
		flags  uint16
		off    uint64
		length uint32
		want   [][]descriptor // base:allocation, m2, m1
	}{
		{"whole", 0, 0, testDevSize, [][]descriptor{{{testDevSize, 3}}, {{g, 1}, {15 * g, 0}}, {{g, 0}, {2 * g, 1}, {12 * g, 0}, {g, 1}}}},
		{"odd", 0, g - 3, g + 10, [][]descriptor{{{g + 10, 3}}, {{3, 1}, {g + 7, 0}}, {{3, 0}, {g + 7, 1}}}},
		{"req one", cmdFlagReqOne, 5, 3 * g, [][]descriptor{{{3 * g, 3}}, {{g - 5, 1}}, {{g - 5, 0}}}},
		{"last grain", 0, testDevSize - 1, 1, [][]descriptor{{{1, 3}}, {{1, 0}}, {{1, 1}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ids, ds, errno := c.statusChunks(tc.flags, tc.off, tc.length)
			if errno != 0 {
				t.Fatalf("error %d", errno)
			}
			if fmt.Sprint(ids) != "[1 2 3]" || fmt.Sprint(ds) != fmt.Sprint(tc.want) {
				t.Fatalf("contexts %v: %v, want [1 2 3]: %v", ids, ds, tc.want)
			}
		})
	}
	c.mustDo(cmdFlush, 0, 0, 0, nil)
}

// TestDirtyBitmapErrors: a bitmap that fails is an error reply (EIO), one that is gone since
// SET is EINVAL; the connection goes on.
func TestDirtyBitmapErrors(t *testing.T) {
	ts := startServer(t, dirtyExports(), Options{})
	for name, want := range map[string]uint32{"broken": errIO, "gone": errInval} {
		c := ts.openStructured(t, "a", ctxAllocationName, ctxDirtyPrefix+name)
		if _, _, errno := c.statusChunks(0, 0, 4096); errno != want {
			t.Errorf("%s: error %d, want %d", name, errno, want)
		}
		c.mustDo(cmdFlush, 0, 0, 0, nil)
	}
	// Only a dirty bitmap selected: BLOCK_STATUS is allowed, one chunk.
	c := ts.openStructured(t, "a", ctxDirtyPrefix+"m2")
	ids, ds, errno := c.statusChunks(0, 0, 2*dirtyGrain)
	if errno != 0 || fmt.Sprint(ids) != "[2]" || fmt.Sprint(ds) != fmt.Sprint([][]descriptor{{{dirtyGrain, 1}, {dirtyGrain, 0}}}) {
		t.Fatalf("only m2: %v %v, error %d", ids, ds, errno)
	}
}
