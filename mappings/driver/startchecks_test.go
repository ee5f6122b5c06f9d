package driver

import (
	"context"
	"encoding/json"
	"errors"
	"fcnbd/internal/volume"
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"fcnbd/bitmap"
	"fcnbd/cow"
	"fcnbd/internal/api"
	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
	"fcnbd/mappings"
)

// TestGrainSizeInheritedThroughDriver: issue 13. A mapping created without -grainsize next to
// (multi-target) or below (cascade) an active one takes its grain size, and startfcmap -prep
// then starts it, with the real engine: its target shows its source as at its start, the older
// target keeps its own image, also after a restart. The same mkfcmap with a conflicting
// -grainsize is refused and changes nothing (it used to be accepted, and its start then
// failed in the engine after the prepare).
func TestGrainSizeInheritedThroughDriver(t *testing.T) {
	tests := []struct {
		name          string
		first, second [2]string // source, target
		grain         int       // the first mapping's grain size, KiB
		conflicting   int       // a -grainsize the second mapping is refused with
	}{
		{"multi-target", [2]string{"S", "T1"}, [2]string{"S", "T4"}, 256, 64},
		{"cascade", [2]string{"S", "T1"}, [2]string{"T1", "C1"}, 64, 256},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, nil)
			ctx := context.Background()
			r.mkvol("S", "T1", "T4", "C1")
			r.write("S", 0, pattern(0x11, volSize))
			if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: tc.first[0], Target: tc.first[1], Name: "m1",
				CopyRate: ip(0), GrainSize: ip(tc.grain)}); err != nil {
				t.Fatal(err)
			}
			if err := r.d.StartFcmap(ctx, "m1", true, false); err != nil {
				t.Fatal(err)
			}
			r.write("S", 0, pattern(0x22, volSize/2)) // T1 keeps 0x11 throughout
			image, err := r.read(tc.second[0], 0, volSize)
			if err != nil {
				t.Fatal(err)
			}

			base := r.snapshot()
			_, err = r.d.MkFcmap(ctx, api.MkFcmap{Source: tc.second[0], Target: tc.second[1], Name: "bad",
				CopyRate: ip(0), GrainSize: ip(tc.conflicting)})
			if fcerr.CodeOf(err) != fcerr.GrainMismatch {
				t.Fatalf("mkfcmap -grainsize %d: %v, want %s", tc.conflicting, err, fcerr.GrainMismatch)
			}
			r.same("refused mkfcmap", base, r.snapshot())

			if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: tc.second[0], Target: tc.second[1], Name: "m2", CopyRate: ip(0)}); err != nil {
				t.Fatal(err)
			}
			if f, _ := r.d.Fcmap(ctx, "m2"); f.GrainSize != tc.grain {
				t.Fatalf("m2 has %d KiB grains, want %d (inherited)", f.GrainSize, tc.grain)
			}
			if err := r.d.StartFcmap(ctx, "m2", true, false); err != nil {
				t.Fatalf("startfcmap -prep of the inheriting mapping: %v", err)
			}
			// A few grains, so that the first mapping does not complete by its target's writes.
			r.write(tc.second[0], 4096, pattern(0x33, 8192))
			for i := range 2 {
				for _, m := range []string{"m1", "m2"} {
					if s := r.status(m); s != "copying" {
						t.Fatalf("pass %d: %s is %s", i, m, s)
					}
				}
				r.expect(tc.second[1], 0, image)
				if tc.second[0] != "T1" {
					r.expect("T1", 0, pattern(0x11, volSize))
				}
				r.restart()
			}
		})
	}
}

// engineStartRefusal is one refusal cow.StartMappings can return, and what stands in front of
// it: every user command that could lead to it is refused by the control plane first, so a start
// fails only for reasons that arise at the start itself.
type engineStartRefusal struct {
	// format is the refusal's fmt.Errorf format in StartMappings (checked against cow/engine.go).
	format string
	// spec builds a start the engine refuses this way, to show the guard is still there (nil
	// where none can be built from outside). vol maps volume names to ids; m1 is an active
	// mapping from S to T1 with 256 KiB grains.
	spec func(vol map[string]int, m1 int) []cow.MappingSpec
	// user lists the commands that would lead to the refusal, each refused earlier.
	user []userAttempt
	// unreachable says why no user command can lead to it, if none can.
	unreachable string
}

