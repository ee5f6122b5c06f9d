// Command faultfs mounts a directory again, through FUSE, so that a test can make some of its
// files fail at the kernel: while faults are on (SIGUSR1; SIGUSR2 turns them off), every open,
// write, sync and allocate of a file whose name is -match fails with EIO, as a shared disk that
// stopped answering would. Processes using the mount see real system-call errors; nothing in
// them knows they are under test.
//
// Reads through handles opened before the faults went on still succeed: the catalogue is read
// through a memory mapping, and a failed page-in would kill the reader with SIGBUS instead of
// giving it an error to handle, which is not the failure under test.
//
// Usage: faultfs -backing DIR -mount DIR -match NAME. It prints "ready" once mounted and
// unmounts on SIGTERM or SIGINT.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"sync/atomic"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

var (
	faulting atomic.Bool
	match    string
)

// node is a loopback node whose files of the matched name fail while faults are on.
type node struct {
	*fs.LoopbackNode
}

// WrapChild makes every node of the tree a node.
func (n *node) WrapChild(_ context.Context, ops fs.InodeEmbedder) fs.InodeEmbedder {
	return &node{ops.(*fs.LoopbackNode)}
}

func (n *node) matched() bool { return filepath.Base(n.EmbeddedInode().Path(nil)) == match }

func (n *node) faulty() bool { return faulting.Load() && n.matched() }

func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if n.faulty() {
		return nil, 0, syscall.EIO
	}
	fh, fl, errno := n.LoopbackNode.Open(ctx, flags)
	if errno != 0 {
		return fh, fl, errno
	}
	return wrap(fh, n.matched()), fl, 0
}

func (n *node) Create(ctx context.Context, name string, flags, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	if name == match && faulting.Load() {
		return nil, nil, 0, syscall.EIO
	}
	in, fh, fl, errno := n.LoopbackNode.Create(ctx, name, flags, mode, out)
	if errno != 0 {
		return in, fh, fl, errno
	}
	// The new node is not in the tree yet (it has no path): its name is the one created.
	return in, wrap(fh, name == match), fl, 0
}

// wrap makes fh, a handle of a file, fail while faults are on if the file is matched.
func wrap(fh fs.FileHandle, matched bool) fs.FileHandle {
	if lf, ok := fh.(*fs.LoopbackFile); ok && matched {
		return &file{LoopbackFile: lf}
	}
	return fh
}

// file is an open handle of a matched file.
type file struct {
	*fs.LoopbackFile
}

func (f *file) faulty() bool { return faulting.Load() }

// PassthroughFd keeps the kernel from writing the backing file directly, past faultfs.
func (f *file) PassthroughFd() (int, bool) { return 0, false }

func (f *file) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	if f.faulty() {
		return 0, syscall.EIO
	}
	return f.LoopbackFile.Write(ctx, data, off)
}

func (f *file) Fsync(ctx context.Context, flags uint32) syscall.Errno {
	if f.faulty() {
		return syscall.EIO
	}
	return f.LoopbackFile.Fsync(ctx, flags)
}

func (f *file) Allocate(ctx context.Context, off, size uint64, mode uint32) syscall.Errno {
	if f.faulty() {
		return syscall.EIO
	}
	return f.LoopbackFile.Allocate(ctx, off, size, mode)
}

func main() {
	backing := flag.String("backing", "", "the directory to mount again")
	mount := flag.String("mount", "", "where to mount it")
	flag.StringVar(&match, "match", "", "the file name (base name) whose operations fail while faults are on")
	flag.Parse()
	if *backing == "" || *mount == "" || match == "" || filepath.Base(match) != match {
		fmt.Fprintln(os.Stderr, "usage: faultfs -backing DIR -mount DIR -match NAME")
		os.Exit(2)
	}
	root, err := fs.NewLoopbackRoot(*backing)
	if err != nil {
		fmt.Fprintln(os.Stderr, "faultfs:", err)
		os.Exit(1)
	}
	srv, err := fs.Mount(*mount, &node{root.(*fs.LoopbackNode)}, &fs.Options{MountOptions: fuse.MountOptions{FsName: "faultfs", Name: "faultfs", DirectMount: true}})
	if err != nil {
		fmt.Fprintln(os.Stderr, "faultfs: mount:", err)
		os.Exit(1)
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		for s := range sigs {
			switch s {
			case syscall.SIGUSR1:
				faulting.Store(true)
				fmt.Println("faults on")
			case syscall.SIGUSR2:
				faulting.Store(false)
				fmt.Println("faults off")
			default:
				if err := srv.Unmount(); err != nil {
					fmt.Fprintln(os.Stderr, "faultfs: unmount:", err)
				}
				return
			}
		}
	}()
	fmt.Println("ready")
	srv.Wait()
}
