package cachelayer

import (
	"reflect"
	"testing"

	"fcnbd/internal/blockdev"
	"fcnbd/internal/memdev"
)

// TestExtentsCountCachedPages: pages written into the cache and not yet destaged are data,
// though the lower device still has a hole there; what was destaged is reported by the lower
// device.
func TestExtentsCountCachedPages(t *testing.T) {
	lower := memdev.New(1 << 20)
	if err := lower.WriteAt(make([]byte, 4096), 8*PageSize, false); err != nil {
		t.Fatal(err)
	}
	c := New(lower, nil, Options{DestagePaused: true})
	t.Cleanup(func() { c.Close() })
	if err := c.WriteAt([]byte{1}, 2*PageSize+10, false); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteAt(make([]byte, 2*PageSize), 3*PageSize, false); err != nil {
		t.Fatal(err)
	}
	if lower.Allocated() != PageSize {
		t.Fatalf("the writes reached the lower device (%d bytes allocated): destage is not paused", lower.Allocated())
	}
	d := func(n int64) blockdev.Extent { return blockdev.Extent{Length: n} }
	h := func(n int64) blockdev.Extent { return blockdev.Extent{Length: n, Hole: true} }
	for _, tc := range []struct {
		off, length int64
		want        []blockdev.Extent
	}{
		{0, 1 << 20, []blockdev.Extent{h(2 * PageSize), d(3 * PageSize), h(3 * PageSize), d(PageSize), h(1<<20 - 9*PageSize)}},
		{2*PageSize + 100, 100, []blockdev.Extent{d(100)}},
		{PageSize + 1, 2 * PageSize, []blockdev.Extent{h(PageSize - 1), d(PageSize + 1)}},
		{7 * PageSize, 2*PageSize + 1, []blockdev.Extent{h(PageSize), d(PageSize), h(1)}},
	} {
		got, err := c.Extents(tc.off, tc.length)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("[%d,+%d): %v, want %v", tc.off, tc.length, got, tc.want)
		}
	}
	if _, err := c.Extents(1<<20-1, 2); err == nil {
		t.Errorf("a range past the end was accepted")
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	c.Invalidate() // nothing cached: the lower device's allocation is all there is
	got, err := c.Extents(0, 10*PageSize)
	if err != nil {
		t.Fatal(err)
	}
	if want := []blockdev.Extent{h(2 * PageSize), d(3 * PageSize), h(3 * PageSize), d(PageSize), h(PageSize)}; !reflect.DeepEqual(got, want) {
		t.Errorf("after flush: %v, want %v", got, want)
	}
}

// extentCounter is a memdev that counts the extents it is asked for.
type extentCounter struct {
	*memdev.Device
	asked int
}

func (d *extentCounter) Extents(off, length int64) ([]blockdev.Extent, error) {
	d.asked++
	return d.Device.Extents(off, length)
}

// TestExtentsAllCachedAsksNothingBelow: a range whose every page is cached is data without a
// question to the device below (for a store, a lseek or two per large structured READ); a range
// with a page not cached still asks.
func TestExtentsAllCachedAsksNothingBelow(t *testing.T) {
	lower := &extentCounter{Device: memdev.New(1 << 20)}
	c := New(lower, nil, Options{DestagePaused: true})
	t.Cleanup(func() { c.Close() })
	if err := c.WriteAt(make([]byte, 4*PageSize), 4*PageSize, false); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		off, length int64
		asks        int
		want        []blockdev.Extent
	}{
		{4 * PageSize, 4 * PageSize, 0, []blockdev.Extent{{Length: 4 * PageSize}}},
		{5*PageSize + 7, 2 * PageSize, 0, []blockdev.Extent{{Length: 2 * PageSize}}},
		{4 * PageSize, 4*PageSize + 1, 1, []blockdev.Extent{{Length: 4 * PageSize}, {Length: 1, Hole: true}}},
		{3 * PageSize, 2 * PageSize, 1, []blockdev.Extent{{Length: PageSize, Hole: true}, {Length: PageSize}}},
	} {
		lower.asked = 0
		got, err := c.Extents(tc.off, tc.length)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("[%d,+%d): %v, want %v", tc.off, tc.length, got, tc.want)
		}
		if lower.asked != tc.asks {
			t.Errorf("[%d,+%d): the device below was asked %d times, want %d", tc.off, tc.length, lower.asked, tc.asks)
		}
	}
}
