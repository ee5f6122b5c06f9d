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
	checkChainMaps(t, "qemu-img map", qemuImgMap)
}
