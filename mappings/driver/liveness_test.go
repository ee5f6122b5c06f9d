package driver

import (
	"context"
	"math/rand/v2"
	"os"
	"runtime/pprof"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"fcnbd/internal/api"
)

// TestLivenessAcrossRestarts is the daemon topology test's shape without NBD: S → T1..T4 and
// T1 → C1 → C2, host I/O through the whole stack on every volume (cached, FUA, large, zeroes,
// flushes, reads), starts with -prep, stops (also -force), rate changes, lsfcmap, and clean
// restarts of the driver. A watchdog dumps every goroutine if any call takes more than 15 s.
// Written while auditing a hang seen once by the daemon topology test (two WRITEs on T2 and T3
// unanswered after a SIGTERM restart); it has not reproduced it (several 60 s runs).
func TestLivenessAcrossRestarts(t *testing.T) {
	dur, err := time.ParseDuration(os.Getenv("FCNBD_LIVENESS"))
	if err != nil {
		t.Skip("a stress run: set FCNBD_LIVENESS to its duration (e.g. 60s)")
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	r := newRig(t, func(o *Options) { o.FenceTimeout = 5 * time.Second; o.ProgressInterval = 100 * time.Millisecond })
	ctx := context.Background()
	vols := []string{"S", "T1", "T2", "T3", "T4", "C1", "C2", "X", "Y"}
	const size = 16 << 20
	for _, n := range vols {
		if _, err := r.d.Create(n, size); err != nil {
			t.Fatal(err)
		}
	}
	maps := [][2]string{{"S", "T1"}, {"S", "T2"}, {"S", "T3"}, {"S", "T4"}, {"T1", "C1"}, {"C1", "C2"}, {"X", "Y"}}
	names := []string{"mT1", "mT2", "mT3", "mT4", "mC1", "mC2", "mY"}
	rates := []int{0, 0, 1, 25, 50, 90, 120, 150, 150}
	mk := func(i int) error {
		grain := 64
		if i == 6 {
			grain = 256
		}
		_, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: maps[i][0], Target: maps[i][1], Name: names[i], GrainSize: ip(grain),
			CopyRate: ip(rates[rng.IntN(len(rates))]), CleanRate: ip(rates[rng.IntN(len(rates))])})
		return err
	}
	for i := range maps {
		if err := mk(i); err != nil {
			t.Fatal(err)
		}
	}
	seen := map[string]int{}

	var last sync.Map
	track := func(name string) func() {
		last.Store(name, time.Now())
		return func() { last.Store(name, time.Time{}) }
	}
	var stuck atomic.Bool
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			last.Range(func(k, v any) bool {
				if ts := v.(time.Time); !ts.IsZero() && time.Since(ts) > 15*time.Second && !stuck.Swap(true) {
					t.Errorf("seed %d: %s stuck for %s", seed, k, time.Since(ts))
					pprof.Lookup("goroutine").WriteTo(os.Stderr, 2)
				}
				return true
			})
		}
	})

	var life sync.RWMutex // held shared by each I/O call, exclusively by a restart
	for vi, name := range vols {
		for w := range 2 {
			id := name + "/" + string(rune('0'+w))
			rr := rand.New(rand.NewPCG(seed, uint64(10+vi*2+w)))
			wg.Go(func() {
				buf := make([]byte, 1<<20)
				for {
					select {
					case <-stop:
						return
					default:
					}
					n := int64(4096 * (1 + rr.IntN(8)))
					switch x := rr.IntN(10); {
					case x == 9:
						n = int64(4096 * (65 + rr.IntN(192)))
					case x >= 7:
						n = int64(4096 * (9 + rr.IntN(56)))
					}
					off := 4096 * rr.Int64N((size-n)/4096+1)
					life.RLock()
					e, ok := r.d.Lookup(name)
					if !ok {
						life.RUnlock()
						continue
					}
					dev := e.Device
					done := track(id)
					switch k := rr.IntN(100); {
					case k < 58:
						dev.WriteAt(buf[:n], off, rr.IntN(8) == 0)
					case k < 68:
						dev.WriteZeroes(off, min(n, 128*4096), rr.IntN(2) == 0, rr.IntN(4) == 0)
					case k < 75:
						dev.Flush()
					default:
						dev.ReadAt(buf[:min(n, 64*4096)], off)
					}
					done()
					life.RUnlock()
				}
			})
		}
	}

	deadline := time.Now().Add(dur)
	for time.Now().Before(deadline) && !stuck.Load() {
		mi := rng.IntN(len(names))
		status := map[string][]int{}
		for _, f := range r.d.Fcmaps(ctx) {
			for i, n := range names {
				if n == f.Name {
					status[f.Status] = append(status[f.Status], i)
				}
			}
		}
		pick := func(states ...string) {
			var c []int
			for _, st := range states {
				c = append(c, status[st]...)
			}
			if len(c) > 0 {
				mi = c[rng.IntN(len(c))]
			}
		}
		x := rng.IntN(100)
		switch {
		case x < 30:
			pick("idle_or_copied", "stopped")
		case x < 50:
			pick("copying")
		}
		m := names[mi]
		done := track("control")
		switch {
		case x < 30:
			cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			if err := r.d.StartFcmap(cctx, m, true, false); err != nil {
				seen["start refused: "+err.Error()[:min(40, len(err.Error()))]]++
			} else {
				seen["started"]++
			}
			cancel()
		case x < 50:
			r.d.StopFcmap(ctx, m, rng.IntN(3) == 0, false)
		case x < 62:
			v := []int{0, 1, 30, 50, 100, 150}[rng.IntN(6)]
			if rng.IntN(2) == 0 {
				r.d.ChFcmap(ctx, m, api.ChFcmap{CopyRate: &v})
			} else {
				r.d.ChFcmap(ctx, m, api.ChFcmap{CleanRate: &v})
			}
		case x < 67:
			if f, err := r.d.Fcmap(ctx, m); err == nil && (f.Status == "idle_or_copied" || f.Status == "stopped") {
				if r.d.RmFcmap(ctx, m, f.Status == "stopped") == nil {
					mk(mi)
				}
			}
		case x < 77:
			life.Lock()
			r.restart()
			life.Unlock()
		default:
			for _, f := range r.d.Fcmaps(ctx) {
				seen[f.Status]++
			}
		}
		done()
		time.Sleep(time.Duration(rng.IntN(200)) * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	t.Logf("statuses seen: %v", seen)
}
