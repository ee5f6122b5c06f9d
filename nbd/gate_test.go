package nbd

import (
	"errors"
	"sync/atomic"
	"testing"
)

// A closed gate (cluster mode: the node's lease ran out) closes the connection instead of
// replying, even to a READ the device answered: no data goes out after the gate closed.
func TestGateClosesInsteadOfReplying(t *testing.T) {
	exports, _ := newTestExports()
	var closed atomic.Bool
	ts := startServer(t, exports, Options{Gate: func() error {
		if closed.Load() {
			return errors.New("lease ran out")
		}
		return nil
	}})
	c := ts.open(t, "a")
	c.request(cmdRead, 0, 1, 0, 4096, nil)
	if got := c.read(16 + 4096); len(got) != 16+4096 {
		t.Fatalf("open gate: read reply of %d bytes", len(got))
	}
	closed.Store(true)
	c.request(cmdRead, 0, 2, 0, 4096, nil)
	c.expectClosed()
}
