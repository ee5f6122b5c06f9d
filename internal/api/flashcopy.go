package api

// FlashCopy routes (all under /v1; {ref} is an id if all digits, else a name):
//
//	POST   /v1/fcmaps                          MkFcmap → 201 {"id": N}
//	GET    /v1/fcmaps                          → 200 [Fcmap, …]
//	GET    /v1/fcmaps/{ref}                    → 200 Fcmap
//	PATCH  /v1/fcmaps/{ref}                    ChFcmap → 204
//	DELETE /v1/fcmaps/{ref}?force=1            → 204
//	POST   /v1/fcmaps/{ref}/prestart?restore=1 → 204
//	POST   /v1/fcmaps/{ref}/start?prep=1&restore=1 → 204
//	POST   /v1/fcmaps/{ref}/stop?force=1&split=1   → 204
//	GET    /v1/fcmaps/{ref}/dependents         → 200 [Fcmap, …]
//
//	POST   /v1/fcconsistgrps                   MkConsistGrp → 201 {"id": N}
//	GET    /v1/fcconsistgrps                   → 200 [ConsistGrp, …]
//	GET    /v1/fcconsistgrps/{ref}             → 200 ConsistGrp
//	PATCH  /v1/fcconsistgrps/{ref}             ChConsistGrp → 204
//	DELETE /v1/fcconsistgrps/{ref}?force=1     → 204
//	POST   /v1/fcconsistgrps/{ref}/prestart?restore=1
//	POST   /v1/fcconsistgrps/{ref}/start?prep=1&restore=1
//	POST   /v1/fcconsistgrps/{ref}/stop?force=1&split=1
//
//	GET    /v1/volumes/{ref}/fcmapcopies       → 200 [Fcmap, …]
//	GET    /v1/volumes/{ref}/dependentmaps     → 200 [Fcmap, …]
//
// Query flags take 1, 0, true or false; a key a route does not list, or a repeated key, is
// refused. Action routes take no body.

import (
	"context"
	"net/http"
	"strconv"

	"fcnbd/internal/fcerr"
)

// Created is the body of a 201 reply to mkfcmap and mkfcconsistgrp.
type Created struct {
	ID int `json:"id"`
}

// MaxRate is the highest copy or clean rate (docs/flashcopy.md §3).
const MaxRate = 150

// fcRoutes serves the FlashCopy routes of h; it is separate from Handler so that adding
// FlashCopy needs no field in it.
type fcRoutes struct {
	h  *Handler
	fc FlashCopy
}

// WithFlashCopy registers the FlashCopy routes, served by fc, and returns h. Call it once,
// before h serves its first request.
func (h *Handler) WithFlashCopy(fc FlashCopy) *Handler {
	s := &fcRoutes{h: h, fc: fc}
	for _, kind := range []struct {
		base string
		o    fcObject
	}{
		{"/v1/fcmaps", fcmapObject{fc}},
		{"/v1/fcconsistgrps", consistGrpObject{fc}},
	} {
		o := kind.o
		h.mux.HandleFunc("POST "+kind.base, func(w http.ResponseWriter, r *http.Request) { s.create(w, r, o) })
		h.mux.HandleFunc("GET "+kind.base, func(w http.ResponseWriter, r *http.Request) { s.list(w, r, o) })
		h.mux.HandleFunc("GET "+kind.base+"/{ref}", func(w http.ResponseWriter, r *http.Request) { s.get(w, r, o) })
		h.mux.HandleFunc("PATCH "+kind.base+"/{ref}", func(w http.ResponseWriter, r *http.Request) { s.change(w, r, o) })
		h.mux.HandleFunc("DELETE "+kind.base+"/{ref}", func(w http.ResponseWriter, r *http.Request) { s.remove(w, r, o) })
		h.mux.HandleFunc("POST "+kind.base+"/{ref}/prestart", func(w http.ResponseWriter, r *http.Request) { s.prestart(w, r, o) })
		h.mux.HandleFunc("POST "+kind.base+"/{ref}/start", func(w http.ResponseWriter, r *http.Request) { s.start(w, r, o) })
		h.mux.HandleFunc("POST "+kind.base+"/{ref}/stop", func(w http.ResponseWriter, r *http.Request) { s.stop(w, r, o) })
	}
	h.mux.HandleFunc("GET /v1/fcmaps/{ref}/dependents", s.fcmapDependents)
	h.mux.HandleFunc("GET /v1/volumes/{ref}/fcmapcopies", s.vdiskFcmapCopies)
	h.mux.HandleFunc("GET /v1/volumes/{ref}/dependentmaps", s.vdiskDependentMaps)
	return h
}

