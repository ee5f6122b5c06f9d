// Package nbd is fcnbd's NBD protocol server (fixed newstyle): negotiation, concurrent transmission with out-of-order replies, request validation and error replies. It serves blockdev.Device values and knows nothing of volumes, caches or mappings.
package nbd
