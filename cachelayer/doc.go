// Package cachelayer is the per-volume write-back cache between the NBD server and the
// copy-on-write layer, with the write-through mode and the Hold/Release fence used by prepare
// and start (docs/flashcopy.md §6). It owns cache memory (a Pool shared by all volumes), dirty
// tracking and destage; it knows nothing of mappings and touches the layer below only through
// blockdev.Device.
//
// Design, in short:
//   - 4 KiB pages in 64 shards (page index mod 64), each a mutex over its pages and three
//     intrusive lists: dirty (by age), destaging (claimed by a run) and clean (eviction order).
//     A per-volume page table (page index → page, atomic pointers in lazily allocated chunks)
//     finds a page with one load; entries change only under the page's shard lock, and a read
//     looks its pages up there without locking, locking a shard only to copy a cached page.
//   - 1024 stripe mutexes (page index mod 1024) serialise the lower I/O of a page: a fill (read
//     for a partial-page write), a destage run, a write-through write, a trim. Stripes are taken
//     before shard locks, in ascending order; shard locks are never held across lower I/O.
//   - A write copies into the page and marks it dirty with a sequence number; a write landing
//     on a page whose destage is in flight marks it re-dirtied, so the run leaves it dirty.
//   - Destage is lazy: it starts when dirty data passes a low-water mark of the cache's share or
//     is older than MaxDirtyAge (all workers run above a high-water mark), so rewrites are
//     absorbed and neighbours coalesce. A run claims the oldest dirty page and its dirty
//     neighbours, snapshots them under the stripes, writes them in one lower write and settles
//     each page (clean and still cached, or dirty again).
//   - Flush destages every page whose age is not newer than the sequence at its start, waiting
//     for runs others hold, then flushes below. Failed pages stay dirty: a later Flush retries.
//   - Reads are served from cached pages; misses go below directly and are not cached (only
//     Prefetch, NBD's CACHE, loads pages for reading: clean, bounded by the pool share). A read
//     whose misses interleave with cached pages reads the span of its misses below in one call
//     and copies the cached pages over it.
//   - The fence counts admitted requests and background runs; Hold waits for the count to drain.
//   - Memory is reserved before admission; when none can be had, the write goes through. So
//     does a write larger than MaxCachedWrite: caching it would only add two copies.
//   - A read finds nothing to look up while no page is resident, and goes straight below.
package cachelayer
