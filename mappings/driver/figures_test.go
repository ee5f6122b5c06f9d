package driver

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"fcnbd/internal/api"
	"fcnbd/internal/metrics"
)

// figGrain is the grain of the figures tests: volSize / figGrain = 64 grains, so every count of
// grains shows as its own difference percentage.
const figGrain = 64 << 10

// noProgressTicks keeps the driver's periodic progress feed out of the way, so that what a
// test reads can only come from the query itself (completion still comes from the engine).
func noProgressTicks(o *Options) { o.ProgressInterval = time.Hour }

// completedIncremental creates s, t and an incremental mapping inc between them in 64 KiB
// grains, and runs its first copy to completion.
func (r *rig) completedIncremental() {
	r.t.Helper()
	ctx := context.Background()
	r.mkvol("s", "t")
	r.write("s", 0, pattern(0x5a, volSize))
	if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "s", Target: "t", Name: "inc", Incremental: true,
		CopyRate: ip(150), GrainSize: ip(figGrain >> 10)}); err != nil {
		r.t.Fatal(err)
	}
	if err := r.d.StartFcmap(ctx, "inc", true, false); err != nil {
		r.t.Fatal(err)
	}
	r.waitStatus("inc", "idle_or_copied")
	if d := r.fcmap("inc").Difference; d != 0 {
		r.t.Fatalf("difference right after the copy completed: %d %%, want 0", d)
	}
}

// diffPct is lsfcmap's difference for n of the volSize/figGrain grains (rounded up).
func diffPct(n int) int {
	const grains = volSize / figGrain
	return (n*100 + grains - 1) / grains
}

// TestDifferenceShownOnceFlushed: issue 13 — once a host's FLUSH (or a FUA write) has been
// acknowledged, lsfcmap's difference counts the grains it made durable, without waiting for
// any periodic feed.
func TestDifferenceShownOnceFlushed(t *testing.T) {
	r := newRig(t, noProgressTicks)
	r.completedIncremental()

	// 13 grains rewritten through the write-back cache, then FLUSH.
	const n = 13
	for g := 0; g < n; g++ {
		r.write("s", int64(g*3)*figGrain+100, pattern(byte(g), 512))
	}
	if err := r.vol("s").Flush(); err != nil {
		t.Fatal(err)
	}
	if got, want := r.fcmap("inc").Difference, diffPct(n); got != want {
		t.Fatalf("difference right after FLUSH: %d %%, want %d %% (%d grains)", got, want, n)
	}

	// FUA writes on the target, to grains not written yet: each is in the difference as soon
	// as it is acknowledged.
	for k := 1; k <= 4; k++ {
		g := int64(3*n + k)
		if err := r.vol("t").WriteAt(pattern(0xfa, 4096), g*figGrain, true); err != nil {
			t.Fatal(err)
		}
		if got, want := r.fcmap("inc").Difference, diffPct(n+k); got != want {
			t.Fatalf("difference right after FUA write %d: %d %%, want %d %% (%d grains)", k, got, want, n+k)
		}
	}
}

// figures is what lsfcmap shows of ref's copy work, as (grains copied, split on write, bytes).
func (r *rig) figures(ref string) [3]int64 {
	r.t.Helper()
	f := r.fcmap(ref)
	return [3]int64{f.GrainsCopied, f.SplitOnWrite, f.BytesCopied}
}

// rewrite writes into each of grains of vol through its cache and flushes it.
func (r *rig) rewrite(vol string, b byte, grains ...int) {
	r.t.Helper()
	for _, g := range grains {
		r.write(vol, int64(g)*figGrain+1000, pattern(b, 100))
	}
	if err := r.vol(vol).Flush(); err != nil {
		r.t.Fatal(err)
	}
}

// TestRunFiguresOutliveTheRun: issue 13 — grains_copied, split_on_write and bytes_copied keep
// showing what the last run did once it has ended (an incremental restart: exactly the grains
// rewritten), survive a daemon restart, and start again from 0 at the next start.
func TestRunFiguresOutliveTheRun(t *testing.T) {
	const grains = volSize / figGrain
	r := newRig(t, nil)
	ctx := context.Background()
	r.completedIncremental()
	if got, want := r.figures("inc"), [3]int64{grains, 0, volSize}; got != want {
		t.Fatalf("after the first copy completed: %v, want %v (every grain copied once)", got, want)
	}

	changed := []int{2, 17, 40, 63}
	r.rewrite("s", 0x61, changed...)
	if err := r.d.StartFcmap(ctx, "inc", true, false); err != nil {
		t.Fatal(err)
	}
	r.waitStatus("inc", "idle_or_copied")
	k := int64(len(changed))
	want := [3]int64{k, 0, k * figGrain}
	if got := r.figures("inc"); got != want {
		t.Fatalf("after the incremental restart completed: %v, want %v (the %d grains rewritten)", got, want, k)
	}

	r.restart()
	if got := r.figures("inc"); got != want {
		t.Fatalf("after a daemon restart: %v, want %v", got, want)
	}

	// The next start begins from 0: with no background copy, one host write to a grain the
	// target does not hold yet splits it, and after the stop that is all the run shows.
	if err := r.d.ChFcmap(ctx, "inc", api.ChFcmap{CopyRate: ip(0)}); err != nil {
		t.Fatal(err)
	}
	r.rewrite("s", 0x62, 5, 6)
	if err := r.d.StartFcmap(ctx, "inc", true, false); err != nil {
		t.Fatal(err)
	}
	if got := r.figures("inc"); got != [3]int64{} {
		t.Fatalf("right after the next start: %v, want zeros", got)
	}
	r.rewrite("s", 0x63, 5)
	if err := r.d.StopFcmap(ctx, "inc", false, false); err != nil {
		t.Fatal(err)
	}
	r.waitStatus("inc", "stopped")
	if got, want := r.figures("inc"), [3]int64{0, 1, figGrain}; got != want {
		t.Fatalf("after a stopped run that split one grain on write: %v, want %v", got, want)
	}
}

