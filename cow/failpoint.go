package cow

import "sync/atomic"

// FailpointHook, when a test sets it, is called at each named failpoint of the copy-on-write
// path (the durability order of docs/architecture.md rule 4), so that a crash test can capture
// the durable state at exactly that instant. Production never sets it.
var FailpointHook atomic.Pointer[func(name string)]

func failpoint(name string) {
	if h := FailpointHook.Load(); h != nil {
		(*h)(name)
	}
}
