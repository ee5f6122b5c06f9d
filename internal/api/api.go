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
// Errors: {"code": "CMMVC…", "message": "…"} with 4xx for refusals, 500 for internal failures.
package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"fcnbd/internal/fcerr"
	"fcnbd/internal/volume"
)

// MaxBody caps a request body.
const MaxBody = 64 << 10

// Volume is a volume as the API shows it.
type Volume = volume.Info

// CreateVolume is the body of POST /v1/volumes. Both fields are required.
type CreateVolume struct {
	Name     *string `json:"name"`
	Capacity *int64  `json:"capacity"`
}

// Error is the body of every non-2xx reply.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// Volumes is what the API needs of the volume manager.
type Volumes interface {
	Create(name string, size int64) (volume.Info, error)
	Delete(ref string, force bool) error
	Get(ref string) (volume.Info, error)
	Volumes() []volume.Info
}

// Handler serves the control API.
type Handler struct {
	vols Volumes
	log  zerolog.Logger
	mux  *http.ServeMux
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

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// Unknown routes get the same error shape as everything else.
	if _, pattern := h.mux.Handler(r); pattern == "" {
		h.fail(w, r, fcerr.New(fcerr.BadValue, "no such request: %s %s", r.Method, r.URL.Path))
		return
	}
	h.mux.ServeHTTP(w, r)
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
	switch {
	case req.Name == nil:
		h.fail(w, r, fcerr.New(fcerr.MissingParameter, "the name of the volume is missing"))
		return
	case req.Capacity == nil:
		h.fail(w, r, fcerr.New(fcerr.MissingParameter, "the size of the volume is missing"))
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
	v, err := h.vols.Get(r.PathValue("ref"))
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
	force := false
	for k, vs := range r.URL.Query() {
		if k != "force" || len(vs) != 1 || (vs[0] != "0" && vs[0] != "1") {
			h.fail(w, r, fcerr.New(fcerr.BadValue, "the query %q is not valid for this request", r.URL.RawQuery))
			return
		}
		force = vs[0] == "1"
	}
	if err := h.vols.Delete(r.PathValue("ref"), force); err != nil {
		h.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
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
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, MaxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return fcerr.New(fcerr.BadValue, "the request body is larger than %d bytes", MaxBody)
		}
		return fcerr.New(fcerr.BadValue, "the request body is not valid: %v", err)
	}
	if dec.More() {
		return fcerr.New(fcerr.BadValue, "the request body has data after its JSON object")
	}
	if _, err := dec.Token(); err != io.EOF {
		return fcerr.New(fcerr.BadValue, "the request body has data after its JSON object")
	}
	return nil
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
	}
	return http.StatusBadRequest
}

func (h *Handler) fail(w http.ResponseWriter, r *http.Request, err error) {
	var fe *fcerr.Error
	if !errors.As(err, &fe) {
		h.log.Error().Err(err).Str("method", r.Method).Str("path", r.URL.Path).Msg("control request failed")
		fe = fcerr.New(fcerr.Internal, "internal error: %v", err)
	}
	reply(w, status(fe.Code), Error{Code: fe.Code, Message: fe.Message})
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
