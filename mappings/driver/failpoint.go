package driver

import "sync/atomic"

// failpointHook, when a test sets it, is called at each named failpoint (the "// failpoint:"
// comments mark them). Crash tests use it to capture the durable state at exactly that
// instant; production never sets it, and a nil hook costs one atomic load.
var failpointHook atomic.Pointer[func(name string)]

func failpoint(name string) {
	if h := failpointHook.Load(); h != nil {
		(*h)(name)
	}
}
