// Package cow is the copy-on-write indirection layer of docs/flashcopy.md §5: grain routing
// through the dependency chain, per-grain locks, copy-on-write with the durability order of
// docs/architecture.md rule 4, background copy and cleaning. It sits below the cache and above
// the volume stores; it owns no catalogue and decides no state: the control plane starts and
// stops mappings through Engine, sets volumes online or offline, and listens to Events.
//
// # Topology
//
// Every active target has one upstream. Starting S→T puts T directly under S and moves S's
// previous newest target under T (S ← Tn ← … ← T1); cascades hang off their source the same way.
// Stopping after cleaning joins the target's downstream to its upstream; Split and RemoveMapping
// of a mapping at 100 % cut the target from its upstream and leave its dependants under it.
//
// # Locking
//
// A volume's gate (RWMutex) is held shared by each request and exclusively, over a whole
// connected set of volumes, by a topology change; a request never holds two gates. Grain g of a
// connected set has one lock in a sharded table of on-demand locks: shared for reads that
// redirect, exclusive for copies and protected writes. Reads of grains a volume holds and writes
// to grains nobody depends on take neither (bits only go from clear to set while the links
// stay, so a test made before the write stays true).
//
// # Durability
//
// For each copy: grain written to the target, target synced, bit committed to the BitJournal,
// bit published in memory, and only then the write that needed it. Syncs and commits of
// concurrent copies go through one committer goroutine (group commit). The failpoint comments
// name each step.
package cow
