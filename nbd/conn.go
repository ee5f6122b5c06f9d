package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"fcnbd/internal/blockdev"
)

// readBufferSize is the bufio.Reader size on a connection: many small requests per read
// syscall, while payloads at least this large are read straight into their buffers.
const readBufferSize = 64 << 10

// inlineWriteMin is the size from which a WRITE without FUA runs on the reader itself, between
// reading its payload and reading the next request, instead of on a goroutine of its own. For
// such a write the payload's copy is most of the cost: run where it was received, the copy reads
// it from that core's cache, and there is no hand-off to another thread to pay (each one a
// wake-up, and on a VM an interrupt between virtual CPUs). The reader stops reading meanwhile,
// which costs a large write nothing: the client's socket buffer holds only a part of the next
// payload anyway. Smaller writes, which wait for cache memory more than they copy, and FUA
// writes, which wait for the disk, keep their own goroutines.
const inlineWriteMin = 256 << 10

// unixSendBuffer is the send buffer of a Unix-socket connection. On a Unix socket the
// sender's buffer is all there is between the two ends, and its default (net.core.wmem_default,
// 208 KiB) made a 1 MiB READ reply go out in five bursts, each waiting for the client to drain
// the one before. With 4 MiB (which the kernel doubles for its bookkeeping) a 1 MiB reply is
// queued whole by one writev. TCP keeps its autotuning, which setting a size would switch off.
const unixSendBuffer = 4 << 20

// setSendBuffer sets uc's send buffer to n bytes: beyond net.core.wmem_max where the process
// may (SO_SNDBUFFORCE, with CAP_NET_ADMIN), else as far as wmem_max allows.
func setSendBuffer(uc *net.UnixConn, n int) error {
	rc, err := uc.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, n)
		if serr != nil {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF, n)
		}
	}); err != nil {
		return err
	}
	return serr
}

// conn is one client connection: negotiation, then a reader (the serve goroutine) and request
// goroutines bounded by slots, each of which sends its own reply (see reply).
type conn struct {
	s      *Server
	nc     net.Conn
	rc     syscall.RawConn // nc's descriptor, for writes that must not wait; nil if it has none
	br     *bufio.Reader
	log    zerolog.Logger
	optBuf [maxOptionLen]byte
	client Client  // who the peer is, for Exports that filter
	tls    connTLS // NBD_OPT_STARTTLS policy and state

	mu       sync.Mutex
	stopping bool // Shutdown asked: reads fail from now on

	// Negotiated, then read-only during transmission.
	structured bool   // NBD_OPT_STRUCTURED_REPLY: READ replies are structured
	metaAlloc  bool   // base:allocation is selected for metaExport
	metaExport string // the export name of the last NBD_OPT_SET_META_CONTEXT

	// The dirty bitmaps selected for metaExport (metactx.go); context IDs from ctxDirtyFirstID.
	metaDirty []string

	// Transmission phase.
	dev      blockdev.Device
	size     uint64
	flags    uint16        // the transmission flags advertised for dev
	slots    chan struct{} // one token per request between header read and reply written
	budget   byteBudget    // payload bytes held by READ and WRITE buffers
	inflight sync.WaitGroup

	// Replies waiting to be written, and whether a goroutine is writing (it takes them).
	wmu     sync.Mutex
	queue   []reply
	writing bool
	// w is the writer's scratch space, used only by the goroutine that set writing.
	w replyWriter
	// running counts requests started whose reply is not queued yet.
	running atomic.Int32

	// failed is set once a reply could not be written: the client is gone, so requests not
	// yet started are dropped and replies are discarded.
	failed atomic.Bool
}

// reply is a reply waiting to be written: a simple reply, a structured READ reply of one
// OFFSET_DATA chunk, or structured chunks encoded by the request.
type reply struct {
	cookie uint64
	errno  uint32
	kind   replyKind
	data   *[]byte   // READ payload (pooled), nil for none
	off    uint64    // replyData: the offset of data
	chunks *[][]byte // replyChunks: the whole reply, headers included (data's parts among them)
}

type replyKind uint8

