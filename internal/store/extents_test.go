package store

import (
	"reflect"
	"testing"

	"fcnbd/internal/blockdev"
)

func TestExtents(t *testing.T) {
	const mib = 1 << 20
	f, err := Dir{Path: t.TempDir()}.Create("v", 8*mib)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// Data in [1 MiB, 2 MiB) and [5 MiB, 5 MiB+4 KiB); holes elsewhere.
	if _, err := f.WriteAt(make1(mib), mib); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(make1(4096), 5*mib); err != nil {
		t.Fatal(err)
	}
	sf := StickySync(f)
	if all, err := Extents(f, 0, 8*mib); err == nil && len(all) == 1 {
		t.Skipf("the filesystem of %s reports no holes (SEEK_HOLE unsupported)", t.TempDir())
	}
	d, h := func(n int64) blockdev.Extent { return blockdev.Extent{Length: n} },
		func(n int64) blockdev.Extent { return blockdev.Extent{Length: n, Hole: true} }
	for _, tc := range []struct {
		name        string
		off, length int64
		want        []blockdev.Extent
	}{
		{"whole", 0, 8 * mib, []blockdev.Extent{h(mib), d(mib), h(3 * mib), d(4096), h(3*mib - 4096)}},
		{"inside data", mib + 100, 1000, []blockdev.Extent{d(1000)}},
		{"inside hole", 3 * mib, 7, []blockdev.Extent{h(7)}},
		{"hole into data", mib - 512, 1024, []blockdev.Extent{h(512), d(512)}},
		{"data to end", 5 * mib, 3 * mib, []blockdev.Extent{d(4096), h(3*mib - 4096)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, file := range []File{f, sf} {
				got, err := Extents(file, tc.off, tc.length)
				if err != nil {
					t.Fatal(err)
				}
				if !reflect.DeepEqual(got, tc.want) {
					t.Errorf("%T: got %v, want %v", file, got, tc.want)
				}
			}
		})
	}
}

func make1(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = 1
	}
	return b
}
