package cow

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"sync"
	"testing"
	"time"
)

// TestCommitterAnswersEveryRequest: a request submitted after, or concurrently with, the
// committer's close is answered (errShutdown), never left in the queue after the committer's
// final drain. That happened when a host write reached the copy-on-write while Driver.Close
// closed the engine: the write waited forever in protect, and the volume manager's close waited
// forever for the write (issue 13, found by TestTopologyRace).
func TestCommitterAnswersEveryRequest(t *testing.T) {
	wait := func(t *testing.T, r *commitReq, what string) {
		t.Helper()
		select {
		case err := <-r.done:
			if err != nil && !errors.Is(err, errShutdown) {
				t.Fatalf("%s: %v, want nil or ESHUTDOWN", what, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: never answered", what)
		}
	}
	t.Run("after close", func(t *testing.T) {
		c := newCommitter(&MemJournal{})
		c.close()
		for i := range 100 {
			wait(t, c.submit(nil, []BitUpdate{{Mapping: 1, Grains: []int{i}}}), "a request submitted after close")
		}
	})
	t.Run("during close", func(t *testing.T) {
		for range 50 {
			c := newCommitter(&MemJournal{})
			var wg sync.WaitGroup
			reqs := make(chan *commitReq, 4*64)
			for range 4 {
				wg.Go(func() {
					for i := range 64 {
						reqs <- c.submit(nil, []BitUpdate{{Mapping: 1, Grains: []int{i}}})
					}
				})
			}
			c.close()
			wg.Wait()
			close(reqs)
			for r := range reqs {
				wait(t, r, "a request submitted while the committer closed")
			}
		}
	})
}

// TestWriteFailsWhenTheCommitterIsGone: a host write admitted before the engine closed, whose
// copy-on-write meets the closed committer, fails and leaves its volume unchanged: going ahead
// (as for a failed grain copy, which is recorded durably first) would let the target read that
// write through its source after the restart, the split bit never having been committed.
func TestWriteFailsWhenTheCommitterIsGone(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	g := newRig(t, 2, 4*64*kib, 64*kib, r)
	g.start(g.spec(1, 0, 1))
	before := bytes.Clone(g.files[0].data)
	// The race of Driver.Close: the write is past the engine's admission when the committer
	// closes.
	g.e.commit.close()
	err := g.devs[0].WriteAt(bytes.Repeat([]byte{0xab}, 4096), 64*kib, false)
	if !errors.Is(err, errShutdown) {
		t.Fatalf("source write after the committer closed: %v, want ESHUTDOWN", err)
	}
	if !bytes.Equal(g.files[0].data, before) {
		t.Fatal("the source changed although the target's copy was never made durable")
	}
}
