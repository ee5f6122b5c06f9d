// Package follow keeps an NBD client of a cluster-mode volume working across a failover of its
// I/O group. A Device is a blockdev.Device that forwards every request to whichever node of the
// group owns it, over NBD; when the owner dies, it finds the new owner, replays to it every write
// acknowledged since the last successful FLUSH (the dead owner may have held them only in its
// write-back cache), and retries the requests in flight. So a FLUSH it acknowledges covers every
// write it acknowledged before, whichever node took them, and the kernel block device or
// filesystem above it sees a pause, not an error.
//
// `fcnbd follow` serves such a Device on a local Unix socket; `fcnbd attach --follow` puts a
// kernel block device on it.
package follow

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"fcnbd/internal/blockdev"
	"fcnbd/internal/nbdclient"
)

// Options tunes a Device.
type Options struct {
	// Nodes are the NBD TCP addresses of the I/O group's nodes.
	Nodes []string
	// Export is the volume's name.
	Export string
	// Wait bounds the search for an owner after a failure (default 60 s); requests fail with
	// EIO after it.
	Wait time.Duration
	// MaxUnflushed is the most data of acknowledged writes held for replay (default 256 MiB);
	// a write beyond it first flushes.
	MaxUnflushed int64
	Log          zerolog.Logger
}

// entry is one acknowledged change not yet covered by a successful FLUSH.
type entry struct {
	op       nbdclient.Op
	flags    uint16
	off      uint64
	length   uint32
	data     []byte
	sequence uint64
}

// Device forwards to the owner of the volume's I/O group. It is safe for concurrent use.
type Device struct {
	o    Options
	size int64

	mu   sync.Mutex // guards c and gen; held while a new owner is found and replayed to
	c    *nbdclient.Client
	addr string
	gen  uint64

	jmu      sync.Mutex
	journal  []entry // acknowledged since the last successful FLUSH, in completion order
	jbytes   int64
	sequence uint64 // of the last journal entry

	failovers int
}

// Open connects to the current owner.
func Open(ctx context.Context, o Options) (*Device, error) {
	if len(o.Nodes) == 0 || o.Export == "" {
		return nil, errors.New("follow: nodes and an export are needed")
	}
	if o.Wait <= 0 {
		o.Wait = time.Minute
	}
	if o.MaxUnflushed <= 0 {
		o.MaxUnflushed = 256 << 20
	}
	d := &Device{o: o}
	c, addr, err := d.find(ctx)
	if err != nil {
		return nil, err
	}
	d.c, d.addr, d.size = c, addr, int64(c.Size())
	return d, nil
}

