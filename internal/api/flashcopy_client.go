package api

import (
	"context"
	"net/http"
	"net/url"
)

// The FlashCopy calls mirror the FlashCopy interface, one per route of flashcopy.go. Object
// arguments are ids or names; refusals are *fcerr.Error with the daemon's code.

const (
	fcmapsPath      = "/v1/fcmaps/"
	consistGrpsPath = "/v1/fcconsistgrps/"
)

// MkFcmap creates a mapping and returns its id.
func (c *Client) MkFcmap(ctx context.Context, req MkFcmap) (int, error) {
	var created Created
	err := c.do(ctx, http.MethodPost, "/v1/fcmaps", req, &created)
	return created.ID, err
}

// ChFcmap changes the attributes of mapping ref that req sets.
func (c *Client) ChFcmap(ctx context.Context, ref string, req ChFcmap) error {
	return c.do(ctx, http.MethodPatch, fcmapsPath+url.PathEscape(ref), req, nil)
}

// PrestartFcmap starts preparing mapping ref; it returns before the mapping is prepared.
func (c *Client) PrestartFcmap(ctx context.Context, ref string, restore bool) error {
	return c.do(ctx, http.MethodPost, fcmapsPath+url.PathEscape(ref)+"/prestart"+query(qflag{"restore", restore}), nil, nil)
}

// StartFcmap starts mapping ref (preparing it first with prep) and returns once it is copying.
func (c *Client) StartFcmap(ctx context.Context, ref string, prep, restore bool) error {
	return c.do(ctx, http.MethodPost, fcmapsPath+url.PathEscape(ref)+"/start"+query(qflag{"prep", prep}, qflag{"restore", restore}), nil, nil)
}

// StopFcmap stops mapping ref.
func (c *Client) StopFcmap(ctx context.Context, ref string, force, split bool) error {
	return c.do(ctx, http.MethodPost, fcmapsPath+url.PathEscape(ref)+"/stop"+query(qflag{"force", force}, qflag{"split", split}), nil, nil)
}

// RmFcmap deletes mapping ref.
func (c *Client) RmFcmap(ctx context.Context, ref string, force bool) error {
	return c.do(ctx, http.MethodDelete, fcmapsPath+url.PathEscape(ref)+query(qflag{"force", force}), nil, nil)
}

// Fcmaps lists every mapping.
func (c *Client) Fcmaps(ctx context.Context) ([]Fcmap, error) {
	var ms []Fcmap
	err := c.do(ctx, http.MethodGet, "/v1/fcmaps", nil, &ms)
	return ms, err
}

// Fcmap returns mapping ref.
func (c *Client) Fcmap(ctx context.Context, ref string) (Fcmap, error) {
	var m Fcmap
	err := c.do(ctx, http.MethodGet, fcmapsPath+url.PathEscape(ref), nil, &m)
	return m, err
}

// FcmapDependentMaps lists the mappings that depend on mapping ref.
func (c *Client) FcmapDependentMaps(ctx context.Context, ref string) ([]Fcmap, error) {
	var ms []Fcmap
	err := c.do(ctx, http.MethodGet, fcmapsPath+url.PathEscape(ref)+"/dependents", nil, &ms)
	return ms, err
}

// MkConsistGrp creates a consistency group and returns its id.
func (c *Client) MkConsistGrp(ctx context.Context, req MkConsistGrp) (int, error) {
	var created Created
	err := c.do(ctx, http.MethodPost, "/v1/fcconsistgrps", req, &created)
	return created.ID, err
}

// ChConsistGrp changes the attributes of group ref that req sets.
func (c *Client) ChConsistGrp(ctx context.Context, ref string, req ChConsistGrp) error {
	return c.do(ctx, http.MethodPatch, consistGrpsPath+url.PathEscape(ref), req, nil)
}

// PrestartConsistGrp starts preparing every member of group ref.
func (c *Client) PrestartConsistGrp(ctx context.Context, ref string, restore bool) error {
	return c.do(ctx, http.MethodPost, consistGrpsPath+url.PathEscape(ref)+"/prestart"+query(qflag{"restore", restore}), nil, nil)
}

// StartConsistGrp starts group ref (preparing it first with prep) and returns once it is copying.
func (c *Client) StartConsistGrp(ctx context.Context, ref string, prep, restore bool) error {
	return c.do(ctx, http.MethodPost, consistGrpsPath+url.PathEscape(ref)+"/start"+query(qflag{"prep", prep}, qflag{"restore", restore}), nil, nil)
}

// StopConsistGrp stops every member of group ref.
func (c *Client) StopConsistGrp(ctx context.Context, ref string, force, split bool) error {
	return c.do(ctx, http.MethodPost, consistGrpsPath+url.PathEscape(ref)+"/stop"+query(qflag{"force", force}, qflag{"split", split}), nil, nil)
}

// RmConsistGrp deletes group ref; with force its members become stand-alone.
func (c *Client) RmConsistGrp(ctx context.Context, ref string, force bool) error {
	return c.do(ctx, http.MethodDelete, consistGrpsPath+url.PathEscape(ref)+query(qflag{"force", force}), nil, nil)
}

// ConsistGrps lists every consistency group.
func (c *Client) ConsistGrps(ctx context.Context) ([]ConsistGrp, error) {
	var gs []ConsistGrp
	err := c.do(ctx, http.MethodGet, "/v1/fcconsistgrps", nil, &gs)
	return gs, err
}

// ConsistGrp returns group ref.
func (c *Client) ConsistGrp(ctx context.Context, ref string) (ConsistGrp, error) {
	var g ConsistGrp
	err := c.do(ctx, http.MethodGet, consistGrpsPath+url.PathEscape(ref), nil, &g)
	return g, err
}

// VdiskFcmapCopies lists the mappings whose targets hold a full copy of volume vol.
func (c *Client) VdiskFcmapCopies(ctx context.Context, vol string) ([]Fcmap, error) {
	var ms []Fcmap
	err := c.do(ctx, http.MethodGet, "/v1/volumes/"+url.PathEscape(vol)+"/fcmapcopies", nil, &ms)
	return ms, err
}

// VdiskDependentMaps lists the mappings that depend on volume vol.
func (c *Client) VdiskDependentMaps(ctx context.Context, vol string) ([]Fcmap, error) {
	var ms []Fcmap
	err := c.do(ctx, http.MethodGet, "/v1/volumes/"+url.PathEscape(vol)+"/dependentmaps", nil, &ms)
	return ms, err
}

// qflag is a boolean query flag: name=1 when set, absent when not.
type qflag struct {
	name string
	set  bool
}

// query returns "?name=1&…" for the flags that are set, or "".
func query(flags ...qflag) string {
	v := url.Values{}
	for _, f := range flags {
		if f.set {
			v.Set(f.name, "1")
		}
	}
	if len(v) == 0 {
		return ""
	}
	return "?" + v.Encode()
}
