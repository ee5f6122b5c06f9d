// Package api is fcnbd's control API: HTTP with JSON bodies over a Unix socket, served by the
// daemon and called by the CLI through Client. It validates every request completely, turns
// refusals into 4xx replies carrying the stable fcerr code, and owns no state: volumes (and
// later mappings and groups) belong to the managers it calls.
//
// Routes (all under /v1):
//
//	POST   /v1/volumes               {"name": "v1", "capacity": 67108864} → 201 Volume
//	GET    /v1/volumes               → 200 [Volume, …]
//	GET    /v1/volumes/{ref}         → 200 Volume     (ref: id if all digits, else name)
//	DELETE /v1/volumes/{ref}?force=1 → 204
//
// Errors: {"code": "CMMVC…", "message": "…"} with 4xx for refusals, 500 for internal failures:
// 400 for a malformed or invalid request (bad JSON, unknown fields, wrong types, trailing data,
// invalid names, sizes or queries), 404 for an unknown path or object, 405 (with Allow) for a
// known path with the wrong method, 409 for a conflict, 413 for a body over MaxBody and 415 for
// a body that is declared as something other than JSON. Every field is validated before
// anything changes.
package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"fcnbd/internal/fcerr"
	"fcnbd/internal/volume"
)

// MaxBody caps a request body.
const MaxBody = 64 << 10

// maxRefLen caps a volume reference in a path: an id has at most 20 digits, a name at most
// volume.MaxNameLen characters.
const maxRefLen = 20

// statusError is a refusal whose HTTP status is not the one its code maps to.
type statusError struct {
	status int
	err    *fcerr.Error
}

func (e *statusError) Error() string { return e.err.Error() }
func (e *statusError) Unwrap() error { return e.err }

// Volume is a volume as the API shows it.
type Volume = volume.Info

// CreateVolume is the body of POST /v1/volumes. Both fields are required.
type CreateVolume struct {
	Name     *string `json:"name"`
	Capacity *int64  `json:"capacity"`
}

// Validate returns the refusal for the first field that is missing or invalid: the name must
// follow the naming rules (volume.ValidateName) and the capacity must be a positive multiple of
// volume.BlockSize no larger than volume.MaxCapacity.
func (c CreateVolume) Validate() error {
	switch {
	case c.Name == nil:
		return fcerr.New(fcerr.MissingParameter, "the name of the volume is missing")
	case c.Capacity == nil:
		return fcerr.New(fcerr.MissingParameter, "the size of the volume is missing")
	}
	if err := volume.ValidateName(*c.Name); err != nil {
		return err
	}
	return volume.ValidateCapacity(*c.Capacity)
}

// Error is the body of every non-2xx reply.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// Volumes is what the API needs of the volume manager.
type Volumes interface {
	Create(name string, size int64) (volume.Info, error)
	Delete(ref string, mode volume.DeleteMode) error
	Get(ref string) (volume.Info, error)
	Volumes() []volume.Info
}

// Handler serves the control API.
type Handler struct {
	vols     Volumes
	log      zerolog.Logger
	mux      *http.ServeMux
	fallback func() error // the error of every request no route takes; nil: 404 or 405
}

// NewHandler returns the API handler over vols.
func NewHandler(vols Volumes, log zerolog.Logger) *Handler {
	h := &Handler{vols: vols, log: log, mux: http.NewServeMux()}
	h.mux.HandleFunc("POST /v1/volumes", h.createVolume)
	h.mux.HandleFunc("GET /v1/volumes", h.listVolumes)
	h.mux.HandleFunc("GET /v1/volumes/{ref}", h.getVolume)
	h.mux.HandleFunc("DELETE /v1/volumes/{ref}", h.deleteVolume)
	return h
}

// NewRefusingHandler returns a handler that fails every request with refuse's error.
func NewRefusingHandler(log zerolog.Logger, refuse func() error) *Handler {
	return &Handler{log: log, mux: http.NewServeMux(), fallback: refuse}
}

// WithFallback makes every request that no route takes fail with fallback's error (a node that
// answers some requests only, such as a cluster-mode standby), and returns h. Call it once,
// before h serves its first request.
func (h *Handler) WithFallback(fallback func() error) *Handler {
	h.fallback = fallback
	return h
}