// TestRunFiguresAcrossDaemonRestart: a run in progress when the daemon stops keeps what it had
// counted: lsfcmap and the metrics go on from there after the restart, and the run's figures
// at completion include both parts.
func TestRunFiguresAcrossDaemonRestart(t *testing.T) {
	const grains = volSize / figGrain
	r := newRig(t, nil)
	ctx := context.Background()
	r.mkvol("s", "t")
	r.write("s", 0, pattern(0x5a, volSize))
	if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "s", Target: "t", Name: "m",
		CopyRate: ip(0), GrainSize: ip(figGrain >> 10)}); err != nil {
		t.Fatal(err)
	}
	if err := r.d.StartFcmap(ctx, "m", true, false); err != nil {
		t.Fatal(err)
	}
	r.rewrite("s", 0x61, 1, 2)
	want := [3]int64{0, 2, 2 * figGrain}
	if got := r.figures("m"); got != want {
		t.Fatalf("after two copy-on-writes: %v, want %v", got, want)
	}
	r.restart()
	if got := r.figures("m"); got != want {
		t.Fatalf("after a daemon restart: %v, want %v", got, want)
	}
	if f := r.fcmap("m"); f.GrainsCopiedTotal != 0 || f.SplitOnWriteTotal != 2 || f.BytesCopiedTotal != 2*figGrain {
		t.Fatalf("totals after a daemon restart: %d/%d/%d, want 0/2/%d", f.GrainsCopiedTotal, f.SplitOnWriteTotal, f.BytesCopiedTotal, 2*figGrain)
	}
	r.rewrite("s", 0x62, 3)
	if err := r.d.ChFcmap(ctx, "m", api.ChFcmap{CopyRate: ip(150)}); err != nil {
		t.Fatal(err)
	}
	r.waitStatus("m", "idle_or_copied")
	want = [3]int64{grains - 3, 3, volSize}
	if got := r.figures("m"); got != want {
		t.Fatalf("the run completed: %v, want %v (both parts of the run)", got, want)
	}
}

// counters gathers the metrics' copy counters of every mapping, by series.
func counters(t *testing.T, src metrics.Source) map[string]float64 {
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(metrics.Collector(src))
	mfs, err := reg.Gather()
	if err != nil {
		t.Error(err)
		return nil
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			if c := m.GetCounter(); c != nil {
				key := mf.GetName()
				for _, l := range m.GetLabel() {
					key += "," + l.GetName() + "=" + l.GetValue()
				}
				out[key] = c.GetValue()
			}
		}
	}
	return out
}

// TestMetricsCountersNeverDecrease: issue 13 — the Prometheus copy counters of a mapping,
// scraped continuously, never go down: not when a copy completes and the mapping leaves the
// engine, not when it starts again; they add up every run, and a daemon restart keeps them.
func TestMetricsCountersNeverDecrease(t *testing.T) {
	const grains = volSize / figGrain
	r := newRig(t, nil)
	ctx := context.Background()

	var (
		wg      sync.WaitGroup
		stop    = make(chan struct{})
		scrapes int
		last    = map[string]float64{}
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			for k, v := range counters(t, r.d) {
				if v < last[k] {
					t.Errorf("%s went down from %v to %v", k, last[k], v)
				}
				last[k] = v
			}
			scrapes++
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	r.completedIncremental()
	changed := []int{1, 30, 62}
	r.rewrite("s", 0x71, changed...)
	if err := r.d.StartFcmap(ctx, "inc", true, false); err != nil {
		t.Fatal(err)
	}
	r.waitStatus("inc", "idle_or_copied")
	time.Sleep(20 * time.Millisecond) // a few scrapes of the completed mapping
	close(stop)
	wg.Wait()
	t.Logf("%d scrapes", scrapes)

	const series = `,fcmap=inc,source=s,target=t`
	k := int64(len(changed))
	want := map[string]float64{
		"fcnbd_fcmap_grains_copied_total" + series:  float64(grains + k),
		"fcnbd_fcmap_split_on_write_total" + series: 0,
		"fcnbd_fcmap_copied_bytes_total" + series:   float64((grains + k) * figGrain),
	}
	check := func(when string, got map[string]float64) {
		t.Helper()
		for s, v := range want {
			if got[s] != v {
				t.Errorf("%s: %s = %v, want %v (both runs added up)", when, s, got[s], v)
			}
		}
	}
	check("after the second run", counters(t, r.d))
	r.restart()
	check("after a daemon restart", counters(t, r.d))
}
