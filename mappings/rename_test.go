package mappings

import (
	"testing"

	"fcnbd/internal/fcerr"
)

func TestRenameVolume(t *testing.T) {
	m := New()
	for _, n := range []string{"a", "b"} {
		if _, _, err := m.AddVolume(n, VolumeAlign); err != nil {
			t.Fatal(err)
		}
	}
	before := string(m.durable())
	for _, c := range []struct{ ref, name, code string }{
		{"a", "b", fcerr.NameInUse},
		{"a", "1x", fcerr.BadName},
		{"zz", "c", fcerr.NoSuchName},
	} {
		_, err := m.RenameVolume(c.ref, c.name)
		if fe, ok := err.(*fcerr.Error); !ok || fe.Code != c.code {
			t.Errorf("RenameVolume(%s, %s): %v, want %s", c.ref, c.name, err, c.code)
		}
	}
	if string(m.durable()) != before {
		t.Fatal("a refused rename changed the model")
	}
	effs, err := m.RenameVolume("a", "c")
	if err != nil || len(effs) != 1 {
		t.Fatalf("RenameVolume: %v %v", effs, err)
	}
	if _, ok := effs[0].(Persist); !ok {
		t.Errorf("effects %v, want Persist", effs)
	}
	if v, err := m.volume("c"); err != nil || v.ID != 0 {
		t.Errorf("volume c: %v %v", v, err)
	}
}
