// Package nbd is fcnbd's NBD protocol server (fixed newstyle): negotiation, concurrent
// transmission with out-of-order replies, request validation and error replies. It serves
// blockdev.Device values and knows nothing of volumes, caches or mappings.
//
// Each connection has one reader (it parses and validates requests and reads WRITE payloads
// into pooled buffers), up to Options.MaxInFlight requests executing at once on their own
// goroutines, and one writer that sends simple replies in order of completion, batching them
// into one writev while more are queued. A failing request gets an error reply and the
// connection goes on; only a protocol violation closes it.
package nbd
