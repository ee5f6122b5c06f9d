package nbdclient

import (
	"bytes"
	"context"
	"errors"
	"net"
	"syscall"
	"testing"
	"time"

	"fcnbd/internal/memdev"
	"fcnbd/nbd"
)

func serve(t *testing.T, dev *memdev.Device) string {
	t.Helper()
	sock := t.TempDir() + "/nbd.sock"
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	s := nbd.NewServer(nbd.StaticExports{{Name: "v", Device: dev}}, nbd.Options{})
	go s.Serve(l)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.Shutdown(ctx)
	})
	return sock
}

func dial(t *testing.T, sock, export string) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, "unix", sock, export)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// Pipelined writes (some FUA) and zeroes are all answered and read back; errors come back as
// NBD errors and leave the connection up; an unknown export is refused at negotiation.
func TestClientAgainstServer(t *testing.T) {
	dev := memdev.New(1 << 20)
	sock := serve(t, dev)
	c := dial(t, sock, "v")
	if c.Size() != 1<<20 {
		t.Fatalf("size %d", c.Size())
	}
	if f := c.TransmissionFlags(); f&FlagSendFUA == 0 || f&FlagSendWriteZeroes == 0 || f&FlagSendFlush == 0 {
		t.Fatalf("transmission flags %#x lack FUA, WRITE_ZEROES or FLUSH", f)
	}
	var calls []*Call
	for i := 0; i < 64; i++ {
		p := bytes.Repeat([]byte{byte(i + 1)}, 8192)
		var f uint16
		if i%3 == 0 {
			f = CmdFlagFUA
		}
		calls = append(calls, c.Submit(OpWrite, f, uint64(i)*8192, 0, p))
	}
	calls = append(calls, c.Submit(OpWriteZeroes, 0, 8192, 8192, nil))
	for _, call := range calls {
		<-call.Done
		if call.Err != nil {
			t.Fatalf("%s at %d: %v", call.Op, call.Offset, call.Err)
		}
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 3*8192)
	if err := c.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	want := append(append(bytes.Repeat([]byte{1}, 8192), make([]byte, 8192)...), bytes.Repeat([]byte{3}, 8192)...)
	if !bytes.Equal(got, want) {
		t.Fatal("read back differs from what was written")
	}
	if err := c.WriteAt(make([]byte, 4096), 1<<20, false); !IsErrno(err, ENOSPC) {
		t.Fatalf("write past the end: %v, want ENOSPC", err)
	}
	dev.SetHook(func(op memdev.Op, off, length int64) error {
		if op == memdev.OpRead {
			return syscall.EIO
		}
		return nil
	})
	if err := c.ReadAt(got, 0); !IsErrno(err, EIO) {
		t.Fatalf("failing read: %v, want EIO", err)
	}
	dev.SetHook(nil)
	if err := c.ReadAt(got, 0); err != nil {
		t.Fatalf("read after an error reply: %v", err)
	}
	if len(c.Pending()) != 0 {
		t.Fatalf("pending after all replies: %v", c.Pending())
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := Dial(ctx, "unix", sock, "nope"); err == nil {
		t.Fatal("unknown export accepted")
	}
}

// A request the server holds is listed by Pending with its age; when the connection ends, every
// pending request completes with ErrClosed.
func TestClientPendingAndClose(t *testing.T) {
	dev := memdev.New(1 << 20)
	release := make(chan struct{})
	dev.SetHook(func(op memdev.Op, off, length int64) error {
		if op == memdev.OpWrite && off == 4096 {
			<-release
		}
		return nil
	})
	sock := serve(t, dev)
	c := dial(t, sock, "v")
	held := c.Submit(OpWrite, 0, 4096, 0, make([]byte, 4096))
	if err := c.WriteAt(make([]byte, 4096), 0, false); err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	p := c.Pending()
	if len(p) != 1 || p[0] != held || time.Since(p[0].Sent) < 20*time.Millisecond {
		t.Fatalf("pending %v, want the held write", p)
	}
	close(release)
	<-held.Done
	if held.Err != nil {
		t.Fatal(held.Err)
	}

	block := make(chan struct{})
	dev.SetHook(func(op memdev.Op, off, length int64) error {
		<-block
		return nil
	})
	defer close(block)
	stuck := c.Submit(OpRead, 0, 0, 4096, nil)
	c.nc.Close() // as a daemon's death would
	select {
	case <-stuck.Done:
	case <-time.After(5 * time.Second):
		t.Fatal("pending request not completed after the connection ended")
	}
	if !errors.Is(stuck.Err, ErrClosed) {
		t.Fatalf("pending request ended with %v, want ErrClosed", stuck.Err)
	}
	if c := c.Submit(OpFlush, 0, 0, 0, nil); !errors.Is(c.Err, ErrClosed) {
		t.Fatalf("request after the end: %v, want ErrClosed", c.Err)
	}
}
