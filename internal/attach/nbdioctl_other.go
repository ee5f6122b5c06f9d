//go:build !(linux && (amd64 || cgo))

package attach

import (
	"os"
)

// The kernel NBD ioctls (_IO(0xab, n), linux/nbd.h) where go-nbd defines none: a build without
// cgo on another architecture than amd64. The generic _IO encoding (asm-generic/ioctl.h:
// arm64, riscv64, 386, ...).
const (
	ioctlSetSock       = 0xab00
	ioctlSetBlksize    = 0xab01
	ioctlSetSizeBlocks = 0xab07
	ioctlDoIt          = 0xab03
	ioctlClearSock     = 0xab04
	ioctlClearQue      = 0xab05
	ioctlDisconnect    = 0xab08
)

// disconnectDevice is go-nbd's client.Disconnect: NBD_CLEAR_QUE, NBD_DISCONNECT,
// NBD_CLEAR_SOCK.
func disconnectDevice(f *os.File) error {
	for _, req := range []uintptr{ioctlClearQue, ioctlDisconnect, ioctlClearSock} {
		if err := ioctlArg(f, req, 0); err != nil {
			return err
		}
	}
	return nil
}
