package volume

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
)

// TestManagerExpand: Expand grows the file and the device (the one handed out before too),
// keeps the data, the new range reads zeroes and takes writes, the hooks run in order (Check
// sees the old record and the new capacity, Commit runs in the capacity's transaction, Done
// says it committed), and a reopen keeps the capacity and the data.
func TestManagerExpand(t *testing.T) {
	dir := t.TempDir()
	e := open(t, dir, nil)
	if _, err := e.m.Create("a", 8192); err != nil {
		t.Fatal(err)
	}
	dev, _ := e.m.Device("a")
	old := bytes.Repeat([]byte{7}, 8192)
	if err := dev.WriteAt(old, 0, false); err != nil {
		t.Fatal(err)
	}
	var calls []string
	info, err := e.m.Expand("a", 4096, ExpandHooks{
		Check: func(rec catalog.Volume, capacity int64) error {
			if rec.Capacity != 8192 || capacity != 12288 {
				t.Errorf("Check(%d, %d)", rec.Capacity, capacity)
			}
			calls = append(calls, "check")
			return nil
		},
		Commit: func(tx *catalog.Tx) error {
			calls = append(calls, "commit")
			return tx.PutModel([]byte(`{"marker":1}`))
		},
		Done: func(committed bool) {
			calls = append(calls, "done")
			if !committed {
				t.Error("Done(false) after a successful expansion")
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := len(calls); got != 3 || calls[0] != "check" || calls[1] != "commit" || calls[2] != "done" {
		t.Errorf("hooks ran %v", calls)
	}
	if info.Capacity != 12288 || dev.Size() != 12288 {
		t.Fatalf("capacity %d, device %d", info.Capacity, dev.Size())
	}
	p := make([]byte, 12288)
	if err := dev.ReadAt(p, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p[:8192], old) || !bytes.Equal(p[8192:], make([]byte, 4096)) {
		t.Fatal("after expand: old data changed or the new range is not zero")
	}
	if err := dev.WriteAt(bytes.Repeat([]byte{9}, 4096), 8192, true); err != nil {
		t.Fatal(err)
	}
	e.close()

	e = open(t, dir, nil)
	got, err := e.m.Get("a")
	if err != nil || got.Capacity != 12288 {
		t.Fatalf("after reopen: %+v %v", got, err)
	}
	var model []byte
	e.cat.View(func(tx *catalog.Tx) error { model = append(model, tx.Model()...); return nil })
	if string(model) != `{"marker":1}` {
		t.Errorf("Commit's write is not in the catalogue: %q", model)
	}
	dev, _ = e.m.Device("a")
	if err := dev.ReadAt(p, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p[:8192], old) || !bytes.Equal(p[8192:], bytes.Repeat([]byte{9}, 4096)) {
		t.Fatal("after reopen the data differs")
	}
}

// TestManagerExpandRefusals: bad sizes, a missing volume, a refusal by Check and a failed
// commit change nothing: capacity (in memory and in the catalogue), file size, data; the device
// keeps serving.
func TestManagerExpandRefusals(t *testing.T) {
	dir := t.TempDir()
	e := open(t, dir, nil)
	if _, err := e.m.Create("a", 8192); err != nil {
		t.Fatal(err)
	}
	dev, _ := e.m.Device("a")
	data := bytes.Repeat([]byte{5}, 8192)
	if err := dev.WriteAt(data, 0, false); err != nil {
		t.Fatal(err)
	}
	check := func(what string) {
		t.Helper()
		if got, _ := e.m.Get("a"); got.Capacity != 8192 || dev.Size() != 8192 {
			t.Fatalf("%s: capacity %d, device %d", what, got.Capacity, dev.Size())
		}
		var rec catalog.Volume
		e.cat.View(func(tx *catalog.Tx) (err error) { rec, _, err = tx.Volume(0); return err })
		if rec.Capacity != 8192 {
			t.Fatalf("%s: catalogue capacity %d", what, rec.Capacity)
		}
		p := make([]byte, 8192)
		if err := dev.ReadAt(p, 0); err != nil || !bytes.Equal(p, data) {
			t.Fatalf("%s: read %v, data equal %v", what, err, bytes.Equal(p, data))
		}
	}
	fileSize := func() int64 {
		st, err := os.Stat(filepath.Join(dir, FileName(0)))
		if err != nil {
			t.Fatal(err)
		}
		return st.Size()
	}
	for _, add := range []int64{0, -512, 1, 511, 513, 512, MaxCapacity, MaxCapacity - 4096, 1 << 62} {
		if _, err := e.m.Expand("a", add, ExpandHooks{}); fcerr.CodeOf(err) != fcerr.BadValue {
			t.Errorf("add %d: %v, want %s", add, err, fcerr.BadValue)
		}
		check("bad size")
		if fileSize() != 8192 {
			t.Fatalf("bad size: file has %d bytes", fileSize())
		}
	}
	if _, err := e.m.Expand("nosuch", 4096, ExpandHooks{}); fcerr.CodeOf(err) != fcerr.NoSuchObject {
		t.Errorf("missing volume: %v", err)
	}
	done := 0
	_, err := e.m.Expand("a", 4096, ExpandHooks{
		Check: func(catalog.Volume, int64) error { return fcerr.New(fcerr.ExpandInMapping, "no") },
		Done: func(committed bool) {
			done++
			if committed {
				t.Error("Done(true) after a refusal")
			}
		},
	})
	if fcerr.CodeOf(err) != fcerr.ExpandInMapping || done != 1 {
		t.Fatalf("Check's refusal: %v, Done called %d times", err, done)
	}
	check("refused by Check")
	if fileSize() != 8192 {
		t.Fatalf("refused by Check: file has %d bytes", fileSize())
	}
	_, err = e.m.Expand("a", 4096, ExpandHooks{Commit: func(*catalog.Tx) error { return errors.New("injected") }})
	if fcerr.CodeOf(err) != fcerr.MetadataUnwritable {
		t.Fatalf("failed commit: %v", err)
	}
	check("failed commit")
	if err := dev.WriteAt(bytes.Repeat([]byte{6}, 4096), 4096, true); err != nil {
		t.Fatalf("write after a failed commit: %v", err)
	}
	copy(data[4096:], bytes.Repeat([]byte{6}, 4096))
	e.close()
	e = open(t, dir, nil)
	dev, _ = e.m.Device("a")
	check("reopen after a failed commit (file longer than the capacity)")
}
