package driver

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"time"

	"fcnbd/internal/blockdev"
	"fcnbd/internal/nbdclient"
)

// nbdDev is an NBD connection (internal/nbdclient) as a blockdev.Device: TestTopologyRace
// sends part of its host I/O through the daemon's NBD server, reply path included. Error
// replies come back as their errno; a connection that ended fails every request with
// ESHUTDOWN, and the caller dials again.
type nbdDev struct{ c *nbdclient.Client }

// dialNBD connects to the server on the Unix socket sock and opens export name.
func dialNBD(sock, name string) (*nbdDev, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := nbdclient.Dial(ctx, "unix", sock, name)
	if err != nil {
		return nil, fmt.Errorf("nbd handshake for %s: %w", name, err)
	}
	return &nbdDev{c}, nil
}

// failed reports whether the connection has ended.
func (d *nbdDev) failed() bool { return d.c.Err() != nil }

func (d *nbdDev) Close() { d.c.Close() }

// errOf maps the client's errors to the errnos the writers branch on.
func errOf(err error) error {
	var e *nbdclient.Error
	switch {
	case err == nil:
		return nil
	case errors.As(err, &e):
		return fmt.Errorf("nbd: %w", syscall.Errno(e.Errno))
	}
	return fmt.Errorf("nbd connection: %v: %w", err, syscall.ESHUTDOWN)
}

func (d *nbdDev) do(op nbdclient.Op, flags uint16, off, length int64) error {
	return errOf(d.c.Do(op, flags, uint64(off), uint32(length), nil).Err)
}

var _ blockdev.Device = (*nbdDev)(nil)

func (d *nbdDev) Size() int64 { return int64(d.c.Size()) }

func (d *nbdDev) ReadAt(p []byte, off int64) error { return errOf(d.c.ReadAt(p, uint64(off))) }

func (d *nbdDev) WriteAt(p []byte, off int64, fua bool) error {
	return errOf(d.c.WriteAt(p, uint64(off), fua))
}

func (d *nbdDev) Flush() error { return d.do(nbdclient.OpFlush, 0, 0, 0) }

func (d *nbdDev) Trim(off, length int64) error { return d.do(nbdclient.OpTrim, 0, off, length) }

func (d *nbdDev) WriteZeroes(off, length int64, mayPunch, fua bool) error {
	var f uint16
	if !mayPunch {
		f |= nbdclient.CmdFlagNoHole
	}
	if fua {
		f |= nbdclient.CmdFlagFUA
	}
	return d.do(nbdclient.OpWriteZeroes, f, off, length)
}

// errDev fails every request with err (a connection that could not be made).
type errDev struct{ err error }

func (d errDev) Size() int64                                { return 0 }
func (d errDev) ReadAt([]byte, int64) error                 { return d.err }
func (d errDev) WriteAt([]byte, int64, bool) error          { return d.err }
func (d errDev) Flush() error                               { return d.err }
func (d errDev) Trim(int64, int64) error                    { return d.err }
func (d errDev) WriteZeroes(int64, int64, bool, bool) error { return d.err }
