package api

// The metadata recovery route (docs/flashcopy.md §3 "Bitmap online"):
//
//	POST /v1/recoverfcmap → 200 RecoverResult
//
// The daemon retries its metadata store on its own every few seconds; this route lets an
// operator retry it now, after fixing the disk. It takes no query and no body.

import (
	"context"
	"net/http"
)

// RecoverResult is the reply to recoverfcmap.
type RecoverResult struct {
	// Resumed lists the mappings that were suspended and are back in their state.
	Resumed []string `json:"resumed"`
	// Suspended lists the mappings still suspended (the metadata store is still failing).
	Suspended []string `json:"suspended"`
}

// Recoverer retries the metadata store and brings suspended mappings back. It returns an
// fcerr MetadataUnwritable error (with the result) if the store still can't be written.
type Recoverer interface {
	RecoverFcmaps(ctx context.Context) (RecoverResult, error)
}

// WithRecover registers the recovery route, served by r, and returns h. Call it once, before h
// serves its first request.
func (h *Handler) WithRecover(r Recoverer) *Handler {
	h.mux.HandleFunc("POST /v1/recoverfcmap", func(w http.ResponseWriter, req *http.Request) {
		if !h.noQuery(w, req) || !h.noBody(w, req) {
			return
		}
		res, err := r.RecoverFcmaps(req.Context())
		if err != nil {
			h.fail(w, req, err)
			return
		}
		reply(w, http.StatusOK, res)
	})
	return h
}

// RecoverFcmap asks the daemon to retry its metadata store now.
func (c *Client) RecoverFcmap(ctx context.Context) (RecoverResult, error) {
	var res RecoverResult
	err := c.do(ctx, http.MethodPost, "/v1/recoverfcmap", nil, &res)
	return res, err
}
