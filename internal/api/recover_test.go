package api

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/rs/zerolog"

	"fcnbd/internal/fcerr"
)

type fakeRecoverer struct {
	res RecoverResult
	err error
}

func (f *fakeRecoverer) RecoverFcmaps(context.Context) (RecoverResult, error) { return f.res, f.err }

// TestRecoverRoute: POST /v1/recoverfcmap replies 200 with the result, 500 with the stable
// code while the metadata is still unwritable, and refuses a query.
func TestRecoverRoute(t *testing.T) {
	f := &fakeRecoverer{res: RecoverResult{Resumed: []string{"m"}}}
	h := NewHandler(nil, zerolog.Nop()).WithRecover(f)
	do := func(target string) *httptest.ResponseRecorder {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest(http.MethodPost, target, nil))
		return w
	}
	w := do("/v1/recoverfcmap")
	var res RecoverResult
	if w.Code != http.StatusOK || json.Unmarshal(w.Body.Bytes(), &res) != nil || len(res.Resumed) != 1 {
		t.Fatalf("recover: %d %s", w.Code, w.Body)
	}
	f.err = fcerr.New(fcerr.MetadataUnwritable, "still failing")
	w = do("/v1/recoverfcmap")
	var e Error
	if w.Code != http.StatusInternalServerError || json.Unmarshal(w.Body.Bytes(), &e) != nil || e.Code != fcerr.MetadataUnwritable {
		t.Fatalf("recover while unwritable: %d %s", w.Code, w.Body)
	}
	if w = do("/v1/recoverfcmap?x=1"); w.Code != http.StatusBadRequest {
		t.Fatalf("recover with a query: %d", w.Code)
	}
}

// TestFallback: with a fallback, a request no route takes gets the fallback's error, whatever
// its method; the routes registered still answer. A refusing handler refuses everything.
func TestFallback(t *testing.T) {
	refuse := func() error { return fcerr.New(fcerr.NotServing, "a standby") }
	f := &fakeRecoverer{res: RecoverResult{Resumed: []string{"m"}}}
	h := NewHandler(nil, zerolog.Nop()).WithRecover(f).WithFallback(refuse)
	do := func(h *Handler, method, target string) (int, Error) {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest(method, target, nil))
		var e Error
		json.Unmarshal(w.Body.Bytes(), &e)
		return w.Code, e
	}
	if code, _ := do(h, http.MethodPost, "/v1/recoverfcmap"); code != http.StatusOK {
		t.Errorf("a route with a fallback: %d", code)
	}
	for _, req := range [][2]string{{http.MethodPost, "/v1/hosts"}, {http.MethodGet, "/v1/recoverfcmap"}, {http.MethodDelete, "/v1/nosuch"}} {
		if code, e := do(h, req[0], req[1]); code != http.StatusServiceUnavailable || e.Code != fcerr.NotServing {
			t.Errorf("%s %s: %d %+v, want 503 %s", req[0], req[1], code, e, fcerr.NotServing)
		}
	}
	all := NewRefusingHandler(zerolog.Nop(), refuse)
	if code, e := do(all, http.MethodGet, "/v1/volumes"); code != http.StatusServiceUnavailable || e.Code != fcerr.NotServing {
		t.Errorf("refusing handler: %d %+v", code, e)
	}
}