const (
	replySimple replyKind = iota
	replyData             // one OFFSET_DATA chunk carrying all of data, flagged DONE
	replyChunks
)

func newConn(s *Server, nc net.Conn) *conn {
	c := &conn{
		s:   s,
		nc:  nc,
		br:  bufio.NewReaderSize(nc, readBufferSize),
		log: s.log.With().Str("remote", nc.RemoteAddr().String()).Logger(),
	}
	c.client = clientOf(nc)
	c.tls.mode = s.opts.TLSMode
	if c.client.Network == "unix" {
		c.tls.mode = min(c.tls.mode, TLSOn)
	}
	if sc, ok := nc.(syscall.Conn); ok {
		c.rc, _ = sc.SyscallConn()
	}
	return c
}

// stop makes the connection's reads fail, so its reader ends after the requests it already
// has; replies still go out.
func (c *conn) stop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stopping = true
	c.nc.SetReadDeadline(time.Unix(1, 0))
}

// setDeadlines sets the read and write deadlines, except that a stopped connection's reads
// stay failed.
func (c *conn) setDeadlines(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.nc.SetWriteDeadline(t)
	if !c.stopping {
		c.nc.SetReadDeadline(t)
	}
}

func (c *conn) isStopping() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stopping
}

func (c *conn) serve() {
	defer func() { c.nc.Close() }() // the TLS conn after STARTTLS: it sends close_notify
	switch nc := c.nc.(type) {
	case *net.TCPConn:
		nc.SetNoDelay(true)
	case *net.UnixConn:
		if err := setSendBuffer(nc, c.s.opts.unixSendBuffer); err != nil {
			c.log.Debug().Err(err).Msg("could not enlarge the send buffer")
		}
	}
	c.log.Debug().Msg("connected")

	c.setDeadlines(time.Now().Add(c.s.opts.HandshakeTimeout))
	exp, ok := c.negotiate()
	if !ok {
		c.log.Debug().Msg("disconnected during negotiation")
		return
	}
	c.setDeadlines(time.Time{})
	c.log = c.log.With().Str("export", exp.Name).Logger()
	c.log.Debug().Msg("transmission started")
	c.transmit(exp.Device)
	c.log.Debug().Msg("disconnected")
}

// transmit serves requests until the client disconnects, violates the protocol, the
// connection fails or the server shuts down; every request read by then is replied to.
func (c *conn) transmit(dev blockdev.Device) {
	n := c.s.opts.MaxInFlight
	c.dev = dev
	c.size = uint64(dev.Size())
	c.flags = exportFlags(dev)
	c.slots = make(chan struct{}, n)
	c.budget.init(int64(c.s.opts.MaxInFlightBytes))
	c.queue = make([]reply, 0, n)

	c.readLoop()

	// Every request has queued its reply, and the goroutine that queued the last one has
	// written it (reply returns only when no writer is left).
	c.inflight.Wait()
}

func (c *conn) readLoop() {
	var h [requestSize]byte
	for {
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			c.logReadEnd(err)
			return
		}
		if m := binary.BigEndian.Uint32(h[0:]); m != requestMagic {
			c.log.Warn().Uint32("magic", m).Msg("protocol violation: bad request magic; closing")
			return
		}
		flags := binary.BigEndian.Uint16(h[4:])
		typ := binary.BigEndian.Uint16(h[6:])
		cookie := binary.BigEndian.Uint64(h[8:])
		off := binary.BigEndian.Uint64(h[16:])
		length := binary.BigEndian.Uint32(h[24:])

		if typ == cmdDisc {
			c.log.Debug().Msg("client sent DISC")
			return
		}
		c.slots <- struct{}{}
		// Headers already buffered when the connection failed are not worth running: no reply
		// can reach the client.
		if c.failed.Load() {
			<-c.slots
			c.log.Debug().Msg("connection failed; dropping the requests not started")
			return
		}
		if !c.dispatch(flags, typ, cookie, off, length) {
			return
		}
	}
}

func (c *conn) logReadEnd(err error) {
	switch {
	case errors.Is(err, io.EOF):
		c.log.Debug().Msg("client closed the connection")
	case errors.Is(err, os.ErrDeadlineExceeded) && c.isStopping():
		c.log.Debug().Msg("server shutting down")
	default:
		c.log.Debug().Err(err).Msg("read failed")
	}
}

