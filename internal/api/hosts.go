package api

// Host routes (issue 14; all under /v1; {ref} is an id if all digits, else a name):
//
//	POST   /v1/hosts                          MkHost → 201 {"id": N}
//	GET    /v1/hosts                          → 200 [Host, …]
//	GET    /v1/hosts/{ref}                    → 200 Host
//	PATCH  /v1/hosts/{ref}                    ChHost → 204
//	DELETE /v1/hosts/{ref}?force=1            → 204
//	POST   /v1/hosts/{ref}/ports              HostPorts → 204 (addhostport)
//	POST   /v1/hosts/{ref}/ports/remove       HostPorts → 204 (rmhostport)
//	POST   /v1/hostmaps                       MkHostMap → 201 {"id": SCSI id}
//	GET    /v1/hostmaps?host=H | ?volume=V    → 200 [HostMap, …] (every one without a query)
//	DELETE /v1/hostmaps/{host}/{volume}       → 204
//
// The hosts manager validates every request completely before it changes anything.

import (
	"context"
	"net/http"
	"net/url"
	"slices"

	"fcnbd/internal/fcerr"
)

// HostPort is one port name of a host; Kind is "nbd", "iscsi" or "fc".
type HostPort struct {
	Kind string `json:"kind"`
	Name string `json:"name"`
}

// Host is a host as the API shows it.
type Host struct {
	ID       int        `json:"id"`
	Name     string     `json:"name"`
	Type     string     `json:"type"`
	Protocol string     `json:"protocol"`
	Ports    []HostPort `json:"ports"`
	// Mappings is the number of volumes mapped to the host.
	Mappings int `json:"mappings"`
}

// HostPorts lists port names by kind, as mkhost, addhostport and rmhostport take them.
type HostPorts struct {
	NBDNames   []string `json:"nbd_names,omitempty"`
	ISCSINames []string `json:"iscsi_names,omitempty"`
	FCWWPNs    []string `json:"fc_wwpns,omitempty"`
	// Force: addhostport/mkhost accept it (fcnbd never checks that a port is logged in);
	// rmhostport needs it to remove a port of a host that has mappings.
	Force bool `json:"force,omitempty"`
}

// MkHost is the body of POST /v1/hosts. Name "" means host<id>; Type "" generic, Protocol ""
// scsi; IOGrps lists the I/O groups (fcnbd has one, io_grp0).
type MkHost struct {
	Name     string   `json:"name,omitempty"`
	Type     string   `json:"type,omitempty"`
	Protocol string   `json:"protocol,omitempty"`
	IOGrps   []string `json:"iogrps,omitempty"`
	HostPorts
}

// ChHost is the body of PATCH /v1/hosts/{ref}: the fields to change.
type ChHost struct {
	Name *string `json:"name,omitempty"`
	Type *string `json:"type,omitempty"`
}

// MkHostMap is the body of POST /v1/hostmaps. SCSI nil means the host's lowest free SCSI id;
// Force allows a volume already mapped to another host.
type MkHostMap struct {
	Host   string `json:"host"`
	Volume string `json:"volume"`
	SCSI   *int   `json:"scsi,omitempty"`
	Force  bool   `json:"force,omitempty"`
}

// HostMap is one host mapping: a volume given to a host under a SCSI id.
type HostMap struct {
	HostID     int    `json:"host_id"`
	HostName   string `json:"host_name"`
	VolumeID   int    `json:"volume_id"`
	VolumeName string `json:"volume_name"`
	SCSI       int    `json:"scsi"`
}

// Hosts is what the API needs of the hosts manager.
type Hosts interface {
	MkHost(req MkHost) (int, error)
	ChHost(ref string, req ChHost) error
	RmHost(ref string, force bool) error
	AddHostPorts(ref string, req HostPorts) error
	RmHostPorts(ref string, req HostPorts) error
	Hosts() ([]Host, error)
	Host(ref string) (Host, error)
	MkHostMap(req MkHostMap) (int, error)
	RmHostMap(host, volume string) error
	// HostMaps lists the mappings of host (if not ""), or of volume (if not ""), or all.
	HostMaps(host, volume string) ([]HostMap, error)
}

