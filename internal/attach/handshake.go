package attach

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"

	"fcnbd/internal/nbdproto"
)

// Wire constants of the handshake not in internal/nbdproto.
const (
	hsRepErrPolicy    = nbdproto.RepFlagError + 2 // NBD_REP_ERR_POLICY
	hsRepErrTLSReqd   = nbdproto.RepFlagError + 5 // NBD_REP_ERR_TLS_REQD
	hsFlagReadOnly    = 1 << 1                    // NBD_FLAG_READ_ONLY
	hsMaxReplyPayload = 64 << 10                  // the most option reply data read
)

// exportInfo is what NBD_OPT_GO told about an export.
type exportInfo struct {
	Size  uint64
	Flags uint16 // transmission flags, as the kernel's NBD_SET_FLAGS takes them
	// Block size constraints (NBD_INFO_BLOCK_SIZE); zero if the server sent none.
	MinBlock, PrefBlock, MaxBlock uint32
}

// errNoExport is wrapped by handshake when the server has no export of that name.
var errNoExport = errors.New("no such export")

// handshake runs the fixed newstyle negotiation on nc and enters the transmission phase of
// export with NBD_OPT_GO, asking for block sizes. It reads exactly the handshake's bytes, so that
// nc can then be handed to the kernel. Structured replies are not negotiated: the kernel's NBD
// driver speaks simple replies only.
func handshake(nc net.Conn, export string) (exportInfo, error) {
	var hello [18]byte
	if _, err := io.ReadFull(nc, hello[:]); err != nil {
		return exportInfo{}, fmt.Errorf("read the server's greeting: %w", err)
	}
	if binary.BigEndian.Uint64(hello[0:]) != nbdproto.NBDMagic {
		return exportInfo{}, errors.New("not an NBD server (bad greeting magic)")
	}
	if binary.BigEndian.Uint64(hello[8:]) != nbdproto.OptMagic {
		return exportInfo{}, errors.New("the server speaks oldstyle NBD, not newstyle")
	}
	hflags := binary.BigEndian.Uint16(hello[16:])
	if hflags&nbdproto.FlagFixedNewstyle == 0 {
		return exportInfo{}, errors.New("the server does not speak fixed newstyle NBD (NBD_OPT_GO)")
	}
	cflags := uint32(nbdproto.FlagFixedNewstyle)
	if hflags&nbdproto.FlagNoZeroes != 0 {
		cflags |= nbdproto.FlagNoZeroes
	}
	if len(export) > 4096 {
		return exportInfo{}, fmt.Errorf("export name of %d bytes (at most 4096)", len(export))
	}
	data := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	data = append(data, export...)
	data = binary.BigEndian.AppendUint16(data, 1) // one information request:
	data = binary.BigEndian.AppendUint16(data, nbdproto.InfoBlockSize)
	msg := binary.BigEndian.AppendUint32(nil, cflags)
	msg = binary.BigEndian.AppendUint64(msg, nbdproto.OptMagic)
	msg = binary.BigEndian.AppendUint32(msg, nbdproto.OptGo)
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(data)))
	msg = append(msg, data...)
	if _, err := nc.Write(msg); err != nil {
		return exportInfo{}, fmt.Errorf("send NBD_OPT_GO: %w", err)
	}

	var info exportInfo
	gotExport := false
	for {
		var h [20]byte
		if _, err := io.ReadFull(nc, h[:]); err != nil {
			return exportInfo{}, fmt.Errorf("read the reply to NBD_OPT_GO: %w", err)
		}
		if binary.BigEndian.Uint64(h[0:]) != nbdproto.OptReplyMagic {
			return exportInfo{}, errors.New("bad option reply magic")
		}
		if opt := binary.BigEndian.Uint32(h[8:]); opt != nbdproto.OptGo {
			return exportInfo{}, fmt.Errorf("option reply for option %d, want NBD_OPT_GO", opt)
		}
		typ := binary.BigEndian.Uint32(h[12:])
		n := binary.BigEndian.Uint32(h[16:])
		if n > hsMaxReplyPayload {
			return exportInfo{}, fmt.Errorf("option reply of %d bytes", n)
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(nc, body); err != nil {
			return exportInfo{}, fmt.Errorf("read the reply to NBD_OPT_GO: %w", err)
		}
		switch {
		case typ == nbdproto.RepAck:
			if !gotExport {
				return exportInfo{}, errors.New("the server acknowledged NBD_OPT_GO without NBD_INFO_EXPORT")
			}
			return info, nil
		case typ == nbdproto.RepInfo:
			if len(body) < 2 {
				return exportInfo{}, errors.New("NBD_REP_INFO without a type")
			}
			switch binary.BigEndian.Uint16(body) {
			case nbdproto.InfoExport:
				if len(body) != 12 {
					return exportInfo{}, fmt.Errorf("NBD_INFO_EXPORT of %d bytes", len(body))
				}
				info.Size = binary.BigEndian.Uint64(body[2:])
				info.Flags = binary.BigEndian.Uint16(body[10:])
				gotExport = true
			case nbdproto.InfoBlockSize:
				if len(body) != 14 {
					return exportInfo{}, fmt.Errorf("NBD_INFO_BLOCK_SIZE of %d bytes", len(body))
				}
				info.MinBlock = binary.BigEndian.Uint32(body[2:])
				info.PrefBlock = binary.BigEndian.Uint32(body[6:])
				info.MaxBlock = binary.BigEndian.Uint32(body[10:])
			}
			// Other information (name, description) is of no use to the kernel.
		case typ&nbdproto.RepFlagError != 0:
			msg := string(body)
			if msg == "" {
				msg = repErrName(typ)
			}
			if typ == nbdproto.RepErrUnknown {
				return exportInfo{}, fmt.Errorf("%w: %q (server: %s)", errNoExport, export, msg)
			}
			return exportInfo{}, fmt.Errorf("the server refused NBD_OPT_GO for %q: %s (%s)", export, msg, repErrName(typ))
		default:
			return exportInfo{}, fmt.Errorf("unexpected option reply type %#x", typ)
		}
	}
}

