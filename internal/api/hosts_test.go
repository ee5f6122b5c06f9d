package api_test

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/rs/zerolog"

	"fcnbd/internal/api"
	"fcnbd/internal/catalog"
	"fcnbd/internal/hosts"
	"fcnbd/internal/store"
	"fcnbd/internal/volume"
)

// TestHostRoutesRefuseMalformed: malformed host requests are refused with a code and change
// nothing.
func TestHostRoutesRefuseMalformed(t *testing.T) {
	dir := t.TempDir()
	cat, err := catalog.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer cat.Close()
	vols, err := volume.Open(volume.Options{Catalog: cat, FS: store.Dir{Path: dir}})
	if err != nil {
		t.Fatal(err)
	}
	defer vols.Close()
	hm, err := hosts.New(cat, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(api.NewHandler(vols, zerolog.Nop()).WithHosts(hm))
	defer srv.Close()
	do := func(method, path, body string) (int, string) {
		req, _ := http.NewRequest(method, srv.URL+path, strings.NewReader(body))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		data, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(data)
	}
	if code, body := do("POST", "/v1/hosts", `{"name":"h","nbd_names":["h"]}`); code != 201 || !strings.Contains(body, `"id":0`) {
		t.Fatalf("mkhost: %d %s", code, body)
	}
	for _, tc := range []struct{ method, path, body, code string }{
		{"POST", "/v1/hosts", `{"name":"x","nbd_names":["x"],"bogus":1}`, "CMMVC5731E"},
		{"POST", "/v1/hosts", `{"name":"x","nbd_names":["x"]} {}`, "CMMVC5731E"},
		{"POST", "/v1/hosts?x=1", `{"name":"x","nbd_names":["x"]}`, "CMMVC5731E"},
		{"DELETE", "/v1/hosts/h?force=maybe", ``, "CMMVC5731E"},
		{"DELETE", "/v1/hosts/h?force=1&force=1", ``, "CMMVC5731E"},
		{"GET", "/v1/hosts/bad%20name", ``, "CMMVC5754E"},
		{"GET", "/v1/hostmaps?host=h&volume=v", ``, "CMMVC5731E"},
		{"GET", "/v1/hostmaps?other=h", ``, "CMMVC5731E"},
		{"PATCH", "/v1/hosts/h", `{}`, "CMMVC5707E"},
		{"POST", "/v1/hostmaps", `{"host":"h"}`, "CMMVC5707E"},
		{"DELETE", "/v1/hostmaps/h/v?x=1", ``, "CMMVC5731E"},
	} {
		code, body := do(tc.method, tc.path, tc.body)
		if code < 400 || !strings.Contains(body, tc.code) {
			t.Errorf("%s %s %s: %d %s, want %s", tc.method, tc.path, tc.body, code, body, tc.code)
		}
	}
	if list, err := hm.Hosts(); err != nil || len(list) != 1 || list[0].Name != "h" {
		t.Fatalf("after refusals: %+v %v", list, err)
	}
}