// dispatch validates one request whose slot is held, reads its payload, and starts it. It
// returns false if the connection can't go on (the payload could not be read).
func (c *conn) dispatch(flags, typ uint16, cookie, off uint64, length uint32) bool {
	errno := c.validate(flags, typ, off, length)
	if errno != 0 {
		if typ == cmdWrite {
			if _, err := c.br.Discard(int(length)); err != nil {
				<-c.slots
				c.logReadEnd(err)
				return false
			}
		}
		r := reply{cookie: cookie, errno: errno}
		if c.structured && (typ == cmdRead || typ == cmdBlockStatus) {
			// A READ must get a structured reply once they are negotiated, even for EINVAL.
			r = errorChunk(cookie, errno, nil)
		}
		// Not from the reader itself: a writer may block on a client that is not reading, and
		// the reader must go on reading meanwhile.
		c.inflight.Add(1)
		go func() {
			defer c.inflight.Done()
			c.reply(r, false)
		}()
		return true
	}

	fua := flags&cmdFlagFUA != 0
	switch typ {
	case cmdRead:
		c.budget.acquire(int64(length))
		buf := getBuf(int(length))
		structured := c.structured
		// A structured read that fits one data chunk takes the simple path's steps, on a stack
		// no deeper (see readError).
		sparse := structured && (length >= holeProbeMin || length == 0)
		kind := replySimple
		if structured {
			kind = replyData
		}
		c.start(cookie, func() {
			if sparse {
				c.replySparse(cookie, off, buf)
				return
			}
			if err := c.dev.ReadAt(*buf, int64(off)); err != nil {
				c.readError(cookie, off, buf, structured, err)
				return
			}
			c.reply(reply{cookie: cookie, kind: kind, data: buf, off: off}, true)
		}, func() {
			putBuf(buf)
			c.budget.release(int64(length))
		})
	case cmdWrite:
		c.budget.acquire(int64(length))
		buf := getBuf(int(length))
		if _, err := io.ReadFull(c.br, *buf); err != nil {
			putBuf(buf)
			c.budget.release(int64(length))
			<-c.slots
			c.logReadEnd(err)
			return false
		}
		if length >= inlineWriteMin && !fua && c.rc != nil {
			c.writeInline(cookie, off, buf)
			return true
		}
		c.start(cookie, func() {
			c.done(cookie, "write", c.write(buf, off, fua))
		}, func() {
			putBuf(buf)
			c.budget.release(int64(length))
		})
	case cmdFlush:
		c.start(cookie, func() { c.done(cookie, "flush", c.dev.Flush()) }, nil)
	case cmdTrim:
		c.start(cookie, func() {
			err := c.dev.Trim(int64(off), int64(length))
			if err == nil && fua {
				err = c.dev.Flush()
			}
			c.done(cookie, "trim", err)
		}, nil)
	case cmdWriteZeroes:
		punch := flags&cmdFlagNoHole == 0
		if flags&cmdFlagFastZero != 0 {
			c.start(cookie, func() {
				c.done(cookie, "write_zeroes_fast", blockdev.WriteZeroesFast(c.dev, int64(off), int64(length), punch, fua))
			}, nil)
			break
		}
		c.start(cookie, func() {
			c.done(cookie, "write_zeroes", c.dev.WriteZeroes(int64(off), int64(length), punch, fua))
		}, nil)
	case cmdCache:
		c.start(cookie, func() {
			c.done(cookie, "cache", blockdev.Prefetch(c.dev, int64(off), int64(length)))
		}, nil)
	case cmdBlockStatus:
		one := flags&cmdFlagReqOne != 0
		c.start(cookie, func() { c.reply(c.blockStatus(cookie, off, length, one), true) }, nil)
	}
	return true
}

