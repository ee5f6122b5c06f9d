package integration

import (
	"encoding/json"
	"testing"
)

// qemuImgMap returns `qemu-img map --output=json` of a volume as nbdinfo --map entries (type 0
// data, 3 hole and zero, as base:allocation's flags), so that blockstatus_test.go's helpers
// compare it. qemu-img learns the map through NBD_CMD_BLOCK_STATUS: data is "data": true, a hole
// is "data": false, "zero": true.
func qemuImgMap(t *testing.T, d *daemon, vol string) []mapEntry {
	t.Helper()
	out := sh(t, "qemu-img", "map", "--output=json", "-f", "raw", d.uri(vol))
	var raw []struct {
		Start  int64 `json:"start"`
		Length int64 `json:"length"`
		Data   bool  `json:"data"`
		Zero   bool  `json:"zero"`
	}
	if err := json.Unmarshal([]byte(out), &raw); err != nil {
		t.Fatalf("qemu-img map --output=json: %v\n%s", err, out)
	}
	var m []mapEntry
	for _, r := range raw {
		e := mapEntry{Offset: r.Start, Length: r.Length, Type: 0, Desc: "data"}
		switch {
		case !r.Data && r.Zero:
			e.Type, e.Desc = 3, "hole,zero"
		case !r.Data:
			t.Fatalf("qemu-img map: neither data nor zero at [%d,+%d):\n%s", r.Start, r.Length, out)
		}
		if n := len(m); n > 0 && m[n-1].Type == e.Type && m[n-1].Offset+m[n-1].Length == e.Offset {
			m[n-1].Length += e.Length
			continue
		}
		m = append(m, e)
	}
	return m
}

// TestQemuImgMap: qemu-img map shows a sparse volume's data and holes exactly, and a FlashCopy
// target's map is its point-in-time image's: the source's data where it reads through it, its
// own writes, holes where both have holes. (Where the source's later write copied a grain of
// holes into the target, the target's grain is allocated: data, which promises nothing.)
func TestQemuImgMap(t *testing.T) {
	needTools(t, "qemu-img", "qemu-io")
	d := startDaemon(t)
	d.cli("mkvolume", "-name", "src", "-size", "64M")
	d.cli("mkvolume", "-name", "tgt", "-size", "64M")
	qemuIOClean(t, d, "src", "write -P 0xaa 1M 2M", "write -P 0xbb 40M 64k", "flush")
	want := []mapEntry{
		{0, 1 * mib, 3, "hole,zero"},
		{1 * mib, 2 * mib, 0, "data"},
		{3 * mib, 37 * mib, 3, "hole,zero"},
		{40 * mib, 64 << 10, 0, "data"},
		{40*mib + 64<<10, 24*mib - 64<<10, 3, "hole,zero"},
	}
	if got := qemuImgMap(t, d, "src"); !equalMaps(got, want) {
		t.Fatalf("qemu-img map of the source:\n%+v\nwant\n%+v", got, want)
	}

	d.cli("mkfcmap", "-source", "src", "-target", "tgt", "-name", "snap", "-copyrate", "0")
	d.cli("startfcmap", "-prep", "snap")
	if got := qemuImgMap(t, d, "tgt"); !equalMaps(got, want) {
		t.Fatalf("qemu-img map of the started target:\n%+v\nwant\n%+v", got, want)
	}
	// The source is trimmed where the target still needs its data and written elsewhere; the
	// target writes a range of its own.
	qemuIOClean(t, d, "src", "discard 1M 2M", "write -P 0xcc 50M 64k", "flush")
	qemuIOClean(t, d, "tgt", "write -P 0xdd 10M 64k", "flush")
	tm := qemuImgMap(t, d, "tgt")
	for _, c := range []struct {
		off, n int64
		typ    int
		why    string
	}{
		{1 * mib, 2 * mib, 0, "data the source held at the start, copied before its trim"},
		{40 * mib, 64 << 10, 0, "data read through the source"},
		{10 * mib, 64 << 10, 0, "the target's own write"},
		{0, 1 * mib, 3, "a hole in both"},
		{20 * mib, 10 * mib, 3, "a hole in both"},
	} {
		if got := mapType(t, tm, c.off, c.n); got != c.typ {
			t.Errorf("target [%d,+%d) (%s): type %d, want %d; map %+v", c.off, c.n, c.why, got, c.typ, tm)
		}
	}
	if got := mapType(t, qemuImgMap(t, d, "src"), 1*mib, 2*mib); got != 3 {
		t.Errorf("source's trimmed range: type %d, want 3 (hole)", got)
	}
}
