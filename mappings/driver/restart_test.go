package driver

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"

	"github.com/rs/zerolog"

	"fcnbd/internal/api"
	"fcnbd/internal/catalog"
	"fcnbd/mappings"
)

// TestTargetOnlineWhenStartReturns: StartFcmap returns once the start is done (§6 step 4: the
// targets are online), so a read of the target right after it must succeed.
func TestTargetOnlineWhenStartReturns(t *testing.T) {
	r := newRig(t, nil)
	ctx := context.Background()
	r.mkvol("src", "tgt")
	r.write("src", 0, pattern(0x71, 1<<20))
	if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "src", Target: "tgt", Name: "m", CopyRate: ip(0)}); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		if err := r.d.StartFcmap(ctx, "m", true, false); err != nil {
			t.Fatal(err)
		}
		if _, err := r.read("tgt", 0, 4096); err != nil {
			t.Fatalf("start %d: read of the target right after the start returned: %v", i, err)
		}
		if err := r.d.StopFcmap(ctx, "m", true, false); err != nil {
			t.Fatal(err)
		}
	}
}

// TestCleanRestartKeepsMappings: a daemon restart while background copies run and a stopped
// target is offline closes cleanly and leaves every mapping as it was: a grain copy cut short
// by the shutdown must not stop its mapping, and the offline target must not fail the close.
func TestCleanRestartKeepsMappings(t *testing.T) {
	r := newRig(t, nil)
	ctx := context.Background()
	r.mkvol("src", "t1", "t2", "t3", "off")
	r.write("src", 0, pattern(0x72, volSize))
	// A stopped mapping: its target is offline across the restarts.
	if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "src", Target: "off", Name: "stp", CopyRate: ip(0), GrainSize: ip(64)}); err != nil {
		t.Fatal(err)
	}
	if err := r.d.StartFcmap(ctx, "stp", true, false); err != nil {
		t.Fatal(err)
	}
	if err := r.d.StopFcmap(ctx, "stp", true, false); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 3; i++ {
		name := fmt.Sprintf("m%d", i)
		if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "src", Target: fmt.Sprintf("t%d", i), Name: name,
			CopyRate: ip(65), GrainSize: ip(64)}); err != nil {
			t.Fatal(err)
		}
		if err := r.d.StartFcmap(ctx, name, true, false); err != nil {
			t.Fatal(err)
		}
	}
	r.write("src", 0, pattern(0x73, volSize))
	for i := range 5 {
		r.restart() // rig.close fails the test if Close returns an error
		for _, m := range []string{"m1", "m2", "m3"} {
			if s := r.status(m); s != "copying" && s != "idle_or_copied" {
				t.Fatalf("restart %d: mapping %s is %s", i, m, s)
			}
		}
	}
	for _, tg := range []string{"t1", "t2", "t3"} {
		r.expect(tg, 0, pattern(0x72, volSize))
	}
	r.expectEIO("off")
}