// readError replies to a READ that failed with err: a simple error reply, or with structured
// replies an ERROR_OFFSET chunk; it frees buf and its budget. It is a function of its own so
// that its frame is never on a request goroutine's stack while that goroutine reads or writes
// replies: the stack stays as small as the simple path's and never has to grow, which would
// cost more than a 4 KiB read.
//
//go:noinline
func (c *conn) readError(cookie, off uint64, buf *[]byte, structured bool, err error) {
	if structured {
		c.reply(c.readFailed(cookie, off, buf, err), true)
		return
	}
	c.budget.release(int64(len(*buf)))
	putBuf(buf)
	c.done(cookie, "read", err)
}

// replySparse replies to a structured READ that readSparse handles.
//
//go:noinline
func (c *conn) replySparse(cookie, off uint64, buf *[]byte) {
	c.reply(c.readSparse(cookie, off, buf), true)
}

// validate returns the NBD error for a request that must not reach the device, or 0.
func (c *conn) validate(flags, typ uint16, off uint64, length uint32) uint32 {
	allowed := uint16(cmdFlagFUA) // valid on every command once SEND_FUA is advertised
	switch typ {
	case cmdWriteZeroes:
		allowed |= cmdFlagNoHole
		if c.flags&tflagSendFastZero != 0 {
			allowed |= cmdFlagFastZero
		}
	case cmdBlockStatus:
		allowed |= cmdFlagReqOne
	}
	if flags&^allowed != 0 {
		return errInval
	}
	inRange := off <= c.size && uint64(length) <= c.size-off
	switch typ {
	case cmdRead:
		if length > MaxPayload || !inRange {
			return errInval
		}
	case cmdWrite:
		if length > MaxPayload {
			return errInval
		}
		if !inRange {
			return errNoSpc
		}
	case cmdFlush:
	case cmdTrim, cmdWriteZeroes:
		if !inRange {
			return errInval
		}
	case cmdCache:
		// Any length: the cache bounds what it loads (blockdev.Prefetcher).
		if c.flags&tflagSendCache == 0 || !inRange {
			return errInval
		}
	case cmdBlockStatus:
		// Only with a context selected (which needs structured replies), and never empty.
		if (!c.metaAlloc && len(c.metaDirty) == 0) || length == 0 || !inRange {
			return errInval
		}
	default:
		return errInval
	}
	return 0
}

// start runs the request on its own goroutine; run must send exactly one reply. If the
// connection has failed by the time the goroutine runs, run is skipped: release frees what the
// request holds (if anything) and a reply, which is discarded, frees its slot.
func (c *conn) start(cookie uint64, run, release func()) {
	c.inflight.Add(1)
	c.running.Add(1)
	go func() {
		defer c.inflight.Done()
		if c.failed.Load() {
			c.skip(cookie, release)
			return
		}
		run()
	}()
}

// skip is start's path for a request not run. A function of its own, so that its frame is not
// at the bottom of every request goroutine's stack.
//
//go:noinline
func (c *conn) skip(cookie uint64, release func()) {
	if release != nil {
		release()
	}
	c.reply(reply{cookie: cookie, errno: errShutdown}, true)
}

// done replies to a request that ended with err (nil for success).
func (c *conn) done(cookie uint64, op string, err error) {
	c.reply(c.result(cookie, op, err), true)
}

// result is the reply to a request that ended with err; a failure is logged.
func (c *conn) result(cookie uint64, op string, err error) reply {
	if err == nil {
		return reply{cookie: cookie}
	}
	errno := nbdErrno(blockdev.Errno(err))
	c.log.Debug().Err(err).Str("op", op).Uint32("nbd_error", errno).Msg("request failed")
	if errors.Is(err, ErrRevoked) {
		c.stop() // no more requests: the connection closes once these are answered
	}
	return reply{cookie: cookie, errno: errno}
}

// write writes the WRITE payload buf at off, then frees buf and the budget it holds.
func (c *conn) write(buf *[]byte, off uint64, fua bool) error {
	n := len(*buf)
	err := c.dev.WriteAt(*buf, int64(off), fua)
	putBuf(buf)
	c.budget.release(int64(n))
	return err
}

// writeInline runs a WRITE (see inlineWriteMin) on the reader, whose slot and budget it holds,
// and replies without waiting for the client (see replyNoWait).
func (c *conn) writeInline(cookie, off uint64, buf *[]byte) {
	c.inflight.Add(1)
	defer c.inflight.Done()
	c.running.Add(1)
	c.replyNoWait(c.result(cookie, "write", c.write(buf, off, false)))
}