// methods are those a route may be registered for; ServeHTTP tries them to tell a wrong
// method (405) from an unknown path (404).
var methods = []string{http.MethodGet, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// A handler that panics must not take the daemon down or leave the client without the
	// error shape; net/http would log and drop the connection.
	defer func() {
		if p := recover(); p != nil {
			h.log.Error().Interface("panic", p).Str("method", r.Method).Str("path", r.URL.Path).
				Msg("control request panicked")
			h.fail(w, r, fcerr.New(fcerr.Internal, "internal error"))
		}
	}()
	// Unknown routes get the same error shape as everything else.
	if _, pattern := h.mux.Handler(r); pattern == "" {
		if h.fallback != nil {
			h.fail(w, r, h.fallback())
			return
		}
		var allow []string
		for _, m := range methods {
			r2 := r.Clone(r.Context())
			r2.Method = m
			if _, p := h.mux.Handler(r2); p != "" {
				allow = append(allow, m)
			}
		}
		if len(allow) > 0 {
			w.Header().Set("Allow", strings.Join(allow, ", "))
			h.fail(w, r, &statusError{http.StatusMethodNotAllowed,
				fcerr.New(fcerr.BadValue, "the method %s is not valid for %s (allowed: %s)", r.Method, r.URL.Path, strings.Join(allow, ", "))})
			return
		}
		h.fail(w, r, &statusError{http.StatusNotFound,
			fcerr.New(fcerr.BadValue, "no such request: %s %s", r.Method, r.URL.Path)})
		return
	}
	h.mux.ServeHTTP(w, r)
}

// validRef returns a refusal unless ref can name a volume: an id (digits, fitting a uint64) or
// a valid name. A ref that can't is reported as not existing (NoSuchName), as IBM does.
func validRef(ref string) error {
	if ref != "" && len(ref) <= maxRefLen && strings.Trim(ref, "0123456789") == "" {
		if _, err := strconv.ParseUint(ref, 10, 64); err == nil {
			return nil
		}
	} else if volume.ValidateName(ref) == nil {
		return nil
	}
	shown := ref
	if len(shown) > 80 {
		shown = shown[:80] + "…"
	}
	return fcerr.New(fcerr.NoSuchName, "the object %q does not exist or the name does not meet the naming rules", shown)
}

func (h *Handler) createVolume(w http.ResponseWriter, r *http.Request) {
	if !h.noQuery(w, r) {
		return
	}
	var req CreateVolume
	if err := decode(w, r, &req); err != nil {
		h.fail(w, r, err)
		return
	}
	if err := req.Validate(); err != nil {
		h.fail(w, r, err)
		return
	}
	v, err := h.vols.Create(*req.Name, *req.Capacity)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	reply(w, http.StatusCreated, v)
}

func (h *Handler) listVolumes(w http.ResponseWriter, r *http.Request) {
	if h.noQuery(w, r) && h.noBody(w, r) {
		reply(w, http.StatusOK, h.vols.Volumes())
	}
}

func (h *Handler) getVolume(w http.ResponseWriter, r *http.Request) {
	if !h.noQuery(w, r) || !h.noBody(w, r) {
		return
	}
	ref := r.PathValue("ref")
	if err := validRef(ref); err != nil {
		h.fail(w, r, err)
		return
	}
	v, err := h.vols.Get(ref)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	reply(w, http.StatusOK, v)
}