// WithHosts registers the host routes, served by hs, and returns h. Call it once, before h
// serves its first request.
func (h *Handler) WithHosts(hs Hosts) *Handler {
	h.mux.HandleFunc("POST /v1/hosts", func(w http.ResponseWriter, r *http.Request) {
		var req MkHost
		if !h.noQuery(w, r) || !h.body(w, r, &req) {
			return
		}
		id, err := hs.MkHost(req)
		h.result(w, r, err, http.StatusCreated, Created{ID: id})
	})
	h.mux.HandleFunc("GET /v1/hosts", func(w http.ResponseWriter, r *http.Request) {
		if h.noQuery(w, r) && h.noBody(w, r) {
			list, err := hs.Hosts()
			h.result(w, r, err, http.StatusOK, list)
		}
	})
	h.mux.HandleFunc("GET /v1/hosts/{ref}", func(w http.ResponseWriter, r *http.Request) {
		ref, ok := h.ref(w, r, "ref")
		if ok && h.noQuery(w, r) && h.noBody(w, r) {
			host, err := hs.Host(ref)
			h.result(w, r, err, http.StatusOK, host)
		}
	})
	h.mux.HandleFunc("PATCH /v1/hosts/{ref}", func(w http.ResponseWriter, r *http.Request) {
		var req ChHost
		ref, ok := h.ref(w, r, "ref")
		if ok && h.noQuery(w, r) && h.body(w, r, &req) {
			h.result(w, r, hs.ChHost(ref, req), http.StatusNoContent, nil)
		}
	})
	h.mux.HandleFunc("DELETE /v1/hosts/{ref}", func(w http.ResponseWriter, r *http.Request) {
		ref, ok := h.ref(w, r, "ref")
		if !ok || !h.noBody(w, r) {
			return
		}
		q, err := queryFlags(r, "force")
		if err != nil {
			h.fail(w, r, err)
			return
		}
		h.result(w, r, hs.RmHost(ref, q["force"]), http.StatusNoContent, nil)
	})
	h.mux.HandleFunc("POST /v1/hosts/{ref}/ports", func(w http.ResponseWriter, r *http.Request) {
		var req HostPorts
		ref, ok := h.ref(w, r, "ref")
		if ok && h.noQuery(w, r) && h.body(w, r, &req) {
			h.result(w, r, hs.AddHostPorts(ref, req), http.StatusNoContent, nil)
		}
	})
	h.mux.HandleFunc("POST /v1/hosts/{ref}/ports/remove", func(w http.ResponseWriter, r *http.Request) {
		var req HostPorts
		ref, ok := h.ref(w, r, "ref")
		if ok && h.noQuery(w, r) && h.body(w, r, &req) {
			h.result(w, r, hs.RmHostPorts(ref, req), http.StatusNoContent, nil)
		}
	})
	h.mux.HandleFunc("POST /v1/hostmaps", func(w http.ResponseWriter, r *http.Request) {
		var req MkHostMap
		if !h.noQuery(w, r) || !h.body(w, r, &req) {
			return
		}
		scsi, err := hs.MkHostMap(req)
		h.result(w, r, err, http.StatusCreated, Created{ID: scsi})
	})
	h.mux.HandleFunc("GET /v1/hostmaps", func(w http.ResponseWriter, r *http.Request) {
		if !h.noBody(w, r) {
			return
		}
		var host, vol string
		for k, vs := range r.URL.Query() {
			if (k != "host" && k != "volume") || len(vs) != 1 || len(r.URL.Query()) > 1 {
				h.fail(w, r, badQuery(r))
				return
			}
			if err := validRef(vs[0]); err != nil {
				h.fail(w, r, err)
				return
			}
			if k == "host" {
				host = vs[0]
			} else {
				vol = vs[0]
			}
		}
		list, err := hs.HostMaps(host, vol)
		h.result(w, r, err, http.StatusOK, list)
	})
	h.mux.HandleFunc("DELETE /v1/hostmaps/{host}/{volume}", func(w http.ResponseWriter, r *http.Request) {
		host, ok := h.ref(w, r, "host")
		if !ok {
			return
		}
		vol, ok := h.ref(w, r, "volume")
		if ok && h.noQuery(w, r) && h.noBody(w, r) {
			h.result(w, r, hs.RmHostMap(host, vol), http.StatusNoContent, nil)
		}
	})
	return h
}

