package driver

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"fcnbd/cachelayer"
	"fcnbd/internal/api"
	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
	"fcnbd/internal/store"
	"fcnbd/internal/store/errorfs"
)

// Fault table tests (docs/flashcopy.md §3 "Stop by I/O error", "Flush failed", "Bitmap
// offline/online"): the driver on an errorfs-wrapped store and a catalogue whose commits can be
// made to fail; each asserts the mapping's state, the volumes' availability and the errno the
// host sees.

// faultRig is a rig whose store passes inj and whose catalogue fails every commit while
// metaDown is set.
type faultRig struct {
	*rig
	metaDown atomic.Bool
	commits  atomic.Int64 // commits refused while metaDown
}

func newFaultRig(t *testing.T, inj errorfs.Injector, mod func(*Options)) *faultRig {
	t.Helper()
	fr := &faultRig{}
	r := &rig{t: t, dir: t.TempDir()}
	r.fs = errorfs.Wrap(store.Dir{Path: r.dir}, inj)
	r.opt = Options{Logger: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.ErrorLevel + 1),
		ProgressInterval: 10 * time.Millisecond, FenceTimeout: 2 * time.Second, MetadataRetry: time.Hour}
	if mod != nil {
		mod(&r.opt)
	}
	r.catOpts = catalog.Options{CommitHook: func(commit func() error) error {
		if fr.metaDown.Load() {
			fr.commits.Add(1)
			return errors.New("injected: catalogue commit refused")
		}
		return commit()
	}}
	fr.rig = r
	r.open()
	t.Cleanup(func() { fr.metaDown.Store(false); r.close() })
	return fr
}

// closeQuiet closes the driver of a test that broke a store for good; Close reports the broken
// flush, which is the point of such a test, not a failure.
func (r *rig) closeQuiet() {
	if r.d == nil {
		return
	}
	r.d.Close()
	r.cat.Close()
	r.d = nil
}

func (r *rig) writeFUA(vol string, off int64, p []byte) error {
	return r.vol(vol).WriteAt(p, off, true)
}

func (r *rig) mkmap(name, src, tgt string, copyRate int, group string) {
	r.t.Helper()
	if _, err := r.d.MkFcmap(context.Background(), api.MkFcmap{Source: src, Target: tgt, Name: name,
		CopyRate: ip(copyRate), GrainSize: ip(64), ConsistGrp: group}); err != nil {
		r.t.Fatal(err)
	}
}

func (r *rig) start(name string) {
	r.t.Helper()
	if err := r.d.StartFcmap(context.Background(), name, true, false); err != nil {
		r.t.Fatal(err)
	}
}

func isEIO(err error) bool { return errors.Is(err, syscall.EIO) }

// TestFaultGrainCopy: a grain copy that fails (target write or sync, or source read; in a
// copy-on-write or in the background copy) stops that mapping and takes its target offline,
// while the host write that triggered it succeeds and the source stays online with the new data.
func TestFaultGrainCopy(t *testing.T) {
	const grain = 64 << 10
	tgtFile, srcFile := volFile(1), volFile(0)
	for _, tc := range []struct {
		name     string
		inj      errorfs.Injector
		copyRate int
		hostIO   bool // a host write triggers the copy (else the background copy meets the fault)
	}{
		{"cow/target-write", errorfs.And(errorfs.OnFile(tgtFile), errorfs.OnOp(errorfs.OpWrite)), 0, true},
		{"cow/target-sync", errorfs.And(errorfs.OnFile(tgtFile), errorfs.OnOp(errorfs.OpSync)), 0, true},
		{"cow/source-read", errorfs.And(errorfs.OnFile(srcFile), errorfs.OnOp(errorfs.OpRead), errorfs.InRange(2*grain, grain)), 0, true},
		{"background/target-write", errorfs.And(errorfs.OnFile(tgtFile), errorfs.OnOp(errorfs.OpWrite)), 150, false},
		{"background/source-read", errorfs.And(errorfs.OnFile(srcFile), errorfs.OnOp(errorfs.OpRead), errorfs.InRange(5*grain, grain)), 150, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sw := errorfs.NewSwitch(tc.inj)
			fr := newFaultRig(t, sw, nil)
			r := fr.rig
			r.mkvol("src", "tgt")
			if err := r.writeFUA("src", 0, pattern(0x11, volSize)); err != nil {
				t.Fatal(err)
			}
			r.mkmap("m", "src", "tgt", tc.copyRate, "")
			sw.On()
			r.start("m")
			if tc.hostIO {
				// A partial-grain write: the copy-on-write reads the grain and copies it out.
				if err := r.writeFUA("src", 2*grain+4096, pattern(0x22, 8192)); err != nil {
					t.Fatalf("the host write that triggered the failed copy: %v, want success", err)
				}
				if err := r.vol("src").Flush(); err != nil {
					t.Fatalf("flush of the source after a failed copy: %v", err)
				}
			}
			r.waitStatus("m", "stopped")
			r.expectEIO("tgt")
			if err := r.writeFUA("tgt", 0, pattern(0x33, 4096)); !isEIO(err) {
				t.Fatalf("write to the stopped target: %v, want EIO", err)
			}
			sw.Off()
			if tc.hostIO {
				r.expect("src", 2*grain+4096, pattern(0x22, 8192))
			}
			r.expect("src", 0, pattern(0x11, grain))
			if strings.HasSuffix(tc.name, "sync") {
				// The target's file failed a sync: it fails every later one (sticky), so the
				// target can't be flushed again until the daemon reopens it.
				r.closeQuiet()
				return
			}
			// stopped → prepare+start again works once the store does.
			r.start("m")
			r.expect("tgt", 0, pattern(0x11, grain))
		})
	}
}

