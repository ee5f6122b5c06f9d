package nbd

import (
	"encoding/binary"
	"syscall"

	"fcnbd/internal/blockdev"
)

// holeProbeMin is the smallest structured READ for which the device is asked where its holes
// are, so that they go out as OFFSET_HOLE chunks and are never read. The question costs a
// store a lseek or two, nothing next to reading this much; for smaller reads it would be a
// noticeable part of the cost, and their holes are read and sent as data.
const holeProbeMin = 256 << 10

// maxStatusExtents caps the descriptors of one BLOCK_STATUS reply (the protocol lets a reply
// describe less than was asked); a client asks again from where it ends.
const maxStatusExtents = 1 << 16

// appendChunkHdr appends a structured reply chunk header.
func appendChunkHdr(b []byte, flags, typ uint16, cookie uint64, length int) []byte {
	b = binary.BigEndian.AppendUint32(b, chunkMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	return binary.BigEndian.AppendUint32(b, uint32(length))
}

// errorChunk is a reply of one final error chunk: ERROR_OFFSET at *at, or ERROR if at is nil.
// Its message is the errno's text.
func errorChunk(cookie uint64, errno uint32, at *uint64) reply {
	msg := syscall.Errno(errno).Error()
	typ, n := uint16(chunkError), 6+len(msg)
	if at != nil {
		typ, n = chunkErrorOffset, n+8
	}
	b := make([]byte, 0, chunkHdrSize+n)
	b = appendChunkHdr(b, chunkFlagDone, typ, cookie, n)
	b = binary.BigEndian.AppendUint32(b, errno)
	b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
	b = append(b, msg...)
	if at != nil {
		b = binary.BigEndian.AppendUint64(b, *at)
	}
	return reply{cookie: cookie, errno: errno, kind: replyChunks, chunks: &[][]byte{b}}
}

// readSparse reads a structured READ that is empty or large enough to ask the device for its
// holes (the others are read by dispatch like a simple READ, into one OFFSET_DATA chunk). buf
// is the reply's from then on (or freed, with its budget, on failure). The reply is one
// OFFSET_DATA chunk, or OFFSET_DATA and OFFSET_HOLE chunks in order of offset, the holes never
// read; a failed read is one ERROR_OFFSET chunk at the part that failed.
func (c *conn) readSparse(cookie, off uint64, buf *[]byte) reply {
	p := *buf
	if len(p) == 0 {
		// Nothing to cover: no data chunk (which carries at least a byte), just the end.
		hdr := appendChunkHdr(nil, chunkFlagDone, chunkNone, cookie, 0)
		return reply{cookie: cookie, kind: replyChunks, data: buf, chunks: &[][]byte{hdr}}
	}
	// Without an answer the whole range is read: data is always a correct reply.
	exts, _ := blockdev.Extents(c.dev, int64(off), int64(len(p)))
	if extentsLen(exts) != int64(len(p)) {
		exts = nil // not the contract: trust none of it
	}
	if len(exts) <= 1 && (len(exts) == 0 || !exts[0].Hole) {
		if err := c.dev.ReadAt(p, int64(off)); err != nil {
			return c.readFailed(cookie, off, buf, err)
		}
		return reply{cookie: cookie, kind: replyData, data: buf, off: off}
	}
	pos := uint64(0)
	for _, e := range exts {
		if !e.Hole {
			if err := c.dev.ReadAt(p[pos:pos+uint64(e.Length)], int64(off+pos)); err != nil {
				return c.readFailed(cookie, off+pos, buf, err)
			}
		}
		pos += uint64(e.Length)
	}
	// Every header is appended before any is sliced, into room enough for all of them.
	hdrs := make([]byte, 0, len(exts)*(readChunkHdrSize+4))
	ends := make([]int, len(exts))
	pos = 0
	for i, e := range exts {
		var flags uint16
		if i == len(exts)-1 {
			flags = chunkFlagDone
		}
		if e.Hole {
			hdrs = appendChunkHdr(hdrs, flags, chunkOffsetHole, cookie, 12)
			hdrs = binary.BigEndian.AppendUint64(hdrs, off+pos)
			hdrs = binary.BigEndian.AppendUint32(hdrs, uint32(e.Length))
		} else {
			hdrs = appendChunkHdr(hdrs, flags, chunkOffsetData, cookie, 8+int(e.Length))
			hdrs = binary.BigEndian.AppendUint64(hdrs, off+pos)
		}
		ends[i] = len(hdrs)
		pos += uint64(e.Length)
	}
	chunks := make([][]byte, 0, 2*len(exts))
	start := 0
	pos = 0
	for i, e := range exts {
		if e.Hole {
			pos += uint64(e.Length)
			continue
		}
		chunks = append(chunks, hdrs[start:ends[i]], p[pos:pos+uint64(e.Length)])
		start = ends[i]
		pos += uint64(e.Length)
	}
	if start < len(hdrs) {
		chunks = append(chunks, hdrs[start:])
	}
	return reply{cookie: cookie, kind: replyChunks, data: buf, chunks: &chunks}
}

// readFailed frees a failed READ's buffer and budget and returns its error chunk at at.
func (c *conn) readFailed(cookie, at uint64, buf *[]byte, err error) reply {
	c.budget.release(int64(len(*buf)))
	putBuf(buf)
	errno := c.result(cookie, "read", err).errno
	return errorChunk(cookie, errno, &at)
}

// blockStatus answers BLOCK_STATUS: one BLOCK_STATUS chunk per selected context,
// base:allocation first (allocStatus), then the dirty bitmaps in the order of their IDs
// (dirtyStatus); the last chunk is flagged DONE. If any context cannot be described, the reply
// is one error chunk instead.
func (c *conn) blockStatus(cookie, off uint64, length uint32, one bool) reply {
	var chunks [][]byte
	last := len(c.metaDirty) - 1
	if c.metaAlloc {
		var flags uint16
		if last < 0 {
			flags = chunkFlagDone
		}
		b, err := c.allocStatus(flags, cookie, off, length, one)
		if err != nil {
			return errorChunk(cookie, c.result(cookie, "block_status", err).errno, nil)
		}
		chunks = append(chunks, b)
	}
	for i, name := range c.metaDirty {
		var flags uint16
		if i == last {
			flags = chunkFlagDone
		}
		b, err := c.dirtyStatus(nil, flags, cookie, off, length, one, ctxDirtyFirstID+uint32(i), name)
		if err != nil {
			errno := dirtyErrno(err)
			c.log.Warn().Err(err).Str("bitmap", name).Uint32("nbd_error", errno).Msg("block status of a dirty bitmap failed")
			return errorChunk(cookie, errno, nil)
		}
		chunks = append(chunks, b)
	}
	return reply{cookie: cookie, kind: replyChunks, chunks: &chunks}
}

// allocStatus is the BLOCK_STATUS chunk of base:allocation: its descriptors cover
// [off, off+length) in order, or less of it (never past it, nor more than maxStatusExtents;
// with one, exactly one descriptor). A hole reads as zeroes, so it is HOLE|ZERO.
func (c *conn) allocStatus(flags uint16, cookie, off uint64, length uint32, one bool) ([]byte, error) {
	exts, err := blockdev.Extents(c.dev, int64(off), int64(length))
	if err != nil {
		return nil, err
	}
	if n := extentsLen(exts); n == 0 || n > int64(length) {
		c.log.Warn().Int64("described", n).Uint32("length", length).
			Msg("device described a range wrongly; reported as data")
		exts = []blockdev.Extent{{Length: int64(length)}}
	}
	if one {
		exts = exts[:min(len(exts), 1)]
	}
	exts = exts[:min(len(exts), maxStatusExtents)]
	b := make([]byte, 0, chunkHdrSize+4+8*len(exts))
	b = appendChunkHdr(b, flags, chunkBlockStatus, cookie, 4+8*len(exts))
	b = binary.BigEndian.AppendUint32(b, ctxAllocationID)
	for _, e := range exts {
		var state uint32
		if e.Hole {
			state = stateHole | stateZero
		}
		b = binary.BigEndian.AppendUint32(b, uint32(e.Length))
		b = binary.BigEndian.AppendUint32(b, state)
	}
	return b, nil
}

// extentsLen is the number of bytes exts describe.
func extentsLen(exts []blockdev.Extent) int64 {
	var n int64
	for _, e := range exts {
		if e.Length <= 0 {
			return -1
		}
		n += e.Length
	}
	return n
}
