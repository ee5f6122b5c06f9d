// Package nbd is fcnbd's NBD protocol server (fixed newstyle): negotiation, concurrent
// transmission with out-of-order replies, request validation and error replies. It serves
// blockdev.Device values and knows nothing of volumes, caches or mappings.
//
// Each connection has one reader (it parses and validates requests and reads WRITE payloads
// into pooled buffers), up to Options.MaxInFlight requests executing at once on their own
// goroutines, and one writer at a time, sending simple replies in order of completion: a
// request that finishes while nobody writes writes its own reply, and replies that finish
// while a write is in flight go out together in that writer's next writev, so no reply waits
// for a hand-off to another goroutine. A failing request gets an error reply and the
// connection goes on; only a protocol violation closes it.
//
// A client that negotiates structured replies gets its READ replies as chunks (structured.go):
// one OFFSET_DATA chunk, framed by the writer like a simple reply, or, for a large read over
// holes the device reports (blockdev.Extenter), data and hole chunks built by the request. The
// base:allocation meta context answers BLOCK_STATUS from the same extents; qemu's
// qemu:dirty-bitmap:NAME contexts (metactx.go) answer it from the device's dirty bitmaps
// (blockdev.DirtyBitmaps), one chunk per selected context. A client that
// negotiates neither gets exactly the simple replies it always did.
//
// NBD_OPT_STARTTLS (tls.go) switches a connection to crypto/tls during negotiation, under the
// policy of Options.TLSMode; negotiation and transmission then go through the tls.Conn, the
// writer gathering a batch's replies into full records. Who the client is (Client: address,
// Unix peer uid, verified certificate) reaches Exports that implement ClientExports.
//
// CACHE and FAST_ZERO are advertised per export, for a device that implements them
// (blockdev.Prefetcher, blockdev.FastZeroer; see exportFlags); a refused fast zero is ENOTSUP.
package nbd
