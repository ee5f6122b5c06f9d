package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"fcnbd/internal/api"
	"fcnbd/internal/fcerr"
)

// step is one poll's view of an object in a wait script; gone: it no longer exists.
type step struct {
	status   string
	progress int
	gone     bool
}

// fakeFC is a FlashCopy driver that records every call as one line ("StopFcmap m1 true false",
// structs as JSON), refuses each call with err when set, and serves maps and grps. A mapping
// or group looked up by id or name takes its status from the next step of mapSteps or
// grpSteps while they last (the last step repeats), so a test can move it over time.
type fakeFC struct {
	mu       sync.Mutex
	calls    []string
	err      error
	maps     []api.Fcmap
	grps     []api.ConsistGrp
	mapSteps []step
	grpSteps []step
}

func (f *fakeFC) record(name string, args ...any) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	line := name
	for _, a := range args {
		switch a.(type) {
		case string, bool:
			line += fmt.Sprint(" ", a)
		default:
			data, _ := json.Marshal(a)
			line += " " + string(data)
		}
	}
	f.calls = append(f.calls, line)
	return f.err
}

func (f *fakeFC) takeCalls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.calls
	f.calls = nil
	return c
}

// next pops the next step of *steps, keeping the last one.
func next(steps *[]step) (step, bool) {
	if len(*steps) == 0 {
		return step{}, false
	}
	s := (*steps)[0]
	if len(*steps) > 1 {
		*steps = (*steps)[1:]
	}
	return s, true
}

func notFound(ref string) error {
	return fcerr.New(fcerr.NoSuchObject, "the object %s does not exist", ref)
}

