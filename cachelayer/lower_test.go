package cachelayer

import (
	"bytes"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"fcnbd/internal/memdev"
)

// event is one operation the recording device completed (or a mark the test placed).
type event struct {
	op   string // "write", "flush", "trim", "zeroes", "mark"
	off  int64
	n    int64
	fua  bool
	name string // for marks
}

// recDev is a memdev that records every completed operation in order, with fault switches.
type recDev struct {
	*memdev.Device
	mu         sync.Mutex
	log        []event
	failWrites atomic.Bool
	failFlush  atomic.Bool
}

func newRecDev(size int64) *recDev { return &recDev{Device: memdev.New(size)} }

func (d *recDev) add(e event) {
	d.mu.Lock()
	d.log = append(d.log, e)
	d.mu.Unlock()
}

func (d *recDev) mark(name string) { d.add(event{op: "mark", name: name}) }

func (d *recDev) events() []event {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]event(nil), d.log...)
}

func (d *recDev) WriteAt(p []byte, off int64, fua bool) error {
	if d.failWrites.Load() {
		return syscall.EIO
	}
	if err := d.Device.WriteAt(p, off, fua); err != nil {
		return err
	}
	d.add(event{op: "write", off: off, n: int64(len(p)), fua: fua})
	return nil
}

func (d *recDev) Flush() error {
	if d.failFlush.Load() {
		return syscall.EIO
	}
	if err := d.Device.Flush(); err != nil {
		return err
	}
	d.add(event{op: "flush"})
	return nil
}

func (d *recDev) Trim(off, n int64) error {
	if err := d.Device.Trim(off, n); err != nil {
		return err
	}
	d.add(event{op: "trim", off: off, n: n})
	return nil
}

func (d *recDev) WriteZeroes(off, n int64, mayPunch, fua bool) error {
	if err := d.Device.WriteZeroes(off, n, mayPunch, fua); err != nil {
		return err
	}
	d.add(event{op: "zeroes", off: off, n: n, fua: fua})
	return nil
}

// between returns the events strictly between marks a and b.
func between(evs []event, a, b string) []event {
	var out []event
	in := false
	for _, e := range evs {
		if e.op == "mark" && e.name == a {
			in = true
			continue
		}
		if e.op == "mark" && e.name == b {
			break
		}
		if in {
			out = append(out, e)
		}
	}
	return out
}

func lowerBytes(t *testing.T, d *recDev, off, n int64) []byte {
	t.Helper()
	b := make([]byte, n)
	if err := d.Device.ReadAt(b, off); err != nil {
		t.Fatalf("read lower: %v", err)
	}
	return b
}

func readCache(t *testing.T, c *Cache, off, n int64) []byte {
	t.Helper()
	b := make([]byte, n)
	if err := c.ReadAt(b, off); err != nil {
		t.Fatalf("ReadAt(%d,+%d): %v", off, n, err)
	}
	return b
}

func fill(n int, v byte) []byte { return bytes.Repeat([]byte{v}, n) }

// newTestCache returns a cache over a fresh recording device, closed at cleanup.
func newTestCache(t testing.TB, size int64, pool *Pool, opts Options) (*Cache, *recDev) {
	d := newRecDev(size)
	c := New(d, pool, opts)
	t.Cleanup(func() { _ = c.Close() })
	return c, d
}
