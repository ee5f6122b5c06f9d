package cow

import (
	"testing"
	"time"
)

// Background copy makes a batch of grains durable with one journal commit, and host writes to
// the source during the copy (each may copy-on-write a grain the batch has copied but not yet
// published) leave the target exactly the source's image at start.
func TestCopyBatches(t *testing.T) {
	r, _ := seedRand(t)
	const size, grain = 8 << 20, 16 * kib
	g := newRig(t, 2, size, grain, r)
	s := g.spec(1, 0, 1)
	s.CopyRate = 150
	g.start(s)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		p := make([]byte, 4*kib)
		for {
			select {
			case <-stop:
				return
			default:
			}
			fill(r, p)
			g.write(0, r.Int64N(size/int64(len(p)))*int64(len(p)), p)
		}
	}()
	g.waitEvent(CopyComplete, 1, 30*time.Second)
	close(stop)
	<-done
	g.checkAll(0, 1)
	grains := int64(size / grain)
	if p := g.progress(1); p.GrainsCopied+p.SplitOnWrite != grains {
		t.Fatalf("progress %+v: copied and split-on-write grains should add up to %d", p, grains)
	}
	if c := g.j.Commits(); int64(c) >= grains/2 {
		t.Fatalf("%d journal commits for %d grains: background copy does not batch", c, grains)
	}
}

func TestBatchLimit(t *testing.T) {
	for _, tt := range []struct {
		rate int
		want int64
	}{
		{150, copyBatchBytes},
		{1, 131072 * 64 / 1000}, // 128 KiB/s: 64 ms is about 8 KiB, so a batch is one grain
		{0, 0},
	} {
		if got := batchLimit(tt.rate); got != tt.want {
			t.Errorf("batchLimit(%d) = %d, want %d", tt.rate, got, tt.want)
		}
	}
}