func (f *fakeFC) MkFcmap(_ context.Context, req api.MkFcmap) (int, error) {
	return 4, f.record("MkFcmap", req)
}
func (f *fakeFC) ChFcmap(_ context.Context, ref string, req api.ChFcmap) error {
	return f.record("ChFcmap", ref, req)
}
func (f *fakeFC) PrestartFcmap(_ context.Context, ref string, restore bool) error {
	return f.record("PrestartFcmap", ref, restore)
}
func (f *fakeFC) StartFcmap(_ context.Context, ref string, prep, restore bool) error {
	return f.record("StartFcmap", ref, prep, restore)
}
func (f *fakeFC) StopFcmap(_ context.Context, ref string, force, split bool) error {
	return f.record("StopFcmap", ref, force, split)
}
func (f *fakeFC) RmFcmap(_ context.Context, ref string, force bool) error {
	return f.record("RmFcmap", ref, force)
}
func (f *fakeFC) Fcmaps(context.Context) []api.Fcmap {
	f.record("Fcmaps")
	return f.maps
}
func (f *fakeFC) Fcmap(_ context.Context, ref string) (api.Fcmap, error) {
	if err := f.record("Fcmap", ref); err != nil {
		return api.Fcmap{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, m := range f.maps {
		if fmt.Sprint(m.ID) == ref || m.Name == ref {
			if s, ok := next(&f.mapSteps); ok {
				if s.gone {
					return api.Fcmap{}, notFound(ref)
				}
				m.Status, m.Progress = s.status, s.progress
			}
			return m, nil
		}
	}
	return api.Fcmap{}, notFound(ref)
}
func (f *fakeFC) FcmapDependentMaps(_ context.Context, ref string) ([]api.Fcmap, error) {
	return f.maps, f.record("FcmapDependentMaps", ref)
}
func (f *fakeFC) MkConsistGrp(_ context.Context, req api.MkConsistGrp) (int, error) {
	return 2, f.record("MkConsistGrp", req)
}
func (f *fakeFC) ChConsistGrp(_ context.Context, ref string, req api.ChConsistGrp) error {
	return f.record("ChConsistGrp", ref, req)
}
func (f *fakeFC) PrestartConsistGrp(_ context.Context, ref string, restore bool) error {
	return f.record("PrestartConsistGrp", ref, restore)
}
func (f *fakeFC) StartConsistGrp(_ context.Context, ref string, prep, restore bool) error {
	return f.record("StartConsistGrp", ref, prep, restore)
}
func (f *fakeFC) StopConsistGrp(_ context.Context, ref string, force, split bool) error {
	return f.record("StopConsistGrp", ref, force, split)
}
func (f *fakeFC) RmConsistGrp(_ context.Context, ref string, force bool) error {
	return f.record("RmConsistGrp", ref, force)
}
func (f *fakeFC) ConsistGrps(context.Context) []api.ConsistGrp {
	f.record("ConsistGrps")
	return f.grps
}
func (f *fakeFC) ConsistGrp(_ context.Context, ref string) (api.ConsistGrp, error) {
	if err := f.record("ConsistGrp", ref); err != nil {
		return api.ConsistGrp{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, g := range f.grps {
		if fmt.Sprint(g.ID) == ref || g.Name == ref {
			if s, ok := next(&f.grpSteps); ok {
				if s.gone {
					return api.ConsistGrp{}, notFound(ref)
				}
				g.Status = s.status
			}
			return g, nil
		}
	}
	return api.ConsistGrp{}, notFound(ref)
}
func (f *fakeFC) VdiskFcmapCopies(_ context.Context, vol string) ([]api.Fcmap, error) {
	return f.maps, f.record("VdiskFcmapCopies", vol)
}
func (f *fakeFC) VdiskDependentMaps(_ context.Context, vol string) ([]api.Fcmap, error) {
	return f.maps[:1], f.record("VdiskDependentMaps", vol)
}

// fcDaemon serves the real API handler over fc on a Unix socket and returns the socket.
func fcDaemon(t *testing.T, fc api.FlashCopy) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "c.sock")
	l, err := api.ListenUnix(sock, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(api.NewHandler(nil, zerolog.Nop()).WithFlashCopy(fc).WithSystem(t.TempDir()))
	srv.Listener.Close()
	srv.Listener = l
	srv.Start()
	t.Cleanup(srv.Close)
	return sock
}

var fcStart = time.Date(2025, 3, 4, 5, 6, 7, 0, time.UTC)

// testMaps: a copying stand-alone mapping, and its finished, restoring partner in group g1.
func testMaps() []api.Fcmap {
	return []api.Fcmap{
		{ID: 0, Name: "fcmap0", SourceID: 0, SourceName: "vsrc", TargetID: 1, TargetName: "vtgt",
			Status: "copying", Progress: 42, CopyRate: 50, CleanRate: 50, GrainSize: 256, StartTime: fcStart,
			PartnerID: 1, PartnerName: "back", DependentMappings: 1,
			GrainsCopied: 10, SplitOnWrite: 3, BytesCopied: 10 << 18, CopyThroughput: 2 << 20},
		{ID: 1, Name: "back", SourceID: 1, SourceName: "vtgt", TargetID: 0, TargetName: "vsrc",
			GroupID: 1, GroupName: "g1", Status: "idle_or_copied", Progress: 100, CopyRate: 0, CleanProgress: 100,
			CleanRate: 20, GrainSize: 64, Incremental: true, Difference: 3, Autodelete: true,
			PartnerID: -1, Restoring: true, RestoreProgress: 7},
	}
}

func testGrps() []api.ConsistGrp {
	return []api.ConsistGrp{
		{ID: 1, Name: "g1", Status: "idle_or_copied", Autodelete: true, StartTime: fcStart,
			Members: []api.FcmapName{{ID: 0, Name: "fcmap0"}, {ID: 1, Name: "back"}}, LastHold: 1500 * time.Microsecond},
		{ID: 2, Name: "empty", Status: "empty"},
	}
}

// TestFcCommandsReachAPI: each command's flags reach the driver as the interface says, and
// refusals (the CLI's, the API's, the driver's) come out as "CODE message" on stderr.
func TestFcCommandsReachAPI(t *testing.T) {
	fc := &fakeFC{maps: testMaps(), grps: testGrps()}
	sock := fcDaemon(t, fc)
	tests := []struct {
		args    []string
		call    string // the one driver call expected; "" for none
		out     string // exact stdout
		errCode string // the refusal's code, if refused; "usage" for urfave/cli's own refusal
	}{
		{[]string{"mkfcmap", "-source", "vsrc", "-target", "vtgt"}, `MkFcmap {"source":"vsrc","target":"vtgt"}`,
			"FlashCopy Mapping, id [4], successfully created\n", ""},
		{[]string{"mkfcmap", "-source", "0", "-target", "1", "-name", "snap", "-consistgrp", "g1", "-copyrate", "0",
			"-cleanrate", "150", "-grainsize", "64", "-autodelete", "-incremental"},
			`MkFcmap {"source":"0","target":"1","name":"snap","consistgrp":"g1","copyrate":0,"cleanrate":150,"grainsize":64,"autodelete":true,"incremental":true}`,
			"FlashCopy Mapping, id [4], successfully created\n", ""},
		{[]string{"mkfcmap", "-target", "vtgt"}, "", "", fcerr.MissingParameter},
		{[]string{"mkfcmap", "-source", "vsrc"}, "", "", fcerr.MissingParameter},
		{[]string{"mkfcmap", "-source", "a", "-target", "b", "-copyrate", "fast"}, "", "", fcerr.BadValue},
		{[]string{"mkfcmap", "-source", "a", "-target", "b", "-copyrate", "151"}, "", "", fcerr.BadValue},
		{[]string{"mkfcmap", "-source", "a", "-target", "b", "-grainsize", "128"}, "", "", fcerr.BadValue},
		{[]string{"mkfcmap", "-source", "a", "-target", "b", "extra"}, "", "", fcerr.BadValue},
		{[]string{"mkfcmap", "-source", "vsrc", "-target", "vtgt", "-iogrp", "io_grp0"}, `MkFcmap {"source":"vsrc","target":"vtgt"}`,
			"FlashCopy Mapping, id [4], successfully created\n", ""},
		{[]string{"mkfcmap", "-source", "vsrc", "-target", "vtgt", "-iogrp", "1"}, "", "", fcerr.NoSuchName},
		{[]string{"mkfcmap", "-source", "vsrc", "-target", "vtgt", "-keeptarget"}, "", "", fcerr.Unsupported},

		{[]string{"chfcmap", "-copyrate", "10", "-cleanrate", "0", "-autodelete", "on", "-consistgrp", "0", "fcmap0"},
			`ChFcmap fcmap0 {"copyrate":10,"cleanrate":0,"autodelete":true,"consistgrp":"0"}`, "", ""},
		{[]string{"chfcmap", "-name", "n", "fcmap0"}, `ChFcmap fcmap0 {"name":"n"}`, "", ""},
		{[]string{"chfcmap", "-name", "n", "-copyrate", "10", "fcmap0"}, "", "", fcerr.ExclusiveFlags}, // as the product: -name alone
		{[]string{"chfcmap", "-autodelete", "on", "-name", "n", "fcmap0"}, "", "", fcerr.ExclusiveFlags},
		{[]string{"chfcmap", "-autodelete", "off", "1"}, `ChFcmap 1 {"autodelete":false}`, "", ""},
		{[]string{"chfcmap", "-autodelete", "maybe", "1"}, "", "", fcerr.BadValue},
		{[]string{"chfcmap", "1"}, "", "", fcerr.MissingParameter},
		{[]string{"chfcmap", "-name", "n"}, "", "", fcerr.MissingParameter},
		{[]string{"chfcmap", "-cleanrate", "-1", "1"}, "", "", fcerr.BadValue},

		{[]string{"prestartfcmap", "fcmap0"}, "PrestartFcmap fcmap0 false", "", ""},
		{[]string{"prestartfcmap", "-restore", "fcmap0"}, "PrestartFcmap fcmap0 true", "", ""},
		{[]string{"prestartfcmap"}, "", "", fcerr.MissingParameter},
		{[]string{"startfcmap", "0"}, "StartFcmap 0 false false", "", ""},
		{[]string{"startfcmap", "-prep", "0"}, "StartFcmap 0 true false", "", ""},
		{[]string{"startfcmap", "-prep", "-restore", "0"}, "StartFcmap 0 true true", "", ""},
		{[]string{"stopfcmap", "fcmap0"}, "StopFcmap fcmap0 false false", "", ""},
		{[]string{"stopfcmap", "-force", "fcmap0"}, "StopFcmap fcmap0 true false", "", ""},
		{[]string{"stopfcmap", "-split", "fcmap0"}, "StopFcmap fcmap0 false true", "", ""},
		{[]string{"stopfcmap", "-force", "-split", "fcmap0"}, "", "", fcerr.ExclusiveFlags},
		{[]string{"rmfcmap", "fcmap0"}, "RmFcmap fcmap0 false", "", ""},
		{[]string{"rmfcmap", "-force", "fcmap0"}, "RmFcmap fcmap0 true", "", ""},
		{[]string{"rmfcmap", "a", "b"}, "", "", fcerr.BadValue},

		{[]string{"mkfcconsistgrp"}, "MkConsistGrp {}", "FlashCopy Consistency Group, id [2], successfully created\n", ""},
		{[]string{"mkfcconsistgrp", "-name", "nightly", "-autodelete"}, `MkConsistGrp {"name":"nightly","autodelete":true}`,
			"FlashCopy Consistency Group, id [2], successfully created\n", ""},
		{[]string{"chfcconsistgrp", "-name", "weekly", "-autodelete", "off", "g1"}, `ChConsistGrp g1 {"name":"weekly","autodelete":false}`, "", ""},
		{[]string{"chfcconsistgrp", "g1"}, "", "", fcerr.MissingParameter},
		{[]string{"chfcconsistgrp", "-autodelete", "1", "g1"}, "", "", fcerr.BadValue},
		{[]string{"prestartfcconsistgrp", "-restore", "g1"}, "PrestartConsistGrp g1 true", "", ""},
		{[]string{"startfcconsistgrp", "g1"}, "StartConsistGrp g1 false false", "", ""},
		{[]string{"startfcconsistgrp", "-prep", "1"}, "StartConsistGrp 1 true false", "", ""},
		{[]string{"stopfcconsistgrp", "-split", "g1"}, "StopConsistGrp g1 false true", "", ""},
		{[]string{"stopfcconsistgrp", "-force", "-split", "g1"}, "", "", fcerr.ExclusiveFlags},
		{[]string{"rmfcconsistgrp", "-force", "g1"}, "RmConsistGrp g1 true", "", ""},
		{[]string{"rmfcconsistgrp"}, "", "", fcerr.MissingParameter},

		{[]string{"lsfcmap", "nope"}, "Fcmap nope", "", fcerr.NoSuchObject},
		{[]string{"lsfcconsistgrp", "nope"}, "ConsistGrp nope", "", fcerr.NoSuchObject},
		{[]string{"lsfcmap", "-filtervalue", "colour=red"}, "Fcmaps", "", fcerr.BadValue},
		{[]string{"lsfcmap", "-filtervalue", "status=copying", "0"}, "Fcmap 0", "", fcerr.ExclusiveFlags},
		{[]string{"lsfcmap", "-bytes"}, "", "", "usage"}, // not a flag of lsfcmap
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			out, errOut, code := runCLI(t, sock, tc.args...)
			calls := fc.takeCalls()
			if tc.call == "" && len(calls) != 0 || tc.call != "" && (len(calls) != 1 || calls[0] != tc.call) {
				t.Errorf("driver calls %q, want %q", calls, tc.call)
			}
			switch {
			case tc.errCode == "usage":
				if code == 0 {
					t.Errorf("accepted: stdout %q", out)
				}
			case tc.errCode != "":
				if code == 0 || !strings.HasPrefix(errOut, tc.errCode+" ") || strings.Count(errOut, "\n") != 1 || out != "" {
					t.Errorf("code %d, stdout %q, stderr %q; want refusal %s", code, out, errOut, tc.errCode)
				}
			case code != 0 || errOut != "" || out != tc.out:
				t.Errorf("code %d, stderr %q, stdout %q; want %q", code, errOut, out, tc.out)
			}
		})
	}
}

// TestFcDriverRefusal: a refusal from the driver reaches the operator word for word.
func TestFcDriverRefusal(t *testing.T) {
	sock := fcDaemon(t, &fakeFC{err: fcerr.New(fcerr.AlreadyCopying, "the mapping fcmap0 is already copying")})
	out, errOut, code := runCLI(t, sock, "startfcmap", "fcmap0")
	if code != 1 || out != "" || errOut != "CMMVC5907E the mapping fcmap0 is already copying\n" {
		t.Fatalf("code %d stdout %q stderr %q", code, out, errOut)
	}
}

func TestLsfcmap(t *testing.T) {
	sock := fcDaemon(t, &fakeFC{maps: testMaps(), grps: testGrps()})
	start := fcStart.Local().Format("060102150405")
	row0 := "0:fcmap0:0:vsrc:1:vtgt:::copying:42:50:0:off:1:back:no:" + start + ":no"
	row1 := "1:back:1:vtgt:0:vsrc:1:g1:idle_or_copied:100:0:100:on:::yes::no"
	header := strings.Join(fcmapColumns, ":")
	tests := []struct {
		args []string
		out  string
	}{
		{[]string{"lsfcmap", "-delim", ":"}, header + "\n" + row0 + "\n" + row1 + "\n"},
		{[]string{"lsfcmap", "-delim", ":", "-nohdr"}, row0 + "\n" + row1 + "\n"},
		{[]string{"lsfcmap", "-delim", ":", "-filtervalue", "status=idle*"}, header + "\n" + row1 + "\n"},
		{[]string{"lsfcmap", "-delim", ":", "-nohdr", "-filtervalue", "group_name=:restoring=no"}, row0 + "\n"},
		{[]string{"lsfcmap", "-delim", ":", "-nohdr", "-filtervalue", "bytes_copied=2621440"}, row0 + "\n"},
		{[]string{"lsfcmap", "-nohdr", "-filtervalue", "name=nothing"}, ""},
		{[]string{"lsfcmap"}, "" +
			"id name   source_vdisk_id source_vdisk_name target_vdisk_id target_vdisk_name group_id group_name status         progress copy_rate clean_progress incremental partner_FC_id partner_FC_name restoring start_time   rc_controlled\n" +
			"0  fcmap0 0               vsrc              1               vtgt                                  copying        42       50        0              off         1             back            no        " + start + " no\n" +
			"1  back   1               vtgt              0               vsrc              1        g1         idle_or_copied 100      0         100            on                                        yes                    no\n"},
		{[]string{"lsfcmap", "fcmap0"}, "id 0\nname fcmap0\nsource_vdisk_id 0\nsource_vdisk_name vsrc\ntarget_vdisk_id 1\n" +
			"target_vdisk_name vtgt\ngroup_id \ngroup_name \nstatus copying\nprogress 42\ncopy_rate 50\nstart_time " + start + "\n" +
			"dependent_mappings 1\nautodelete off\nclean_progress 0\nclean_rate 50\nincremental off\ndifference 0\n" +
			"grain_size 256\nIO_group_id 0\nIO_group_name io_grp0\npartner_FC_id 1\npartner_FC_name back\nrestoring no\n" +
			"rc_controlled no\nkeep_target no\ntype generic\nrestore_progress 0\nfc_controlled no\nowner_id \nowner_name \n" +
			"grains_copied 10\nsplit_on_write 3\nbytes_copied 2621440\ncopy_throughput 2097152\nstatus_reason \n"},
		{[]string{"lsfcmap", "-delim", "=", "1"}, "id=1\nname=back\nsource_vdisk_id=1\nsource_vdisk_name=vtgt\ntarget_vdisk_id=0\n" +
			"target_vdisk_name=vsrc\ngroup_id=1\ngroup_name=g1\nstatus=idle_or_copied\nprogress=100\ncopy_rate=0\nstart_time=\n" +
			"dependent_mappings=0\nautodelete=on\nclean_progress=100\nclean_rate=20\nincremental=on\ndifference=3\n" +
			"grain_size=64\nIO_group_id=0\nIO_group_name=io_grp0\npartner_FC_id=\npartner_FC_name=\nrestoring=yes\n" +
			"rc_controlled=no\nkeep_target=no\ntype=generic\nrestore_progress=7\nfc_controlled=no\nowner_id=\nowner_name=\n" +
			"grains_copied=0\nsplit_on_write=0\nbytes_copied=0\ncopy_throughput=0\nstatus_reason=\n"},
		{[]string{"lsfcmapprogress", "fcmap0"}, "id progress\n0  42\n"},
		{[]string{"lsfcmapprogress", "-nohdr", "-delim", ",", "back"}, "1,100\n"},
		{[]string{"lsfcmapprogress", "-json", "back"}, "[\n  {\n    \"id\": 1,\n    \"progress\": 100\n  }\n]\n"},
		{[]string{"lsfcmapdependentmaps", "fcmap0"}, "fc_id fc_name\n0     fcmap0\n1     back\n"},
		{[]string{"lsfcmapdependentmaps", "-nohdr", "-delim", ":", "-filtervalue", "fc_name=b*", "fcmap0"}, "1:back\n"},
		{[]string{"lsvdiskdependentmaps", "vsrc"}, "id name\n0  fcmap0\n"},
		{[]string{"lsvdiskfcmapcopies", "-delim", ":", "vsrc"}, "id:name:status:progress:difference:start_time:target_vdisk_id:target_vdisk_name:group_id:group_name\n" +
			"0:fcmap0:copying:42:0:" + start + ":1:vtgt::\n1:back:idle_or_copied:100:3::0:vsrc:1:g1\n"},
		{[]string{"lsvdiskfcmapcopies", "-nohdr", "-delim", ":", "-filtervalue", "incremental=on", "vsrc"}, "1:back:idle_or_copied:100:3::0:vsrc:1:g1\n"},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			out, errOut, code := runCLI(t, sock, tc.args...)
			if code != 0 || errOut != "" || out != tc.out {
				t.Errorf("code %d, stderr %q, stdout\n%s\nwant\n%s", code, errOut, out, tc.out)
			}
		})
	}

	// -json is the API's object, lossless.
	out, _, code := runCLI(t, sock, "lsfcmap", "-json")
	var got []api.Fcmap
	if err := json.Unmarshal([]byte(out), &got); code != 0 || err != nil || len(got) != 2 {
		t.Fatalf("lsfcmap -json: %v\n%s", err, out)
	}
	if want := testMaps(); !got[0].StartTime.Equal(want[0].StartTime) || got[1].PartnerID != -1 || got[0].BytesCopied != want[0].BytesCopied {
		t.Errorf("lsfcmap -json: %+v", got)
	}
	out, _, _ = runCLI(t, sock, "lsfcmap", "-json", "back")
	if !strings.HasPrefix(out, "{\n  \"id\": 1,\n  \"name\": \"back\",") || !strings.Contains(out, `"restoring": true`) {
		t.Errorf("lsfcmap -json back:\n%s", out)
	}
}

