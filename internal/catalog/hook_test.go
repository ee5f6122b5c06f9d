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
