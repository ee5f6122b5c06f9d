package nbd

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
)

// negotiate runs the fixed newstyle handshake. It returns the export chosen by EXPORT_NAME or
// GO, or ok=false when the session ends here (abort, unknown export on EXPORT_NAME, a protocol
// violation, or an I/O error); the caller then closes the connection.
func (c *conn) negotiate() (exp Export, ok bool) {
	bw := bufio.NewWriterSize(c.nc, 4096)
	var b [18]byte
	binary.BigEndian.PutUint64(b[0:], nbdMagic)
	binary.BigEndian.PutUint64(b[8:], optMagic)
	binary.BigEndian.PutUint16(b[16:], flagFixedNewstyle|flagNoZeroes)
	bw.Write(b[:18])
	if err := bw.Flush(); err != nil {
		c.log.Debug().Err(err).Msg("handshake: write failed")
		return Export{}, false
	}

	if _, err := io.ReadFull(c.br, b[:4]); err != nil {
		c.log.Debug().Err(err).Msg("handshake: no client flags")
		return Export{}, false
	}
	clientFlags := binary.BigEndian.Uint32(b[:4])
	if clientFlags&flagFixedNewstyle == 0 || clientFlags&^(flagFixedNewstyle|flagNoZeroes) != 0 {
		c.log.Warn().Uint32("client_flags", clientFlags).
			Msg("protocol violation: client flags not fixed newstyle or unknown; closing")
		return Export{}, false
	}
	noZeroes := clientFlags&flagNoZeroes != 0

	for {
		var hdr [16]byte
		if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
			c.log.Debug().Err(err).Msg("handshake: client went away")
			return Export{}, false
		}
		if m := binary.BigEndian.Uint64(hdr[0:]); m != optMagic {
			c.log.Warn().Uint64("magic", m).Msg("protocol violation: bad option magic; closing")
			return Export{}, false
		}
		opt := binary.BigEndian.Uint32(hdr[8:])
		n := binary.BigEndian.Uint32(hdr[12:])

		if n > maxOptionLen {
			if n > maxOptionDiscard || opt == optExportName {
				// EXPORT_NAME cannot be answered with an error; an absurd length is not NBD.
				c.log.Warn().Uint32("option", opt).Uint32("length", n).
					Msg("protocol violation: option data too long; closing")
				return Export{}, false
			}
			if _, err := c.br.Discard(int(n)); err != nil {
				return Export{}, false
			}
			if !c.optReply(bw, opt, repErrTooBig, []byte("option data too long")) {
				return Export{}, false
			}
			continue
		}
		data := c.optBuf[:n]
		if _, err := io.ReadFull(c.br, data); err != nil {
			c.log.Debug().Err(err).Msg("handshake: option data truncated")
			return Export{}, false
		}

		if handled, ok := c.refuseBeforeTLS(bw, opt); handled {
			if !ok {
				return Export{}, false
			}
			continue
		}
		switch opt {
		case optStartTLS:
			if !c.startTLS(&bw, n) {
				return Export{}, false
			}

		case optExportName:
			exp, found := c.lookup(string(data))
			if !found {
				c.log.Debug().Str("export", string(data)).Msg("EXPORT_NAME: unknown export; closing")
				return Export{}, false
			}
			c.chooseContexts(exp.Name)
			var r [10 + 124]byte
			binary.BigEndian.PutUint64(r[0:], uint64(exp.Device.Size()))
			binary.BigEndian.PutUint16(r[8:], exportFlags(exp.Device))
			reply := r[:]
			if noZeroes {
				reply = r[:10]
			}
			bw.Write(reply)
			if err := bw.Flush(); err != nil {
				return Export{}, false
			}
			return exp, true

		case optAbort:
			c.optReply(bw, opt, repAck, nil)
			c.log.Debug().Msg("client aborted negotiation")
			return Export{}, false

		case optList:
			if n != 0 {
				if !c.optReply(bw, opt, repErrInvalid, []byte("LIST takes no data")) {
					return Export{}, false
				}
				continue
			}
			if !c.list(bw) {
				return Export{}, false
			}

		case optInfo, optGo:
			exp, found, replied := c.info(bw, opt, data)
			if !replied {
				return Export{}, false
			}
			if found && opt == optGo {
				c.chooseContexts(exp.Name)
				return exp, true
			}

		case optStructured:
			if n != 0 {
				if !c.optReply(bw, opt, repErrInvalid, []byte("STRUCTURED_REPLY takes no data")) {
					return Export{}, false
				}
				continue
			}
			c.structured = true
			if !c.optReply(bw, opt, repAck) {
				return Export{}, false
			}

		case optListMeta, optSetMeta:
			if !c.metaContext(bw, opt, data) {
				return Export{}, false
			}

		default:
			if !c.optReply(bw, opt, repErrUnsup, nil) {
				return Export{}, false
			}
		}
	}
}

