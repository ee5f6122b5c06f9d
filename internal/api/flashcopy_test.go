package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"fcnbd/internal/fcerr"
)

// fakeFC records every call as one line ("StopFcmap m1 true false", structs as JSON) and
// returns err from each call that can fail, and the canned objects from the getters.
type fakeFC struct {
	mu    sync.Mutex
	calls []string
	err   error
	id    int
	maps  []Fcmap
	grps  []ConsistGrp
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

func (f *fakeFC) MkFcmap(_ context.Context, req MkFcmap) (int, error) {
	return f.id, f.record("MkFcmap", req)
}
func (f *fakeFC) ChFcmap(_ context.Context, ref string, req ChFcmap) error {
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
func (f *fakeFC) Fcmaps(context.Context) []Fcmap {
	f.record("Fcmaps")
	return f.maps
}
func (f *fakeFC) Fcmap(_ context.Context, ref string) (Fcmap, error) {
	if err := f.record("Fcmap", ref); err != nil {
		return Fcmap{}, err
	}
	return f.maps[0], nil
}
func (f *fakeFC) FcmapDependentMaps(_ context.Context, ref string) ([]Fcmap, error) {
	return f.maps, f.record("FcmapDependentMaps", ref)
}
func (f *fakeFC) MkConsistGrp(_ context.Context, req MkConsistGrp) (int, error) {
	return f.id, f.record("MkConsistGrp", req)
}
func (f *fakeFC) ChConsistGrp(_ context.Context, ref string, req ChConsistGrp) error {
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
func (f *fakeFC) ConsistGrps(context.Context) []ConsistGrp {
	f.record("ConsistGrps")
	return f.grps
}
func (f *fakeFC) ConsistGrp(_ context.Context, ref string) (ConsistGrp, error) {
	if err := f.record("ConsistGrp", ref); err != nil {
		return ConsistGrp{}, err
	}
	return f.grps[0], nil
}
func (f *fakeFC) VdiskFcmapCopies(_ context.Context, vol string) ([]Fcmap, error) {
	return f.maps, f.record("VdiskFcmapCopies", vol)
}
func (f *fakeFC) VdiskDependentMaps(_ context.Context, vol string) ([]Fcmap, error) {
	return f.maps, f.record("VdiskDependentMaps", vol)
}

// serveFC serves the API with fc (and no volume manager) on a Unix socket.
func serveFC(t *testing.T, fc FlashCopy) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "c.sock")
	l, err := ListenUnix(sock, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(NewHandler(nil, zerolog.Nop()).WithFlashCopy(fc))
	srv.Listener.Close()
	srv.Listener = l
	srv.Start()
	t.Cleanup(srv.Close)
	return sock
}

func ptr[T any](v T) *T { return &v }

var (
	testStart = time.Date(2025, 3, 4, 5, 6, 7, 0, time.UTC)
	testMap   = Fcmap{ID: 3, Name: "fcmap3", SourceID: 0, SourceName: "src", TargetID: 1, TargetName: "tgt",
		Status: "copying", Progress: 42, CopyRate: 50, CleanRate: 50, GrainSize: 256, StartTime: testStart,
		PartnerID: -1, BytesCopied: 1 << 20}
	testGrp = ConsistGrp{ID: 1, Name: "g1", Status: "copying", StartTime: testStart,
		Members: []FcmapName{{3, "fcmap3"}}, LastHold: 1500 * time.Microsecond}
)

func TestFlashCopyRoutes(t *testing.T) {
	fc := &fakeFC{id: 7, maps: []Fcmap{testMap}, grps: []ConsistGrp{testGrp}}
	c := NewClient(serveFC(t, fc))
	ctx := context.Background()
	tests := []struct {
		name string
		call func() (any, error)
		want string // the call the fake saw
		out  any    // what the client returned, if anything
	}{
		{"mkfcmap minimal", func() (any, error) { return c.MkFcmap(ctx, MkFcmap{Source: "a", Target: "b"}) },
			`MkFcmap {"source":"a","target":"b"}`, 7},
		{"mkfcmap all", func() (any, error) {
			return c.MkFcmap(ctx, MkFcmap{Source: "a", Target: "b", Name: "m", ConsistGrp: "g", CopyRate: ptr(0),
				CleanRate: ptr(150), GrainSize: ptr(64), Autodelete: true, Incremental: true})
		}, `MkFcmap {"source":"a","target":"b","name":"m","consistgrp":"g","copyrate":0,"cleanrate":150,"grainsize":64,"autodelete":true,"incremental":true}`, 7},
		{"chfcmap", func() (any, error) {
			return nil, c.ChFcmap(ctx, "m", ChFcmap{Name: ptr("n"), Autodelete: ptr(false), ConsistGrp: ptr("0")})
		}, `ChFcmap m {"name":"n","autodelete":false,"consistgrp":"0"}`, nil},
		{"prestartfcmap", func() (any, error) { return nil, c.PrestartFcmap(ctx, "m", false) }, "PrestartFcmap m false", nil},
		{"prestartfcmap restore", func() (any, error) { return nil, c.PrestartFcmap(ctx, "m", true) }, "PrestartFcmap m true", nil},
		{"startfcmap", func() (any, error) { return nil, c.StartFcmap(ctx, "3", false, false) }, "StartFcmap 3 false false", nil},
		{"startfcmap prep restore", func() (any, error) { return nil, c.StartFcmap(ctx, "m", true, true) }, "StartFcmap m true true", nil},
		{"startfcmap restore", func() (any, error) { return nil, c.StartFcmap(ctx, "m", false, true) }, "StartFcmap m false true", nil},
		{"stopfcmap force", func() (any, error) { return nil, c.StopFcmap(ctx, "m", true, false) }, "StopFcmap m true false", nil},
		{"stopfcmap split", func() (any, error) { return nil, c.StopFcmap(ctx, "m", false, true) }, "StopFcmap m false true", nil},
		{"rmfcmap", func() (any, error) { return nil, c.RmFcmap(ctx, "m", false) }, "RmFcmap m false", nil},
		{"rmfcmap force", func() (any, error) { return nil, c.RmFcmap(ctx, "m", true) }, "RmFcmap m true", nil},
		{"lsfcmap", func() (any, error) { return c.Fcmaps(ctx) }, "Fcmaps", []Fcmap{testMap}},
		{"lsfcmap one", func() (any, error) { return c.Fcmap(ctx, "fcmap3") }, "Fcmap fcmap3", testMap},
		{"dependents", func() (any, error) { return c.FcmapDependentMaps(ctx, "3") }, "FcmapDependentMaps 3", []Fcmap{testMap}},
		{"name with odd characters", func() (any, error) { return c.Fcmap(ctx, "a.b-c_d") }, "Fcmap a.b-c_d", testMap},

		{"mkfcconsistgrp", func() (any, error) { return c.MkConsistGrp(ctx, MkConsistGrp{}) }, "MkConsistGrp {}", 7},
		{"mkfcconsistgrp all", func() (any, error) { return c.MkConsistGrp(ctx, MkConsistGrp{Name: "g", Autodelete: true}) },
			`MkConsistGrp {"name":"g","autodelete":true}`, 7},
		{"chfcconsistgrp", func() (any, error) { return nil, c.ChConsistGrp(ctx, "g", ChConsistGrp{Autodelete: ptr(true)}) },
			`ChConsistGrp g {"autodelete":true}`, nil},
		{"prestartfcconsistgrp", func() (any, error) { return nil, c.PrestartConsistGrp(ctx, "g", true) }, "PrestartConsistGrp g true", nil},
		{"startfcconsistgrp", func() (any, error) { return nil, c.StartConsistGrp(ctx, "g", true, false) }, "StartConsistGrp g true false", nil},
		{"stopfcconsistgrp", func() (any, error) { return nil, c.StopConsistGrp(ctx, "1", false, false) }, "StopConsistGrp 1 false false", nil},
		{"rmfcconsistgrp", func() (any, error) { return nil, c.RmConsistGrp(ctx, "g", true) }, "RmConsistGrp g true", nil},
		{"lsfcconsistgrp", func() (any, error) { return c.ConsistGrps(ctx) }, "ConsistGrps", []ConsistGrp{testGrp}},
		{"lsfcconsistgrp one", func() (any, error) { return c.ConsistGrp(ctx, "g1") }, "ConsistGrp g1", testGrp},

		{"lsvdiskfcmapcopies", func() (any, error) { return c.VdiskFcmapCopies(ctx, "src") }, "VdiskFcmapCopies src", []Fcmap{testMap}},
		{"lsvdiskdependentmaps", func() (any, error) { return c.VdiskDependentMaps(ctx, "0") }, "VdiskDependentMaps 0", []Fcmap{testMap}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out, err := tc.call()
			if err != nil {
				t.Fatal(err)
			}
			if calls := fc.takeCalls(); len(calls) != 1 || calls[0] != tc.want {
				t.Fatalf("calls %q, want %q", calls, tc.want)
			}
			if tc.out != nil && !equalJSON(t, out, tc.out) {
				t.Fatalf("got %+v, want %+v", out, tc.out)
			}
		})
	}
}

// equalJSON compares a and b as the wire shows them (time.Time loses its location).
func equalJSON(t *testing.T, a, b any) bool {
	t.Helper()
	ja, err1 := json.Marshal(a)
	jb, err2 := json.Marshal(b)
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	return string(ja) == string(jb)
}

// TestFlashCopyEmptyLists: no objects is [], never null, so scripts can iterate.
func TestFlashCopyEmptyLists(t *testing.T) {
	sock := serveFC(t, &fakeFC{})
	for _, path := range []string{"/v1/fcmaps", "/v1/fcconsistgrps", "/v1/fcmaps/m/dependents",
		"/v1/volumes/v/fcmapcopies", "/v1/volumes/v/dependentmaps"} {
		status, body := rawRequest(t, sock, "GET", path, "")
		if status != 200 || strings.TrimSpace(body) != "[]" {
			t.Errorf("GET %s: %d %q, want 200 []", path, status, body)
		}
	}
}

// TestFlashCopyRefusals: the driver's refusals reach the client with their code, and the HTTP
// status that goes with it.
func TestFlashCopyRefusals(t *testing.T) {
	tests := []struct {
		err    error
		status int
		code   string
	}{
		{fcerr.New(fcerr.NoSuchObject, "no mapping m"), 404, fcerr.NoSuchObject},
		{fcerr.New(fcerr.BadState, "not valid while copying"), 409, fcerr.BadState},
		{fcerr.New(fcerr.AlreadyCopying, "already copying"), 409, fcerr.AlreadyCopying},
		{fcerr.New(fcerr.AlreadyStopped, "already stopped"), 409, fcerr.AlreadyStopped},
		{fcerr.New(fcerr.GroupMember, "member of g"), 409, fcerr.GroupMember},
		{fcerr.New(fcerr.NeedsRestore, "needs -restore"), 400, fcerr.NeedsRestore},
		{fmt.Errorf("start m: %w", fcerr.New(fcerr.FenceTimeout, "drain timed out")), 500, fcerr.FenceTimeout},
		{errors.New("disk on fire"), 500, fcerr.Internal},
	}
	routes := []struct{ method, path, body string }{
		{"POST", "/v1/fcmaps", `{"source":"a","target":"b"}`},
		{"PATCH", "/v1/fcmaps/m", `{"name":"n"}`},
		{"DELETE", "/v1/fcmaps/m", ""},
		{"POST", "/v1/fcmaps/m/prestart", ""},
		{"POST", "/v1/fcmaps/m/start?prep=1", ""},
		{"POST", "/v1/fcmaps/m/stop", ""},
		{"GET", "/v1/fcmaps/m", ""},
		{"GET", "/v1/fcmaps/m/dependents", ""},
		{"POST", "/v1/fcconsistgrps", `{}`},
		{"PATCH", "/v1/fcconsistgrps/g", `{"autodelete":false}`},
		{"DELETE", "/v1/fcconsistgrps/g?force=true", ""},
		{"POST", "/v1/fcconsistgrps/g/prestart", ""},
		{"POST", "/v1/fcconsistgrps/g/start", ""},
		{"POST", "/v1/fcconsistgrps/g/stop?split=1", ""},
		{"GET", "/v1/fcconsistgrps/g", ""},
		{"GET", "/v1/volumes/v/fcmapcopies", ""},
		{"GET", "/v1/volumes/v/dependentmaps", ""},
	}
	for _, tc := range tests {
		fc := &fakeFC{err: tc.err}
		sock := serveFC(t, fc)
		for _, rt := range routes {
			t.Run(tc.code+" "+rt.method+" "+rt.path, func(t *testing.T) {
				status, body := rawRequest(t, sock, rt.method, rt.path, rt.body)
				var e Error
				if err := json.Unmarshal([]byte(body), &e); err != nil || status != tc.status || e.Code != tc.code || e.Message == "" {
					t.Fatalf("%d %s, want %d %s", status, body, tc.status, tc.code)
				}
				if calls := fc.takeCalls(); len(calls) != 1 {
					t.Fatalf("calls %q, want one", calls)
				}
			})
		}
	}
	// Through the client, the refusal is an *fcerr.Error with the driver's message.
	c := NewClient(serveFC(t, &fakeFC{err: fcerr.New(fcerr.AlreadyStopped, "the mapping is already stopped")}))
	err := c.StopFcmap(context.Background(), "m", false, false)
	var fe *fcerr.Error
	if !errors.As(err, &fe) || fe.Code != fcerr.AlreadyStopped || fe.Message != "the mapping is already stopped" {
		t.Fatalf("client error %v", err)
	}
}

// TestFlashCopyStrictRequests: requests the API refuses before calling the driver.
func TestFlashCopyStrictRequests(t *testing.T) {
	fc := &fakeFC{}
	sock := serveFC(t, fc)
	tests := []struct {
		name, method, path, body string
		code                     string
		status                   int
	}{
		{"missing source", "POST", "/v1/fcmaps", `{"target":"b"}`, fcerr.MissingParameter, 400},
		{"missing target", "POST", "/v1/fcmaps", `{"source":"a"}`, fcerr.MissingParameter, 400},
		{"empty source", "POST", "/v1/fcmaps", `{"source":"","target":"b"}`, fcerr.MissingParameter, 400},
		{"copy rate high", "POST", "/v1/fcmaps", `{"source":"a","target":"b","copyrate":151}`, fcerr.BadValue, 400},
		{"copy rate negative", "POST", "/v1/fcmaps", `{"source":"a","target":"b","copyrate":-1}`, fcerr.BadValue, 400},
		{"clean rate high", "POST", "/v1/fcmaps", `{"source":"a","target":"b","cleanrate":200}`, fcerr.BadValue, 400},
		{"grain size", "POST", "/v1/fcmaps", `{"source":"a","target":"b","grainsize":128}`, fcerr.BadValue, 400},
		{"grain size zero", "POST", "/v1/fcmaps", `{"source":"a","target":"b","grainsize":0}`, fcerr.BadValue, 400},
		{"unknown field", "POST", "/v1/fcmaps", `{"source":"a","target":"b","speed":1}`, fcerr.BadValue, 400},
		{"wrong type", "POST", "/v1/fcmaps", `{"source":"a","target":"b","copyrate":"50"}`, fcerr.BadValue, 400},
		{"trailing data", "POST", "/v1/fcmaps", `{"source":"a","target":"b"} {}`, fcerr.BadValue, 400},
		{"not json", "POST", "/v1/fcmaps", `source=a`, fcerr.BadValue, 400},
		{"no body", "POST", "/v1/fcmaps", ``, fcerr.BadValue, 400},
		{"query on create", "POST", "/v1/fcmaps?force=1", `{"source":"a","target":"b"}`, fcerr.BadValue, 400},
		{"ch nothing", "PATCH", "/v1/fcmaps/m", `{}`, fcerr.MissingParameter, 400},
		{"ch copy rate", "PATCH", "/v1/fcmaps/m", `{"copyrate":151}`, fcerr.BadValue, 400},
		{"ch clean rate", "PATCH", "/v1/fcmaps/m", `{"cleanrate":-5}`, fcerr.BadValue, 400},
		{"ch grain size", "PATCH", "/v1/fcmaps/m", `{"grainsize":64}`, fcerr.BadValue, 400},
		{"ch autodelete type", "PATCH", "/v1/fcmaps/m", `{"autodelete":"on"}`, fcerr.BadValue, 400},
		{"ch query", "PATCH", "/v1/fcmaps/m?x=1", `{"name":"n"}`, fcerr.BadValue, 400},
		{"chgrp nothing", "PATCH", "/v1/fcconsistgrps/g", `{}`, fcerr.MissingParameter, 400},
		{"chgrp unknown field", "PATCH", "/v1/fcconsistgrps/g", `{"status":"copying"}`, fcerr.BadValue, 400},
		{"mkgrp unknown field", "POST", "/v1/fcconsistgrps", `{"members":[]}`, fcerr.BadValue, 400},
		{"force and split", "POST", "/v1/fcmaps/m/stop?force=1&split=1", ``, fcerr.ExclusiveFlags, 400},
		{"group force and split", "POST", "/v1/fcconsistgrps/g/stop?force=true&split=true", ``, fcerr.ExclusiveFlags, 400},
		{"flag value yes", "POST", "/v1/fcmaps/m/start?prep=yes", ``, fcerr.BadValue, 400},
		{"flag value empty", "POST", "/v1/fcmaps/m/start?prep", ``, fcerr.BadValue, 400},
		{"flag twice", "POST", "/v1/fcmaps/m/start?prep=1&prep=0", ``, fcerr.BadValue, 400},
		{"flag of another route", "POST", "/v1/fcmaps/m/prestart?prep=1", ``, fcerr.BadValue, 400},
		{"unknown flag", "DELETE", "/v1/fcmaps/m?force=1&now=1", ``, fcerr.BadValue, 400},
		{"split on delete", "DELETE", "/v1/fcconsistgrps/g?split=1", ``, fcerr.BadValue, 400},
		{"body on start", "POST", "/v1/fcmaps/m/start", `{"prep":true}`, fcerr.BadValue, 400},
		{"body on list", "GET", "/v1/fcmaps", `{}`, fcerr.BadValue, 400},
		{"query on get", "GET", "/v1/fcmaps/m?verbose=1", ``, fcerr.BadValue, 400},
		{"query on dependents", "GET", "/v1/volumes/v/dependentmaps?x=1", ``, fcerr.BadValue, 400},
		{"unknown verb", "POST", "/v1/fcmaps/m/pause", ``, fcerr.BadValue, 404},
		{"no group dependents", "GET", "/v1/fcconsistgrps/g/dependents", ``, fcerr.BadValue, 404},
		{"wrong method", "PUT", "/v1/fcmaps/m", `{"name":"n"}`, fcerr.BadValue, 405},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			want := tc.status
			status, body := rawRequest(t, sock, tc.method, tc.path, tc.body)
			var e Error
			if err := json.Unmarshal([]byte(body), &e); err != nil || status != want || e.Code != tc.code || e.Message == "" {
				t.Fatalf("%d %s, want %d %s", status, body, want, tc.code)
			}
			if calls := fc.takeCalls(); len(calls) != 0 {
				t.Fatalf("the driver was called: %q", calls)
			}
		})
	}
	// The flag spellings the API accepts.
	for path, want := range map[string]string{
		"/v1/fcmaps/m/start?prep=true&restore=0": "StartFcmap m true false",
		"/v1/fcmaps/m/start?prep=false":          "StartFcmap m false false",
		"/v1/fcmaps/m/stop?force=1&split=0":      "StopFcmap m true false",
		"/v1/fcmaps/m/stop?split=1&force=false":  "StopFcmap m false true",
	} {
		if status, body := rawRequest(t, sock, "POST", path, ""); status != 204 || body != "" {
			t.Errorf("POST %s: %d %q", path, status, body)
		}
		if calls := fc.takeCalls(); len(calls) != 1 || calls[0] != want {
			t.Errorf("POST %s: calls %q, want %q", path, calls, want)
		}
	}
}

// rawRequest sends one request over the socket and returns the status and body.
func rawRequest(t *testing.T, sock, method, path, body string) (int, string) {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	defer hc.CloseIdleConnections()
	req, err := http.NewRequest(method, "http://x"+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(data)
}
