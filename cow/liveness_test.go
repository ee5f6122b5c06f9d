package cow

import (
	"errors"
	"math/rand/v2"
	"os"
	"runtime/pprof"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestLivenessUnderTopologyChurn drives the multi-target + cascade topology of the randomized
// daemon test (S → T1..T4, T1 → C1 → C2) at the engine: host I/O on every volume while mappings
// start, stop (normally and by force), change rates, complete and are removed, and Progress is
// polled as the driver does. A watchdog dumps every goroutine if any call takes more than 5 s.
func TestLivenessUnderTopologyChurn(t *testing.T) {
	dur, err := time.ParseDuration(os.Getenv("FCNBD_LIVENESS"))
	if err != nil {
		t.Skip("a stress run: set FCNBD_LIVENESS to its duration (e.g. 60s)")
	}
	r, _ := seedRand(t)
	const size, grain = 1 << 20, 64 * kib
	g := newRig(t, 7, size, grain, r)
	type mdef struct{ src, tgt int }
	defs := map[int]mdef{1: {0, 1}, 2: {0, 2}, 3: {0, 3}, 4: {0, 4}, 5: {1, 5}, 6: {5, 6}}

	var last sync.Map // goroutine name → time of its current call's start (0: idle)
	track := func(name string) func() {
		last.Store(name, time.Now())
		return func() { last.Store(name, time.Time{}) }
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var stuck atomic.Bool
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
				if ts := v.(time.Time); !ts.IsZero() && time.Since(ts) > 5*time.Second && !stuck.Swap(true) {
					t.Errorf("%s stuck for %s", k, time.Since(ts))
					pprof.Lookup("goroutine").WriteTo(os.Stderr, 2)
				}
				return true
			})
		}
	})

	// Host I/O.
	for v := range 7 {
		for w := range 2 {
			name := "io vol " + string(rune('0'+v)) + "/" + string(rune('0'+w))
			rr := rand.New(rand.NewPCG(r.Uint64(), uint64(v*2+w)))
			dev := g.devs[v]
			wg.Go(func() {
				buf := make([]byte, 3*grain)
				for {
					select {
					case <-stop:
						return
					default:
					}
					off := rr.Int64N(size - 3*grain)
					n := 1 + rr.Int64N(3*grain)
					done := track(name)
					switch rr.IntN(6) {
					case 0:
						dev.ReadAt(buf[:n], off)
					case 1:
						dev.WriteZeroes(off, n, rr.IntN(2) == 0, rr.IntN(4) == 0)
					case 2:
						dev.Flush()
					default:
						dev.WriteAt(buf[:n], off, rr.IntN(4) == 0)
					}
					done()
				}
			})
		}
	}

	// Engine events: a finished run leaves the engine.
	go func() {
		for ev := range g.e.Events() {
			done := track("events")
			g.e.RemoveMapping(ev.Mapping)
			done()
		}
	}()

	// Control plane: starts, stops, rates, progress.
	cr := rand.New(rand.NewPCG(r.Uint64(), 99))
	deadline := time.Now().Add(dur)
	for time.Now().Before(deadline) {
		id := 1 + cr.IntN(6)
		done := track("control")
		switch cr.IntN(6) {
		case 0, 1:
			g.e.RemoveMapping(id) // a stopped one goes; one at 100 % leaves its chain
			d := defs[id]
			g.e.StartMappings([]MappingSpec{{ID: id, Source: d.src, Target: d.tgt, GrainSize: grain,
				CopyRate: cr.IntN(151), CleanRate: cr.IntN(151)}})
		case 2:
			g.e.StopMapping(id, cr.IntN(2) == 0)
		case 3:
			g.e.SetRates(id, cr.IntN(151), cr.IntN(151))
		default:
			for id := 1; id <= 6; id++ {
				if _, err := g.e.Progress(id); err != nil && !errors.Is(err, ErrNoMapping) {
					t.Error(err)
				}
			}
		}
		done()
		time.Sleep(time.Duration(cr.IntN(3)) * time.Millisecond)
	}
	close(stop)
	wg.Wait()
}