func TestLsfcconsistgrp(t *testing.T) {
	sock := fcDaemon(t, &fakeFC{maps: testMaps(), grps: testGrps()})
	start := fcStart.Local().Format("060102150405")
	tests := []struct {
		args []string
		out  string
	}{
		{[]string{"lsfcconsistgrp"}, "" +
			"id name  status         start_time   owner_id owner_name\n" +
			"1  g1    idle_or_copied " + start + "          \n" +
			"2  empty empty                                \n"},
		{[]string{"lsfcconsistgrp", "-nohdr", "-delim", ":", "-filtervalue", "status=empty"}, "2:empty:empty:::\n"},
		{[]string{"lsfcconsistgrp", "-nohdr", "-delim", ":", "-filtervalue", "autodelete=on"}, "1:g1:idle_or_copied:" + start + "::\n"},
		{[]string{"lsfcconsistgrp", "g1"}, "id 1\nname g1\nstatus idle_or_copied\nautodelete on\nstart_time " + start + "\n" +
			"owner_id \nowner_name \nFC_mapping_id 0\nFC_mapping_name fcmap0\nFC_mapping_id 1\nFC_mapping_name back\nlast_hold_ms 1.500\n"},
		{[]string{"lsfcconsistgrp", "2"}, "id 2\nname empty\nstatus empty\nautodelete off\nstart_time \nowner_id \nowner_name \nlast_hold_ms \n"},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			out, errOut, code := runCLI(t, sock, tc.args...)
			if code != 0 || errOut != "" || out != tc.out {
				t.Errorf("code %d, stderr %q, stdout\n%s\nwant\n%s", code, errOut, out, tc.out)
			}
		})
	}
	out, _, _ := runCLI(t, sock, "lsfcconsistgrp", "-json", "g1")
	var g api.ConsistGrp
	if err := json.Unmarshal([]byte(out), &g); err != nil || len(g.Members) != 2 || g.LastHold != 1500*time.Microsecond {
		t.Errorf("lsfcconsistgrp -json g1: %v\n%s", err, out)
	}
}