// fcObject is what mappings and groups have in common as far as the routes go: the same
// verbs, with each kind's request bodies and validation.
type fcObject interface {
	// create decodes and validates a create request and performs it.
	create(r *http.Request, decode func(any) error) (int, error)
	list(r *http.Request) any
	get(r *http.Request, ref string) (any, error)
	change(r *http.Request, ref string, decode func(any) error) error
	prestart(r *http.Request, ref string, restore bool) error
	start(r *http.Request, ref string, prep, restore bool) error
	stop(r *http.Request, ref string, force, split bool) error
	remove(r *http.Request, ref string, force bool) error
}

func (s *fcRoutes) create(w http.ResponseWriter, r *http.Request, o fcObject) {
	if !s.h.noQuery(w, r) {
		return
	}
	id, err := o.create(r, func(v any) error { return decode(w, r, v) })
	if err != nil {
		s.h.fail(w, r, err)
		return
	}
	reply(w, http.StatusCreated, Created{ID: id})
}

func (s *fcRoutes) list(w http.ResponseWriter, r *http.Request, o fcObject) {
	if s.h.noQuery(w, r) && s.h.noBody(w, r) {
		reply(w, http.StatusOK, o.list(r))
	}
}

func (s *fcRoutes) get(w http.ResponseWriter, r *http.Request, o fcObject) {
	if !s.h.noQuery(w, r) || !s.h.noBody(w, r) {
		return
	}
	v, err := o.get(r, r.PathValue("ref"))
	s.done(w, r, http.StatusOK, v, err)
}

func (s *fcRoutes) change(w http.ResponseWriter, r *http.Request, o fcObject) {
	if !s.h.noQuery(w, r) {
		return
	}
	err := o.change(r, r.PathValue("ref"), func(v any) error { return decode(w, r, v) })
	s.done(w, r, http.StatusNoContent, nil, err)
}

func (s *fcRoutes) remove(w http.ResponseWriter, r *http.Request, o fcObject) {
	q, ok := s.flags(w, r, "force")
	if !ok {
		return
	}
	s.done(w, r, http.StatusNoContent, nil, o.remove(r, r.PathValue("ref"), q["force"]))
}

func (s *fcRoutes) prestart(w http.ResponseWriter, r *http.Request, o fcObject) {
	q, ok := s.flags(w, r, "restore")
	if !ok {
		return
	}
	s.done(w, r, http.StatusNoContent, nil, o.prestart(r, r.PathValue("ref"), q["restore"]))
}

func (s *fcRoutes) start(w http.ResponseWriter, r *http.Request, o fcObject) {
	q, ok := s.flags(w, r, "prep", "restore")
	if !ok {
		return
	}
	s.done(w, r, http.StatusNoContent, nil, o.start(r, r.PathValue("ref"), q["prep"], q["restore"]))
}

func (s *fcRoutes) stop(w http.ResponseWriter, r *http.Request, o fcObject) {
	q, ok := s.flags(w, r, "force", "split")
	if !ok {
		return
	}
	if q["force"] && q["split"] {
		s.h.fail(w, r, fcerr.New(fcerr.ExclusiveFlags, "-force and -split can't be used together"))
		return
	}
	s.done(w, r, http.StatusNoContent, nil, o.stop(r, r.PathValue("ref"), q["force"], q["split"]))
}

func (s *fcRoutes) fcmapDependents(w http.ResponseWriter, r *http.Request) {
	s.fcmapList(w, r, s.fc.FcmapDependentMaps)
}

func (s *fcRoutes) vdiskFcmapCopies(w http.ResponseWriter, r *http.Request) {
	s.fcmapList(w, r, s.fc.VdiskFcmapCopies)
}

func (s *fcRoutes) vdiskDependentMaps(w http.ResponseWriter, r *http.Request) {
	s.fcmapList(w, r, s.fc.VdiskDependentMaps)
}

func (s *fcRoutes) fcmapList(w http.ResponseWriter, r *http.Request, f func(ctx context.Context, ref string) ([]Fcmap, error)) {
	if !s.h.noQuery(w, r) || !s.h.noBody(w, r) {
		return
	}
	ms, err := f(r.Context(), r.PathValue("ref"))
	s.done(w, r, http.StatusOK, nonNil(ms), err)
}

// done replies v with code, or the refusal err.
func (s *fcRoutes) done(w http.ResponseWriter, r *http.Request, code int, v any, err error) {
	switch {
	case err != nil:
		s.h.fail(w, r, err)
	case code == http.StatusNoContent:
		w.WriteHeader(code)
	default:
		reply(w, code, v)
	}
}

// flags parses a query made only of the boolean flags allowed, each at most once, with the
// value 1, 0, true or false. It replies the refusal itself and returns false if the query is
// not valid; a request with a query takes no body either.
func (s *fcRoutes) flags(w http.ResponseWriter, r *http.Request, allowed ...string) (map[string]bool, bool) {
	if !s.h.noBody(w, r) {
		return nil, false
	}
	q := make(map[string]bool, len(allowed))
	for k, vs := range r.URL.Query() {
		known := false
		for _, a := range allowed {
			known = known || a == k
		}
		var v bool
		var err error
		if known && len(vs) == 1 {
			v, err = parseFlag(vs[0])
		}
		if !known || len(vs) != 1 || err != nil {
			s.h.fail(w, r, fcerr.New(fcerr.BadValue, "the query %q is not valid for this request", r.URL.RawQuery))
			return nil, false
		}
		q[k] = v
	}
	return q, true
}

