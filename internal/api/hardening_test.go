package api

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rs/zerolog"

	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
	"fcnbd/internal/store/crashfs"
	"fcnbd/internal/volume"
)

// memHandler is the real handler over a real volume manager whose backing files are in memory
// (so that any valid capacity, up to volume.MaxCapacity, can be created).
func memHandler(tb testing.TB) http.Handler {
	tb.Helper()
	dir := tb.TempDir()
	cat, err := catalog.Open(dir)
	if err != nil {
		tb.Fatal(err)
	}
	m, err := volume.Open(volume.Options{Catalog: cat, FS: crashfs.New()})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { m.Close(); cat.Close() })
	return NewHandler(m, zerolog.Nop())
}

type result struct {
	status int
	header http.Header
	body   []byte
}

func do(h http.Handler, method, path, contentType string, body []byte) result {
	req := httptest.NewRequest(method, "http://fcnbd"+path, bytes.NewReader(body))
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return result{rec.Code, rec.Header(), rec.Body.Bytes()}
}

// errorOf checks that a reply is an error reply of the documented shape and returns it.
func errorOf(t *testing.T, r result) Error {
	t.Helper()
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("Content-Type %q", ct)
	}
	var e Error
	dec := json.NewDecoder(bytes.NewReader(r.body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&e); err != nil || e.Code == "" || e.Message == "" {
		t.Fatalf("error body %q: %v", r.body, err)
	}
	return e
}

