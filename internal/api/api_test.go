package api

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rs/zerolog"

	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
	"fcnbd/internal/store"
	"fcnbd/internal/volume"
)

// serve starts the API over a real volume manager on a Unix socket and returns the socket path.
func serve(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	cat, err := catalog.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	m, err := volume.Open(volume.Options{Catalog: cat, FS: store.Dir{Path: dir}})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "run", "c.sock")
	l, err := ListenUnix(sock, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(NewHandler(m, zerolog.Nop()))
	srv.Listener.Close()
	srv.Listener = l
	srv.Start()
	t.Cleanup(func() { srv.Close(); m.Close(); cat.Close() })
	return sock
}

func TestClientVolumeLifecycle(t *testing.T) {
	sock := serve(t)
	fi, err := os.Stat(sock)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, %v", fi.Mode(), err)
	}
	c := NewClient(sock)
	ctx := context.Background()
	v, err := c.CreateVolume(ctx, "v1", 64<<20)
	if err != nil || v.ID != 0 || v.Name != "v1" || v.Capacity != 64<<20 || v.Status != "online" {
		t.Fatalf("create: %+v %v", v, err)
	}
	if _, err := c.CreateVolume(ctx, "v2", 4096); err != nil {
		t.Fatal(err)
	}
	refusals := []struct {
		name string
		call func() error
		code string
	}{
		{"duplicate name", func() error { _, err := c.CreateVolume(ctx, "v1", 4096); return err }, fcerr.NameInUse},
		{"bad name", func() error { _, err := c.CreateVolume(ctx, "9v", 4096); return err }, fcerr.BadName},
		{"bad size", func() error { _, err := c.CreateVolume(ctx, "v3", 1000); return err }, fcerr.BadValue},
		{"get unknown", func() error { _, err := c.Volume(ctx, "nope"); return err }, fcerr.NoSuchObject},
		{"get unknown id", func() error { _, err := c.Volume(ctx, "7"); return err }, fcerr.NoSuchObject},
		{"delete unknown", func() error { return c.DeleteVolume(ctx, "nope", volume.DeleteMode{}) }, fcerr.NoSuchObject},
	}
	for _, tc := range refusals {
		t.Run(tc.name, func(t *testing.T) {
			if got := fcerr.CodeOf(tc.call()); got != tc.code {
				t.Fatalf("code %q, want %s", got, tc.code)
			}
		})
	}
	got, err := c.Volume(ctx, "1")
	if err != nil || got.Name != "v2" {
		t.Fatalf("get by id: %+v %v", got, err)
	}
	if err := c.DeleteVolume(ctx, "v1", volume.DeleteMode{Force: true}); err != nil {
		t.Fatal(err)
	}
	vs, err := c.Volumes(ctx)
	if err != nil || len(vs) != 1 || vs[0].Name != "v2" {
		t.Fatalf("list: %+v %v", vs, err)
	}
}

func TestStrictRequests(t *testing.T) {
	sock := serve(t)
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	tests := []struct {
		name, method, path, body string
		status                   int
		code                     string
	}{
		{"unknown field", "POST", "/v1/volumes", `{"name":"a","capacity":4096,"x":1}`, 400, fcerr.BadValue},
		{"missing name", "POST", "/v1/volumes", `{"capacity":4096}`, 400, fcerr.MissingParameter},
		{"missing capacity", "POST", "/v1/volumes", `{"name":"a"}`, 400, fcerr.MissingParameter},
		{"wrong type", "POST", "/v1/volumes", `{"name":"a","capacity":"4096"}`, 400, fcerr.BadValue},
		{"trailing data", "POST", "/v1/volumes", `{"name":"a","capacity":4096} {}`, 400, fcerr.BadValue},
		{"not json", "POST", "/v1/volumes", `name=a`, 400, fcerr.BadValue},
		{"too big", "POST", "/v1/volumes", `{"name":"` + strings.Repeat("a", MaxBody) + `","capacity":4096}`, 413, fcerr.BadValue},
		{"query on create", "POST", "/v1/volumes?x=1", `{"name":"a","capacity":4096}`, 400, fcerr.BadValue},
		{"bad force", "DELETE", "/v1/volumes/a?force=yes", ``, 400, fcerr.BadValue},
		{"unknown route", "GET", "/v1/nothing", ``, 404, fcerr.BadValue},
		{"body on get", "GET", "/v1/volumes", `{}`, 400, fcerr.BadValue},
		{"ok", "POST", "/v1/volumes", `{"name":"a","capacity":4096}`, 201, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(tc.method, "http://x"+tc.path, strings.NewReader(tc.body))
			resp, err := hc.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d", resp.StatusCode, tc.status)
			}
			if tc.code != "" {
				var e Error
				if err := decodeBody(resp, &e); err != nil || e.Code != tc.code || e.Message == "" {
					t.Fatalf("error body %+v %v, want code %s", e, err, tc.code)
				}
			}
		})
	}
}

func TestNoDaemon(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	_, err := NewClient(sock).Volumes(context.Background())
	var fe *fcerr.Error
	if !errors.As(err, &fe) || fe.Code != fcerr.NoDaemon || fe.Message != "no fcnbd daemon is listening on "+sock {
		t.Fatalf("error %v", err)
	}
}

func TestListenUnixStaleAndLive(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "s.sock")
	l, err := ListenUnix(sock, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ListenUnix(sock, 0o600); !errors.Is(err, ErrDaemonRunning) {
		t.Fatalf("second listener on a live socket: %v", err)
	}
	// A dead daemon's socket: the file stays, nobody accepts.
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	if _, err := os.Stat(sock); err != nil {
		t.Fatal(err)
	}
	l, err = ListenUnix(sock, 0o600)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	l.Close()
	plain := filepath.Join(dir, "plain")
	os.WriteFile(plain, nil, 0o600)
	if _, err := ListenUnix(plain, 0o600); err == nil {
		t.Fatal("ListenUnix replaced a regular file")
	}
}

func decodeBody(resp *http.Response, v any) error {
	return jsonDecode(resp.Body, v)
}

func jsonDecode(r interface{ Read([]byte) (int, error) }, v any) error {
	return json.NewDecoder(r).Decode(v)
}