func parseFlag(v string) (bool, error) {
	switch v {
	case "1", "true":
		return true, nil
	case "0", "false":
		return false, nil
	}
	return false, strconv.ErrSyntax
}

func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}

// checkRate refuses a copy or clean rate outside 0–150.
func checkRate(flag string, rate *int) error {
	if rate != nil && (*rate < 0 || *rate > MaxRate) {
		return fcerr.New(fcerr.BadValue, "the %s %d is not valid: use 0 to %d", flag, *rate, MaxRate)
	}
	return nil
}

type fcmapObject struct{ fc FlashCopy }

func (o fcmapObject) create(r *http.Request, decode func(any) error) (int, error) {
	var req MkFcmap
	if err := decode(&req); err != nil {
		return 0, err
	}
	switch {
	case req.Source == "":
		return 0, fcerr.New(fcerr.MissingParameter, "the source volume of the mapping is missing")
	case req.Target == "":
		return 0, fcerr.New(fcerr.MissingParameter, "the target volume of the mapping is missing")
	case req.GrainSize != nil && *req.GrainSize != 64 && *req.GrainSize != 256:
		return 0, fcerr.New(fcerr.BadValue, "the grain size %d is not valid: use 64 or 256", *req.GrainSize)
	}
	if err := checkRate("copy rate", req.CopyRate); err != nil {
		return 0, err
	}
	if err := checkRate("clean rate", req.CleanRate); err != nil {
		return 0, err
	}
	return o.fc.MkFcmap(r.Context(), req)
}

func (o fcmapObject) list(r *http.Request) any { return nonNil(o.fc.Fcmaps(r.Context())) }

func (o fcmapObject) get(r *http.Request, ref string) (any, error) {
	return o.fc.Fcmap(r.Context(), ref)
}

func (o fcmapObject) change(r *http.Request, ref string, decode func(any) error) error {
	var req ChFcmap
	if err := decode(&req); err != nil {
		return err
	}
	if req == (ChFcmap{}) {
		return fcerr.New(fcerr.MissingParameter, "nothing to change: give at least one attribute")
	}
	if err := checkRate("copy rate", req.CopyRate); err != nil {
		return err
	}
	if err := checkRate("clean rate", req.CleanRate); err != nil {
		return err
	}
	return o.fc.ChFcmap(r.Context(), ref, req)
}

func (o fcmapObject) prestart(r *http.Request, ref string, restore bool) error {
	return o.fc.PrestartFcmap(r.Context(), ref, restore)
}

func (o fcmapObject) start(r *http.Request, ref string, prep, restore bool) error {
	return o.fc.StartFcmap(r.Context(), ref, prep, restore)
}

func (o fcmapObject) stop(r *http.Request, ref string, force, split bool) error {
	return o.fc.StopFcmap(r.Context(), ref, force, split)
}

func (o fcmapObject) remove(r *http.Request, ref string, force bool) error {
	return o.fc.RmFcmap(r.Context(), ref, force)
}

type consistGrpObject struct{ fc FlashCopy }

func (o consistGrpObject) create(r *http.Request, decode func(any) error) (int, error) {
	var req MkConsistGrp
	if err := decode(&req); err != nil {
		return 0, err
	}
	return o.fc.MkConsistGrp(r.Context(), req)
}

func (o consistGrpObject) list(r *http.Request) any { return nonNil(o.fc.ConsistGrps(r.Context())) }

func (o consistGrpObject) get(r *http.Request, ref string) (any, error) {
	return o.fc.ConsistGrp(r.Context(), ref)
}

func (o consistGrpObject) change(r *http.Request, ref string, decode func(any) error) error {
	var req ChConsistGrp
	if err := decode(&req); err != nil {
		return err
	}
	if req == (ChConsistGrp{}) {
		return fcerr.New(fcerr.MissingParameter, "nothing to change: give at least one attribute")
	}
	return o.fc.ChConsistGrp(r.Context(), ref, req)
}

func (o consistGrpObject) prestart(r *http.Request, ref string, restore bool) error {
	return o.fc.PrestartConsistGrp(r.Context(), ref, restore)
}

func (o consistGrpObject) start(r *http.Request, ref string, prep, restore bool) error {
	return o.fc.StartConsistGrp(r.Context(), ref, prep, restore)
}

func (o consistGrpObject) stop(r *http.Request, ref string, force, split bool) error {
	return o.fc.StopConsistGrp(r.Context(), ref, force, split)
}

func (o consistGrpObject) remove(r *http.Request, ref string, force bool) error {
	return o.fc.RmConsistGrp(r.Context(), ref, force)
}
