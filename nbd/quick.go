package nbd

// QuickWriter is implemented by a device that can sometimes complete a write at once, in
// memory, waiting for nothing (the write-back cache: cachelayer.Cache.TryWriteAt).
type QuickWriter interface {
	// TryWriteAt either performs the write exactly as WriteAt(p, off, false) would, returning
	// true and its error, or does nothing and returns false.
	TryWriteAt(p []byte, off int64) (bool, error)
}

// writeQuick offers a WRITE without FUA to the device's TryWriteAt on the reader, whose slot
// and budget the request holds. If the device takes it, it replies without waiting for the
// client (replyNoWait) and returns true: a small cached write costs a copy of a few KiB, less
// than starting a goroutine for it and waking a thread to run it. If not, the request is left
// for a goroutine of its own (start), as before.
func (c *conn) writeQuick(qw QuickWriter, cookie, off uint64, buf *[]byte) bool {
	c.inflight.Add(1)
	defer c.inflight.Done()
	ok, err := qw.TryWriteAt(*buf, int64(off))
	if !ok {
		return false
	}
	n := len(*buf)
	putBuf(buf)
	c.budget.release(int64(n))
	c.running.Add(1)
	c.replyNoWait(c.result(cookie, "write", err))
	return true
}
