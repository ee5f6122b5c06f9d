package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fcnbd/internal/volume"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"syscall"

	"fcnbd/internal/fcerr"
)

// Client calls the control API of the daemon listening on a Unix socket. Refusals come back as
// *fcerr.Error with the daemon's code; a socket nobody listens on is fcerr.NoDaemon.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client for the daemon on socket.
func NewClient(socket string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}
	return &Client{socket: socket, http: &http.Client{Transport: tr}}
}

// CreateVolume creates a volume of capacity bytes.
func (c *Client) CreateVolume(ctx context.Context, name string, capacity int64) (Volume, error) {
	var v Volume
	err := c.do(ctx, http.MethodPost, "/v1/volumes", CreateVolume{Name: &name, Capacity: &capacity}, &v)
	return v, err
}

// Volumes lists every volume in id order.
func (c *Client) Volumes(ctx context.Context) ([]Volume, error) {
	var vs []Volume
	err := c.do(ctx, http.MethodGet, "/v1/volumes", nil, &vs)
	return vs, err
}

// Volume returns the volume ref (an id if all digits, else a name).
func (c *Client) Volume(ctx context.Context, ref string) (Volume, error) {
	var v Volume
	err := c.do(ctx, http.MethodGet, "/v1/volumes/"+url.PathEscape(ref), nil, &v)
	return v, err
}

// DeleteVolume deletes the volume ref.
func (c *Client) DeleteVolume(ctx context.Context, ref string, mode volume.DeleteMode) error {
	q := url.Values{}
	if mode.Force {
		q.Set("force", "1")
	}
	if mode.HostMaps {
		q.Set("removehostmappings", "1")
	}
	path := "/v1/volumes/" + url.PathEscape(ref)
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	return c.do(ctx, http.MethodDelete, path, nil, nil)
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		data, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://fcnbd"+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			return fcerr.New(fcerr.NoDaemon, "no fcnbd daemon is listening on %s", c.socket)
		}
		return fmt.Errorf("control socket %s: %w", c.socket, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("control socket %s: %w", c.socket, err)
	}
	if resp.StatusCode >= 300 {
		var e Error
		if json.Unmarshal(data, &e) != nil || e.Code == "" {
			return fcerr.New(fcerr.Internal, "the daemon replied %s", resp.Status)
		}
		return &fcerr.Error{Code: e.Code, Message: e.Message}
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("control socket %s: bad reply: %w", c.socket, err)
	}
	return nil
}