func TestValidation(t *testing.T) {
	h := memHandler(t)
	longName := "a" + strings.Repeat("b", volume.MaxNameLen)
	tests := []struct {
		name, method, path, ctype, body string
		status                          int
		code                            string
	}{
		// Sizes.
		{"capacity zero", "POST", "/v1/volumes", "", `{"name":"a","capacity":0}`, 400, fcerr.BadValue},
		{"capacity negative", "POST", "/v1/volumes", "", `{"name":"a","capacity":-4096}`, 400, fcerr.BadValue},
		{"capacity unaligned", "POST", "/v1/volumes", "", `{"name":"a","capacity":4097}`, 400, fcerr.BadValue},
		{"capacity 512", "POST", "/v1/volumes", "", `{"name":"a","capacity":512}`, 400, fcerr.BadValue},
		{"capacity over max", "POST", "/v1/volumes", "", fmt.Sprintf(`{"name":"a","capacity":%d}`, int64(volume.MaxCapacity)+4096), 400, fcerr.BadValue},
		{"capacity overflows int64", "POST", "/v1/volumes", "", `{"name":"a","capacity":9223372036854775808}`, 400, fcerr.BadValue},
		{"capacity float", "POST", "/v1/volumes", "", `{"name":"a","capacity":4096.5}`, 400, fcerr.BadValue},
		{"capacity exponent", "POST", "/v1/volumes", "", `{"name":"a","capacity":4e3}`, 400, fcerr.BadValue},
		{"capacity null", "POST", "/v1/volumes", "", `{"name":"a","capacity":null}`, 400, fcerr.MissingParameter},
		// Names.
		{"name empty", "POST", "/v1/volumes", "", `{"name":"","capacity":4096}`, 400, fcerr.BadName},
		{"name too long", "POST", "/v1/volumes", "", `{"name":"` + longName + `","capacity":4096}`, 400, fcerr.BadName},
		{"name number", "POST", "/v1/volumes", "", `{"name":"12","capacity":4096}`, 400, fcerr.BadName},
		{"name float", "POST", "/v1/volumes", "", `{"name":"1e5","capacity":4096}`, 400, fcerr.BadName},
		{"name slash", "POST", "/v1/volumes", "", `{"name":"a/b","capacity":4096}`, 400, fcerr.BadName},
		{"name NUL", "POST", "/v1/volumes", "", `{"name":"a\u0000","capacity":4096}`, 400, fcerr.BadName},
		{"name unicode", "POST", "/v1/volumes", "", `{"name":"é","capacity":4096}`, 400, fcerr.BadName},
		{"name invalid UTF-8", "POST", "/v1/volumes", "", "{\"name\":\"a\xff\",\"capacity\":4096}", 400, fcerr.BadName},
		{"name not string", "POST", "/v1/volumes", "", `{"name":7,"capacity":4096}`, 400, fcerr.BadValue},
		// Bodies.
		{"empty body", "POST", "/v1/volumes", "", ``, 400, fcerr.BadValue},
		{"array", "POST", "/v1/volumes", "", `[]`, 400, fcerr.BadValue},
		{"null", "POST", "/v1/volumes", "", `null`, 400, fcerr.MissingParameter},
		{"duplicate key, last valid", "POST", "/v1/volumes", "", `{"name":"9","name":"a","capacity":0}`, 400, fcerr.BadValue},
		{"unknown field nested", "POST", "/v1/volumes", "", `{"name":"a","capacity":4096,"opts":{"x":1}}`, 400, fcerr.BadValue},
		{"unterminated", "POST", "/v1/volumes", "", `{"name":"a"`, 400, fcerr.BadValue},
		{"two objects", "POST", "/v1/volumes", "", `{"name":"a","capacity":4096}{"name":"b","capacity":4096}`, 400, fcerr.BadValue},
		{"text/plain", "POST", "/v1/volumes", "text/plain", `{"name":"a","capacity":4096}`, 415, fcerr.BadValue},
		{"bad content type", "POST", "/v1/volumes", ";;", `{"name":"a","capacity":4096}`, 415, fcerr.BadValue},
		{"too big, valid prefix", "POST", "/v1/volumes", "", `{"name":"a","capacity":4096}` + strings.Repeat(" ", MaxBody), 413, fcerr.BadValue},
		// Refs.
		{"ref not a name", "GET", "/v1/volumes/9v", "", ``, 404, fcerr.NoSuchName},
		{"ref too long", "GET", "/v1/volumes/" + longName, "", ``, 404, fcerr.NoSuchName},
		{"ref id overflows", "GET", "/v1/volumes/99999999999999999999999", "", ``, 404, fcerr.NoSuchName},
		{"ref escaped slash", "DELETE", "/v1/volumes/a%2Fb", "", ``, 404, fcerr.NoSuchName},
		{"ref unknown id", "GET", "/v1/volumes/18446744073709551615", "", ``, 404, fcerr.NoSuchObject},
		// Routes and methods.
		{"unknown path", "GET", "/v1/volume", "", ``, 404, fcerr.BadValue},
		{"unknown version", "GET", "/v2/volumes", "", ``, 404, fcerr.BadValue},
		{"root", "GET", "/", "", ``, 404, fcerr.BadValue},
		{"wrong method on collection", "PUT", "/v1/volumes", "", `{}`, 405, fcerr.BadValue},
		{"wrong method on volume", "POST", "/v1/volumes/a", "", ``, 405, fcerr.BadValue},
		{"unknown method", "BREW", "/v1/volumes", "", ``, 405, fcerr.BadValue},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := do(h, tc.method, tc.path, tc.ctype, []byte(tc.body))
			if r.status != tc.status {
				t.Fatalf("status %d, want %d: %s", r.status, tc.status, r.body)
			}
			if e := errorOf(t, r); e.Code != tc.code {
				t.Fatalf("code %s, want %s: %s", e.Code, tc.code, e.Message)
			}
			if tc.status == 405 && r.header.Get("Allow") == "" {
				t.Fatalf("405 without Allow")
			}
		})
	}
	// Nothing above created anything.
	if r := do(h, "GET", "/v1/volumes", "", nil); r.status != 200 || strings.TrimSpace(string(r.body)) != "[]" {
		t.Fatalf("volumes after refusals: %d %s", r.status, r.body)
	}
	// The largest valid volume, and the JSON media type with parameters, are accepted.
	body := fmt.Sprintf(`{"name":"big","capacity":%d}`, int64(volume.MaxCapacity))
	if r := do(h, "POST", "/v1/volumes", "application/json; charset=utf-8", []byte(body)); r.status != 201 {
		t.Fatalf("largest volume: %d %s", r.status, r.body)
	}
	if r := do(h, "PUT", "/v1/volumes/big", "", nil); r.header.Get("Allow") != "GET, DELETE" {
		t.Fatalf("Allow %q", r.header.Get("Allow"))
	}
}