func TestWait(t *testing.T) {
	tests := []struct {
		name     string
		args     []string
		mapSteps []step
		grpSteps []step
		code     int
		out      string // exact stdout
		errPart  string // in stderr; "" means stderr is empty
		min, max time.Duration
	}{
		{name: "copies", args: []string{"fcmap0"},
			mapSteps: []step{{status: "preparing"}, {status: "prepared"}, {status: "copying", progress: 50}, {status: "idle_or_copied", progress: 100}},
			max:      2 * time.Second, min: 2 * pollInterval},
		{name: "already there", args: []string{"-status", "copying", "0"}, max: time.Second},
		{name: "prepared", args: []string{"-status", "prepared", "-timeout", "5s", "fcmap0"},
			mapSteps: []step{{status: "preparing"}, {status: "prepared"}}, max: 2 * time.Second},
		{name: "timeout", args: []string{"-timeout", "500ms", "fcmap0"},
			mapSteps: []step{{status: "copying", progress: 10}}, code: 1,
			errPart: "fcnbd: timed out after 500ms waiting for FlashCopy mapping fcmap0 to be idle_or_copied (it is copying, progress 10%)\n",
			min:     500 * time.Millisecond, max: 2 * time.Second},
		{name: "stopped", args: []string{"fcmap0"},
			mapSteps: []step{{status: "copying", progress: 10}, {status: "stopped", progress: 10}}, code: 1,
			errPart: "fcnbd: FlashCopy mapping fcmap0 stopped (progress 10%) while waiting for it to be idle_or_copied\n", max: 2 * time.Second},
		{name: "stopped is wanted", args: []string{"-status", "stopped", "fcmap0"},
			mapSteps: []step{{status: "stopping"}, {status: "stopped"}}, max: 2 * time.Second},
		{name: "autodeleted", args: []string{"fcmap0"},
			mapSteps: []step{{status: "copying", progress: 90}, {gone: true}},
			out:      "FlashCopy mapping fcmap0 was deleted (autodelete does this when the copy completes)\n", max: 2 * time.Second},
		{name: "deleted while waiting for copying", args: []string{"-status", "copying", "fcmap0"},
			mapSteps: []step{{status: "prepared"}, {gone: true}}, code: 1,
			errPart: "fcnbd: FlashCopy mapping fcmap0 was deleted while waiting for it to be copying\n", max: 2 * time.Second},
		{name: "group by fallback", args: []string{"g1"},
			grpSteps: []step{{status: "copying"}, {status: "idle_or_copied"}}, max: 2 * time.Second},
		{name: "group by flag", args: []string{"-group", "-status", "copying", "1"},
			grpSteps: []step{{status: "prepared"}, {status: "copying"}}, max: 2 * time.Second},
		{name: "group stopped", args: []string{"-group", "g1"},
			grpSteps: []step{{status: "stopped"}}, code: 1,
			errPart: "fcnbd: FlashCopy consistency group g1 stopped (progress 71%) while waiting for it to be idle_or_copied\n", max: time.Second},
		{name: "group autodeleted", args: []string{"g1"},
			grpSteps: []step{{status: "copying"}, {gone: true}},
			out:      "FlashCopy consistency group g1 was deleted (autodelete does this when its last mapping leaves)\n", max: time.Second},
		{name: "empty group", args: []string{"-status", "empty", "empty"}, max: time.Second},
		{name: "unknown", args: []string{"nope"}, code: 1, errPart: "CMMVC5753E ", max: time.Second},
		{name: "-group and a mapping", args: []string{"-group", "fcmap0"}, code: 1, errPart: "CMMVC5753E ", max: time.Second},
		{name: "bad status", args: []string{"-status", "done", "fcmap0"}, code: 1, errPart: "CMMVC5731E ", max: time.Second},
		{name: "bad timeout", args: []string{"-timeout", "soon", "fcmap0"}, code: 1, errPart: "CMMVC5731E ", max: time.Second},
		{name: "interval", args: []string{"-interval", "20ms", "fcmap0"},
			mapSteps: []step{{status: "preparing"}, {status: "prepared"}, {status: "copying", progress: 50}, {status: "idle_or_copied", progress: 100}},
			min:      2 * 20 * time.Millisecond, max: 2 * pollInterval},
		{name: "interval too short", args: []string{"-interval", "1ms", "fcmap0"}, code: 1, errPart: "CMMVC5731E the -interval value \"1ms\"", max: time.Second},
		{name: "bad interval", args: []string{"-interval", "often", "fcmap0"}, code: 1, errPart: "CMMVC5731E ", max: time.Second},
		{name: "no ref", args: []string{}, code: 1, errPart: "CMMVC5707E ", max: time.Second},
		{name: "flags after the ref", args: []string{"fcmap0", "-status", "prepared", "--timeout=5s"},
			mapSteps: []step{{status: "preparing"}, {status: "prepared"}}, max: 2 * time.Second},
		{name: "group flag after the ref", args: []string{"1", "-group", "-status=copying"},
			grpSteps: []step{{status: "copying"}}, max: time.Second},
		{name: "timeout after the ref", args: []string{"fcmap0", "-timeout", "300ms"}, code: 1,
			errPart: "fcnbd: timed out after 300ms waiting for FlashCopy mapping fcmap0 to be idle_or_copied (it is copying, progress 42%)\n",
			min:     300 * time.Millisecond, max: 2 * time.Second},
		{name: "unknown flag after the ref", args: []string{"fcmap0", "-colour", "red"}, code: 1, errPart: "CMMVC5731E ", max: time.Second},
		{name: "flag value missing", args: []string{"fcmap0", "-status"}, code: 1, errPart: "CMMVC5707E ", max: time.Second},
		{name: "two refs", args: []string{"fcmap0", "-group", "g1"}, code: 1, errPart: "CMMVC5731E unexpected argument \"g1\"", max: time.Second},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sock := fcDaemon(t, &fakeFC{maps: testMaps(), grps: testGrps(), mapSteps: tc.mapSteps, grpSteps: tc.grpSteps})
			begin := time.Now()
			out, errOut, code := runCLI(t, sock, append([]string{"wait"}, tc.args...)...)
			took := time.Since(begin)
			if code != tc.code || out != tc.out {
				t.Errorf("code %d, stdout %q; want %d, %q (stderr %q)", code, out, tc.code, tc.out, errOut)
			}
			if tc.errPart == "" && errOut != "" || !strings.Contains(errOut, tc.errPart) {
				t.Errorf("stderr %q, want %q", errOut, tc.errPart)
			}
			if took < tc.min || took > tc.max {
				t.Errorf("took %v, want %v to %v", took, tc.min, tc.max)
			}
		})
	}
}

