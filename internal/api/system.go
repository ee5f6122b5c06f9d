package api

// The system route, what lssystem, lsnode, lsiogrp and lsmdiskgrp show of the one fcnbd host:
//
//	GET /v1/system → 200 System
//
// The capacities are those of the file system that holds the data directory, read with
// statfs at each request.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"syscall"
)

// System describes the host fcnbd runs on and its data directory's file system.
type System struct {
	// ID is 16 hex digits, stable for one host and data directory.
	ID       string `json:"id"`
	Name     string `json:"name"`
	DataDir  string `json:"data_dir"`
	Capacity int64  `json:"capacity"`      // bytes of the data directory's file system
	Free     int64  `json:"free_capacity"` // bytes available to fcnbd there
	// Cluster is set in cluster mode: this node, and every node and I/O group as etcd has them.
	Cluster *Cluster `json:"cluster,omitempty"`
}

// Cluster is what a cluster-mode node reports of the cluster.
type Cluster struct {
	Node    string        `json:"node"`
	IOGroup int           `json:"iogrp"`
	Serving bool          `json:"serving"` // this node serves its I/O group (false: a standby)
	Nodes   []ClusterNode `json:"nodes"`
	Groups  []IOGroup     `json:"iogrps"`
}

// ClusterNode is one node of the cluster.
type ClusterNode struct {
	Name    string `json:"name"`
	IOGroup int    `json:"iogrp"`
	Addr    string `json:"addr"`
	Online  bool   `json:"online"`
	Owner   bool   `json:"owner"` // owns its I/O group
}

// IOGroup is one I/O group of the cluster.
type IOGroup struct {
	ID      int    `json:"id"`
	Owner   string `json:"owner,omitempty"` // "": no node serves it, its volumes and mappings are offline
	Volumes int    `json:"volumes"`
	// Suspended counts its mappings suspended because their bitmaps are offline; Hosts its
	// host objects.
	Suspended int `json:"suspended"`
	Hosts     int `json:"hosts"`
	// VolumeNames are its volumes' names, as its owner last published them.
	VolumeNames []string `json:"volume_names,omitempty"`
}

// ReadSystem describes this host and the file system of dataDir.
func ReadSystem(dataDir string) (System, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dataDir, &st); err != nil {
		return System{}, fmt.Errorf("statfs %s: %w", dataDir, err)
	}
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "fcnbd"
	}
	sum := sha256.Sum256([]byte(host + "\x00" + dataDir))
	return System{
		ID:       hex.EncodeToString(sum[:8]),
		Name:     host,
		DataDir:  dataDir,
		Capacity: int64(st.Blocks) * st.Bsize,
		Free:     int64(st.Bavail) * st.Bsize,
	}, nil
}

// WithSystem registers the system route for the data directory dataDir and returns h. Call it
// once, before h serves its first request.
func (h *Handler) WithSystem(dataDir string) *Handler { return h.WithClusterSystem(dataDir, nil) }

// WithClusterSystem is WithSystem for a cluster-mode node: cluster, called at each request,
// says what etcd has of the cluster.
func (h *Handler) WithClusterSystem(dataDir string, cluster func(context.Context) (*Cluster, error)) *Handler {
	h.mux.HandleFunc("GET /v1/system", func(w http.ResponseWriter, req *http.Request) {
		if !h.noQuery(w, req) {
			return
		}
		s, err := ReadSystem(dataDir)
		if err == nil && cluster != nil {
			s.Cluster, err = cluster(req.Context())
		}
		if err != nil {
			h.fail(w, req, err)
			return
		}
		reply(w, http.StatusOK, s)
	})
	return h
}

// System reads the daemon's system description.
func (c *Client) System(ctx context.Context) (System, error) {
	var s System
	err := c.do(ctx, http.MethodGet, "/v1/system", nil, &s)
	return s, err
}
