// Package cachelayer is the per-volume write-back cache between the NBD server and the copy-on-write layer, with the write-through mode and the Hold/Release fence used by prepare and start.
package cachelayer
