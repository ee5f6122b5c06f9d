package sysutil

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

type fakeSys struct {
	prctlErr, mlockErr, setErr error
	cur, max                   uint64
	prctlArgs                  []uintptr
	mlockFlags                 int
	mlocked, raised            bool
}

func (f *fakeSys) install(t *testing.T) {
	op, om, og, os := prctl, mlockall, getrlimit, setrlimit
	t.Cleanup(func() { prctl, mlockall, getrlimit, setrlimit = op, om, og, os })
	prctl = func(option int, a2, a3, a4, a5 uintptr) error {
		f.prctlArgs = []uintptr{uintptr(option), a2}
		return f.prctlErr
	}
	mlockall = func(flags int) error {
		f.mlocked, f.mlockFlags = true, flags
		return f.mlockErr
	}
	getrlimit = func(res int, lim *unix.Rlimit) error {
		if res != unix.RLIMIT_MEMLOCK {
			t.Errorf("getrlimit(%d)", res)
		}
		lim.Cur, lim.Max = f.cur, f.max
		return nil
	}
	setrlimit = func(res int, lim *unix.Rlimit) error {
		if res != unix.RLIMIT_MEMLOCK || lim.Cur != unix.RLIM_INFINITY || lim.Max != unix.RLIM_INFINITY {
			t.Errorf("setrlimit(%d, %+v)", res, *lim)
		}
		if f.setErr == nil {
			f.raised = true
		}
		return f.setErr
	}
}

type logLine struct {
	Level   string `json:"level"`
	Message string `json:"message"`
	Error   string `json:"error"`
}

func lines(t *testing.T, b *bytes.Buffer) []logLine {
	var out []logLine
	for _, l := range strings.Split(strings.TrimSpace(b.String()), "\n") {
		var ll logLine
		if err := json.Unmarshal([]byte(l), &ll); err != nil {
			t.Fatalf("log %q: %v", l, err)
		}
		out = append(out, ll)
	}
	return out
}

func TestHarden(t *testing.T) {
	inf := uint64(unix.RLIM_INFINITY)
	eperm := unix.EPERM
	tests := []struct {
		name    string
		sys     fakeSys
		opts    Options
		mlocked bool
		raised  bool
		skipped bool
		levels  []string // the two log lines: IO flusher, mlock
	}{
		{"all good, unlimited", fakeSys{cur: inf, max: inf}, Options{}, true, false, false, []string{"info", "info"}},
		{"limit raised as root", fakeSys{cur: 64 << 10, max: 64 << 10}, Options{}, true, true, false, []string{"info", "info"}},
		{"limit can't be raised", fakeSys{cur: 64 << 10, max: 64 << 10, setErr: eperm}, Options{}, false, false, true, []string{"info", "warn"}},
		{"prctl unsupported", fakeSys{cur: inf, max: inf, prctlErr: unix.EINVAL}, Options{}, true, false, false, []string{"warn", "info"}},
		{"mlockall fails", fakeSys{cur: inf, max: inf, mlockErr: unix.ENOMEM}, Options{}, true, false, false, []string{"info", "warn"}},
		{"no-mlock", fakeSys{cur: 64 << 10, max: 64 << 10}, Options{NoMlock: true}, false, false, true, []string{"info", "info"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := tc.sys
			f.install(t)
			var buf bytes.Buffer
			r := Harden(zerolog.New(&buf), tc.opts)

			if len(f.prctlArgs) != 2 || f.prctlArgs[0] != unix.PR_SET_IO_FLUSHER || f.prctlArgs[1] != 1 {
				t.Errorf("prctl args %v", f.prctlArgs)
			}
			if !errors.Is(r.IOFlusher, tc.sys.prctlErr) || (tc.sys.prctlErr == nil) != (r.IOFlusher == nil) {
				t.Errorf("IOFlusher %v, want %v", r.IOFlusher, tc.sys.prctlErr)
			}
			if f.mlocked != tc.mlocked || f.raised != tc.raised || r.MlockSkipped != tc.skipped {
				t.Errorf("mlocked %v raised %v skipped %v, want %v %v %v", f.mlocked, f.raised, r.MlockSkipped, tc.mlocked, tc.raised, tc.skipped)
			}
			if f.mlocked && f.mlockFlags != unix.MCL_CURRENT|unix.MCL_FUTURE {
				t.Errorf("mlockall flags %#x", f.mlockFlags)
			}
			if tc.sys.setErr != nil && !errors.Is(r.Mlock, ErrMemlockLimit) {
				t.Errorf("Mlock %v does not wrap ErrMemlockLimit", r.Mlock)
			}
			if tc.sys.mlockErr != nil && !errors.Is(r.Mlock, tc.sys.mlockErr) {
				t.Errorf("Mlock %v, want %v", r.Mlock, tc.sys.mlockErr)
			}
			ls := lines(t, &buf)
			if len(ls) != 2 {
				t.Fatalf("%d log lines, want 2 (one per protection): %s", len(ls), buf.String())
			}
			for i, l := range ls {
				if l.Level != tc.levels[i] {
					t.Errorf("line %d level %s, want %s: %+v", i, l.Level, tc.levels[i], l)
				}
				if l.Level == "warn" && l.Error == "" {
					t.Errorf("warning without the error: %+v", l)
				}
			}
		})
	}
}

// TestIOFlusherReal calls the real prctl: with CAP_SYS_RESOURCE on Linux ≥ 5.6 it succeeds;
// otherwise the error must be the kernel's refusal (EPERM without the capability — containers
// often drop it even for root — or EINVAL before 5.6), not something else.
func TestIOFlusherReal(t *testing.T) {
	err := setIOFlusher()
	if err != nil && !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.EINVAL) {
		t.Fatalf("unexpected error %v", err)
	}
	t.Logf("PR_SET_IO_FLUSHER: %v", err)
}