// lookup returns a usable export called name.
func (c *conn) lookup(name string) (Export, bool) {
	exp, ok := c.s.lookup(c.client, name)
	if !ok || exp.Device == nil {
		return Export{}, false
	}
	return exp, true
}

// optReply sends one option reply and flushes it, reporting whether that worked.
func (c *conn) optReply(bw *bufio.Writer, opt, typ uint32, data ...[]byte) bool {
	c.optReplyBuffered(bw, opt, typ, data...)
	if err := bw.Flush(); err != nil {
		c.log.Debug().Err(err).Msg("handshake: write failed")
		return false
	}
	return true
}

// optReplyBuffered queues one option reply whose data is the concatenation of data.
func (c *conn) optReplyBuffered(bw *bufio.Writer, opt, typ uint32, data ...[]byte) {
	var n int
	for _, d := range data {
		n += len(d)
	}
	var h [20]byte
	binary.BigEndian.PutUint64(h[0:], optReplyMagic)
	binary.BigEndian.PutUint32(h[8:], opt)
	binary.BigEndian.PutUint32(h[12:], typ)
	binary.BigEndian.PutUint32(h[16:], uint32(n))
	bw.Write(h[:])
	for _, d := range data {
		bw.Write(d)
	}
}

// list answers NBD_OPT_LIST: one NBD_REP_SERVER per export (name, then description), then ACK.
func (c *conn) list(bw *bufio.Writer) bool {
	for _, e := range c.s.list(c.client) {
		name, desc := truncString(e.Name), truncString(e.Description)
		var l [4]byte
		binary.BigEndian.PutUint32(l[:], uint32(len(name)))
		c.optReplyBuffered(bw, optList, repServer, l[:], []byte(name), []byte(desc))
	}
	return c.optReply(bw, optList, repAck)
}

// info answers NBD_OPT_INFO and NBD_OPT_GO. found reports that the export exists and its
// information was sent and acknowledged; replied is false if the connection failed.
func (c *conn) info(bw *bufio.Writer, opt uint32, data []byte) (exp Export, found, replied bool) {
	// Data: u32 name length, name, u16 count of info requests, count × u16.
	if len(data) < 6 {
		return Export{}, false, c.optReply(bw, opt, repErrInvalid, []byte("option data too short"))
	}
	nameLen := uint64(binary.BigEndian.Uint32(data))
	if nameLen > uint64(len(data)-6) {
		return Export{}, false, c.optReply(bw, opt, repErrInvalid, []byte("name length exceeds option data"))
	}
	name := data[4 : 4+nameLen]
	rest := data[4+nameLen:]
	nreq := int(binary.BigEndian.Uint16(rest))
	reqs := rest[2:]
	if len(reqs) != 2*nreq {
		return Export{}, false, c.optReply(bw, opt, repErrInvalid, []byte("info request count does not match option length"))
	}
	if nameLen > maxString {
		return Export{}, false, c.optReply(bw, opt, repErrTooBig, []byte("export name too long"))
	}
	exp, ok := c.lookup(string(name))
	if !ok {
		return Export{}, false, c.optReply(bw, opt, repErrUnknown, fmt.Appendf(nil, "no export named %q", name))
	}

	var wantName, wantDesc bool
	for i := 0; i < nreq; i++ {
		switch binary.BigEndian.Uint16(reqs[2*i:]) {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		}
	}

	var b [14]byte
	binary.BigEndian.PutUint16(b[0:], infoExport)
	binary.BigEndian.PutUint64(b[2:], uint64(exp.Device.Size()))
	binary.BigEndian.PutUint16(b[10:], exportFlags(exp.Device))
	c.optReplyBuffered(bw, opt, repInfo, b[:12])
	if wantName {
		binary.BigEndian.PutUint16(b[0:], infoName)
		c.optReplyBuffered(bw, opt, repInfo, b[:2], []byte(truncString(exp.Name)))
	}
	if wantDesc && exp.Description != "" {
		binary.BigEndian.PutUint16(b[0:], infoDescription)
		c.optReplyBuffered(bw, opt, repInfo, b[:2], []byte(truncString(exp.Description)))
	}
	// Block sizes are sent whether or not requested: any alignment is accepted, so a client
	// that ignores them loses nothing.
	binary.BigEndian.PutUint16(b[0:], infoBlockSize)
	binary.BigEndian.PutUint32(b[2:], 1)
	binary.BigEndian.PutUint32(b[6:], PreferredBlockSize)
	binary.BigEndian.PutUint32(b[10:], MaxPayload)
	c.optReplyBuffered(bw, opt, repInfo, b[:14])
	return exp, true, c.optReply(bw, opt, repAck)
}

// truncString cuts s to the protocol's maximum string length.
func truncString(s string) string {
	if len(s) > maxString {
		return s[:maxString]
	}
	return s
}
