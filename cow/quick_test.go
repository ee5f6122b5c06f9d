package cow

import (
	"bytes"
	"testing"
)

type tryWriter interface {
	TryWriteAt(p []byte, off int64) (bool, error)
}

// TryWriteAt takes a write only while nothing depends on the volume: once a mapping links it,
// every write must go through copy-on-write (WriteAt), so it declines.
func TestTryWriteAt(t *testing.T) {
	r, _ := seedRand(t)
	g := newRig(t, 2, 256*kib, 64*kib, r)
	src := g.devs[0].(tryWriter)
	p := bytes.Repeat([]byte{7}, 4*kib)
	if ok, err := src.TryWriteAt(p, 8*kib); !ok || err != nil {
		t.Fatalf("unlinked volume: TryWriteAt = %v, %v; want true, nil", ok, err)
	}
	copy(g.model[0][8*kib:], p)
	g.checkAll(0)
	if ok, _ := src.TryWriteAt(p, 256*kib); ok {
		t.Fatal("took a write past the end")
	}

	g.start(g.spec(1, 0, 1))
	for v, d := range []tryWriter{src, g.devs[1].(tryWriter)} {
		if ok, _ := d.TryWriteAt(bytes.Repeat([]byte{9}, 4*kib), 0); ok {
			t.Fatalf("volume %d in a mapping: TryWriteAt took a write", v)
		}
	}
	g.checkAll(0, 1) // the target still reads the source's data from before the write
}