// FuzzAPIDecode posts arbitrary bodies to the volume-create endpoint through the real handler:
// it must never answer 5xx or panic, every reply is JSON, and a 201 is a volume that the body
// asked for.
func FuzzAPIDecode(f *testing.F) {
	for _, seed := range []string{
		`{"name":"v1","capacity":67108864}`,
		`{"name":"v1","capacity":4096,"x":1}`,
		`{"capacity":4096}`,
		`{"name":"a","capacity":"4096"}`,
		`{"name":"a","capacity":4096} {}`,
		`{"name":"a","capacity":1e400}`,
		`{"name":"\ud800","capacity":-1}`,
		`[{"name":"a"}]`,
		`{"name":"a","capacity":281474976710656}`,
		"\xef\xbb\xbf{}",
		``, `null`, `{`, `"`, `0`,
	} {
		f.Add([]byte(seed))
	}
	h := memHandler(f)
	f.Fuzz(func(t *testing.T, body []byte) {
		r := do(h, "POST", "/v1/volumes", "application/json", body)
		if r.status >= 500 || r.status < 200 {
			t.Fatalf("status %d for %q: %s", r.status, body, r.body)
		}
		if !json.Valid(r.body) {
			t.Fatalf("reply %q is not JSON", r.body)
		}
		if r.status == http.StatusCreated {
			var req CreateVolume
			var v Volume
			if json.Unmarshal(body, &req) != nil || json.Unmarshal(r.body, &v) != nil ||
				req.Name == nil || req.Capacity == nil || v.Name != *req.Name || v.Capacity != *req.Capacity {
				t.Fatalf("201 %s for %q", r.body, body)
			}
			// Keep the catalogue small: the created volume is deleted again.
			if d := do(h, "DELETE", "/v1/volumes/"+v.Name, "", nil); d.status != http.StatusNoContent {
				t.Fatalf("delete %s: %d %s", v.Name, d.status, d.body)
			}
			return
		}
		errorOf(t, r)
	})
}

// TestSocketRefusesOtherUsers: the control socket is 0600, so a user other than the daemon's
// (here nobody) can't connect even when the directories on the way are open to everyone.
func TestSocketRefusesOtherUsers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipped: needs root to run a client as nobody")
	}
	for _, tool := range []string{"setpriv", "socat"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("skipped: %s is not installed", tool)
		}
	}
	sock := serve(t)
	fi, err := os.Stat(sock)
	if err != nil || fi.Mode().Perm() != 0o600 || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("socket mode %v, %v", fi.Mode(), err)
	}
	// Open every directory from the socket up to the temporary root: only the socket's own mode
	// may stop nobody.
	for d := filepath.Dir(sock); d != os.TempDir() && d != "/" && d != "."; d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	connect := func(asNobody bool) (string, error) {
		args := []string{"socat", "-u", "OPEN:/dev/null", "UNIX-CONNECT:" + sock}
		if asNobody {
			args = append([]string{"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"}, args...)
		}
		out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		return string(out), err
	}
	// Control: root connects, so the command itself works.
	if out, err := connect(false); err != nil {
		t.Fatalf("as root: %v: %s", err, out)
	}
	out, err := connect(true)
	if err == nil {
		t.Fatalf("nobody connected to the control socket: %s", out)
	}
	if !strings.Contains(strings.ToLower(out), "permission denied") {
		t.Fatalf("nobody refused, but not for permissions: %v: %s", err, out)
	}
	// Control: with the socket opened up, nobody connects; so it was the socket's mode.
	if err := os.Chmod(sock, 0o666); err != nil {
		t.Fatal(err)
	}
	if out, err := connect(true); err != nil {
		t.Fatalf("nobody can't connect even to a 0666 socket: %v: %s", err, out)
	}
}
