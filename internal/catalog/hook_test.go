package catalog

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestCommitHook: a hook that refuses a commit leaves nothing written; one that runs it
// commits; CopyTo yields a catalogue that opens with exactly the committed records.
func TestCommitHook(t *testing.T) {
	dir := t.TempDir()
	refuse := false
	db, err := OpenWith(dir, Options{CommitHook: func(commit func() error) error {
		if refuse {
			return errors.New("refused")
		}
		return commit()
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.Update(func(tx *Tx) error { return tx.PutModel([]byte(`{"v":1}`)) }); err != nil {
		t.Fatal(err)
	}
	refuse = true
	if err := db.Update(func(tx *Tx) error { return tx.PutModel([]byte(`{"v":2}`)) }); err == nil {
		t.Fatal("a refused commit reported success")
	}
	var got string
	db.View(func(tx *Tx) error { got = string(tx.Model()); return nil })
	if got != `{"v":1}` {
		t.Fatalf("after a refused commit the model is %s, want the last committed one", got)
	}

	copyDir := t.TempDir()
	f, err := os.Create(filepath.Join(copyDir, FileName))
	if err != nil {
		t.Fatal(err)
	}
	if err := db.CopyTo(f); err != nil {
		t.Fatal(err)
	}
	f.Close()
	c, err := Open(copyDir)
	if err != nil {
		t.Fatalf("open the copy: %v", err)
	}
	defer c.Close()
	c.View(func(tx *Tx) error { got = string(tx.Model()); return nil })
	if got != `{"v":1}` {
		t.Fatalf("the copy's model is %s", got)
	}
}

// TestTransitionHook: every write of a control-plane record runs Transition before the commit,
// and a refusal there leaves nothing written; a bitmap-only transaction does not ask.
func TestTransitionHook(t *testing.T) {
	var asked int
	refuse := false
	db, err := OpenWith(t.TempDir(), Options{Transition: func(tx *Tx) error {
		asked++
		if refuse {
			return errors.New("not the owner")
		}
		return nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	writes := map[string]func(*Tx) error{
		"model":   func(tx *Tx) error { return tx.PutModel([]byte(`{"v":2}`)) },
		"volume":  func(tx *Tx) error { return tx.PutVolume(Volume{ID: 0, Name: "v", Capacity: 1, File: "vol-0.img"}) },
		"counter": func(tx *Tx) error { _, err := tx.NextID(SeqVolume); return err },
		"host":    func(tx *Tx) error { return tx.PutHost(Host{ID: 0, Name: "h"}) },
	}
	refuse = true
	for what, fn := range writes {
		before := asked
		if err := db.Update(fn); err == nil {
			t.Errorf("%s: a refused transition committed", what)
		}
		if asked != before+1 {
			t.Errorf("%s: Transition asked %d times, want once", what, asked-before)
		}
	}
	db.View(func(tx *Tx) error {
		vols, _ := tx.Volumes()
		hosts, _ := tx.Hosts()
		next, _ := tx.PeekID(SeqVolume)
		if tx.Model() != nil || len(vols) != 0 || len(hosts) != 0 || next != 0 {
			t.Errorf("refused transitions left model %q, %d volumes, %d hosts, next id %d", tx.Model(), len(vols), len(hosts), next)
		}
		return nil
	})
	before := asked
	if err := db.Update(func(tx *Tx) error { return tx.PutBitmapChunk(1, SplitBitmap, 0, []byte{1}) }); err != nil {
		t.Fatalf("bitmap commit: %v", err)
	}
	if asked != before {
		t.Errorf("a bitmap-only commit asked Transition")
	}
}
