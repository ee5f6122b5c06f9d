// Package nbdproto holds the NBD protocol's wire constants that more than one package speaks:
// the server (nbd), the test client (internal/nbdclient) and the kernel attach handshake
// (internal/attach). Names follow NetworkBlockDevice/nbd doc/proto.md without the NBD_ prefix.
// Only constants: what a side does with them stays in its package.
package nbdproto

// Magic numbers.
const (
	NBDMagic         = 0x4e42444d41474943 // "NBDMAGIC", the greeting
	OptMagic         = 0x49484156454f5054 // "IHAVEOPT", the newstyle greeting and every option
	OptReplyMagic    = 0x0003e889045565a9 // option replies
	RequestMagic     = 0x25609513         // NBD_REQUEST_MAGIC
	SimpleReplyMagic = 0x67446698         // NBD_SIMPLE_REPLY_MAGIC
)

// Handshake flags (server) and client flags.
const (
	FlagFixedNewstyle = 1 << 0
	FlagNoZeroes      = 1 << 1
)

// Options.
const (
	OptExportName      = 1
	OptAbort           = 2
	OptList            = 3
	OptInfo            = 6
	OptGo              = 7
	OptStructuredReply = 8
	OptListMetaContext = 9
	OptSetMetaContext  = 10
)

// Option reply types. Error replies have RepFlagError set.
const (
	RepAck         = 1
	RepServer      = 2
	RepInfo        = 3
	RepMetaContext = 4
	RepFlagError   = 1 << 31
	RepErrUnsup    = RepFlagError + 1
	RepErrInvalid  = RepFlagError + 3
	RepErrUnknown  = RepFlagError + 6
	RepErrShutdown = RepFlagError + 7
	RepErrTooBig   = RepFlagError + 9
)

// Information types (NBD_INFO_*) of NBD_OPT_INFO and NBD_OPT_GO.
const (
	InfoExport      = 0
	InfoName        = 1
	InfoDescription = 2
	InfoBlockSize   = 3
)

// Transmission flags.
const (
	FlagHasFlags        = 1 << 0
	FlagSendFlush       = 1 << 2
	FlagSendFUA         = 1 << 3
	FlagSendTrim        = 1 << 5
	FlagSendWriteZeroes = 1 << 6
	FlagCanMultiConn    = 1 << 8
)

// Commands (request types).
const (
	CmdRead        = 0
	CmdWrite       = 1
	CmdDisc        = 2
	CmdFlush       = 3
	CmdTrim        = 4
	CmdWriteZeroes = 6
	CmdBlockStatus = 7
)

// Command flags.
const (
	CmdFlagFUA    = 1 << 0
	CmdFlagNoHole = 1 << 1
	CmdFlagReqOne = 1 << 3
)

// NBD error values (errno numbers as the protocol fixes them, whatever the platform's are).
const (
	EPERM     = 1
	EIO       = 5
	ENOMEM    = 12
	EINVAL    = 22
	ENOSPC    = 28
	EOVERFLOW = 75
	ENOTSUP   = 95
	ESHUTDOWN = 108
)

// Sizes.
const (
	RequestSize     = 28 // bytes of a request header
	SimpleReplySize = 16 // bytes of a simple reply header
)