// ---- client ----

const hostsPath = "/v1/hosts/"

// MkHost creates a host and returns its id.
func (c *Client) MkHost(ctx context.Context, req MkHost) (int, error) {
	var created Created
	err := c.do(ctx, http.MethodPost, "/v1/hosts", req, &created)
	return created.ID, err
}

// Hosts lists every host.
func (c *Client) Hosts(ctx context.Context) ([]Host, error) {
	var list []Host
	err := c.do(ctx, http.MethodGet, "/v1/hosts", nil, &list)
	return list, err
}

// Host returns host ref.
func (c *Client) Host(ctx context.Context, ref string) (Host, error) {
	var host Host
	err := c.do(ctx, http.MethodGet, hostsPath+url.PathEscape(ref), nil, &host)
	return host, err
}

// ChHost changes what req sets of host ref.
func (c *Client) ChHost(ctx context.Context, ref string, req ChHost) error {
	return c.do(ctx, http.MethodPatch, hostsPath+url.PathEscape(ref), req, nil)
}

// RmHost deletes host ref; force also deletes its host mappings.
func (c *Client) RmHost(ctx context.Context, ref string, force bool) error {
	return c.do(ctx, http.MethodDelete, hostsPath+url.PathEscape(ref)+query(qflag{"force", force}), nil, nil)
}

// AddHostPorts adds port names to host ref.
func (c *Client) AddHostPorts(ctx context.Context, ref string, req HostPorts) error {
	return c.do(ctx, http.MethodPost, hostsPath+url.PathEscape(ref)+"/ports", req, nil)
}

// RmHostPorts removes port names from host ref.
func (c *Client) RmHostPorts(ctx context.Context, ref string, req HostPorts) error {
	return c.do(ctx, http.MethodPost, hostsPath+url.PathEscape(ref)+"/ports/remove", req, nil)
}

// MkHostMap maps a volume to a host and returns the SCSI id it got.
func (c *Client) MkHostMap(ctx context.Context, req MkHostMap) (int, error) {
	var created Created
	err := c.do(ctx, http.MethodPost, "/v1/hostmaps", req, &created)
	return created.ID, err
}

// RmHostMap removes the mapping of volume to host.
func (c *Client) RmHostMap(ctx context.Context, host, volume string) error {
	return c.do(ctx, http.MethodDelete, "/v1/hostmaps/"+url.PathEscape(host)+"/"+url.PathEscape(volume), nil, nil)
}

// HostMaps lists the mappings of host, or of volume, or (both "") all.
func (c *Client) HostMaps(ctx context.Context, host, volume string) ([]HostMap, error) {
	q := url.Values{}
	if host != "" {
		q.Set("host", host)
	}
	if volume != "" {
		q.Set("volume", volume)
	}
	path := "/v1/hostmaps"
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	var list []HostMap
	err := c.do(ctx, http.MethodGet, path, nil, &list)
	return list, err
}

func badQuery(r *http.Request) error {
	return fcerr.New(fcerr.BadValue, "the query %q is not valid for this request", r.URL.RawQuery)
}

// queryFlags parses boolean query flags (1, 0, true, false), refusing other keys and repeats.
func queryFlags(r *http.Request, allowed ...string) (map[string]bool, error) {
	out := map[string]bool{}
	for k, vs := range r.URL.Query() {
		if !slices.Contains(allowed, k) || len(vs) != 1 {
			return nil, badQuery(r)
		}
		switch vs[0] {
		case "1", "true":
			out[k] = true
		case "0", "false":
		default:
			return nil, badQuery(r)
		}
	}
	return out, nil
}
