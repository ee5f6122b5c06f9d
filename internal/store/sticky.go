package store

import (
	"fmt"
	"sync"
)

// StickySync returns f with the fsyncgate rule applied above any store: once a Sync of f
// failed, every later Sync fails with that error too, until the file is reopened. Linux may
// report a writeback failure to one fsync and then drop the dirty pages, so a later Sync can
// "succeed" for data that never reached the disk; the data path must never turn a failed
// FLUSH into a later success. Dir's files already behave so; wrapping them again costs a load.
func StickySync(f File) File {
	if s, ok := f.(*stickyFile); ok {
		return s
	}
	return &stickyFile{File: f}
}

type stickyFile struct {
	File
	mu  sync.Mutex
	err error // the first failed Sync's error
}

func (s *stickyFile) Sync() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return s.err
	}
	if err := s.File.Sync(); err != nil {
		s.err = fmt.Errorf("%w (an earlier sync failed: later syncs of this file fail too until it is reopened)", err)
		return s.err
	}
	return nil
}

// ZeroFast forwards to the wrapped file (see FastZeroer).
func (s *stickyFile) ZeroFast(off, length int64, punch bool) error {
	return ZeroFast(s.File, off, length, punch)
}
