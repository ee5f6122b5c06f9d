// Package nbdclient is a small NBD client for tests: fixed newstyle negotiation with
// NBD_OPT_GO, then pipelined READ, WRITE, FLUSH and WRITE_ZEROES requests (with FUA) matched to
// their replies by cookie. Every request in flight can be listed with its age, so that a test
// can tell which ones a server never answered. It speaks simple replies only and is not meant
// for production use.
package nbdclient

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sort"
	"sync"
	"time"

	"fcnbd/internal/nbdproto"
)

// Protocol constants (internal/nbdproto).
const (
	// Transmission flags.
	FlagHasFlags        = nbdproto.FlagHasFlags
	FlagSendFlush       = nbdproto.FlagSendFlush
	FlagSendFUA         = nbdproto.FlagSendFUA
	FlagSendWriteZeroes = nbdproto.FlagSendWriteZeroes
	FlagCanMultiConn    = nbdproto.FlagCanMultiConn

	// CmdFlagFUA asks for the request's data to be on stable storage before the reply.
	CmdFlagFUA = nbdproto.CmdFlagFUA
	// CmdFlagNoHole asks WRITE_ZEROES not to deallocate.
	CmdFlagNoHole = nbdproto.CmdFlagNoHole

	// NBD error values a caller may branch on.
	EIO       = nbdproto.EIO
	EINVAL    = nbdproto.EINVAL
	ENOSPC    = nbdproto.ENOSPC
	ESHUTDOWN = nbdproto.ESHUTDOWN
)

// Op is a request type.
type Op uint16

// Request types.
const (
	OpRead        Op = nbdproto.CmdRead
	OpWrite       Op = nbdproto.CmdWrite
	OpDisc        Op = nbdproto.CmdDisc
	OpFlush       Op = nbdproto.CmdFlush
	OpTrim        Op = nbdproto.CmdTrim
	OpWriteZeroes Op = nbdproto.CmdWriteZeroes
)

func (o Op) String() string {
	switch o {
	case OpRead:
		return "READ"
	case OpWrite:
		return "WRITE"
	case OpFlush:
		return "FLUSH"
	case OpTrim:
		return "TRIM"
	case OpWriteZeroes:
		return "WRITE_ZEROES"
	case OpDisc:
		return "DISC"
	}
	return fmt.Sprintf("op%d", uint16(o))
}

// Error is an error reply from the server.
type Error struct {
	Errno uint32
}

func (e *Error) Error() string { return fmt.Sprintf("NBD error %d", e.Errno) }

// IsErrno reports whether err is an error reply with the given NBD error value.
func IsErrno(err error, errno uint32) bool {
	var e *Error
	return errors.As(err, &e) && e.Errno == errno
}

// ErrClosed is returned for requests that the connection ended before answering, wrapped with
// the reason.
var ErrClosed = errors.New("nbd connection closed")

// Call is one request: what was sent and, once Done is closed, its outcome.
type Call struct {
	Op     Op
	Flags  uint16
	Offset uint64
	Length uint32
	Cookie uint64
	Sent   time.Time // when the request was handed to the connection

	Done    chan struct{}
	Err     error         // nil, an *Error, or ErrClosed wrapped
	Data    []byte        // READ payload
	Latency time.Duration // from Sent to the reply (or the connection's end)
}

// Client is one NBD connection in the transmission phase. Its methods are safe for concurrent
// use.
type Client struct {
	nc     net.Conn
	br     *bufio.Reader
	size   uint64
	tflags uint16

	wmu sync.Mutex // serialises request writes

	mu      sync.Mutex
	pending map[uint64]*Call
	next    uint64
	closed  error // why the connection ended, nil while it is up
	done    chan struct{}
}

// Dial connects to network/addr ("unix" or "tcp") and negotiates export.
func Dial(ctx context.Context, network, addr, export string) (*Client, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	}
	c := &Client{nc: nc, br: bufio.NewReaderSize(nc, 256<<10), pending: map[uint64]*Call{}, done: make(chan struct{})}
	if err := c.negotiate(export); err != nil {
		nc.Close()
		return nil, fmt.Errorf("negotiate %q: %w", export, err)
	}
	nc.SetDeadline(time.Time{})
	go c.readLoop()
	return c, nil
}

