// Package mappings is the control plane: volumes, FlashCopy mappings and consistency groups, the
// pure state machine of their states, the driver that carries out its effects, and the persistent
// catalogue.
//
// Model is the catalogue as one JSON-serialisable value. Its commands (MkFcmap, Prestart, Start,
// Stop, StartGroup, …) validate everything first and either refuse with an *fcerr.Error, changing
// nothing, or change the model and return the []Effect a driver must carry out in order. The
// driver feeds outcomes back with Model.Apply(Event) (FlushDone, FenceDrained, CopyComplete,
// IOError, …), which returns further effects. Nothing here does I/O or starts goroutines: every
// transition of docs/flashcopy.md §3 is a table test.
//
// Dependency chains (§5) are derived from each active mapping's insertion order (ChainSeq) and,
// for a target that a chain's change left elsewhere, its Via;
// Upstream, Downstream, DependentMappings and Links answer what the copy-on-write layer needs.
// What hosts may see of a volume (§2) is VolumeAccess; effects that change it are derived by
// comparing it before and after each transition.
//
// This package must not touch the data path directly: cachelayer/, cow/ and the stores are
// reached only through the driver executing effects.
package mappings
