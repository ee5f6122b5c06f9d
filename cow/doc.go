// Package cow is the copy-on-write indirection layer of docs/flashcopy.md §5: grain routing through the dependency chain, per-grain locks, background copy and cleaning. It sits below the cache and above the volume stores.
package cow
