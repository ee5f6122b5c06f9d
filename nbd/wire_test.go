package nbd

import (
	"testing"

	"fcnbd/internal/nbdproto"
)

// TestWireConstantsAgree: the constants proto.go still defines itself (options, replies,
// transmission flags, commands, command flags, header sizes) have the values of
// internal/nbdproto, which the client and the kernel attach speak.
func TestWireConstantsAgree(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want uint64
	}{
		{"optExportName", optExportName, nbdproto.OptExportName},
		{"optAbort", optAbort, nbdproto.OptAbort},
		{"optList", optList, nbdproto.OptList},
		{"optInfo", optInfo, nbdproto.OptInfo},
		{"optGo", optGo, nbdproto.OptGo},
		{"optStructured", optStructured, nbdproto.OptStructuredReply},
		{"optListMeta", optListMeta, nbdproto.OptListMetaContext},
		{"optSetMeta", optSetMeta, nbdproto.OptSetMetaContext},
		{"repAck", repAck, nbdproto.RepAck},
		{"repServer", repServer, nbdproto.RepServer},
		{"repInfo", repInfo, nbdproto.RepInfo},
		{"repMetaContext", repMetaContext, nbdproto.RepMetaContext},
		{"repErrUnsup", repErrUnsup, nbdproto.RepErrUnsup},
		{"repErrInvalid", repErrInvalid, nbdproto.RepErrInvalid},
		{"repErrUnknown", repErrUnknown, nbdproto.RepErrUnknown},
		{"repErrShutdown", repErrShutdown, nbdproto.RepErrShutdown},
		{"repErrTooBig", repErrTooBig, nbdproto.RepErrTooBig},
		{"tflagHasFlags", tflagHasFlags, nbdproto.FlagHasFlags},
		{"tflagSendFlush", tflagSendFlush, nbdproto.FlagSendFlush},
		{"tflagSendFUA", tflagSendFUA, nbdproto.FlagSendFUA},
		{"tflagSendTrim", tflagSendTrim, nbdproto.FlagSendTrim},
		{"tflagSendWriteZeroes", tflagSendWriteZeroes, nbdproto.FlagSendWriteZeroes},
		{"tflagCanMultiConn", tflagCanMultiConn, nbdproto.FlagCanMultiConn},
		{"cmdRead", cmdRead, nbdproto.CmdRead},
		{"cmdWrite", cmdWrite, nbdproto.CmdWrite},
		{"cmdDisc", cmdDisc, nbdproto.CmdDisc},
		{"cmdFlush", cmdFlush, nbdproto.CmdFlush},
		{"cmdTrim", cmdTrim, nbdproto.CmdTrim},
		{"cmdWriteZeroes", cmdWriteZeroes, nbdproto.CmdWriteZeroes},
		{"cmdBlockStatus", cmdBlockStatus, nbdproto.CmdBlockStatus},
		{"cmdFlagFUA", cmdFlagFUA, nbdproto.CmdFlagFUA},
		{"cmdFlagNoHole", cmdFlagNoHole, nbdproto.CmdFlagNoHole},
		{"cmdFlagReqOne", cmdFlagReqOne, nbdproto.CmdFlagReqOne},
		{"requestSize", requestSize, nbdproto.RequestSize},
		{"replyHdrSize", replyHdrSize, nbdproto.SimpleReplySize},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, internal/nbdproto has %#x", c.name, c.got, c.want)
		}
	}
}
