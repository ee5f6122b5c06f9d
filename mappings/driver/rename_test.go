package driver

import (
	"testing"

	"fcnbd/internal/api"
)

// TestRenameCrashBetweenCommits: a crash after the volume's catalogue record is renamed and
// before the model is leaves the two apart; the next start takes the name from the record.
func TestRenameCrashBetweenCommits(t *testing.T) {
	r := newRig(t, nil)
	r.mkvol("s", "t")
	if _, err := r.d.MkFcmap(t.Context(), api.MkFcmap{Source: "s", Target: "t", CopyRate: ip(0)}); err != nil {
		t.Fatal(err)
	}
	// The manager's commit only, as a crash right after it leaves things.
	if err := r.d.vols.Rename("0", "s2"); err != nil {
		t.Fatal(err)
	}
	r.restart()
	m, err := r.d.Fcmap(t.Context(), "0")
	if err != nil {
		t.Fatal(err)
	}
	if m.SourceName != "s2" {
		t.Errorf("after restart the mapping's source is %q, want s2", m.SourceName)
	}
	r.vol("s2")
	// And the model knows the new name: the old one is free for a new volume.
	r.mkvol("s")
	if err := r.d.RenameVolume("s2", "t"); err == nil {
		t.Error("renaming to a taken name was accepted")
	}
	if err := r.d.RenameVolume("s2", "s3"); err != nil {
		t.Fatal(err)
	}
	if m, _ := r.d.Fcmap(t.Context(), "0"); m.SourceName != "s3" {
		t.Errorf("source name %q, want s3", m.SourceName)
	}
}
