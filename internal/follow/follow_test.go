package follow

import (
	"bytes"
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"fcnbd/nbd"
)

// store is the storage two owners share; node is one owner with a write-back cache that a kill
// loses, as fcnbd's is.
type store struct {
	mu   sync.Mutex
	data []byte
}

type node struct {
	st    *store
	mu    sync.Mutex
	cache map[int64][]byte // offset → data acknowledged, not yet flushed
}

func (n *node) Size() int64 { return int64(len(n.st.data)) }

func (n *node) ReadAt(p []byte, off int64) error {
	n.st.mu.Lock()
	copy(p, n.st.data[off:])
	n.st.mu.Unlock()
	n.mu.Lock()
	defer n.mu.Unlock()
	for o, d := range n.cache { // (tests write whole, aligned blocks)
		if o >= off && o+int64(len(d)) <= off+int64(len(p)) {
			copy(p[o-off:], d)
		}
	}
	return nil
}

func (n *node) WriteAt(p []byte, off int64, fua bool) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if fua { // this write alone goes to the store
		delete(n.cache, off)
		n.st.mu.Lock()
		copy(n.st.data[off:], p)
		n.st.mu.Unlock()
		return nil
	}
	n.cache[off] = bytes.Clone(p)
	return nil
}

func (n *node) Flush() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.st.mu.Lock()
	defer n.st.mu.Unlock()
	for o, d := range n.cache {
		copy(n.st.data[o:], d)
	}
	clear(n.cache)
	return nil
}

func (n *node) Trim(off, length int64) error                                 { return nil }
func (n *node) WriteZeroes(off, length int64, mayPunch bool, fua bool) error { return nil }

// serveNode serves a new owner over st on addr ("" for any port); kill stops it and loses its
// cache, like kill -9 of a node.
func serveNode(t *testing.T, st *store, addr string) (string, func()) {
	t.Helper()
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	n := &node{st: st, cache: map[int64][]byte{}}
	srv := nbd.NewServer(nbd.StaticExports{{Name: "v", Device: n}}, nbd.Options{Logger: zerolog.Nop()})
	go srv.Serve(l)
	var once sync.Once
	kill := func() {
		once.Do(func() {
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			srv.Shutdown(ctx)
			n.mu.Lock()
			clear(n.cache)
			n.mu.Unlock()
		})
	}
	t.Cleanup(kill)
	return l.Addr().String(), kill
}

func block(b byte) []byte { return bytes.Repeat([]byte{b}, 4096) }

// The owner dies with acknowledged writes only in its cache: Flush through the Device, after
// the failover, must make them durable on the new owner (replayed), and the journal is empty
// afterwards.
func TestFailoverReplaysUnflushedWrites(t *testing.T) {
	st := &store{data: make([]byte, 1<<20)}
	addrA, killA := serveNode(t, st, "")
	// B's address is reserved now and served only once A is dead, as a standby does.
	lb, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addrB := lb.Addr().String()
	lb.Close()

	d, err := Open(context.Background(), Options{Nodes: []string{addrA, addrB}, Export: "v", Wait: 10 * time.Second, Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.WriteAt(block(1), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := d.WriteAt(block(2), 4096, false); err != nil { // acknowledged from A's cache only
		t.Fatal(err)
	}
	if err := d.WriteAt(block(3), 0, true); err != nil { // FUA: durable, and newer than block(1)
		t.Fatal(err)
	}
	killA()
	serveNode(t, st, addrB)

	if err := d.Flush(); err != nil {
		t.Fatalf("flush after the failover: %v", err)
	}
	if d.Failovers() != 1 {
		t.Errorf("%d failovers, want 1", d.Failovers())
	}
	st.mu.Lock()
	got0, got1 := bytes.Clone(st.data[:4096]), bytes.Clone(st.data[4096:8192])
	st.mu.Unlock()
	if !bytes.Equal(got1, block(2)) {
		t.Errorf("the write acknowledged by the dead owner's cache is not on the store after FLUSH (byte %d)", got1[0])
	}
	if !bytes.Equal(got0, block(3)) {
		t.Errorf("block 0 holds %d, want the FUA write's 3 (the replay must keep the order)", got0[0])
	}
	d.jmu.Lock()
	left := len(d.journal)
	d.jmu.Unlock()
	if left != 0 {
		t.Errorf("%d writes still held for replay after a successful FLUSH", left)
	}

	// Reads in flight across a failover are retried on the new owner.
	buf := make([]byte, 4096)
	if err := d.ReadAt(buf, 4096); err != nil || !bytes.Equal(buf, block(2)) {
		t.Errorf("read after the failover: %v, byte %d", err, buf[0])
	}
}

// Without an owner for longer than Wait, requests fail instead of hanging.
func TestNoOwnerFails(t *testing.T) {
	st := &store{data: make([]byte, 1<<20)}
	addrA, killA := serveNode(t, st, "")
	d, err := Open(context.Background(), Options{Nodes: []string{addrA}, Export: "v", Wait: 500 * time.Millisecond, Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	killA()
	start := time.Now()
	if err := d.WriteAt(block(1), 0, false); err == nil {
		t.Fatal("a write with no owner to be found succeeded")
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("the write failed only after %s", took)
	}
}
