package blockdev

import (
	"reflect"
	"testing"
)

func TestGrainDirtyExtents(t *testing.T) {
	d := func(n int64) DirtyExtent { return DirtyExtent{Length: n, Dirty: true} }
	c := func(n int64) DirtyExtent { return DirtyExtent{Length: n} }
	// A volume of 10 grains of 100 bytes and a short last one of 50: grains 1, 2, 5 and 10
	// are dirty.
	const size, grain = 1050, 100
	set := map[int]bool{1: true, 2: true, 5: true, 10: true}
	dirty := func(g int) bool {
		if g < 0 || g > 10 {
			t.Fatalf("grain %d asked, outside the volume", g)
		}
		return set[g]
	}
	for _, tc := range []struct {
		name        string
		off, length int64
		want        []DirtyExtent
	}{
		{"whole volume", 0, size, []DirtyExtent{c(100), d(200), c(200), d(100), c(400), d(50)}},
		{"odd start and end inside clean grains", 37, 26, []DirtyExtent{c(26)}},
		{"odd start inside a dirty grain", 150, 200, []DirtyExtent{d(150), c(50)}},
		{"one byte of a dirty grain", 299, 1, []DirtyExtent{d(1)}},
		{"spans clean, dirty, clean", 499, 102, []DirtyExtent{c(1), d(100), c(1)}},
		{"last short grain", 1000, 50, []DirtyExtent{d(50)}},
		{"part of the last short grain", 1010, 7, []DirtyExtent{d(7)}},
		{"ends at the last grain's start", 900, 100, []DirtyExtent{c(100)}},
		{"empty", 500, 0, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := GrainDirtyExtents(size, grain, tc.off, tc.length, dirty)
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
			var n int64
			for _, e := range got {
				n += e.Length
			}
			if n != tc.length {
				t.Errorf("extents cover %d bytes, want %d", n, tc.length)
			}
		})
	}
}

func TestAppendDirtyExtent(t *testing.T) {
	var e []DirtyExtent
	e = AppendDirtyExtent(e, DirtyExtent{Length: 0, Dirty: true})
	e = AppendDirtyExtent(e, DirtyExtent{Length: 4})
	e = AppendDirtyExtent(e, DirtyExtent{Length: 6})
	e = AppendDirtyExtent(e, DirtyExtent{Length: 2, Dirty: true})
	if want := []DirtyExtent{{Length: 10}, {Length: 2, Dirty: true}}; !reflect.DeepEqual(e, want) {
		t.Errorf("got %v, want %v", e, want)
	}
}
