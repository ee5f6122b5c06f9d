package main

import (
	"bytes"
	"context"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"fcnbd/internal/api"
)

// daemon runs serve in-process on temporary paths and returns the control socket.
func daemon(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	cfg := serveConfig{
		dataDir: filepath.Join(dir, "data"),
		socket:  filepath.Join(dir, "run", "c.sock"),
		nbdUnix: filepath.Join(dir, "run", "nbd.sock"),
		log:     zerolog.Nop(),
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- serve(ctx, cfg) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	for i := 0; ; i++ {
		if _, err := api.NewClient(cfg.socket).Volumes(context.Background()); err == nil {
			return cfg.socket
		}
		if i == 200 {
			t.Fatal("daemon did not start")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func runCLI(t *testing.T, socket string, args ...string) (string, string, int) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := run(append([]string{"fcnbd", "--socket", socket}, args...), &out, &errOut)
	return out.String(), errOut.String(), code
}

func TestVolumeCommands(t *testing.T) {
	sock := daemon(t)
	steps := []struct {
		args    []string
		out     string // exact stdout, unless empty
		errCode string // the CMMVC code on stderr, if refused
	}{
		{[]string{"mkvolume", "-name", "v1", "-size", "64M"}, "Volume, id [0], successfully created\n", ""},
		{[]string{"mkvolume", "--name=big", "--size", "10G"}, "Volume, id [1], successfully created\n", ""},
		{[]string{"mkvolume", "-name", "v1", "-size", "4096"}, "", "CMMVC6035E"},
		{[]string{"mkvolume", "-name", "1x", "-size", "4096"}, "", "CMMVC6527E"},
		{[]string{"mkvolume", "-name", "x", "-size", "1000"}, "", "CMMVC5731E"},
		{[]string{"mkvolume", "-name", "x", "-size", "12Q"}, "", "CMMVC5731E"},
		{[]string{"mkvolume", "-size", "4096"}, "", "CMMVC5707E"},
		{[]string{"lsvolume"}, "id name status capacity fc_map_count\n0  v1   online 64.00MB  0\n1  big  online 10.00GB  0\n", ""},
		{[]string{"lsvolume", "-nohdr", "-delim", ":", "-bytes"}, "0:v1:online:67108864:0\n1:big:online:10737418240:0\n", ""},
		{[]string{"lsvolume", "-filtervalue", "name=b*"}, "id name status capacity fc_map_count\n1  big  online 10.00GB  0\n", ""},
		{[]string{"lsvolume", "-filtervalue", "name=v1:status=online", "-nohdr"}, "0 v1 online 64.00MB 0\n", ""},
		{[]string{"lsvolume", "-filtervalue", "colour=red"}, "", "CMMVC5731E"},
		{[]string{"lsvolume", "nope"}, "", "CMMVC5753E"},
		{[]string{"rmvolume"}, "", "CMMVC5707E"},
		{[]string{"rmvolume", "-force", "1"}, "", ""},
		{[]string{"rmvolume", "big"}, "", "CMMVC5754E"}, // a missing name: SVC's code, as rmvdisk (its alias) gives
		{[]string{"lsvolume", "-delim", ","}, "id,name,status,capacity,fc_map_count\n0,v1,online,64.00MB,0\n", ""},
	}
	for _, s := range steps {
		out, errOut, code := runCLI(t, sock, s.args...)
		if s.errCode != "" {
			if code == 0 || !strings.HasPrefix(errOut, s.errCode+" ") || strings.Count(errOut, "\n") != 1 || out != "" {
				t.Errorf("%v: code %d, stdout %q, stderr %q; want refusal %s", s.args, code, out, errOut, s.errCode)
			}
			continue
		}
		if code != 0 || errOut != "" || (s.out != "" && out != s.out) {
			t.Errorf("%v: code %d, stderr %q, stdout\n%s\nwant\n%s", s.args, code, errOut, out, s.out)
		}
	}

	out, _, code := runCLI(t, sock, "lsvolume", "v1")
	if code != 0 || !strings.HasPrefix(out, "id 0\nname v1\nstatus online\ncapacity 64.00MB\nfc_map_count 0\ncreated_time ") {
		t.Errorf("detailed view:\n%s", out)
	}
	out, _, _ = runCLI(t, sock, "lsvolume", "-json", "0")
	if !strings.Contains(out, `"name": "v1"`) || !strings.Contains(out, `"capacity": 67108864`) {
		t.Errorf("json view:\n%s", out)
	}
}

func TestNoDaemonMessage(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "fcnbd.sock")
	out, errOut, code := runCLI(t, sock, "lsvolume")
	if code != 1 || out != "" || errOut != "CMMVC9003E no fcnbd daemon is listening on "+sock+"\n" {
		t.Fatalf("code %d stdout %q stderr %q", code, out, errOut)
	}
}

func TestParseAndFormatSize(t *testing.T) {
	for in, want := range map[string]int64{
		"4096": 4096, "512K": 512 << 10, "64M": 64 << 20, "64m": 64 << 20, "10G": 10 << 30,
		"1T": 1 << 40, "2GiB": 2 << 30, "3MB": 3 << 20, "100B": 100,
	} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "M", "-1M", "1.5G", "10X", "99999999999P", "+4"} {
		if _, err := parseSize(bad); err == nil {
			t.Errorf("parseSize(%q) accepted", bad)
		}
	}
	for n, want := range map[int64]string{
		4096: "4.00KB", 64 << 20: "64.00MB", 10 << 30: "10.00GB", 1536 << 20: "1.50GB", 1 << 40: "1.00TB",
	} {
		if got := formatCapacity(n, false); got != want {
			t.Errorf("formatCapacity(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestMemoryLimit(t *testing.T) {
	defer debug.SetMemoryLimit(debug.SetMemoryLimit(-1))
	t.Setenv("GOMEMLIMIT", "")
	setMemoryLimit(zerolog.Nop(), 64<<20)
	if got, want := debug.SetMemoryLimit(-1), int64(64<<20+memoryHeadroom); got != want {
		t.Fatalf("soft memory limit %d, want cache size plus headroom %d", got, want)
	}
	// Set by the operator: left alone.
	debug.SetMemoryLimit(1 << 40)
	t.Setenv("GOMEMLIMIT", "1TiB")
	setMemoryLimit(zerolog.Nop(), 64<<20)
	if got := debug.SetMemoryLimit(-1); got != 1<<40 {
		t.Fatalf("soft memory limit %d changed although GOMEMLIMIT is set", got)
	}
}

func TestMonitorEnv(t *testing.T) {
	for _, tc := range []struct {
		in   []string
		want string // GODEBUG in the result; "" means no re-exec
	}{
		{[]string{"PATH=/bin"}, "GODEBUG=" + monitorSetting},
		{[]string{"GODEBUG=madvdontneed=1", "PATH=/bin"}, "GODEBUG=madvdontneed=1," + monitorSetting},
		{[]string{"GODEBUG=" + monitorSetting}, ""},      // the re-executed daemon
		{[]string{"GODEBUG=gctrace=1,schedtrace=0"}, ""}, // the operator's choice
		{[]string{"GODEBUG=", "HOME=/root"}, "GODEBUG=" + monitorSetting},
	} {
		env, need := monitorEnv(tc.in)
		if !need {
			if tc.want != "" {
				t.Errorf("%q: no re-exec, want %s", tc.in, tc.want)
			}
			continue
		}
		var godebug []string
		isGodebug := func(kv string) bool { return strings.HasPrefix(kv, "GODEBUG=") }
		for _, kv := range env {
			if isGodebug(kv) {
				godebug = append(godebug, kv)
			}
		}
		if len(godebug) != 1 || godebug[0] != tc.want {
			t.Errorf("%q: GODEBUG %q, want %q", tc.in, godebug, tc.want)
		}
		others := slices.DeleteFunc(slices.Clone(tc.in), isGodebug)
		if got := slices.DeleteFunc(slices.Clone(env), isGodebug); !slices.Equal(got, others) {
			t.Errorf("%q: the other variables became %q", tc.in, got)
		}
	}
}
