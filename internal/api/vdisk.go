package api

// The volume change route (chvdisk):
//
//	PATCH /v1/volumes/{ref} ChVolume → 204
//	POST /v1/volumes/{ref}/expand ExpandVolume → 200 Volume
//
// Only the name can change with PATCH; expand grows the capacity (expandvdisksize).

import (
	"context"
	"net/http"
	"net/url"

	"fcnbd/internal/fcerr"
)

// ChVolume is the body of a chvdisk request: nil fields are left as they are.
type ChVolume struct {
	Name *string `json:"name,omitempty"`
}

// Renamer renames volumes.
type Renamer interface {
	RenameVolume(ref, name string) error
}

// WithVolumeChanges registers the volume change route, served by r, and returns h. Call it
// once, before h serves its first request.
func (h *Handler) WithVolumeChanges(r Renamer) *Handler {
	h.mux.HandleFunc("PATCH /v1/volumes/{ref}", func(w http.ResponseWriter, req *http.Request) {
		ref, ok := h.ref(w, req, "ref")
		var body ChVolume
		if !ok || !h.noQuery(w, req) || !h.body(w, req, &body) {
			return
		}
		if body.Name == nil {
			h.fail(w, req, fcerr.New(fcerr.MissingParameter, "nothing to change: give a name"))
			return
		}
		h.result(w, req, r.RenameVolume(ref, *body.Name), http.StatusNoContent, nil)
	})
	return h
}

// ChVolume changes volume ref.
func (c *Client) ChVolume(ctx context.Context, ref string, req ChVolume) error {
	return c.do(ctx, http.MethodPatch, "/v1/volumes/"+url.PathEscape(ref), req, nil)
}

// ExpandVolume is the body of an expandvdisksize request: how many bytes to add.
type ExpandVolume struct {
	Add *int64 `json:"add"`
}

// Expander grows volumes.
type Expander interface {
	ExpandVolume(ref string, add int64) (Volume, error)
}

// WithVolumeExpand registers the expand route, served by e, and returns h. Call it once,
// before h serves its first request.
func (h *Handler) WithVolumeExpand(e Expander) *Handler {
	h.mux.HandleFunc("POST /v1/volumes/{ref}/expand", func(w http.ResponseWriter, req *http.Request) {
		ref, ok := h.ref(w, req, "ref")
		var body ExpandVolume
		if !ok || !h.noQuery(w, req) || !h.body(w, req, &body) {
			return
		}
		if body.Add == nil {
			h.fail(w, req, fcerr.New(fcerr.MissingParameter, "the size to add is missing"))
			return
		}
		v, err := e.ExpandVolume(ref, *body.Add)
		h.result(w, req, err, http.StatusOK, v)
	})
	return h
}

// ExpandVolume grows volume ref by add bytes and returns it.
func (c *Client) ExpandVolume(ctx context.Context, ref string, add int64) (Volume, error) {
	var v Volume
	err := c.do(ctx, http.MethodPost, "/v1/volumes/"+url.PathEscape(ref)+"/expand", ExpandVolume{Add: &add}, &v)
	return v, err
}
