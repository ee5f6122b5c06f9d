// Package sysutil makes the daemon safe to run on the same host as the block devices it serves.
// A kernel block device over NBD (nbd-client, or nbdfuse + loop) sends its writeback through
// this process: if the kernel has to reclaim memory by writing dirty pages to that device while
// the daemon itself waits for memory, the host deadlocks. Two defences, both best effort:
//
//   - PR_SET_IO_FLUSHER marks the process as part of the I/O path, so its own allocations don't
//     recurse into filesystem or block I/O reclaim (Linux ≥ 5.6, needs CAP_SYS_RESOURCE).
//   - mlockall(MCL_CURRENT|MCL_FUTURE) keeps its memory resident, so serving a request never
//     waits for a page-in from swap that may itself need the device.
//
// mlockall with MCL_FUTURE makes every later mapping locked; if RLIMIT_MEMLOCK is lower than
// the Go heap will grow to, allocations start failing and the runtime dies. So mlockall is done
// only when the limit is (or, as root, can be made) unlimited, and skipped with a warning
// otherwise.
package sysutil

import (
	"errors"
	"fmt"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// Options selects what Harden does.
type Options struct {
	// NoMlock skips mlockall (for memory-heavy hosts where locking everything is unwanted).
	NoMlock bool
}

// Result is what Harden did; an error field is nil on success.
type Result struct {
	IOFlusher error
	Mlock     error
	// MlockSkipped is true when mlockall was not attempted (Options.NoMlock, or a memlock limit
	// that could not be made unlimited; then Mlock says why).
	MlockSkipped bool
}

// ErrMemlockLimit is wrapped by Result.Mlock when RLIMIT_MEMLOCK is finite and can't be raised.
var ErrMemlockLimit = errors.New("RLIMIT_MEMLOCK is not unlimited")

// The system calls, replaceable by tests.
var (
	prctl     = unix.Prctl
	mlockall  = unix.Mlockall
	getrlimit = unix.Getrlimit
	setrlimit = unix.Setrlimit
)

// Harden sets PR_SET_IO_FLUSHER and, unless opts.NoMlock, locks the process's memory. Each
// outcome is logged once: info when done, warn with the error when not. Failures are not fatal:
// the daemon still works, it just lacks the protection.
func Harden(log zerolog.Logger, opts Options) Result {
	var r Result
	r.IOFlusher = setIOFlusher()
	if r.IOFlusher != nil {
		log.Warn().Err(r.IOFlusher).Msg("PR_SET_IO_FLUSHER failed: writeback to a local NBD device through this daemon may deadlock under memory pressure")
	} else {
		log.Info().Msg("PR_SET_IO_FLUSHER set: reclaim in this process does not recurse into I/O")
	}

	if opts.NoMlock {
		r.MlockSkipped = true
		log.Info().Msg("mlockall disabled by --no-mlock")
		return r
	}
	if err := unlimitMemlock(); err != nil {
		r.MlockSkipped, r.Mlock = true, err
		log.Warn().Err(err).Msg("mlockall skipped: memory may be swapped out, and paging it back in may wait on a local NBD device")
		return r
	}
	r.Mlock = lockAll()
	if r.Mlock != nil {
		log.Warn().Err(r.Mlock).Msg("mlockall failed: memory may be swapped out, and paging it back in may wait on a local NBD device")
	} else {
		log.Info().Msg("mlockall done: memory locked (current and future)")
	}
	return r
}

func setIOFlusher() error {
	if err := prctl(unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("prctl(PR_SET_IO_FLUSHER): %w", err)
	}
	return nil
}

// unlimitMemlock makes RLIMIT_MEMLOCK unlimited, or says why it can't: raising the hard limit
// needs CAP_SYS_RESOURCE (root); the soft limit can be raised up to the hard one by anyone.
func unlimitMemlock() error {
	var lim unix.Rlimit
	if err := getrlimit(unix.RLIMIT_MEMLOCK, &lim); err != nil {
		return fmt.Errorf("getrlimit(RLIMIT_MEMLOCK): %w", err)
	}
	if lim.Cur == unix.RLIM_INFINITY {
		return nil
	}
	want := unix.Rlimit{Cur: unix.RLIM_INFINITY, Max: unix.RLIM_INFINITY}
	if err := setrlimit(unix.RLIMIT_MEMLOCK, &want); err != nil {
		return fmt.Errorf("%w (soft %s, hard %s) and raising it failed: %w",
			ErrMemlockLimit, limitString(lim.Cur), limitString(lim.Max), err)
	}
	return nil
}

func limitString(v uint64) string {
	if v == unix.RLIM_INFINITY {
		return "unlimited"
	}
	return fmt.Sprintf("%d bytes", v)
}

func lockAll() error {
	if err := mlockall(unix.MCL_CURRENT | unix.MCL_FUTURE); err != nil {
		return fmt.Errorf("mlockall(MCL_CURRENT|MCL_FUTURE): %w", err)
	}
	return nil
}
