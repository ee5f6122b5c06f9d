package cow

import (
	"errors"
	"fmt"
	"sync"
)

// BitKind says which of a mapping's bitmaps a BitUpdate sets bits in.
type BitKind uint8

const (
	// SplitBits: the target holds its own copy of the grain (flashcopy.md §5).
	SplitBits BitKind = iota
	// DifferenceBits: the grain was written on the source or the target of an incremental
	// mapping since its last start (flashcopy.md §5 "Incremental").
	DifferenceBits
)

func (k BitKind) String() string {
	if k == DifferenceBits {
		return "difference"
	}
	return "split"
}

// BitUpdate is a set of bits of one bitmap of one mapping that must become durable together.
// The zero Kind is SplitBits.
type BitUpdate struct {
	Mapping int
	Kind    BitKind
	Grains  []int
}

// BitJournal makes split and difference bits durable. The engine calls SetBits for split bits
// only after the data those bits vouch for is durable in the target's store, and lets the host
// write that depended on them go ahead only after SetBits returned nil (docs/architecture.md
// rule 4). A difference bit is committed before the write it records reaches any store (rule
// 5). Both kinds of one group commit arrive in one call.
type BitJournal interface {
	// SetBits makes every listed bit durable, in one atomic commit, before it returns. After an
	// error none, some or all of them may be durable; the engine treats the grains as not split
	// and the difference bits as not recorded (the writes that needed them fail).
	SetBits(updates []BitUpdate) error
}

// FailureJournal is implemented by a BitJournal that can record, durably, that a mapping was
// stopped by a failed grain copy. The engine records it before the host write that triggered
// the copy goes ahead and before the target leaves its chain; on restart the control plane
// finds the record and stops the mapping instead of resuming it.
type FailureJournal interface {
	MarkFailed(mapping int) error
}

// ErrJournal marks errors from the BitJournal: the mapping's metadata is unavailable
// (flashcopy.md §3 "Bitmap offline"), which the control plane turns into suspended. The host
// write that needed the bit fails with EIO and nothing is assumed about the grain.
var ErrJournal = errors.New("cow: split bit journal failed")

// MemJournal is an in-memory BitJournal for tests: it remembers every bit committed, per mapping,
// and can be told to fail.
type MemJournal struct {
	mu      sync.Mutex
	bits    map[BitKind]map[int]map[int]bool
	commits int
	// Fail, if set, is consulted on every SetBits; a non-nil result fails the commit.
	Fail func(updates []BitUpdate) error
}

// SetBits implements BitJournal.
func (j *MemJournal) SetBits(updates []BitUpdate) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.Fail != nil {
		if err := j.Fail(updates); err != nil {
			return err
		}
	}
	if j.bits == nil {
		j.bits = map[BitKind]map[int]map[int]bool{}
	}
	for _, u := range updates {
		if j.bits[u.Kind] == nil {
			j.bits[u.Kind] = map[int]map[int]bool{}
		}
		m := j.bits[u.Kind][u.Mapping]
		if m == nil {
			m = map[int]bool{}
			j.bits[u.Kind][u.Mapping] = m
		}
		for _, g := range u.Grains {
			m[g] = true
		}
	}
	j.commits++
	return nil
}

// Durable reports whether mapping's split bit for grain g was committed.
func (j *MemJournal) Durable(mapping, g int) bool { return j.DurableKind(SplitBits, mapping, g) }

// DurableKind reports whether mapping's bit of kind for grain g was committed.
func (j *MemJournal) DurableKind(kind BitKind, mapping, g int) bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.bits[kind][mapping][g]
}

// Commits is the number of successful SetBits calls (group commit makes it smaller than the
// number of bits).
func (j *MemJournal) Commits() int {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.commits
}

// commitReq asks the committer to make vol's file durable and then, if that worked, bits.
type commitReq struct {
	vol  *volume // nil: journal only
	bits []BitUpdate
	done chan error
}

