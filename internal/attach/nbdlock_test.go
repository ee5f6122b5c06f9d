package attach

import (
	"context"
	"path/filepath"
	"testing"
	"time"
)

// TestLockNBD: the lock that makes concurrent kernel-NBD attaches pick different devices
// excludes a second holder until the first releases it, and a waiter gives up with its context.
func TestLockNBD(t *testing.T) {
	old := NBDLockPath
	NBDLockPath = filepath.Join(t.TempDir(), "sub", "nbd-attach.lock")
	t.Cleanup(func() { NBDLockPath = old })

	unlock, err := lockNBD(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if u, err := lockNBD(ctx); err == nil {
		u()
		t.Fatal("a second lockNBD succeeded while the first held the lock")
	}
	got := make(chan error, 1)
	go func() {
		u, err := lockNBD(context.Background())
		if err == nil {
			u()
		}
		got <- err
	}()
	time.Sleep(50 * time.Millisecond)
	select {
	case err := <-got:
		t.Fatalf("lockNBD returned (%v) while the lock was held", err)
	default:
	}
	unlock()
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("lockNBD still waiting 5s after the lock was released")
	}
}
