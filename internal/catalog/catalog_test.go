package catalog

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

func openT(t *testing.T, dir string) *DB {
	t.Helper()
	db, err := Open(dir)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return db
}

func TestVolumesPersistAcrossReopen(t *testing.T) {
	dir := t.TempDir()
	db := openT(t, dir)
	created := time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)
	var ids []uint64
	for _, name := range []string{"a", "b", "c"} {
		err := db.Update(func(tx *Tx) error {
			id, err := tx.NextID(SeqVolume)
			if err != nil {
				return err
			}
			ids = append(ids, id)
			return tx.PutVolume(Volume{ID: id, Name: name, Capacity: 4096, File: name + ".img", Created: created})
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if want := []uint64{0, 1, 2}; !equal(ids, want) {
		t.Fatalf("ids %v, want %v", ids, want)
	}
	if err := db.Update(func(tx *Tx) error { return tx.DeleteVolume(1) }); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	db = openT(t, dir)
	defer db.Close()
	err := db.View(func(tx *Tx) error {
		vols, err := tx.Volumes()
		if err != nil {
			return err
		}
		if len(vols) != 2 || vols[0].Name != "a" || vols[1].Name != "c" || vols[1].ID != 2 {
			t.Errorf("volumes after reopen: %+v", vols)
		}
		if !vols[0].Created.Equal(created) || vols[0].File != "a.img" || vols[0].Capacity != 4096 {
			t.Errorf("record fields: %+v", vols[0])
		}
		if _, ok, _ := tx.Volume(1); ok {
			t.Errorf("deleted volume 1 still present")
		}
		v, ok, err := tx.VolumeByName("c")
		if err != nil || !ok || v.ID != 2 {
			t.Errorf("VolumeByName(c) = %+v %v %v", v, ok, err)
		}
		next, err := tx.PeekID(SeqVolume)
		if next != 3 {
			t.Errorf("next id %d, want 3 (ids are never reused)", next)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestUpdateIsAtomic(t *testing.T) {
	db := openT(t, t.TempDir())
	defer db.Close()
	boom := errors.New("boom")
	err := db.Update(func(tx *Tx) error {
		id, _ := tx.NextID(SeqVolume)
		if err := tx.PutVolume(Volume{ID: id, Name: "x", Capacity: 4096, File: "x"}); err != nil {
			return err
		}
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("Update error %v, want boom", err)
	}
	db.View(func(tx *Tx) error {
		vols, _ := tx.Volumes()
		next, _ := tx.PeekID(SeqVolume)
		if len(vols) != 0 || next != 0 {
			t.Errorf("rolled-back tx left %d volumes, next id %d", len(vols), next)
		}
		return nil
	})
}

func TestOpenRefusesCorruptCatalogue(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T, dir string)
	}{
		{"garbage file", func(t *testing.T, dir string) {
			garbage := make([]byte, 64<<10)
			for i := range garbage {
				garbage[i] = byte(i * 7)
			}
			if err := os.WriteFile(filepath.Join(dir, FileName), garbage, 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		{"undecodable record", func(t *testing.T, dir string) {
			rawUpdate(t, dir, func(tx *bolt.Tx) error {
				return tx.Bucket(bucketVolumes).Put(key(0), []byte("{not json"))
			})
		}},
		{"record under the wrong key", func(t *testing.T, dir string) {
			rawUpdate(t, dir, func(tx *bolt.Tx) error {
				return tx.Bucket(bucketVolumes).Put(key(5), []byte(`{"id":4,"name":"a","capacity":4096,"file":"f"}`))
			})
		}},
		{"unknown field", func(t *testing.T, dir string) {
			rawUpdate(t, dir, func(tx *bolt.Tx) error {
				return tx.Bucket(bucketVolumes).Put(key(0), []byte(`{"id":0,"name":"a","capacity":4096,"file":"f","x":1}`))
			})
		}},
		{"id not below counter", func(t *testing.T, dir string) {
			rawUpdate(t, dir, func(tx *bolt.Tx) error {
				return tx.Bucket(bucketVolumes).Put(key(0), []byte(`{"id":0,"name":"a","capacity":4096,"file":"f"}`))
			})
		}},
		{"duplicate names", func(t *testing.T, dir string) {
			rawUpdate(t, dir, func(tx *bolt.Tx) error {
				tx.Bucket(bucketCounters).Put([]byte(SeqVolume), key(2))
				tx.Bucket(bucketVolumes).Put(key(0), []byte(`{"id":0,"name":"a","capacity":4096,"file":"f"}`))
				return tx.Bucket(bucketVolumes).Put(key(1), []byte(`{"id":1,"name":"a","capacity":4096,"file":"g"}`))
			})
		}},
		{"future format", func(t *testing.T, dir string) {
			rawUpdate(t, dir, func(tx *bolt.Tx) error {
				return tx.Bucket(bucketMeta).Put([]byte("format"), []byte("99"))
			})
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			tc.setup(t, dir)
			db, err := Open(dir)
			if err == nil {
				db.Close()
				t.Fatal("Open succeeded on a corrupt catalogue")
			}
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
		})
	}
}

func TestOpenRefusesSecondOpener(t *testing.T) {
	dir := t.TempDir()
	db := openT(t, dir)
	defer db.Close()
	if _, err := Open(dir); !errors.Is(err, ErrLocked) {
		t.Fatalf("second Open: %v, want ErrLocked", err)
	}
}

// rawUpdate creates a valid catalogue in dir and then changes it behind the catalogue's back.
func rawUpdate(t *testing.T, dir string, fn func(*bolt.Tx) error) {
	t.Helper()
	openT(t, dir).Close()
	b, err := bolt.Open(filepath.Join(dir, FileName), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if err := b.Update(fn); err != nil {
		t.Fatal(err)
	}
}

func equal(a, b []uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