// find connects to the first node that serves the export, trying them in turn until o.Wait.
func (d *Device) find(ctx context.Context) (*nbdclient.Client, string, error) {
	deadline := time.Now().Add(d.o.Wait)
	var last error
	for {
		for _, a := range d.o.Nodes {
			cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			c, err := nbdclient.Dial(cctx, "tcp", a, d.o.Export)
			cancel()
			if err == nil {
				return c, a, nil
			}
			last = err
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return nil, "", fmt.Errorf("follow: no node of %v serves %s (last: %v)", d.o.Nodes, d.o.Export, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Size implements blockdev.Device.
func (d *Device) Size() int64 { return d.size }

// Failovers is how many times the device moved to another owner.
func (d *Device) Failovers() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.failovers
}

// Close closes the connection. Writes not flushed are not flushed by Close.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.c.Close()
}

func (d *Device) conn() (*nbdclient.Client, uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.c, d.gen
}

// failed tells whether err on connection c means the owner is gone: the connection closed, or
// an error reply after which it closes within a second (an owner that lost its I/O group
// refuses what it can no longer make durable, and exits).
func failed(c *nbdclient.Client, err error) bool {
	if errors.Is(err, nbdclient.ErrClosed) {
		return true
	}
	select {
	case <-c.Closed():
		return true
	case <-time.After(time.Second):
		return false
	}
}

// failover moves to a new owner unless another request already did (gen moved on), and
// replays the journal to it.
func (d *Device) failover(gen uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.gen != gen {
		return nil
	}
	d.c.Close()
	start := time.Now()
	for {
		c, addr, err := d.find(context.Background())
		if err != nil {
			return err
		}
		if int64(c.Size()) != d.size {
			c.Close()
			return fmt.Errorf("follow: %s on %s has %d bytes, was %d", d.o.Export, addr, c.Size(), d.size)
		}
		d.jmu.Lock()
		replay := slices.Clone(d.journal)
		d.jmu.Unlock()
		var rerr error
		for _, e := range replay {
			if rerr = c.Do(e.op, e.flags, e.off, e.length, e.data).Err; rerr != nil {
				break
			}
		}
		if rerr != nil {
			c.Close()
			d.o.Log.Warn().Err(rerr).Str("node", addr).Msg("follow: replay to the new owner failed; looking again")
			continue
		}
		d.c, d.addr = c, addr
		d.gen++
		d.failovers++
		d.o.Log.Info().Str("node", addr).Str("export", d.o.Export).Int("replayed", len(replay)).
			Dur("took", time.Since(start)).Msg("follow: the volume's I/O group failed over; continuing on its new owner")
		return nil
	}
}

// do sends one request, following the owner until it succeeds or a real error reply comes.
func (d *Device) do(op nbdclient.Op, flags uint16, off uint64, length uint32, data []byte) (*nbdclient.Call, error) {
	for {
		c, gen := d.conn()
		call := c.Do(op, flags, off, length, data)
		if call.Err == nil || !failed(c, call.Err) {
			return call, call.Err
		}
		if err := d.failover(gen); err != nil {
			return call, err
		}
	}
}

// record adds an acknowledged change to the journal.
func (d *Device) record(e entry) {
	d.jmu.Lock()
	defer d.jmu.Unlock()
	d.sequence++
	e.sequence = d.sequence
	d.journal = append(d.journal, e)
	d.jbytes += int64(len(e.data))
}

func (d *Device) change(op nbdclient.Op, flags uint16, off uint64, length uint32, data []byte) error {
	d.jmu.Lock()
	full := d.jbytes >= d.o.MaxUnflushed
	d.jmu.Unlock()
	if full {
		if err := d.Flush(); err != nil {
			return err
		}
	}
	if _, err := d.do(op, flags, off, length, data); err != nil {
		return err
	}
	d.record(entry{op: op, flags: flags, off: off, length: length, data: data})
	return nil
}

// ReadAt implements blockdev.Device.
func (d *Device) ReadAt(p []byte, off int64) error {
	call, err := d.do(nbdclient.OpRead, 0, uint64(off), uint32(len(p)), nil)
	if err != nil {
		return err
	}
	copy(p, call.Data)
	return nil
}

// WriteAt implements blockdev.Device. The data is kept (the caller's buffer may be reused)
// until a FLUSH covers it.
func (d *Device) WriteAt(p []byte, off int64, fua bool) error {
	var flags uint16
	if fua {
		flags = nbdclient.CmdFlagFUA
	}
	return d.change(nbdclient.OpWrite, flags, uint64(off), uint32(len(p)), slices.Clone(p))
}

// Trim implements blockdev.Device.
func (d *Device) Trim(off, length int64) error {
	return d.change(nbdclient.OpTrim, 0, uint64(off), uint32(length), nil)
}

// WriteZeroes implements blockdev.Device.
func (d *Device) WriteZeroes(off, length int64, mayPunch bool, fua bool) error {
	var flags uint16
	if !mayPunch {
		flags |= nbdclient.CmdFlagNoHole
	}
	if fua {
		flags |= nbdclient.CmdFlagFUA
	}
	return d.change(nbdclient.OpWriteZeroes, flags, uint64(off), uint32(length), nil)
}

// Flush implements blockdev.Device: once it returns nil, every change acknowledged before it was
// called is durable on the owner, even if it was acknowledged by an owner that died since.
func (d *Device) Flush() error {
	d.jmu.Lock()
	upTo := d.sequence
	d.jmu.Unlock()
	if _, err := d.do(nbdclient.OpFlush, 0, 0, 0, nil); err != nil {
		return err
	}
	d.jmu.Lock()
	defer d.jmu.Unlock()
	i := 0
	for i < len(d.journal) && d.journal[i].sequence <= upTo {
		d.jbytes -= int64(len(d.journal[i].data))
		i++
	}
	d.journal = slices.Delete(d.journal, 0, i)
	return nil
}

var _ blockdev.Device = (*Device)(nil)