func (c *Client) negotiate(export string) error {
	var hello [18]byte
	if _, err := io.ReadFull(c.br, hello[:]); err != nil {
		return err
	}
	if binary.BigEndian.Uint64(hello[0:]) != nbdproto.NBDMagic || binary.BigEndian.Uint64(hello[8:]) != nbdproto.OptMagic {
		return errors.New("not a newstyle NBD server")
	}
	hflags := binary.BigEndian.Uint16(hello[16:])
	if hflags&nbdproto.FlagFixedNewstyle == 0 {
		return errors.New("server is not fixed newstyle")
	}
	cflags := uint32(nbdproto.FlagFixedNewstyle)
	if hflags&nbdproto.FlagNoZeroes != 0 {
		cflags |= nbdproto.FlagNoZeroes
	}
	msg := binary.BigEndian.AppendUint32(nil, cflags)
	data := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	data = append(data, export...)
	data = binary.BigEndian.AppendUint16(data, 0) // no information requests: the export's is sent anyway
	msg = binary.BigEndian.AppendUint64(msg, nbdproto.OptMagic)
	msg = binary.BigEndian.AppendUint32(msg, nbdproto.OptGo)
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(data)))
	msg = append(msg, data...)
	if _, err := c.nc.Write(msg); err != nil {
		return err
	}
	gotExport := false
	for {
		var h [20]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return err
		}
		if binary.BigEndian.Uint64(h[0:]) != nbdproto.OptReplyMagic || binary.BigEndian.Uint32(h[8:]) != nbdproto.OptGo {
			return errors.New("bad option reply")
		}
		typ := binary.BigEndian.Uint32(h[12:])
		n := binary.BigEndian.Uint32(h[16:])
		if n > 1<<16 {
			return fmt.Errorf("option reply of %d bytes", n)
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(c.br, body); err != nil {
			return err
		}
		switch {
		case typ == nbdproto.RepAck:
			if !gotExport {
				return errors.New("NBD_REP_ACK without NBD_INFO_EXPORT")
			}
			return nil
		case typ == nbdproto.RepInfo:
			if len(body) >= 12 && binary.BigEndian.Uint16(body) == nbdproto.InfoExport {
				c.size = binary.BigEndian.Uint64(body[2:])
				c.tflags = binary.BigEndian.Uint16(body[10:])
				gotExport = true
			}
		case typ&nbdproto.RepFlagError != 0:
			return fmt.Errorf("option refused: reply type %#x: %s", typ, body)
		}
	}
}

// Size is the export's size in bytes.
func (c *Client) Size() uint64 { return c.size }

// TransmissionFlags are the export's flags as the server sent them.
func (c *Client) TransmissionFlags() uint16 { return c.tflags }

// Closed is closed once the connection has ended.
func (c *Client) Closed() <-chan struct{} { return c.done }

// Err is why the connection ended, or nil while it is up.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

// Submit sends one request and returns at once (after writing it); the reply completes the
// Call. data is the WRITE payload; length is used by the other requests.
func (c *Client) Submit(op Op, flags uint16, off uint64, length uint32, data []byte) *Call {
	if op == OpWrite {
		length = uint32(len(data))
	}
	call := &Call{Op: op, Flags: flags, Offset: off, Length: length, Done: make(chan struct{})}
	c.mu.Lock()
	if c.closed != nil {
		err := c.closed
		c.mu.Unlock()
		call.Err = err
		close(call.Done)
		return call
	}
	c.next++
	call.Cookie = c.next
	call.Sent = time.Now()
	c.pending[call.Cookie] = call
	c.mu.Unlock()

	hdr := make([]byte, 0, nbdproto.RequestSize)
	hdr = binary.BigEndian.AppendUint32(hdr, nbdproto.RequestMagic)
	hdr = binary.BigEndian.AppendUint16(hdr, flags)
	hdr = binary.BigEndian.AppendUint16(hdr, uint16(op))
	hdr = binary.BigEndian.AppendUint64(hdr, call.Cookie)
	hdr = binary.BigEndian.AppendUint64(hdr, off)
	hdr = binary.BigEndian.AppendUint32(hdr, length)
	bufs := net.Buffers{hdr}
	if op == OpWrite {
		bufs = append(bufs, data)
	}
	c.wmu.Lock()
	_, err := bufs.WriteTo(c.nc)
	c.wmu.Unlock()
	if err != nil {
		c.fail(fmt.Errorf("%w: write: %v", ErrClosed, err))
	}
	return call
}