// TestFaultDestageAtPrepare: the source's cache can't be written down at prepare (Flush
// failed): the mapping and its whole group are stopped, the targets offline, the source online.
func TestFaultDestageAtPrepare(t *testing.T) {
	sw := errorfs.NewSwitch(errorfs.And(errorfs.OnFile(volFile(0)), errorfs.OnOp(errorfs.OpWrite)))
	fr := newFaultRig(t, sw, func(o *Options) { o.Cache = cachelayer.Options{DestagePaused: true} })
	r := fr.rig
	ctx := context.Background()
	r.mkvol("src", "tgt", "src2", "tgt2")
	if _, err := r.d.MkConsistGrp(ctx, api.MkConsistGrp{Name: "g"}); err != nil {
		t.Fatal(err)
	}
	r.mkmap("m1", "src", "tgt", 0, "g")
	r.mkmap("m2", "src2", "tgt2", 0, "g")
	for off := int64(0); off < 512<<10; off += 64 << 10 {
		r.write("src", off, pattern(0x44, 64<<10)) // acknowledged, dirty in the cache
	}
	sw.On()
	err := r.d.StartConsistGrp(ctx, "g", true, false)
	if err == nil {
		t.Fatal("start -prep of a group whose source can't be destaged succeeded")
	}
	for _, m := range []string{"m1", "m2"} {
		r.waitStatus(m, "stopped")
	}
	g, err := r.d.ConsistGrp(ctx, "g")
	if err != nil || g.Status != "stopped" {
		t.Fatalf("group after a failed flush: %+v %v, want stopped", g, err)
	}
	r.expectEIO("tgt")
	r.expectEIO("tgt2")
	r.expect("src", 0, pattern(0x44, 64<<10)) // the cache still has it
	sw.Off()
	if err := r.d.StartConsistGrp(ctx, "g", true, false); err != nil {
		t.Fatalf("start again once the store works: %v", err)
	}
	r.expect("tgt", 0, pattern(0x44, 512<<10))
}

