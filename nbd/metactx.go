package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"
	"syscall"

	"fcnbd/internal/blockdev"
)

// Meta contexts besides base:allocation: qemu's dirty bitmaps (qemu docs/interop/nbd.txt), one
// per bitmap the export's device offers (blockdev.DirtyBitmaps).
const (
	qemuNamespace   = "qemu:"
	ctxDirtyPrefix  = "qemu:dirty-bitmap:"
	stateDirty      = 1 << 0 // NBD_STATE_DIRTY of a qemu:dirty-bitmap context
	ctxDirtyFirstID = ctxAllocationID + 1
)

// chooseContexts keeps the meta contexts set for the export entered, name: contexts set for
// another export's name do not carry over.
func (c *conn) chooseContexts(name string) {
	if c.metaExport != name {
		c.metaAlloc, c.metaDirty = false, nil
	}
}

// dirtyNames lists the dirty bitmaps dev offers.
func dirtyNames(dev blockdev.Device) []string {
	if db, ok := dev.(blockdev.DirtyBitmaps); ok {
		return db.DirtyBitmapNames()
	}
	return nil
}

// metaContext answers NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT. The contexts
// are base:allocation and qemu:dirty-bitmap:NAME for every dirty bitmap NAME the export's
// device offers. LIST with no query lists them all; a query of a namespace ("base:", "qemu:")
// or of "qemu:dirty-bitmap:" lists what is in it; SET selects only by full name. Unknown
// queries select nothing, which is not an error. Each context is replied once. SET replaces
// the selection, even when it fails. It returns false if the connection failed.
func (c *conn) metaContext(bw *bufio.Writer, opt uint32, data []byte) bool {
	set := opt == optSetMeta
	if set {
		c.metaAlloc, c.metaDirty, c.metaExport = false, nil, ""
	}
	if !c.structured {
		return c.optReply(bw, opt, repErrInvalid, []byte("meta contexts need structured replies first"))
	}
	// Data: u32 name length, name, u32 query count, count × (u32 length, query).
	if len(data) < 8 {
		return c.optReply(bw, opt, repErrInvalid, []byte("option data too short"))
	}
	nameLen := uint64(binary.BigEndian.Uint32(data))
	if nameLen > uint64(len(data)-8) {
		return c.optReply(bw, opt, repErrInvalid, []byte("name length exceeds option data"))
	}
	name := string(data[4 : 4+nameLen])
	rest := data[4+nameLen:]
	nq := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	var queries []string
	for i := uint32(0); i < nq; i++ {
		if len(rest) < 4 || uint64(binary.BigEndian.Uint32(rest)) > uint64(len(rest)-4) {
			return c.optReply(bw, opt, repErrInvalid, []byte("query count or length does not match option length"))
		}
		ql := binary.BigEndian.Uint32(rest)
		queries = append(queries, string(rest[4:4+ql]))
		rest = rest[4+ql:]
	}
	if len(rest) != 0 {
		return c.optReply(bw, opt, repErrInvalid, []byte("option data longer than its queries"))
	}
	if nameLen > maxString {
		return c.optReply(bw, opt, repErrTooBig, []byte("export name too long"))
	}
	exp, ok := c.lookup(name)
	if !ok {
		return c.optReply(bw, opt, repErrUnknown, fmt.Appendf(nil, "no export named %q", name))
	}
	alloc, dirty := matchContexts(queries, set, dirtyNames(exp.Device))
	if alloc {
		var id [4]byte
		if set {
			// LIST's context IDs are reserved (zero); SET's are what BLOCK_STATUS replies carry.
			binary.BigEndian.PutUint32(id[:], ctxAllocationID)
		}
		c.optReplyBuffered(bw, opt, repMetaContext, id[:], []byte(ctxAllocationName))
	}
	for i, d := range dirty {
		var id [4]byte
		if set {
			binary.BigEndian.PutUint32(id[:], ctxDirtyFirstID+uint32(i))
		}
		c.optReplyBuffered(bw, opt, repMetaContext, id[:], []byte(ctxDirtyPrefix+d))
	}
	if set {
		c.metaAlloc, c.metaDirty, c.metaExport = alloc, dirty, name
	}
	return c.optReply(bw, opt, repAck)
}

// matchContexts returns the contexts queries select among base:allocation and the dirty
// bitmaps names: whether base:allocation is, and the bitmaps' names, each once, in the order
// of the first query that names each. For LIST (set false) no query selects everything and a
// namespace query selects what is in it; SET selects only by full name.
func matchContexts(queries []string, set bool, names []string) (alloc bool, dirty []string) {
	add := func(n string) {
		if !slices.Contains(dirty, n) {
			dirty = append(dirty, n)
		}
	}
	if len(queries) == 0 && !set {
		return true, slices.Clone(names)
	}
	for _, q := range queries {
		switch {
		case q == ctxAllocationName || (!set && q == "base:"):
			alloc = true
		case !set && (q == qemuNamespace || q == ctxDirtyPrefix):
			for _, n := range names {
				add(n)
			}
		case strings.HasPrefix(q, ctxDirtyPrefix):
			if n := q[len(ctxDirtyPrefix):]; slices.Contains(names, n) {
				add(n)
			}
		}
	}
	return alloc, dirty
}

// dirtyStatus is the BLOCK_STATUS chunk of the dirty bitmap selected as context id for
// [off, off+length): at most maxStatusExtents descriptors (one with one), never past the range.
func (c *conn) dirtyStatus(b []byte, flags uint16, cookie, off uint64, length uint32, one bool, id uint32, name string) ([]byte, error) {
	db, ok := c.dev.(blockdev.DirtyBitmaps)
	if !ok {
		return nil, fmt.Errorf("dirty bitmap %q: the device has none: %w", name, syscall.ENOENT)
	}
	exts, err := db.DirtyExtents(name, int64(off), int64(length))
	if err != nil {
		return nil, err
	}
	var n int64
	for _, e := range exts {
		if e.Length <= 0 {
			n = -1
			break
		}
		n += e.Length
	}
	if n <= 0 || n > int64(length) {
		// Correct over precise: what the device could not describe is dirty.
		c.log.Warn().Int64("described", n).Uint32("length", length).Str("bitmap", name).
			Msg("device described a dirty bitmap range wrongly; reported as dirty")
		exts = []blockdev.DirtyExtent{{Length: int64(length), Dirty: true}}
	}
	if one {
		exts = exts[:1]
	}
	exts = exts[:min(len(exts), maxStatusExtents)]
	b = appendChunkHdr(b, flags, chunkBlockStatus, cookie, 4+8*len(exts))
	b = binary.BigEndian.AppendUint32(b, id)
	for _, e := range exts {
		var state uint32
		if e.Dirty {
			state = stateDirty
		}
		b = binary.BigEndian.AppendUint32(b, uint32(e.Length))
		b = binary.BigEndian.AppendUint32(b, state)
	}
	return b, nil
}

// dirtyErrno is the NBD error for a dirty bitmap that could not be described: one the device
// no longer offers (its mapping renamed or deleted since SET_META_CONTEXT) is EINVAL, like a
// request for a context that is not selected.
func dirtyErrno(err error) uint32 {
	if errors.Is(err, syscall.ENOENT) {
		return errInval
	}
	return nbdErrno(blockdev.Errno(err))
}
