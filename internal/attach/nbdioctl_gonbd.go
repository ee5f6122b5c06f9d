//go:build linux && (amd64 || cgo)

package attach

import (
	nbdclient "github.com/pojntfx/go-nbd/pkg/client"
	"github.com/pojntfx/go-nbd/pkg/ioctl"
)

// The kernel NBD ioctls, from go-nbd (which defines them for amd64, or through cgo from
// linux/nbd.h); nbdioctl_other.go has them for the other builds.
const (
	ioctlSetSock       = ioctl.NEGOTIATION_IOCTL_SET_SOCK
	ioctlSetBlksize    = ioctl.NEGOTIATION_IOCTL_SET_BLOCKSIZE
	ioctlSetSizeBlocks = ioctl.NEGOTIATION_IOCTL_SET_SIZE_BLOCKS
	ioctlDoIt          = ioctl.NEGOTIATION_IOCTL_DO_IT
	ioctlClearSock     = ioctl.TRANSMISSION_IOCTL_CLEAR_SOCK
)

// disconnectDevice asks the kernel to disconnect the NBD device open as f (NBD_CLEAR_QUE,
// NBD_DISCONNECT, NBD_CLEAR_SOCK), with go-nbd's client.Disconnect.
var disconnectDevice = nbdclient.Disconnect