// reply sends r: it queues r and, unless another goroutine is writing (that one takes r with
// what else is queued), becomes the writer until the queue is empty. Replies queued while a
// write is in flight go out together in the next one, so a busy connection sends many replies
// per writev while an idle one sends each at once, with no hand-off to another goroutine. A
// READ's data goes out from its own buffer, not copied. Slots and buffers are released once
// their reply is written. After a write error the connection is closed, so the reader stops,
// and later replies are discarded.
func (c *conn) reply(r reply, started bool) {
	if c.enqueue(r, started) {
		c.writeQueue()
	}
}

// enqueue queues r and returns whether the caller is now the writer, in which case wmu stays
// held for it; else it is released.
func (c *conn) enqueue(r reply, started bool) bool {
	if started {
		c.running.Add(-1)
	}
	c.wmu.Lock()
	c.queue = append(c.queue, r)
	if c.writing {
		c.wmu.Unlock()
		return false
	}
	c.writing = true
	return true
}

// writeQueue is the writer's loop: it writes what is queued until nothing is. It is called
// by the goroutine that set writing, with wmu held, and returns with it released.
func (c *conn) writeQueue() {
	w := &c.w
	for len(c.queue) > 0 {
		if c.running.Load() > 0 {
			// Requests are running: let those about to finish queue their replies first, so
			// that one writev carries them all.
			c.wmu.Unlock()
			runtime.Gosched()
			c.wmu.Lock()
		}
		batch := c.queue
		c.queue = w.spare[:0]
		c.wmu.Unlock()
		w.spare = c.writeReplies(w, batch)
		c.wmu.Lock()
	}
	c.writing = false
	c.wmu.Unlock()
}

// replyNoWait is reply for the reader, which must never wait for the client: a client may
// read its replies only once it has sent its requests. Unless another goroutine is writing
// (which takes r), what is queued goes out with one writev that does not wait; what the socket
// did not take, and replies queued meanwhile, are left to a goroutine that becomes the writer.
func (c *conn) replyNoWait(r reply) {
	if !c.enqueue(r, true) {
		return
	}
	w := &c.w
	batch := c.queue
	c.queue = w.spare[:0]
	c.wmu.Unlock()
	sent := c.failed.Load()
	if !sent {
		c.prepareReplies(w, batch)
		sent = c.sendNoWait(w)
	}
	if sent {
		w.spare = c.releaseReplies(w, batch)
		c.wmu.Lock()
		if len(c.queue) == 0 {
			c.writing = false
			c.wmu.Unlock()
			return
		}
		c.wmu.Unlock()
	}
	c.inflight.Add(1)
	go func() {
		defer c.inflight.Done()
		if !sent {
			c.send(w)
			w.spare = c.releaseReplies(w, batch)
		}
		c.wmu.Lock()
		c.writeQueue()
	}()
}

// replyWriter is the scratch space of one writer.
type replyWriter struct {
	hdrs  []byte
	iov   net.Buffers // what the batch's replies are made of
	rest  net.Buffers // the part of iov not written yet
	spare []reply
}

// writeReplies writes batch in one writev (unless the connection has failed), then frees what
// the replies held. It returns batch emptied, for reuse as a queue.
func (c *conn) writeReplies(w *replyWriter, batch []reply) []reply {
	if !c.failed.Load() {
		c.prepareReplies(w, batch)
		c.send(w)
	}
	return c.releaseReplies(w, batch)
}