// TestRestartWithUnrestorableMapping: startup never fails because of one mapping's state. A
// mapping whose chain can't be restored at open (its split bitmap record is corrupt, or its
// grain size conflicts with its tree's) comes up stopped, with the reason in its lsfcmap view,
// its target offline; whatever read through its target stops with it; every other mapping is
// served and resumes, and the stop is in the catalogue (a second restart finds it stopped, with
// no restore error). A new start of the stopped mapping clears the reason.
func TestRestartWithUnrestorableMapping(t *testing.T) {
	tests := []struct {
		name string
		// damage changes the catalogue of the closed daemon; ids: older 0, newer 1, other 2.
		damage func(t *testing.T, tx *catalog.Tx)
		lost   string
		reason string
		// dependant: the older mapping read through the lost one's target and stops too.
		dependant bool
		// broken: the damage stays in the model, so the mapping can't be started again.
		broken bool
	}{
		{
			name: "split bitmap record corrupt",
			damage: func(t *testing.T, tx *catalog.Tx) {
				if err := tx.PutBitmapChunk(0, catalog.SplitBitmap, 0, []byte{1, 2, 3}); err != nil {
					t.Fatal(err)
				}
			},
			lost: "older", reason: "split bitmap could not be read",
		},
		{
			name: "grain size conflicting in its tree",
			damage: func(t *testing.T, tx *catalog.Tx) {
				editModel(t, tx, func(m *mappings.Model) { m.Mappings[1].GrainKiB = 256 })
			},
			lost: "newer", reason: "grain size 262144 differs from 65536",
			// The model still mixes sizes in one set: the grain rule refuses a new start.
			dependant: true, broken: true,
		},
		{
			name: "impossible geometry",
			damage: func(t *testing.T, tx *catalog.Tx) {
				editModel(t, tx, func(m *mappings.Model) { m.Mappings[0].GrainKiB = 0 })
			},
			lost: "older", reason: "impossible geometry", broken: true,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var logs syncBuf
			r := newRig(t, func(o *Options) {
				o.Logger = zerolog.New(io.MultiWriter(zerolog.NewTestWriter(t), &logs)).Level(zerolog.WarnLevel)
			})
			ctx := context.Background()
			r.mkvol("src", "t_old", "t_new", "src2", "t_other")
			r.write("src", 0, pattern(0x81, volSize))
			r.write("src2", 0, pattern(0x82, volSize))
			for _, m := range []struct{ name, src, tgt string }{
				{"older", "src", "t_old"}, {"newer", "src", "t_new"}, {"other", "src2", "t_other"},
			} {
				if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: m.src, Target: m.tgt, Name: m.name,
					CopyRate: ip(0), GrainSize: ip(64)}); err != nil {
					t.Fatal(err)
				}
				if err := r.d.StartFcmap(ctx, m.name, true, false); err != nil {
					t.Fatal(err)
				}
			}
			// Split grains on every mapping, so their bitmaps have records.
			r.write("src", 0, pattern(0x91, 256<<10))
			r.write("src2", 0, pattern(0x92, 256<<10))

			r.close()
			cat, err := catalog.Open(r.dir)
			if err != nil {
				t.Fatal(err)
			}
			if err := cat.Update(func(tx *catalog.Tx) error { tc.damage(t, tx); return nil }); err != nil {
				t.Fatal(err)
			}
			cat.Close()
			r.open()

			f, err := r.d.Fcmap(ctx, tc.lost)
			if err != nil {
				t.Fatal(err)
			}
			if f.Status != "stopped" || !strings.Contains(f.StatusReason, tc.reason) {
				t.Fatalf("%s after the restart: %s, reason %q; want stopped, reason with %q", tc.lost, f.Status, f.StatusReason, tc.reason)
			}
			r.expectEIO("t_" + map[string]string{"older": "old", "newer": "new"}[tc.lost])
			if l := logs.String(); !strings.Contains(l, `"level":"error"`) || !strings.Contains(l, `"name":"`+tc.lost+`"`) ||
				!strings.Contains(l, tc.reason) {
				t.Fatalf("no error-level log naming %s with its reason:\n%s", tc.lost, l)
			}
			survivors := map[string]string{"other": "t_other"}
			if tc.lost == "older" {
				survivors["newer"] = "t_new"
			}
			if tc.dependant {
				if f, _ := r.d.Fcmap(ctx, "older"); f.Status != "stopped" || !strings.Contains(f.StatusReason, tc.lost) {
					t.Fatalf("older, which read through the lost target: %s, reason %q", f.Status, f.StatusReason)
				}
				r.expectEIO("t_old")
			}
			for m, tgt := range survivors {
				if f, _ := r.d.Fcmap(ctx, m); f.Status != "copying" || f.StatusReason != "" {
					t.Fatalf("%s after the restart: %s, reason %q", m, f.Status, f.StatusReason)
				}
				want := byte(0x81)
				if m == "other" {
					want = 0x82
				}
				r.expect(tgt, 0, pattern(want, volSize))
			}
			// Copy-on-write runs again for the survivors.
			r.write("src", 0, pattern(0xa1, 1<<20))
			r.write("src2", 0, pattern(0xa2, 1<<20))
			for m, tgt := range survivors {
				want := byte(0x81)
				if m == "other" {
					want = 0x82
				}
				r.expect(tgt, 0, pattern(want, volSize))
			}

			// The stop is durable: in the catalogue now, and a second restart restores what is
			// left without complaint.
			var stored mappings.Model
			if err := r.cat.View(func(tx *catalog.Tx) error { return json.Unmarshal(tx.Model(), &stored) }); err != nil {
				t.Fatal(err)
			}
			for _, mp := range stored.Mappings {
				if mp.Name == tc.lost && (mp.State != mappings.Stopped || !strings.Contains(mp.StatusReason, tc.reason)) {
					t.Fatalf("%s in the catalogue: %s, reason %q", tc.lost, mp.State, mp.StatusReason)
				}
			}
			r.restart()
			if s := r.status(tc.lost); s != "stopped" {
				t.Fatalf("%s after a second restart: %s", tc.lost, s)
			}
			for m := range survivors {
				if s := r.status(m); s != "copying" {
					t.Fatalf("%s after a second restart: %s", m, s)
				}
			}
			if tc.broken {
				if err := r.d.StartFcmap(ctx, tc.lost, true, false); err == nil {
					t.Fatalf("start %s again, its damage still in the model: accepted", tc.lost)
				} else if s := r.status(tc.lost); s != "stopped" {
					t.Fatalf("refused start of %s (%v) left it %s", tc.lost, err, s)
				}
				return
			}
			if err := r.d.StartFcmap(ctx, tc.lost, true, false); err != nil {
				t.Fatalf("start %s again: %v", tc.lost, err)
			}
			if f, _ := r.d.Fcmap(ctx, tc.lost); f.Status != "copying" || f.StatusReason != "" {
				t.Fatalf("%s started again: %s, reason %q", tc.lost, f.Status, f.StatusReason)
			}
		})
	}
}

// editModel changes the FlashCopy model stored in the catalogue.
func editModel(t *testing.T, tx *catalog.Tx, edit func(m *mappings.Model)) {
	t.Helper()
	var m mappings.Model
	if err := json.Unmarshal(tx.Model(), &m); err != nil {
		t.Fatal(err)
	}
	edit(&m)
	data, err := json.Marshal(&m)
	if err != nil {
		t.Fatal(err)
	}
	if err := tx.PutModel(data); err != nil {
		t.Fatal(err)
	}
}

// syncBuf is a bytes.Buffer safe for the driver's goroutines to log into.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