// TestWaitProgressBar: on a terminal the bar is redrawn in place, then the line is ended.
func TestWaitProgressBar(t *testing.T) {
	// The first step is the lookup's.
	fc := &fakeFC{maps: testMaps(), mapSteps: []step{{status: "preparing"}, {status: "copying", progress: 50}, {status: "idle_or_copied", progress: 100}}}
	sock := fcDaemon(t, fc)
	var bar, out bytes.Buffer
	w := &waiter{cl: api.NewClient(sock), want: "idle_or_copied", interval: 10 * time.Millisecond, bar: &bar}
	if err := w.wait(context.Background(), &out, "fcmap0", false); err != nil {
		t.Fatal(err)
	}
	want := "\rfcmap0 [###############...............]  50% copying\x1b[K" +
		"\rfcmap0 [##############################] 100% idle_or_copied\x1b[K\n"
	if bar.String() != want || out.Len() != 0 {
		t.Errorf("bar %q, want %q; stdout %q", bar.String(), want, out.String())
	}
	for _, tc := range []struct {
		s    snapshot
		want string
	}{
		{snapshot{status: "prepared"}, "m [..........]   0% prepared"},
		{snapshot{status: "copying", progress: 99}, "m [#########.]  99% copying"},
		{snapshot{gone: true}, "m [..........]   0% deleted"},
	} {
		if got := progressLine("m", tc.s, 10); got != tc.want {
			t.Errorf("progressLine(%+v) = %q, want %q", tc.s, got, tc.want)
		}
	}
}