type userAttempt struct {
	name string
	code string
	do   func() error
}

// TestEngineStartRefusalsAreRefusedFirst enumerates the refusals of cow.StartMappings (the list
// must match the source: a new refusal in the engine fails this test until it is listed) and, on
// a daemon with the real engine, checks for each that the user commands that would provoke it
// are refused by the control plane with their code, changing nothing, and that the engine, given
// the start directly, still refuses it.
//
// StartMappings fails in no other way a user could reach: sameView returns nothing, and its walks,
// like those of reads, stop at maxDepth only in a loop of chains, which the control plane
// refuses (TestGroupStartLoopRefused); the connected-set limit (256) keeps chains far shorter.
func TestEngineStartRefusalsAreRefusedFirst(t *testing.T) {
	r := newRig(t, nil)
	ctx := context.Background()
	r.mkvol("S", "T1", "T4", "C1", "U", "X", "XT", "V", "VT")
	if _, err := r.d.Create("small", volSize/2); err != nil {
		t.Fatal(err)
	}
	vol := map[string]int{}
	for _, v := range r.d.Volumes() {
		vol[v.Name] = int(v.ID)
	}
	mk := func(a api.MkFcmap) int {
		t.Helper()
		id, err := r.d.MkFcmap(ctx, a)
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	m1 := mk(api.MkFcmap{Source: "S", Target: "T1", Name: "m1", CopyRate: ip(0)}) // 256 KiB, copying
	if err := r.d.StartFcmap(ctx, "m1", true, false); err != nil {
		t.Fatal(err)
	}
	mk(api.MkFcmap{Source: "X", Target: "XT", Name: "px", CopyRate: ip(0)}) // 256 KiB, prepared
	if err := r.d.PrestartFcmap(ctx, "px", false); err != nil {
		t.Fatal(err)
	}
	r.waitStatus("px", "prepared")
	mk(api.MkFcmap{Source: "V", Target: "VT", Name: "v64", CopyRate: ip(0), GrainSize: ip(64)}) // idle

	const newID = 1000 // no mapping has it
	spec := func(src, tgt int, grainKiB int) cow.MappingSpec {
		return cow.MappingSpec{ID: newID, Source: src, Target: tgt, GrainSize: int64(grainKiB) << 10}
	}
	mkfcmap := func(a api.MkFcmap) func() error {
		return func() error { _, err := r.d.MkFcmap(ctx, a); return err }
	}
	refusals := []engineStartRefusal{
		{
			format: "start mapping %d: %w", // ErrNoVolume
			spec:   func(v map[string]int, _ int) []cow.MappingSpec { return []cow.MappingSpec{spec(999, v["T4"], 256)} },
			// rmvolume -force deletes the volume's mappings before the volume goes.
			user: []userAttempt{
				{"rmvolume of a prepared mapping's source", fcerr.VolumeMapped, func() error { return r.d.Delete("X", volume.DeleteMode{}) }},
				{"rmvolume of a copying mapping's target", fcerr.VolumeMapped, func() error { return r.d.Delete("T1", volume.DeleteMode{}) }},
				{"mkfcmap from an unknown volume", fcerr.NoSuchName, mkfcmap(api.MkFcmap{Source: "nosuch", Target: "U"})},
			},
		},
		{
			format: "start mapping %d: %w: source %d and target %d",
			spec: func(v map[string]int, _ int) []cow.MappingSpec {
				return []cow.MappingSpec{spec(v["S"], v["small"], 256)}
			},
			// A mapped volume can't be resized either (mappings.ResizeVolume; the driver offers
			// no resize).
			user: []userAttempt{
				{"mkfcmap onto the source itself", fcerr.SameVolume, mkfcmap(api.MkFcmap{Source: "S", Target: "S"})},
				{"mkfcmap onto a smaller volume", fcerr.SizeMismatch, mkfcmap(api.MkFcmap{Source: "S", Target: "small"})},
			},
		},
		{
			format: "start mapping %d: %w: grain size %d",
			spec:   func(v map[string]int, _ int) []cow.MappingSpec { return []cow.MappingSpec{spec(v["U"], v["T4"], 0)} },
			// A catalogue holding such a size: TestCatalogueFromBeforeTheGrainRule.
			user: []userAttempt{
				{"mkfcmap -grainsize 0", fcerr.BadValue, mkfcmap(api.MkFcmap{Source: "U", Target: "T4", GrainSize: ip(0)})},
				{"mkfcmap -grainsize 128", fcerr.BadValue, mkfcmap(api.MkFcmap{Source: "U", Target: "T4", GrainSize: ip(128)})},
			},
		},
		{
			format: "start mapping %d: %w: split bitmap geometry",
			spec: func(v map[string]int, _ int) []cow.MappingSpec {
				s := spec(v["U"], v["T4"], 256)
				s.Split = bitmap.New(volSize, 64<<10)
				return []cow.MappingSpec{s}
			},
			unreachable: "internal consistency guard: commitStart builds each split bitmap from the model's source size and " +
				"grain size, and the target's size equals the source's (mkfcmap) and can't change while mapped",
		},
		{
			format: "start mapping %d: %w: rates %d/%d",
			spec: func(v map[string]int, _ int) []cow.MappingSpec {
				s := spec(v["U"], v["T4"], 256)
				s.CopyRate = 151
				return []cow.MappingSpec{s}
			},
			// commitStart starts every mapping at rates 0/0; the model's rates follow through
			// SetRates.
			user: []userAttempt{
				{"mkfcmap -copyrate 151", fcerr.BadValue, mkfcmap(api.MkFcmap{Source: "U", Target: "T4", CopyRate: ip(151)})},
				{"chfcmap -cleanrate 151", fcerr.BadValue, func() error { return r.d.ChFcmap(ctx, "m1", api.ChFcmap{CleanRate: ip(151)}) }},
				{"chfcmap -copyrate -1", fcerr.BadValue, func() error { return r.d.ChFcmap(ctx, "px", api.ChFcmap{CopyRate: ip(-1)}) }},
			},
		},
		{
			format: "start mapping %d: %w: volume %d is already a target",
			spec:   func(v map[string]int, _ int) []cow.MappingSpec { return []cow.MappingSpec{spec(v["U"], v["T1"], 256)} },
			// Two entries of one start with the same target can't occur: one mapping per target.
			user: []userAttempt{
				{"mkfcmap onto an active target", fcerr.TargetInUse, mkfcmap(api.MkFcmap{Source: "U", Target: "T1"})},
				{"prestartfcmap of a copying mapping", fcerr.BadState, func() error { return r.d.PrestartFcmap(ctx, "m1", false) }},
				{"startfcmap -prep of a copying mapping", fcerr.AlreadyCopying, func() error { return r.d.StartFcmap(ctx, "m1", true, false) }},
			},
		},
		{
			format: "start mapping %d: %w: already active",
			spec: func(v map[string]int, m1 int) []cow.MappingSpec {
				s := spec(v["S"], v["T4"], 256)
				s.ID = m1
				return []cow.MappingSpec{s}
			},
			user: []userAttempt{
				{"startfcmap of a copying mapping", fcerr.AlreadyCopying, func() error { return r.d.StartFcmap(ctx, "m1", false, false) }},
			},
		},
		{
			format: "start mapping %d: %w: listed twice",
			spec: func(v map[string]int, _ int) []cow.MappingSpec {
				return []cow.MappingSpec{spec(v["U"], v["T4"], 256), spec(v["U"], v["C1"], 256)}
			},
			unreachable: "internal consistency guard: a fence names each mapping once",
		},
		{
			format: "start mapping %d: %w: grain size %d differs from %d of mapping %d in the same dependency tree",
			spec:   func(v map[string]int, _ int) []cow.MappingSpec { return []cow.MappingSpec{spec(v["S"], v["T4"], 64)} },
			// A catalogue that already mixes sizes: TestCatalogueFromBeforeTheGrainRule. One
			// start of two unconnected sets of different sizes (a group) is not refused:
			// TestGroupOfUnconnectedGrainSizes.
			user: []userAttempt{
				{"mkfcmap -grainsize 64 beside 256 (multi-target)", fcerr.GrainMismatch,
					mkfcmap(api.MkFcmap{Source: "S", Target: "T4", GrainSize: ip(64)})},
				{"mkfcmap -grainsize 64 below 256 (cascade)", fcerr.GrainMismatch,
					mkfcmap(api.MkFcmap{Source: "T1", Target: "C1", GrainSize: ip(64)})},
				{"mkfcmap joining a 256 KiB set to a 64 KiB one", fcerr.GrainMismatch,
					mkfcmap(api.MkFcmap{Source: "XT", Target: "V"})},
			},
		},
		{
			format: "start mapping %d: %w", // a Via volume the engine does not have
			unreachable: "internal consistency guard: only a daemon start passes Via, the model's Via of a mapping, " +
				"and the model can't lose that volume while the mapping hangs under it (rmvolume refuses it, or stops the mapping with -force)",
		},
		{
			format: "start mapping %d: %w: via volume %d",
			unreachable: "internal consistency guard: a Via is a volume the target once read through in the same chain, " +
				"so another volume than the target, of the same size (volumes can't be resized while mapped)",
		},
		{
			format:      "start mapping %d: %w", // from preserveDownstream
			unreachable: "arises at the start: an I/O or journal error while a dependant's image is preserved; the start fails and reports it",
		},
	}

	listed := map[string]int{}
	for _, ref := range refusals {
		listed[ref.format]++
	}
	for _, f := range startMappingsRefusals(t) {
		if listed[f] == 0 {
			t.Errorf("cow.StartMappings refuses with %q, which this test does not list", f)
		}
		listed[f]--
	}
	for f, n := range listed {
		if n > 0 {
			t.Errorf("listed refusal %q is not (or no longer as often) in cow.StartMappings", f)
		}
	}

	for _, ref := range refusals {
		t.Run(ref.format, func(t *testing.T) {
			if len(ref.user) == 0 && ref.unreachable == "" {
				t.Fatal("a refusal needs the user commands that lead to it or why none can")
			}
			for _, u := range ref.user {
				base := r.snapshot()
				err := u.do()
				if fcerr.CodeOf(err) != u.code {
					t.Fatalf("%s: %v, want %s", u.name, err, u.code)
				}
				r.same(u.name, base, r.snapshot())
			}
			if ref.spec == nil {
				return
			}
			err := r.d.eng.StartMappings(ref.spec(vol, m1))
			if err == nil || !formatMatches(ref.format, err.Error()) {
				t.Fatalf("the engine, given the start directly: %v, want a refusal %q", err, ref.format)
			}
		})
	}
	if _, err := r.d.eng.Progress(newID); !errors.Is(err, cow.ErrNoMapping) {
		t.Fatalf("a refused start left mapping %d in the engine: %v", newID, err)
	}
	for m, want := range map[string]string{"m1": "copying", "px": "prepared", "v64": "idle_or_copied"} {
		if s := r.status(m); s != want {
			t.Errorf("%s is %s after the refusals, want %s", m, s, want)
		}
	}
}

// startMappingsRefusals returns the format of every fmt.Errorf in cow.StartMappings.
func startMappingsRefusals(t *testing.T) []string {
	t.Helper()
	file, err := parser.ParseFile(token.NewFileSet(), filepath.Join("..", "..", "cow", "engine.go"), nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, decl := range file.Decls {
		fn, ok := decl.(*ast.FuncDecl)
		// StartMappings and the checks it delegates to.
		if !ok || fn.Name.Name != "StartMappings" && fn.Name.Name != "checkGrains" {
			continue
		}
		ast.Inspect(fn.Body, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok || len(call.Args) == 0 {
				return true
			}
			sel, ok := call.Fun.(*ast.SelectorExpr)
			if !ok || sel.Sel.Name != "Errorf" {
				return true
			}
			if lit, ok := call.Args[0].(*ast.BasicLit); ok && lit.Kind == token.STRING {
				if s, err := strconv.Unquote(lit.Value); err == nil {
					out = append(out, s)
				}
			}
			return true
		})
	}
	if len(out) == 0 {
		t.Fatal("found no refusal in cow.StartMappings")
	}
	return out
}

// formatMatches reports whether msg is what format (with %d and %w verbs) produces.
func formatMatches(format, msg string) bool {
	re := regexp.QuoteMeta(format)
	re = strings.ReplaceAll(re, "%d", `-?\d+`)
	re = strings.ReplaceAll(re, "%w", `.+`)
	return regexp.MustCompile("^" + re + "$").MatchString(msg)
}

// TestCatalogueFromBeforeTheGrainRule: a catalogue written before mkfcmap enforced one grain
// size per connected set, or holding a grain size that is none, is refused at prestartfcmap,
// startfcmap -prep and the group forms with the rule's code, changing nothing (the start used to
// fail in the engine after the prepare). Once the odd mapping is recreated without -grainsize,
// the start goes through.
func TestCatalogueFromBeforeTheGrainRule(t *testing.T) {
	r := newRig(t, nil)
	ctx := context.Background()
	r.mkvol("S", "T1", "T4", "A", "AT", "A2", "Z", "ZT", "F")
	for _, a := range []api.MkFcmap{
		{Source: "S", Target: "T1", Name: "m1"},
		{Source: "S", Target: "T4", Name: "m4"},
		{Source: "A", Target: "AT", Name: "ga", ConsistGrp: "g"},
		{Source: "A", Target: "A2", Name: "a2"},
		{Source: "Z", Target: "ZT", Name: "z"},
	} {
		if a.ConsistGrp != "" {
			if _, err := r.d.MkConsistGrp(ctx, api.MkConsistGrp{Name: a.ConsistGrp}); err != nil {
				t.Fatal(err)
			}
		}
		a.CopyRate = ip(0)
		if _, err := r.d.MkFcmap(ctx, a); err != nil {
			t.Fatal(err)
		}
	}
	// What an older version could have written.
	r.editModel(func(m *mappings.Model) {
		for _, mp := range m.Mappings {
			switch mp.Name {
			case "m4", "a2":
				mp.GrainKiB, mp.Grains = 64, volSize/(64<<10)
			case "z":
				mp.GrainKiB = 0
			}
		}
	})

	refusals := []struct {
		name, code string
		do         func() error
	}{
		{"prestartfcmap of the odd mapping", fcerr.GrainMismatch, func() error { return r.d.PrestartFcmap(ctx, "m4", false) }},
		{"prestartfcmap of the other", fcerr.GrainMismatch, func() error { return r.d.PrestartFcmap(ctx, "m1", false) }},
		{"startfcmap -prep", fcerr.GrainMismatch, func() error { return r.d.StartFcmap(ctx, "m4", true, false) }},
		{"prestartfcconsistgrp", fcerr.GrainMismatch, func() error { return r.d.PrestartConsistGrp(ctx, "g", false) }},
		{"startfcconsistgrp -prep", fcerr.GrainMismatch, func() error { return r.d.StartConsistGrp(ctx, "g", true, false) }},
		{"startfcmap -prep of a grain size that is none", fcerr.BadValue, func() error { return r.d.StartFcmap(ctx, "z", true, false) }},
		{"mkfcmap joining the mixed set", fcerr.GrainMismatch, func() error {
			_, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "T1", Target: "F"})
			return err
		}},
	}
	base := r.snapshot()
	for _, c := range refusals {
		err := c.do()
		if fcerr.CodeOf(err) != c.code {
			t.Fatalf("%s: %v, want %s", c.name, err, c.code)
		}
		r.same(c.name, base, r.snapshot())
	}
	r.restart()
	r.same("after restart", base, r.snapshot())

	// The way out the refusal names: delete the odd mapping and create it again without
	// -grainsize.
	if err := r.d.RmFcmap(ctx, "m4", false); err != nil {
		t.Fatal(err)
	}
	if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: "S", Target: "T4", Name: "m4", CopyRate: ip(0)}); err != nil {
		t.Fatal(err)
	}
	if err := r.d.StartFcmap(ctx, "m4", true, false); err != nil {
		t.Fatal(err)
	}
	if s := r.status("m4"); s != "copying" {
		t.Fatalf("m4 is %s after its start", s)
	}
}

