package driver

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"syscall"
	"time"

	"fcnbd/internal/blockdev"
)

// nbdDev is a minimal NBD client (fixed newstyle, NBD_OPT_EXPORT_NAME, simple replies) with
// one request in flight, as a blockdev.Device: TestTopologyRace sends part of its host I/O
// through the daemon's NBD server, reply path included. A connection that fails stays failed
// (every request then fails with ESHUTDOWN); the caller dials again.
type nbdDev struct {
	nc     net.Conn
	br     *bufio.Reader
	size   int64
	cookie uint64
	err    error
}

const (
	nbdReqMagic   = 0x25609513
	nbdReplyMagic = 0x67446698
	nbdCmdRead    = 0
	nbdCmdWrite   = 1
	nbdCmdDisc    = 2
	nbdCmdFlush   = 3
	nbdCmdTrim    = 4
	nbdCmdZeroes  = 6
	nbdFlagFUA    = 1
	nbdFlagNoHole = 2
)

// dialNBD connects to the server on the Unix socket sock and opens export name.
func dialNBD(sock, name string) (*nbdDev, error) {
	nc, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		return nil, err
	}
	c := &nbdDev{nc: nc, br: bufio.NewReaderSize(nc, 1<<20)}
	if err := c.handshake(name); err != nil {
		nc.Close()
		return nil, fmt.Errorf("nbd handshake for %s: %w", name, err)
	}
	return c, nil
}

func (c *nbdDev) handshake(name string) error {
	c.nc.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.nc.SetDeadline(time.Time{})
	var hello [18]byte
	if _, err := io.ReadFull(c.br, hello[:]); err != nil {
		return err
	}
	if string(hello[:8]) != "NBDMAGIC" || string(hello[8:16]) != "IHAVEOPT" {
		return fmt.Errorf("bad greeting %q", hello[:16])
	}
	const fixedNewstyle, noZeroes = 1, 2
	msg := binary.BigEndian.AppendUint32(nil, fixedNewstyle|noZeroes)
	msg = append(msg, "IHAVEOPT"...)
	msg = binary.BigEndian.AppendUint32(msg, 1) // NBD_OPT_EXPORT_NAME
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(name)))
	msg = append(msg, name...)
	if _, err := c.nc.Write(msg); err != nil {
		return err
	}
	var info [10]byte
	if _, err := io.ReadFull(c.br, info[:]); err != nil {
		return err
	}
	c.size = int64(binary.BigEndian.Uint64(info[:8]))
	return nil
}

// do sends one request and reads its reply (into p for a READ).
func (c *nbdDev) do(typ, flags uint16, off int64, length int, payload, p []byte) error {
	if c.err != nil {
		return c.err
	}
	c.cookie++
	req := make([]byte, 0, 28+len(payload))
	req = binary.BigEndian.AppendUint32(req, nbdReqMagic)
	req = binary.BigEndian.AppendUint16(req, flags)
	req = binary.BigEndian.AppendUint16(req, typ)
	req = binary.BigEndian.AppendUint64(req, c.cookie)
	req = binary.BigEndian.AppendUint64(req, uint64(off))
	req = binary.BigEndian.AppendUint32(req, uint32(length))
	req = append(req, payload...)
	if _, err := c.nc.Write(req); err != nil {
		return c.fail(err)
	}
	var h [16]byte
	if _, err := io.ReadFull(c.br, h[:]); err != nil {
		return c.fail(err)
	}
	if m := binary.BigEndian.Uint32(h[:4]); m != nbdReplyMagic {
		return c.fail(fmt.Errorf("bad reply magic %#x", m))
	}
	if ck := binary.BigEndian.Uint64(h[8:]); ck != c.cookie {
		return c.fail(fmt.Errorf("reply to cookie %d, want %d", ck, c.cookie))
	}
	if e := binary.BigEndian.Uint32(h[4:8]); e != 0 {
		return fmt.Errorf("nbd request %d [%d,+%d): %w", typ, off, length, syscall.Errno(e))
	}
	if typ == nbdCmdRead {
		if _, err := io.ReadFull(c.br, p); err != nil {
			return c.fail(err)
		}
	}
	return nil
}

func (c *nbdDev) fail(err error) error {
	c.err = fmt.Errorf("nbd connection: %v: %w", err, syscall.ESHUTDOWN)
	c.nc.Close()
	return c.err
}

func (c *nbdDev) Close() {
	if c.err == nil {
		c.do(nbdCmdDisc, 0, 0, 0, nil, nil)
	}
	c.nc.Close()
}

var _ blockdev.Device = (*nbdDev)(nil)

func (c *nbdDev) Size() int64 { return c.size }

func (c *nbdDev) ReadAt(p []byte, off int64) error {
	return c.do(nbdCmdRead, 0, off, len(p), nil, p)
}

func (c *nbdDev) WriteAt(p []byte, off int64, fua bool) error {
	var f uint16
	if fua {
		f = nbdFlagFUA
	}
	return c.do(nbdCmdWrite, f, off, len(p), p, nil)
}

func (c *nbdDev) Flush() error { return c.do(nbdCmdFlush, 0, 0, 0, nil, nil) }

func (c *nbdDev) Trim(off, length int64) error {
	return c.do(nbdCmdTrim, 0, off, int(length), nil, nil)
}

func (c *nbdDev) WriteZeroes(off, length int64, mayPunch, fua bool) error {
	var f uint16
	if !mayPunch {
		f |= nbdFlagNoHole
	}
	if fua {
		f |= nbdFlagFUA
	}
	return c.do(nbdCmdZeroes, f, off, int(length), nil, nil)
}

// errDev fails every request with err (a connection that could not be made).
type errDev struct{ err error }

func (d errDev) Size() int64                                { return 0 }
func (d errDev) ReadAt([]byte, int64) error                 { return d.err }
func (d errDev) WriteAt([]byte, int64, bool) error          { return d.err }
func (d errDev) Flush() error                               { return d.err }
func (d errDev) Trim(int64, int64) error                    { return d.err }
func (d errDev) WriteZeroes(int64, int64, bool, bool) error { return d.err }
