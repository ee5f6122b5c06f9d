package blockdev

import (
	"reflect"
	"testing"
)

func TestOverlayData(t *testing.T) {
	d := func(n int64) Extent { return Extent{Length: n} }
	h := func(n int64) Extent { return Extent{Length: n, Hole: true} }
	for _, tc := range []struct {
		name string
		exts []Extent
		data [][2]int64
		want []Extent
	}{
		{"nothing over", []Extent{h(10), d(5)}, nil, []Extent{h(10), d(5)}},
		{"inside a hole", []Extent{h(100)}, [][2]int64{{110, 120}}, []Extent{h(10), d(10), h(80)}},
		{"over data and holes", []Extent{h(10), d(10), h(10)}, [][2]int64{{105, 125}}, []Extent{h(5), d(20), h(5)}},
		{"several, clipped", []Extent{h(30)}, [][2]int64{{90, 101}, {110, 112}, {128, 200}}, []Extent{d(1), h(9), d(2), h(16), d(2)}},
		{"covering all", []Extent{h(10), d(1), h(3)}, [][2]int64{{100, 114}}, []Extent{d(14)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := OverlayData(tc.exts, 100, tc.data); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
}

func TestAppendExtent(t *testing.T) {
	var e []Extent
	e = AppendExtent(e, Extent{Length: 0, Hole: true})
	e = AppendExtent(e, Extent{Length: 4})
	e = AppendExtent(e, Extent{Length: 6})
	e = AppendExtent(e, Extent{Length: 2, Hole: true})
	if want := []Extent{{Length: 10}, {Length: 2, Hole: true}}; !reflect.DeepEqual(e, want) {
		t.Errorf("got %v, want %v", e, want)
	}
}
