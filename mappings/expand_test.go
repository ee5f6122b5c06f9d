package mappings

import (
	"testing"

	"fcnbd/internal/fcerr"
)

func TestExpandVolume(t *testing.T) {
	f := newFx(t, 3)
	f.ok2(f.m.MkFcmap(MkFcmapArgs{Source: "vol0", Target: "vol1"}))
	before := string(f.m.durable())
	for _, c := range []struct {
		ref  string
		size int64
		code string
	}{
		{"vol0", 2 * mib, fcerr.ExpandInMapping},
		{"vol1", 2 * mib, fcerr.ExpandInMapping},
		{"vol2", mib, fcerr.BadValue},
		{"vol2", mib / 2, fcerr.BadValue},
		{"vol2", mib + 512, fcerr.BadValue},
		{"nosuch", 2 * mib, fcerr.NoSuchName},
	} {
		_, err := f.m.ExpandVolume(c.ref, c.size)
		if got := fcerr.CodeOf(err); got != c.code {
			t.Errorf("ExpandVolume(%s, %d): %v, want %s", c.ref, c.size, err, c.code)
		}
	}
	if string(f.m.durable()) != before {
		t.Fatal("a refused expansion changed the model")
	}
	effs, err := f.m.ExpandVolume("vol2", 2*mib)
	if err != nil {
		t.Fatal(err)
	}
	if len(effs) != 1 {
		t.Fatalf("effects %v, want Persist only", effs)
	}
	if _, ok := effs[0].(Persist); !ok {
		t.Fatalf("effects %v, want Persist only", effs)
	}
	if vi, _ := f.m.VolumeInfo(2); vi.Size != 2*mib {
		t.Fatalf("size %d", vi.Size)
	}
	// A mapping needs volumes of one size.
	if _, _, err := f.m.MkFcmap(MkFcmapArgs{Source: "vol2", Target: "vol1"}); err == nil {
		t.Error("mkfcmap between volumes of different sizes was accepted")
	}
}

func (f *fx) ok2(_ MappingID, effs []Effect, err error) []Effect { return f.ok(effs, err) }
