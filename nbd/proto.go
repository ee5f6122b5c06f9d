package nbd

import (
	"syscall"

	"fcnbd/internal/blockdev"
)

// Wire constants of the NBD protocol (fixed newstyle, simple and structured replies, block
// status), as named in the NetworkBlockDevice/nbd proto.md.
const (
	chunkMagic = 0x668e33ef // NBD_STRUCTURED_REPLY_MAGIC

	// Options.
	optExportName = 1
	optAbort      = 2
	optList       = 3
	optStartTLS   = 5 // NBD_OPT_STARTTLS
	optInfo       = 6
	optGo         = 7
	optStructured = 8  // NBD_OPT_STRUCTURED_REPLY
	optListMeta   = 9  // NBD_OPT_LIST_META_CONTEXT
	optSetMeta    = 10 // NBD_OPT_SET_META_CONTEXT

	// Option reply types.
	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repMetaContext = 4
	repErrUnsup    = 1<<31 + 1
	repErrPolicy   = 1<<31 + 2
	repErrInvalid  = 1<<31 + 3
	repErrTLSReqd  = 1<<31 + 5
	repErrUnknown  = 1<<31 + 6
	repErrShutdown = 1<<31 + 7
	repErrTooBig   = 1<<31 + 9

	// Transmission flags.
	tflagHasFlags        = 1 << 0
	tflagSendFlush       = 1 << 2
	tflagSendFUA         = 1 << 3
	tflagSendTrim        = 1 << 5
	tflagSendWriteZeroes = 1 << 6
	tflagCanMultiConn    = 1 << 8
	tflagSendCache       = 1 << 10 // NBD_FLAG_SEND_CACHE: the device is a blockdev.Prefetcher
	tflagSendFastZero    = 1 << 11 // NBD_FLAG_SEND_FAST_ZERO: the device is a blockdev.FastZeroer

	// transmissionFlags is exactly what the server implements for every device; exportFlags
	// adds what depends on the device.
	transmissionFlags = tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim |
		tflagSendWriteZeroes | tflagCanMultiConn

	// Commands.
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdCache       = 5
	cmdWriteZeroes = 6
	cmdBlockStatus = 7

	// Command flags.
	cmdFlagFUA      = 1 << 0
	cmdFlagNoHole   = 1 << 1
	cmdFlagReqOne   = 1 << 3
	cmdFlagFastZero = 1 << 4

	// Structured reply chunks: flags and types.
	chunkFlagDone     = 1 << 0
	chunkNone         = 0
	chunkOffsetData   = 1
	chunkOffsetHole   = 2
	chunkBlockStatus  = 5
	chunkError        = 1<<15 + 1
	chunkErrorOffset  = 1<<15 + 2
	chunkHdrSize      = 20 // bytes of a structured reply chunk header
	readChunkHdrSize  = chunkHdrSize + 8
	ctxAllocationName = "base:allocation"
	ctxAllocationID   = 1      // the context ID of base:allocation on every connection
	stateHole         = 1 << 0 // NBD_STATE_HOLE
	stateZero         = 1 << 1 // NBD_STATE_ZERO

	requestSize  = 28 // bytes of a request header
	replyHdrSize = 16 // bytes of a simple reply header
)

// exportFlags is the transmission flags of an export of dev: CACHE and FAST_ZERO are
// advertised only for devices that implement them.
func exportFlags(dev blockdev.Device) uint16 {
	f := uint16(transmissionFlags)
	if _, ok := dev.(blockdev.Prefetcher); ok {
		f |= tflagSendCache
	}
	if _, ok := dev.(blockdev.FastZeroer); ok {
		f |= tflagSendFastZero
	}
	return f
}

// Limits.
const (
	// MaxPayload is the largest READ or WRITE accepted, advertised as the maximum block size.
	MaxPayload = 32 << 20
	// PreferredBlockSize is advertised as the preferred block size.
	PreferredBlockSize = 4096

	// maxString is the protocol's limit on names and other strings.
	maxString = 4096
	// maxOptionLen caps option data read into memory: an INFO/GO with a maximal name and a
	// generous list of info requests fits.
	maxOptionLen = 8192
	// maxOptionDiscard is the most option data skipped to answer NBD_REP_ERR_TOO_BIG; a
	// client announcing more is not speaking NBD and is disconnected.
	maxOptionDiscard = 1 << 20
)

// nbdErrno maps an errno to its NBD error value: the ones the protocol names pass through,
// every other one becomes EIO.
func nbdErrno(e syscall.Errno) uint32 {
	switch e {
	case syscall.EPERM:
		return errPerm
	case syscall.EIO:
		return errIO
	case syscall.ENOMEM:
		return errNoMem
	case syscall.EINVAL:
		return errInval
	case syscall.ENOSPC:
		return errNoSpc
	case syscall.EOVERFLOW:
		return errOverflow
	case syscall.ENOTSUP:
		return errNotSup
	case syscall.ESHUTDOWN:
		return errShutdown
	}
	return errIO
}