// Do sends one request and waits for its reply.
func (c *Client) Do(op Op, flags uint16, off uint64, length uint32, data []byte) *Call {
	call := c.Submit(op, flags, off, length, data)
	<-call.Done
	return call
}

// ReadAt reads len(p) bytes at off.
func (c *Client) ReadAt(p []byte, off uint64) error {
	call := c.Do(OpRead, 0, off, uint32(len(p)), nil)
	if call.Err == nil {
		copy(p, call.Data)
	}
	return call.Err
}

// WriteAt writes p at off, with FUA if fua.
func (c *Client) WriteAt(p []byte, off uint64, fua bool) error {
	var f uint16
	if fua {
		f = CmdFlagFUA
	}
	return c.Do(OpWrite, f, off, 0, p).Err
}

// Flush sends FLUSH and waits for it.
func (c *Client) Flush() error { return c.Do(OpFlush, 0, 0, 0, nil).Err }

// Pending returns the requests not yet answered, oldest first.
func (c *Client) Pending() []*Call {
	c.mu.Lock()
	out := make([]*Call, 0, len(c.pending))
	for _, call := range c.pending {
		out = append(out, call)
	}
	c.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Sent.Before(out[j].Sent) })
	return out
}

// Close sends NBD_CMD_DISC and closes the connection; requests still pending fail with
// ErrClosed.
func (c *Client) Close() error {
	c.mu.Lock()
	up := c.closed == nil
	c.mu.Unlock()
	if up {
		hdr := binary.BigEndian.AppendUint32(nil, nbdproto.RequestMagic)
		hdr = binary.BigEndian.AppendUint16(hdr, 0)
		hdr = binary.BigEndian.AppendUint16(hdr, uint16(OpDisc))
		hdr = append(hdr, make([]byte, 20)...)
		c.wmu.Lock()
		c.nc.SetWriteDeadline(time.Now().Add(time.Second))
		c.nc.Write(hdr)
		c.wmu.Unlock()
	}
	c.fail(fmt.Errorf("%w: closed by the client", ErrClosed))
	<-c.done
	return nil
}

// fail ends the connection: every pending request completes with err.
func (c *Client) fail(err error) {
	c.mu.Lock()
	if c.closed != nil {
		c.mu.Unlock()
		return
	}
	c.closed = err
	pending := c.pending
	c.pending = map[uint64]*Call{}
	c.mu.Unlock()
	c.nc.Close()
	now := time.Now()
	for _, call := range pending {
		call.Err = err
		call.Latency = now.Sub(call.Sent)
		close(call.Done)
	}
}

func (c *Client) readLoop() {
	defer close(c.done)
	var h [nbdproto.SimpleReplySize]byte
	for {
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			c.fail(fmt.Errorf("%w: read: %v", ErrClosed, err))
			return
		}
		if binary.BigEndian.Uint32(h[0:]) != nbdproto.SimpleReplyMagic {
			c.fail(fmt.Errorf("%w: bad reply magic %#x", ErrClosed, binary.BigEndian.Uint32(h[0:])))
			return
		}
		errno := binary.BigEndian.Uint32(h[4:])
		cookie := binary.BigEndian.Uint64(h[8:])
		c.mu.Lock()
		call := c.pending[cookie]
		delete(c.pending, cookie)
		c.mu.Unlock()
		if call == nil {
			c.fail(fmt.Errorf("%w: reply to unknown cookie %d", ErrClosed, cookie))
			return
		}
		if errno == 0 && call.Op == OpRead {
			// A READ's data follows its successful reply.
			call.Data = make([]byte, call.Length)
			if _, err := io.ReadFull(c.br, call.Data); err != nil {
				call.Err = fmt.Errorf("%w: read payload: %v", ErrClosed, err)
				call.Latency = time.Since(call.Sent)
				close(call.Done)
				c.fail(call.Err)
				return
			}
		}
		if errno != 0 {
			call.Err = &Error{Errno: errno}
		}
		call.Latency = time.Since(call.Sent)
		close(call.Done)
	}
}
