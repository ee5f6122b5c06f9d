package mappings

import (
	"testing"
)

// setups: each returns the mapping under test, m0 = vol0 -> vol1 unless said otherwise.
func idle(f *fx) MappingID { return f.mk(0, 1) }
func preparing(f *fx) MappingID {
	id := f.mk(0, 1)
	f.ok(f.m.Prestart(ref(id), false))
	return id
}
func prepared(f *fx) MappingID {
	id := f.mk(0, 1)
	f.prepare(id)
	return id
}
func copying(f *fx) MappingID {
	id := f.mk(0, 1)
	f.start(id)
	return id
}
func copyingHalf(f *fx) MappingID {
	id := copying(f)
	f.apply(SplitProgress{Map: id, Split: 2})
	return id
}
func stopping(f *fx) MappingID {
	id := copyingHalf(f)
	f.ok(f.m.Stop(ref(id), false, false))
	return id
}
func stopped(f *fx) MappingID {
	id := prepared(f)
	f.ok(f.m.Stop(ref(id), false, false))
	return id
}
func suspendedCopying(f *fx) MappingID {
	id := copyingHalf(f)
	f.apply(BitmapOffline{Map: id})
	return id
}
func suspendedStopping(f *fx) MappingID {
	id := stopping(f)
	f.apply(BitmapOffline{Map: id})
	return id
}

// copiedWithDependant: m0 = vol0->vol2 started first, m1 = vol0->vol1 started second and at
// 100 %; m0 reads through vol1, so m1 stays copying (cleaning). Returns m1.
func copiedWithDependant(f *fx) MappingID {
	older := f.mk(0, 2)
	f.start(older)
	id := f.mk(0, 1)
	f.start(id)
	f.apply(CopyComplete{Map: id})
	return id
}