// prepareReplies sets w.iov (and w.rest) to batch's headers and data.
func (c *conn) prepareReplies(w *replyWriter, batch []reply) {
	// Headers first, so that iov can point into hdrs without it moving. Chunks encoded by
	// their request bring their own.
	w.hdrs = w.hdrs[:0]
	for _, r := range batch {
		switch r.kind {
		case replySimple:
			w.hdrs = binary.BigEndian.AppendUint32(w.hdrs, simpleReplyMagic)
			w.hdrs = binary.BigEndian.AppendUint32(w.hdrs, r.errno)
			w.hdrs = binary.BigEndian.AppendUint64(w.hdrs, r.cookie)
		case replyData:
			w.hdrs = appendChunkHdr(w.hdrs, chunkFlagDone, chunkOffsetData, r.cookie, 8+len(*r.data))
			w.hdrs = binary.BigEndian.AppendUint64(w.hdrs, r.off)
		}
	}
	w.iov = w.iov[:0]
	start, end := 0, 0 // of the headers not yet in iov, and of r's
	for _, r := range batch {
		switch r.kind {
		case replySimple:
			end += replyHdrSize
			if r.data != nil {
				w.iov = append(w.iov, w.hdrs[start:end], *r.data)
				start = end
			}
		case replyData:
			end += readChunkHdrSize
			w.iov = append(w.iov, w.hdrs[start:end], *r.data)
			start = end
		case replyChunks:
			if start < end {
				w.iov = append(w.iov, w.hdrs[start:end])
				start = end
			}
			w.iov = append(w.iov, *r.chunks...)
		}
	}
	if start < len(w.hdrs) {
		w.iov = append(w.iov, w.hdrs[start:])
	}
	w.rest = w.iov
}

// gated closes the connection and reports true if the server's gate refuses replies now.
func (c *conn) gated() bool {
	if c.s.opts.Gate == nil {
		return false
	}
	if err := c.s.opts.Gate(); err != nil {
		c.writeFailed(err)
		return true
	}
	return false
}

// send writes w.rest, waiting for the client as long as it takes.
func (c *conn) send(w *replyWriter) {
	if c.gated() {
		return
	}
	var err error
	if c.tls.conn != nil {
		err = c.sendTLS(w.rest)
	} else {
		_, err = w.rest.WriteTo(c.nc)
	}
	if err != nil {
		c.writeFailed(err)
	}
}

// sendNoWait writes what of w.rest the socket takes now, with one writev. It returns whether
// nothing is left to write (or the connection failed).
func (c *conn) sendNoWait(w *replyWriter) bool {
	if c.gated() {
		return true
	}
	var n int
	var werr error
	err := c.rc.Write(func(fd uintptr) bool {
		n, werr = unix.Writev(int(fd), w.rest)
		return true // one attempt: never wait for the socket
	})
	if err == nil && werr != nil && werr != unix.EAGAIN && werr != unix.EINTR {
		err = werr // EAGAIN, EINTR: nothing written, the goroutine goes on
	}
	if err != nil {
		c.writeFailed(err)
		return true
	}
	for n > 0 {
		if k := len(w.rest[0]); n >= k {
			w.rest, n = w.rest[1:], n-k
		} else {
			w.rest[0], n = w.rest[0][n:], 0
		}
	}
	return len(w.rest) == 0
}

func (c *conn) writeFailed(err error) {
	if !c.failed.Swap(true) {
		c.log.Debug().Err(err).Msg("write failed; closing")
		c.nc.Close()
	}
}

// releaseReplies frees what batch's replies held (their data, their slots) once they are
// written, and returns batch emptied.
func (c *conn) releaseReplies(w *replyWriter, batch []reply) []reply {
	clear(w.iov)
	w.rest = nil
	for i, r := range batch {
		if r.data != nil {
			c.budget.release(int64(len(*r.data)))
			putBuf(r.data)
		}
		batch[i] = reply{}
		<-c.slots
	}
	return batch[:0]
}

// byteBudget bounds the payload bytes a connection holds at once. Only the reader acquires;
// a request larger than the whole budget is admitted alone.
type byteBudget struct {
	mu   sync.Mutex
	cond sync.Cond
	used int64
	max  int64
}

func (b *byteBudget) init(max int64) {
	b.max = max
	b.cond.L = &b.mu
}

func (b *byteBudget) acquire(n int64) {
	b.mu.Lock()
	for b.used > 0 && b.used+n > b.max {
		b.cond.Wait()
	}
	b.used += n
	b.mu.Unlock()
}

func (b *byteBudget) release(n int64) {
	b.mu.Lock()
	b.used -= n
	b.mu.Unlock()
	b.cond.Signal()
}