func repErrName(typ uint32) string {
	switch typ {
	case nbdproto.RepErrUnsup:
		return "NBD_REP_ERR_UNSUP"
	case hsRepErrPolicy:
		return "NBD_REP_ERR_POLICY"
	case nbdproto.RepErrInvalid:
		return "NBD_REP_ERR_INVALID"
	case hsRepErrTLSReqd:
		return "NBD_REP_ERR_TLS_REQD"
	case nbdproto.RepErrUnknown:
		return "NBD_REP_ERR_UNKNOWN"
	case nbdproto.RepErrShutdown:
		return "NBD_REP_ERR_SHUTDOWN"
	}
	return fmt.Sprintf("error %#x", typ)
}

// kernelBlockSize picks the block size for the kernel driver (a power of two from 512 to 4096,
// NBD_SET_BLKSIZE's range): the server's preferred size, within its minimum, and dividing the
// export's size so that NBD_SET_SIZE_BLOCKS loses nothing.
func kernelBlockSize(info exportInfo) (uint32, error) {
	for _, bs := range []uint32{4096, 2048, 1024, 512} {
		if info.PrefBlock != 0 && bs > info.PrefBlock && bs > 512 {
			continue
		}
		if info.MinBlock > bs || (info.MaxBlock != 0 && info.MaxBlock < bs) {
			continue
		}
		if info.Size%uint64(bs) == 0 {
			return bs, nil
		}
	}
	return 0, fmt.Errorf("the export's size (%d bytes) and block sizes (minimum %d, preferred %d) suit no kernel block size (512 to 4096, dividing the size)",
		info.Size, info.MinBlock, info.PrefBlock)
}