func (h *Handler) deleteVolume(w http.ResponseWriter, r *http.Request) {
	if !h.noBody(w, r) {
		return
	}
	var mode volume.DeleteMode
	for k, vs := range r.URL.Query() {
		flag := map[string]*bool{"force": &mode.Force, "removehostmappings": &mode.HostMaps}[k]
		if flag == nil || len(vs) != 1 || (vs[0] != "0" && vs[0] != "1") {
			h.fail(w, r, fcerr.New(fcerr.BadValue, "the query %q is not valid for this request", r.URL.RawQuery))
			return
		}
		*flag = vs[0] == "1"
	}
	ref := r.PathValue("ref")
	if err := validRef(ref); err != nil {
		h.fail(w, r, err)
		return
	}
	if err := h.vols.Delete(ref, mode); err != nil {
		h.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// ref returns the path value name if it can name an object, else refuses.
func (h *Handler) ref(w http.ResponseWriter, r *http.Request, name string) (string, bool) {
	ref := r.PathValue(name)
	if err := validRef(ref); err != nil {
		h.fail(w, r, err)
		return "", false
	}
	return ref, true
}

// body decodes the request body into v, or refuses.
func (h *Handler) body(w http.ResponseWriter, r *http.Request, v any) bool {
	if err := decode(w, r, v); err != nil {
		h.fail(w, r, err)
		return false
	}
	return true
}

// result replies v with code, or the refusal err.
func (h *Handler) result(w http.ResponseWriter, r *http.Request, err error, code int, v any) {
	switch {
	case err != nil:
		h.fail(w, r, err)
	case v == nil:
		w.WriteHeader(code)
	default:
		reply(w, code, v)
	}
}

func (h *Handler) noQuery(w http.ResponseWriter, r *http.Request) bool {
	if r.URL.RawQuery != "" {
		h.fail(w, r, fcerr.New(fcerr.BadValue, "the query %q is not valid for this request", r.URL.RawQuery))
		return false
	}
	return true
}

func (h *Handler) noBody(w http.ResponseWriter, r *http.Request) bool {
	n, _ := io.Copy(io.Discard, io.LimitReader(r.Body, 1))
	if n != 0 {
		h.fail(w, r, fcerr.New(fcerr.BadValue, "this request takes no body"))
		return false
	}
	return true
}

// decode reads exactly one JSON object into v, refusing unknown fields, trailing data and
// bodies over MaxBody.
func decode(w http.ResponseWriter, r *http.Request, v any) error {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != "application/json" {
			return &statusError{http.StatusUnsupportedMediaType,
				fcerr.New(fcerr.BadValue, "the request body must be application/json, not %q", ct)}
		}
	}
	if r.ContentLength > MaxBody {
		return tooLarge()
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, MaxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return tooLarge()
		}
		if err == io.EOF {
			return fcerr.New(fcerr.BadValue, "the request body is empty")
		}
		return fcerr.New(fcerr.BadValue, "the request body is not valid: %v", err)
	}
	// Anything after the object, even whitespace-separated, is refused; reading it to its end
	// also catches a body over MaxBody whose excess follows a complete object.
	if _, err := dec.Token(); err != io.EOF {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return tooLarge()
		}
		return fcerr.New(fcerr.BadValue, "the request body has data after its JSON object")
	}
	return nil
}

func tooLarge() error {
	return &statusError{http.StatusRequestEntityTooLarge,
		fcerr.New(fcerr.BadValue, "the request body is larger than %d bytes", MaxBody)}
}

// status maps a refusal's code to an HTTP status.
func status(code string) int {
	switch code {
	case fcerr.NoSuchObject, fcerr.NoSuchName:
		return http.StatusNotFound
	case fcerr.NameInUse, fcerr.BadState, fcerr.AlreadyCopying, fcerr.AlreadyStopped,
		fcerr.VolumeMapped, fcerr.TargetInUse, fcerr.DuplicateMapping, fcerr.GroupMember:
		return http.StatusConflict
	case fcerr.Internal, fcerr.MetadataUnwritable, fcerr.FenceTimeout:
		return http.StatusInternalServerError
	case fcerr.ClusterUnavailable, fcerr.NotServing:
		return http.StatusServiceUnavailable
	}
	return http.StatusBadRequest
}

func (h *Handler) fail(w http.ResponseWriter, r *http.Request, err error) {
	var fe *fcerr.Error
	if !errors.As(err, &fe) {
		h.log.Error().Err(err).Str("method", r.Method).Str("path", r.URL.Path).Msg("control request failed")
		fe = fcerr.New(fcerr.Internal, "internal error: %v", err)
	}
	code := status(fe.Code)
	if se := (*statusError)(nil); errors.As(err, &se) {
		code = se.status
	}
	reply(w, code, Error{Code: fe.Code, Message: fe.Message})
}

func reply(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

// ErrDaemonRunning is returned by ListenUnix when a live process already listens on the path.
var ErrDaemonRunning = errors.New("another daemon is running")

// ListenUnix listens on the Unix socket path with permissions perm, creating its parent
// directory (0755) if needed. A socket file left by a dead daemon is removed; a socket that
// still accepts connections is an error wrapping ErrDaemonRunning; anything else at path is an
// error (it is never removed). The socket file is removed when the listener is closed.
func ListenUnix(path string, perm os.FileMode) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		c, err := net.DialTimeout("unix", path, time.Second)
		if err == nil {
			c.Close()
			return nil, fmt.Errorf("%s: %w", path, ErrDaemonRunning)
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("%s: checking for a running daemon: %w", path, err)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale socket %s: %w", path, err)
		}
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, perm); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}
