package api

// The volume change route (chvdisk):
//
//	PATCH /v1/volumes/{ref} ChVolume → 204
//
// Only the name can change for now.

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
		ref := req.PathValue("ref")
		if err := validRef(ref); err != nil {
			h.fail(w, req, err)
			return
		}
		if !h.noQuery(w, req) {
			return
		}
		var body ChVolume
		if err := decode(w, req, &body); err != nil {
			h.fail(w, req, err)
			return
		}
		if body.Name == nil {
			h.fail(w, req, fcerr.New(fcerr.MissingParameter, "nothing to change: give a name"))
			return
		}
		if err := r.RenameVolume(ref, *body.Name); err != nil {
			h.fail(w, req, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	return h
}

// ChVolume changes volume ref.
func (c *Client) ChVolume(ctx context.Context, ref string, req ChVolume) error {
	return c.do(ctx, http.MethodPatch, "/v1/volumes/"+url.PathEscape(ref), req, nil)
}