// committer is the group commit: one goroutine takes every request queued while the previous
// batch was being made durable, syncs each file of the batch once and commits all their bits in
// one journal transaction.
type committer struct {
	journal BitJournal
	reqs    chan *commitReq
	quit    chan struct{}
	done    chan struct{}

	// mu orders submissions before close: a request is queued with mu held shared and only
	// while closed is false, and close sets closed with mu held exclusively before it tells
	// run to quit. So every queued request is in reqs before run's final drain, which answers
	// it; without this, a submit could queue a request after that drain (a select between a
	// free buffer slot and a closed quit picks either) and its waiter would wait forever.
	mu     sync.RWMutex
	closed bool
}

func newCommitter(j BitJournal) *committer {
	c := &committer{
		journal: j,
		reqs:    make(chan *commitReq, 256),
		quit:    make(chan struct{}),
		done:    make(chan struct{}),
	}
	go c.run()
	return c
}

// errClosed is returned for requests made after Close.
var errClosed = fmt.Errorf("cow: engine closed: %w", errShutdown)

// submit queues a request; wait for its result with <-req.done.
func (c *committer) submit(vol *volume, bits []BitUpdate) *commitReq {
	r := &commitReq{vol: vol, bits: bits, done: make(chan error, 1)}
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.closed {
		r.done <- errClosed
		return r
	}
	// run keeps draining reqs until close, which waits for this send: it cannot block forever.
	c.reqs <- r
	return r
}

// commit makes vol durable, then bits; it returns when both are.
func (c *committer) commit(vol *volume, bits []BitUpdate) error {
	return <-c.submit(vol, bits).done
}

func (c *committer) close() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		<-c.done
		return
	}
	c.closed = true
	close(c.quit)
	c.mu.Unlock()
	<-c.done
}

const maxBatch = 512

func (c *committer) run() {
	defer close(c.done)
	for {
		var batch []*commitReq
		select {
		case r := <-c.reqs:
			batch = append(batch, r)
		case <-c.quit:
			for {
				select {
				case r := <-c.reqs:
					r.done <- errClosed
				default:
					return
				}
			}
		}
	drain:
		for len(batch) < maxBatch {
			select {
			case r := <-c.reqs:
				batch = append(batch, r)
			default:
				break drain
			}
		}
		c.commitBatch(batch)
	}
}

// commitBatch is the durability order of a batch, top to bottom: every target file synced,
// then the bits of the requests whose file synced committed in one journal transaction, then
// the waiters released (only then may a host write reach a source).
func (c *committer) commitBatch(batch []*commitReq) {
	syncErr := c.syncFiles(batch)
	failpoint("cow-after-target-sync")

	var updates []BitUpdate
	for _, r := range batch {
		if r.vol == nil || syncErr[r.vol] == nil {
			updates = append(updates, r.bits...)
		}
	}
	var jerr error
	if len(updates) > 0 {
		if err := c.journal.SetBits(updates); err != nil {
			jerr = fmt.Errorf("%w: %w", ErrJournal, err)
		}
	}
	failpoint("cow-after-bit-commit")

	for _, r := range batch {
		switch {
		case r.vol != nil && syncErr[r.vol] != nil:
			r.done <- fmt.Errorf("sync volume %d: %w", r.vol.id, syncErr[r.vol])
		case len(r.bits) > 0 && jerr != nil:
			r.done <- jerr
		default:
			r.done <- nil
		}
	}
}

// syncFiles syncs each distinct volume of the batch once, in parallel.
func (c *committer) syncFiles(batch []*commitReq) map[*volume]error {
	errs := map[*volume]error{}
	var vols []*volume
	for _, r := range batch {
		if r.vol == nil {
			continue
		}
		if _, ok := errs[r.vol]; !ok {
			errs[r.vol] = nil
			vols = append(vols, r.vol)
		}
	}
	if len(vols) == 1 {
		errs[vols[0]] = vols[0].file.Sync()
		return errs
	}
	res := make([]error, len(vols))
	var wg sync.WaitGroup
	for i, v := range vols {
		wg.Go(func() { res[i] = v.file.Sync() })
	}
	wg.Wait()
	for i, v := range vols {
		errs[v] = res[i]
	}
	return errs
}