// TestFaultMetadata: while the catalogue can't be written, a copy-on-write that needs a split
// bit fails the host write (EIO) and suspends the mapping: source and target return EIO, and the
// durable state is the last consistent one. When the catalogue takes commits again the mapping
// returns to its state, through the periodic retry or the operator's recoverfcmap, and the
// target still shows the start image.
func TestFaultMetadata(t *testing.T) {
	const grain = 64 << 10
	for _, how := range []string{"periodic", "operator", "restart"} {
		t.Run(how, func(t *testing.T) {
			fr := newFaultRig(t, errorfs.NewSwitch(nil), func(o *Options) {
				if how == "periodic" {
					o.MetadataRetry = 20 * time.Millisecond
				}
			})
			r := fr.rig
			ctx := context.Background()
			r.mkvol("src", "tgt")
			if err := r.writeFUA("src", 0, pattern(0x51, volSize)); err != nil {
				t.Fatal(err)
			}
			r.mkmap("m", "src", "tgt", 0, "")
			r.start("m")

			fr.metaDown.Store(true)
			if err := r.writeFUA("src", 3*grain, pattern(0x52, 4096)); !isEIO(err) {
				t.Fatalf("host write needing a split bit while the catalogue fails: %v, want EIO", err)
			}
			r.waitStatus("m", "suspended")
			r.expectEIO("src")
			r.expectEIO("tgt")
			if err := r.writeFUA("src", 9*grain, pattern(0x53, 4096)); !isEIO(err) {
				t.Fatalf("write to a suspended source: %v, want EIO", err)
			}
			if how == "operator" {
				res, err := r.d.RecoverFcmaps(ctx)
				if fcerr.CodeOf(err) != fcerr.MetadataUnwritable || len(res.Suspended) != 1 {
					t.Fatalf("recoverfcmap while the catalogue still fails: %+v %v", res, err)
				}
			}

			fr.metaDown.Store(false)
			switch how {
			case "operator":
				res, err := r.d.RecoverFcmaps(ctx)
				if err != nil || len(res.Resumed) != 1 || res.Resumed[0] != "m" {
					t.Fatalf("recoverfcmap: %+v %v", res, err)
				}
			case "restart":
				// Durable state: copying (the suspension could not be recorded); the restart
				// resumes the mapping with its durable bits.
				r.restart()
			}
			r.waitStatus("m", "copying")
			r.expect("tgt", 3*grain, pattern(0x51, grain))
			if err := r.writeFUA("src", 3*grain, pattern(0x54, 4096)); err != nil {
				t.Fatalf("host write after recovery: %v", err)
			}
			r.expect("src", 3*grain, pattern(0x54, 4096))
			r.expect("tgt", 0, pattern(0x51, volSize))
		})
	}
}

// TestFaultMetadataDuringIOError: a grain copy fails while the catalogue can't record the
// stop either: the host write that needed the copy fails (going ahead would let a crash bring
// the target back reading data from after its start), the mapping is suspended, and once the
// catalogue is back the failure is recorded and stops it: target offline, source online and
// unchanged by the failed write.
func TestFaultMetadataDuringIOError(t *testing.T) {
	sw := errorfs.NewSwitch(errorfs.And(errorfs.OnFile(volFile(1)), errorfs.OnOp(errorfs.OpWrite)))
	fr := newFaultRig(t, sw, nil)
	r := fr.rig
	r.mkvol("src", "tgt")
	r.mkmap("m", "src", "tgt", 0, "")
	r.start("m")
	sw.On()
	fr.metaDown.Store(true)
	if err := r.writeFUA("src", 4096, pattern(0x61, 4096)); !isEIO(err) {
		t.Fatalf("host write whose copy failed and whose failure can't be recorded: %v, want EIO", err)
	}
	r.waitStatus("m", "suspended")
	r.expectEIO("tgt")
	r.expectEIO("src")
	sw.Off()
	fr.metaDown.Store(false)
	if _, err := r.d.RecoverFcmaps(context.Background()); err != nil {
		t.Fatal(err)
	}
	r.waitStatus("m", "stopped")
	r.expectEIO("tgt")
	r.expect("src", 4096, pattern(0, 4096))
	if err := r.writeFUA("src", 4096, pattern(0x62, 4096)); err != nil {
		t.Fatalf("host write once the mapping is stopped: %v", err)
	}
	r.expect("src", 4096, pattern(0x62, 4096))
}

// TestFaultSyncSticky: a failed sync of a volume's file fails the FLUSH (and FUA write) that
// needed it with EIO, and no later FLUSH reports success for that file: the failure is sticky
// even though the store below would now sync.
func TestFaultSyncSticky(t *testing.T) {
	sw := errorfs.NewSwitch(errorfs.And(errorfs.OnFile(volFile(0)), errorfs.OnOp(errorfs.OpSync), errorfs.OnIndex(0)))
	fr := newFaultRig(t, sw, nil)
	r := fr.rig
	r.mkvol("vol")
	r.write("vol", 0, pattern(0x71, 64<<10))
	sw.On()
	if err := r.vol("vol").Flush(); !isEIO(err) {
		t.Fatalf("flush whose sync failed: %v, want EIO", err)
	}
	for i := range 3 {
		if err := r.vol("vol").Flush(); !isEIO(err) {
			t.Fatalf("flush %d after a failed sync: %v, want EIO (fsync errors are sticky)", i+2, err)
		}
	}
	if err := r.writeFUA("vol", 1<<20, pattern(0x72, 4096)); !isEIO(err) {
		t.Fatalf("FUA write after a failed sync: %v, want EIO", err)
	}
	r.expect("vol", 0, pattern(0x71, 64<<10)) // reads still work
	r.closeQuiet()
}
