package nbd

import "fcnbd/internal/nbdproto"

// Wire constants shared with the other NBD speakers of this module (internal/nbdproto), under
// the names the server's code uses. The rest are in proto.go.
const (
	nbdMagic         = nbdproto.NBDMagic
	optMagic         = nbdproto.OptMagic
	optReplyMagic    = nbdproto.OptReplyMagic
	requestMagic     = nbdproto.RequestMagic
	simpleReplyMagic = nbdproto.SimpleReplyMagic

	// Handshake flags (server) and client flags.
	flagFixedNewstyle = nbdproto.FlagFixedNewstyle
	flagNoZeroes      = nbdproto.FlagNoZeroes

	// Info types.
	infoExport      = nbdproto.InfoExport
	infoName        = nbdproto.InfoName
	infoDescription = nbdproto.InfoDescription
	infoBlockSize   = nbdproto.InfoBlockSize

	// NBD error values.
	errPerm     = nbdproto.EPERM
	errIO       = nbdproto.EIO
	errNoMem    = nbdproto.ENOMEM
	errInval    = nbdproto.EINVAL
	errNoSpc    = nbdproto.ENOSPC
	errOverflow = nbdproto.EOVERFLOW
	errNotSup   = nbdproto.ENOTSUP
	errShutdown = nbdproto.ESHUTDOWN
)