// editModel rewrites the FlashCopy model in the catalogue with the daemon stopped, as another
// version of it could have left it, and starts the daemon again.
func (r *rig) editModel(edit func(*mappings.Model)) {
	r.t.Helper()
	r.close()
	cat, err := catalog.OpenWith(r.dir, r.catOpts)
	if err != nil {
		r.t.Fatal(err)
	}
	err = cat.Update(func(tx *catalog.Tx) error {
		m := mappings.New()
		if err := json.Unmarshal(tx.Model(), m); err != nil {
			return err
		}
		edit(m)
		data, err := json.Marshal(m)
		if err != nil {
			return err
		}
		return tx.PutModel(data)
	})
	if cerr := cat.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		r.t.Fatal(err)
	}
	r.open()
}

// TestGroupStartLoopRefused: cow.StartMappings accepts S→T and T→S in one start, after which
// every read of S or T walks the loop up to the engine's depth bound and fails with EIO. The
// control plane refuses such a group at prestart and start -prep, changing nothing; the volumes
// keep serving their data.
func TestGroupStartLoopRefused(t *testing.T) {
	r := newRig(t, nil)
	ctx := context.Background()
	r.mkvol("S", "T")
	r.write("S", 0, pattern(0x51, volSize))
	r.write("T", 0, pattern(0x52, volSize))
	if _, err := r.d.MkConsistGrp(ctx, api.MkConsistGrp{Name: "g"}); err != nil {
		t.Fatal(err)
	}
	for _, a := range []api.MkFcmap{{Source: "S", Target: "T", Name: "st"}, {Source: "T", Target: "S", Name: "ts"}} {
		a.ConsistGrp, a.CopyRate = "g", ip(0)
		if _, err := r.d.MkFcmap(ctx, a); err != nil {
			t.Fatal(err)
		}
	}
	base := r.snapshot()
	for _, c := range []struct {
		name string
		do   func() error
	}{
		{"prestartfcconsistgrp", func() error { return r.d.PrestartConsistGrp(ctx, "g", false) }},
		{"startfcconsistgrp -prep", func() error { return r.d.StartConsistGrp(ctx, "g", true, false) }},
		{"startfcconsistgrp -prep -restore", func() error { return r.d.StartConsistGrp(ctx, "g", true, true) }},
	} {
		if err := c.do(); fcerr.CodeOf(err) != fcerr.ChainLoop {
			t.Fatalf("%s: %v, want %s", c.name, err, fcerr.ChainLoop)
		}
		r.same(c.name, base, r.snapshot())
	}
	r.expect("S", 0, pattern(0x51, volSize))
	r.expect("T", 0, pattern(0x52, volSize))
}

