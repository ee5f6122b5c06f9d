package cow

import (
	"errors"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// failJournal is a MemJournal whose failure records fail while refuse is set.
type failJournal struct {
	MemJournal
	refuse atomic.Bool
	marked sync.Map
}

func (j *failJournal) MarkFailed(id int) error {
	if j.refuse.Load() {
		return errors.New("catalogue unwritable")
	}
	j.marked.Store(id, true)
	return nil
}

// TestStoppingWaitsForAFailedDependant: a stopping mapping whose only cleaning left is owed to a
// dependant whose grain copy failed, and whose failure can't be recorded yet, can't finish (the
// dependant still reads through its target until it leaves the chain), and nextClean has
// nothing for it to copy. Its worker must wait for the dependant to leave, not re-check at
// once in a loop that takes every gate of the tree each time (it did: some hundred thousand
// re-checks a second, each one waiting for the I/O in flight on every volume of the tree and
// holding off new I/O).
func TestStoppingWaitsForAFailedDependant(t *testing.T) {
	const size, grain = 1 << 20, 64 * kib
	j := &failJournal{}
	e := New(j, Options{})
	defer e.Close()
	files := map[int]*memFile{}
	for v := range 3 {
		files[v] = newMemFile("vol", size)
		if err := e.AddVolume(v, size, files[v]); err != nil {
			t.Fatal(err)
		}
	}
	dev := func(v int) interface {
		WriteAt([]byte, int64, bool) error
	} {
		d, err := e.Device(v)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	// S(0) ← T(2) ← Told(1): Told is the older target of S.
	for _, s := range []MappingSpec{{ID: 1, Source: 0, Target: 1, GrainSize: grain}, {ID: 2, Source: 0, Target: 2, GrainSize: grain}} {
		if err := e.StartMappings([]MappingSpec{s}); err != nil {
			t.Fatal(err)
		}
	}
	// A write to S: T gets grain 0, which Told still reads through T.
	if err := dev(0).WriteAt(make([]byte, grain), 0, false); err != nil {
		t.Fatal(err)
	}
	// A write to T whose copy into Told fails while the failure can't be recorded.
	j.refuse.Store(true)
	files[1].setHook(func(op string, off, n int64) error {
		if op == "write" {
			return syscall.EIO
		}
		return nil
	})
	if err := dev(2).WriteAt(make([]byte, 4096), grain, false); !errors.Is(err, ErrJournal) {
		t.Fatalf("write to T: %v, want ErrJournal", err)
	}

	var rechecks atomic.Int64
	hook := func(name string) {
		if name == "cow-clean-recheck" {
			rechecks.Add(1)
		}
	}
	FailpointHook.Store(&hook)
	defer FailpointHook.Store(nil)
	if _, err := e.StopMapping(2, false); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	if n := rechecks.Load(); n > 5 {
		t.Errorf("the stopping mapping re-checked its cleaning %d times in 300 ms while only a failed dependant held it up", n)
	}

	// Once the failure is recorded, the dependant leaves and the stop completes.
	j.refuse.Store(false)
	deadline := time.After(5 * time.Second)
	var got []EventKind
	for len(got) < 2 {
		select {
		case ev := <-e.Events():
			got = append(got, ev.Kind)
		case <-deadline:
			t.Fatalf("events %v: want an I/O error for mapping 1 and the clean completion of mapping 2", got)
		}
	}
	if p, err := e.Progress(2); err != nil || p.Phase != Stopped {
		t.Fatalf("mapping 2: %+v, %v; want stopped", p, err)
	}
}