// TestTransitions has one row per row (and variant) of docs/flashcopy.md §3.
func TestTransitions(t *testing.T) {
	tests := []struct {
		name  string
		setup func(*fx) MappingID
		act   func(*fx, MappingID) ([]Effect, error)
		state State
		want  []string
	}{
		{
			name:  "create",
			setup: func(f *fx) MappingID { return NoMapping },
			act: func(f *fx, _ MappingID) ([]Effect, error) {
				_, effs, err := f.m.MkFcmap(MkFcmapArgs{Source: "vol0", Target: "vol1"})
				return effs, err
			},
			state: IdleOrCopied,
			want:  []string{"Persist"},
		},
		{
			name:  "prepare from idle_or_copied",
			setup: idle,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Prestart(ref(id), false) },
			state: Preparing,
			want:  []string{"Persist", "SetOnline v1 off", "SetWriteThrough v0 on", "InvalidateCache v1", "FlushSource m0 v0"},
		},
		{
			name:  "prepare from stopped (target already offline)",
			setup: stopped,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Prestart(ref(id), false) },
			state: Preparing,
			want:  []string{"Persist", "SetWriteThrough v0 on", "InvalidateCache v1", "FlushSource m0 v0"},
		},
		{
			name:  "flush done",
			setup: preparing,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Apply(FlushDone{Map: id}) },
			state: Prepared,
			want:  []string{"Persist"},
		},
		{
			name:  "flush failed",
			setup: preparing,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Apply(FlushFailed{Map: id}) },
			state: Stopped,
			want:  []string{"Persist", "SetWriteThrough v0 off"},
		},
		{
			name:  "start holds the source (still prepared until the commit)",
			setup: prepared,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Start(ref(id), false, false) },
			state: Prepared,
			want:  []string{"Hold g0 [m0] [v0]"},
		},
		{
			name:  "fence drained: one commit, release, target online, write-back, copy",
			setup: prepared,
			act: func(f *fx, id MappingID) ([]Effect, error) {
				fence := f.holdOf(f.ok(f.m.Start(ref(id), false, false)))
				return f.m.Apply(FenceDrained{Fence: fence, Now: t0})
			},
			state: Copying,
			want: []string{"CommitStart g0 m0(v0->v1) [v1 via v0]", "Release [v0]", "SetOnline v1 on",
				"SetWriteThrough v0 off", "StartBackgroundCopy m0 rate 50"},
		},
		{
			name:  "fence timeout: back to prepared",
			setup: prepared,
			act: func(f *fx, id MappingID) ([]Effect, error) {
				fence := f.holdOf(f.ok(f.m.Start(ref(id), false, false)))
				return f.m.Apply(FenceTimeout{Fence: fence})
			},
			state: Prepared,
			want:  []string{"Release [v0]"},
		},
		{
			name:  "start -prep prepares",
			setup: idle,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Start(ref(id), true, false) },
			state: Preparing,
			want:  []string{"Persist", "SetOnline v1 off", "SetWriteThrough v0 on", "InvalidateCache v1", "FlushSource m0 v0"},
		},
		{
			name:  "start -prep: flush done goes on to the fence",
			setup: idle,
			act: func(f *fx, id MappingID) ([]Effect, error) {
				f.ok(f.m.Start(ref(id), true, false))
				return f.m.Apply(FlushDone{Map: id})
			},
			state: Prepared,
			want:  []string{"Persist", "Hold g0 [m0] [v0]"},
		},
		{
			name:  "modify copy rate while copying re-rates the copy",
			setup: copying,
			act: func(f *fx, id MappingID) ([]Effect, error) {
				return f.m.ChFcmap(ref(id), ChFcmapArgs{CopyRate: new(100), Name: new("snap")})
			},
			state: Copying,
			want:  []string{"Persist", "StartBackgroundCopy m0 rate 100"},
		},
		{
			name:  "modify clean rate 0 while stopping cleans at 50",
			setup: stopping,
			act: func(f *fx, id MappingID) ([]Effect, error) {
				return f.m.ChFcmap(ref(id), ChFcmapArgs{CleanRate: new(0)})
			},
			state: Stopping,
			want:  []string{"Persist", "StartCleaning m0 rate 50"},
		},
		{
			name: "modify -autodelete on a finished mapping deletes it",
			setup: func(f *fx) MappingID {
				id := copying(f)
				f.apply(CopyComplete{Map: id})
				return id
			},
			act: func(f *fx, id MappingID) ([]Effect, error) {
				return f.m.ChFcmap(ref(id), ChFcmapArgs{Autodelete: new(true)})
			},
			state: "gone",
			want:  []string{"Persist", "DropMapping m0"},
		},
		{
			name:  "modify -autodelete on a never started mapping keeps it",
			setup: idle,
			act: func(f *fx, id MappingID) ([]Effect, error) {
				return f.m.ChFcmap(ref(id), ChFcmapArgs{Autodelete: new(true)})
			},
			state: IdleOrCopied,
			want:  []string{"Persist"},
		},
		{
			name:  "stop prepared",
			setup: prepared,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Stop(ref(id), false, false) },
			state: Stopped,
			want:  []string{"Persist", "SetWriteThrough v0 off"},
		},
		{
			name:  "stop preparing",
			setup: preparing,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Stop(ref(id), false, false) },
			state: Stopped,
			want:  []string{"Persist", "SetWriteThrough v0 off"},
		},
		{
			name:  "stop copying below 100 %: stopping, target offline, cleaning",
			setup: copyingHalf,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Stop(ref(id), false, false) },
			state: Stopping,
			want:  []string{"Persist", "SetOnline v1 off", "StopWorkers m0", "StartCleaning m0 rate 50"},
		},
		{
			name:  "clean complete below 100 %: stopped, out of the chain",
			setup: stopping,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Apply(CleanComplete{Map: id}) },
			state: Stopped,
			want:  []string{"Persist", "StopWorkers m0", "Relink [v1 via none]"},
		},
		{
			name:  "stop copying at 100 %: stopping, target stays online",
			setup: copiedWithDependant,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Stop(ref(id), false, false) },
			state: Stopping,
			want:  []string{"Persist", "StopWorkers m1", "StartCleaning m1 rate 50"},
		},
		{
			name: "clean complete at 100 %: idle_or_copied, downstream relinked",
			setup: func(f *fx) MappingID {
				id := copiedWithDependant(f)
				f.ok(f.m.Stop(ref(id), false, false))
				return id
			},
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Apply(CleanComplete{Map: id}) },
			state: IdleOrCopied,
			want:  []string{"Persist", "StopWorkers m1", "Relink [v1 via none v2 via v0]"},
		},
		{
			name:  "stop idle_or_copied: no effect",
			setup: idle,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Stop(ref(id), false, false) },
			state: IdleOrCopied,
			want:  []string{},
		},
		{
			name:  "stop stopping again: no effect",
			setup: stopping,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Stop(ref(id), false, false) },
			state: Stopping,
			want:  []string{},
		},
		{
			name:  "stop -force copying below 100 %: stopped at once",
			setup: copyingHalf,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Stop(ref(id), true, false) },
			state: Stopped,
			want:  []string{"Persist", "SetOnline v1 off", "StopWorkers m0", "Relink [v1 via none]"},
		},
		{
			name:  "stop -force stopping: stopped at once",
			setup: stopping,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Stop(ref(id), true, false) },
			state: Stopped,
			want:  []string{"Persist", "StopWorkers m0", "Relink [v1 via none]"},
		},
		{
			name:  "stop -force at 100 %: idle_or_copied, dependant stopped too",
			setup: copiedWithDependant,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Stop(ref(id), true, false) },
			state: IdleOrCopied,
			want:  []string{"Persist", "SetOnline v2 off", "StopWorkers m1", "StopWorkers m0", "Relink [v1 via none v2 via none]"},
		},
		{
			// The dependant stays under the split target, which holds its image whole.
			name:  "stop -split at 100 %: leaves the chain at once, dependant keeps its data",
			setup: copiedWithDependant,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Stop(ref(id), false, true) },
			state: IdleOrCopied,
			want:  []string{"Persist", "StopWorkers m1", "SplitOut m1 v1", "Relink [v1 via none]"},
		},
		{
			name:  "stop suspended: resumes as stopping",
			setup: suspendedCopying,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Stop(ref(id), false, false) },
			state: Suspended,
			want:  []string{"Persist"},
		},
		{
			name:  "stop -force suspended",
			setup: suspendedCopying,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Stop(ref(id), true, false) },
			state: Stopped,
			want:  []string{"Persist", "StopWorkers m0", "Relink [v1 via none]", "SetOnline v0 on"},
		},
		{
			name:  "I/O error while copying",
			setup: copyingHalf,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Apply(IOError{Map: id}) },
			state: Stopped,
			want:  []string{"Persist", "SetOnline v1 off", "StopWorkers m0", "Relink [v1 via none]"},
		},
		{
			name:  "I/O error while stopping",
			setup: stopping,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Apply(IOError{Map: id}) },
			state: Stopped,
			want:  []string{"Persist", "StopWorkers m0", "Relink [v1 via none]"},
		},
		{
			name:  "restore failed while copying",
			setup: copyingHalf,
			act: func(f *fx, id MappingID) ([]Effect, error) {
				return f.m.Apply(RestoreFailed{Map: id, Reason: "split bitmap unreadable"})
			},
			state: Stopped,
			want:  []string{"Persist", "SetOnline v1 off", "StopWorkers m0", "Relink [v1 via none]"},
		},
		{
			name:  "restore failed while suspended: source online, target offline",
			setup: suspendedCopying,
			act: func(f *fx, id MappingID) ([]Effect, error) {
				return f.m.Apply(RestoreFailed{Map: id, Reason: "split bitmap unreadable"})
			},
			state: Stopped,
			want:  []string{"Persist", "StopWorkers m0", "Relink [v1 via none]", "SetOnline v0 on"},
		},
		{
			name:  "delete idle_or_copied",
			setup: idle,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.RmFcmap(ref(id), false) },
			state: "gone",
			want:  []string{"Persist", "DropMapping m0"},
		},
		{
			name:  "delete stopped with -force: target online again",
			setup: stopped,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.RmFcmap(ref(id), true) },
			state: "gone",
			want:  []string{"Persist", "DropMapping m0", "SetOnline v1 on"},
		},
		{
			name:  "copy complete",
			setup: copyingHalf,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Apply(CopyComplete{Map: id}) },
			state: IdleOrCopied,
			want:  []string{"Persist", "StopWorkers m0", "Relink [v1 via none]"},
		},
		{
			name: "copy complete with autodelete deletes the mapping",
			setup: func(f *fx) MappingID {
				id := f.mk(0, 1, autodelete)
				f.start(id)
				return id
			},
			act: func(f *fx, id MappingID) ([]Effect, error) {
				return f.m.Apply(SplitProgress{Map: id, Split: fullSplit})
			},
			state: "gone",
			want:  []string{"Persist", "StopWorkers m0", "Relink [v1 via none]", "DropMapping m0"},
		},
		{
			name:  "copy complete while a dependant reads through: cleaning, still copying",
			setup: func(f *fx) MappingID { f.start(f.mk(0, 2)); id := f.mk(0, 1); f.start(id); return id },
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Apply(CopyComplete{Map: id}) },
			state: Copying,
			want:  []string{"Persist", "StartCleaning m1 rate 50"},
		},
		{
			name:  "clean complete of a copied mapping completes it",
			setup: copiedWithDependant,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Apply(CleanComplete{Map: id}) },
			state: IdleOrCopied,
			want:  []string{"Persist", "StopWorkers m1", "Relink [v1 via none v2 via v0]"},
		},
		{
			name:  "bitmap offline while copying",
			setup: copyingHalf,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Apply(BitmapOffline{Map: id}) },
			state: Suspended,
			want:  []string{"Persist", "SetOnline v0 off", "SetOnline v1 off", "StopWorkers m0"},
		},
		{
			name:  "bitmap offline while stopping",
			setup: stopping,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Apply(BitmapOffline{Map: id}) },
			state: Suspended,
			want:  []string{"Persist", "SetOnline v0 off", "StopWorkers m0"},
		},
		{
			name:  "bitmap online: back to copying",
			setup: suspendedCopying,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Apply(BitmapOnline{Map: id}) },
			state: Copying,
			want:  []string{"Persist", "SetOnline v0 on", "SetOnline v1 on", "StartBackgroundCopy m0 rate 50"},
		},
		{
			name:  "bitmap online: back to stopping",
			setup: suspendedStopping,
			act:   func(f *fx, id MappingID) ([]Effect, error) { return f.m.Apply(BitmapOnline{Map: id}) },
			state: Stopping,
			want:  []string{"Persist", "SetOnline v0 on", "StartCleaning m0 rate 50"},
		},
		{
			name:  "progress reaching 100 % while stopping brings the target online",
			setup: stopping,
			act: func(f *fx, id MappingID) ([]Effect, error) {
				return f.m.Apply(SplitProgress{Map: id, Split: fullSplit})
			},
			state: Stopping,
			want:  []string{"SetOnline v1 on"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFx(t, 3)
			id := tc.setup(f)
			effs, err := tc.act(f, id)
			if err != nil {
				t.Fatalf("refused: %v", err)
			}
			if id == NoMapping {
				id = 0
			}
			f.wantState(id, tc.state)
			wantEffects(t, effs, tc.want...)
		})
	}
}