// TestGroupOfUnconnectedGrainSizes: one group whose members are two unconnected sets of
// different grain sizes starts (the grain rule is per connected set, in the control plane and
// the engine alike), each target keeps its image and both survive a restart.
func TestGroupOfUnconnectedGrainSizes(t *testing.T) {
	r := newRig(t, nil)
	ctx := context.Background()
	r.mkvol("A", "B", "C", "D")
	r.write("A", 0, pattern(0x31, volSize))
	r.write("C", 0, pattern(0x32, volSize))
	if _, err := r.d.MkConsistGrp(ctx, api.MkConsistGrp{Name: "g"}); err != nil {
		t.Fatal(err)
	}
	for _, m := range []struct {
		name, src, tgt string
		grain          int
	}{{"m64", "A", "B", 64}, {"m256", "C", "D", 256}} {
		if _, err := r.d.MkFcmap(ctx, api.MkFcmap{Source: m.src, Target: m.tgt, Name: m.name, CopyRate: ip(0),
			GrainSize: ip(m.grain), ConsistGrp: "g"}); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.d.StartConsistGrp(ctx, "g", true, false); err != nil {
		t.Fatalf("start a group of two sets of 64 and 256 KiB grains: %v", err)
	}
	// Half of each source: a mapping at 100 % would complete and leave its chain.
	r.write("A", 0, pattern(0x41, volSize/2))
	r.write("C", 0, pattern(0x42, volSize/2))
	for i := 0; i < 2; i++ {
		for _, m := range []string{"m64", "m256"} {
			if s := r.status(m); s != "copying" {
				t.Fatalf("%s: %s, want copying", m, s)
			}
		}
		r.expect("B", 0, pattern(0x31, volSize))
		r.expect("D", 0, pattern(0x32, volSize))
		r.restart()
	}
}
