package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"github.com/urfave/cli/v2"

	"fcnbd/internal/api"
	"fcnbd/internal/catalog"
	"fcnbd/internal/cluster"
	"fcnbd/internal/fcerr"
	"fcnbd/internal/store"
	"fcnbd/mappings"
	"fcnbd/mappings/driver"
)

// standDownExit is the exit status of a node that stood down: it lost its lease, or found the
// storage claimed by a newer owner. A supervisor (systemd Restart=always) starts it again, and it
// comes back as a standby.
const standDownExit = 3

// clusterConfig is serve's cluster mode.
type clusterConfig struct {
	endpoints []string
	node      string
	iogrp     int
	sharedDir string
	lease     time.Duration
	log       zerolog.Logger
}

// clusterSettings checks the cluster flags: all of them or none.
func clusterSettings(c *cli.Context, log zerolog.Logger) (*clusterConfig, error) {
	eps := c.String("cluster")
	if eps == "" {
		for _, f := range []string{"node", "iogrp", "shared-dir"} {
			if c.IsSet(f) {
				return nil, fmt.Errorf("--%s is for cluster mode: give --cluster ETCD_ENDPOINTS too", f)
			}
		}
		return nil, nil
	}
	cfg := &clusterConfig{node: c.String("node"), iogrp: c.Int("iogrp"), sharedDir: c.String("shared-dir"), lease: c.Duration("lease"), log: log}
	for _, e := range strings.Split(eps, ",") {
		if e = strings.TrimSpace(e); e != "" {
			cfg.endpoints = append(cfg.endpoints, e)
		}
	}
	switch {
	case len(cfg.endpoints) == 0:
		return nil, fmt.Errorf("--cluster %q names no etcd endpoint", eps)
	case cfg.node == "":
		return nil, fmt.Errorf("cluster mode needs --node NAME")
	case cfg.sharedDir == "":
		return nil, fmt.Errorf("cluster mode needs --shared-dir DIR: the storage both nodes of the I/O group see")
	case cfg.iogrp < 0:
		return nil, fmt.Errorf("bad --iogrp %d", cfg.iogrp)
	case cfg.lease < time.Second || cfg.lease%time.Second != 0:
		return nil, fmt.Errorf("bad --lease %s: whole seconds, at least 1s", cfg.lease)
	}
	return cfg, nil
}

func (cfg *clusterConfig) groupDir() string {
	return filepath.Join(cfg.sharedDir, "iogrp"+strconv.Itoa(cfg.iogrp))
}

func (cfg *clusterConfig) join(ctx context.Context, addr string) (*cluster.Member, error) {
	m, err := cluster.Join(ctx, cluster.Config{
		Endpoints: cfg.endpoints, Node: cfg.node, IOGroup: cfg.iogrp, TTL: cfg.lease, Addr: addr, Log: cfg.log,
	})
	if err != nil {
		return nil, err
	}
	cfg.log.Info().Str("node", cfg.node).Int("iogrp", cfg.iogrp).Strs("etcd", cfg.endpoints).Msg("cluster: joined as a standby; waiting to own the I/O group")
	return m, nil
}

// takeOver waits until this node owns its I/O group, then claims the shared storage with its
// epoch (which waits for any write of the old owner still running), takes the catalogue over
// and returns it with the fenced store. If the catalogue can't be loaded (the group's journal
// is unreadable), no node can serve the group: this node gives it up, so that its partner may
// try, and tries again a lease later; meanwhile the group's volumes and mappings are offline,
// and both nodes' standby views say so.
func (cfg *clusterConfig) takeOver(ctx context.Context, m *cluster.Member) (*catalog.DB, store.Dir, string, error) {
	for {
		cat, dir, catDir, err := cfg.tryTakeOver(ctx, m)
		if err == nil || ctx.Err() != nil || m.LostErr() != nil {
			return cat, dir, catDir, err
		}
		cfg.log.Error().Err(err).Int("iogrp", cfg.iogrp).Dur("retry_in", cfg.lease).
			Msg("cluster: bitmaps offline: this node owns the I/O group but can't load its catalogue (the journal), so no node serves it; giving it up to the partner and trying again")
		if rerr := m.Resign(); rerr != nil {
			cfg.log.Warn().Err(rerr).Msg("cluster: resign")
		}
		select {
		case <-ctx.Done():
			return nil, store.Dir{}, "", ctx.Err()
		case <-time.After(cfg.lease):
		}
	}
}

func (cfg *clusterConfig) tryTakeOver(ctx context.Context, m *cluster.Member) (*catalog.DB, store.Dir, string, error) {
	won := time.Now()
	epoch, err := m.Campaign(ctx)
	if err != nil {
		return nil, store.Dir{}, "", err
	}
	dir := cfg.groupDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, store.Dir{}, "", err
	}
	fence, err := store.OpenFence(dir, func(theirs uint64) {
		cfg.standDown(fmt.Errorf("the storage was claimed by epoch %d (this node's is %d)", theirs, epoch))
	})
	if err != nil {
		return nil, store.Dir{}, "", err
	}
	claimStart := time.Now()
	if err := fence.Claim(epoch); err != nil {
		fence.Close()
		return nil, store.Dir{}, "", err
	}
	catDir, err := cfg.catalogueFor(epoch)
	if err != nil {
		fence.Close()
		return nil, store.Dir{}, "", err
	}
	cat, err := catalog.OpenWith(catDir, catalog.Options{
		CommitHook: fence.Guard,
		Transition: func(tx *catalog.Tx) error {
			state, err := controlState(tx, cfg.node, epoch)
			if err != nil {
				return err
			}
			return m.Transition(state)
		},
	})
	if err != nil {
		fence.Close()
		return nil, store.Dir{}, "", openFailure(catDir, err)
	}
	m.Serving()
	cfg.log.Info().Uint64("epoch", epoch).Str("shared", dir).
		Dur("waited_for_ownership", claimStart.Sub(won)).Dur("claim", time.Since(claimStart)).
		Msg("cluster: this node owns the I/O group")
	return cat, store.Dir{Path: dir, Fence: fence}, catDir, nil
}

// view reads the cluster's nodes and I/O groups for lsnode and lsiogrp; serving says whether
// this node serves its I/O group.
func (cfg *clusterConfig) view(m *cluster.Member, serving bool) func(context.Context) (*api.Cluster, error) {
	return func(ctx context.Context) (*api.Cluster, error) {
		nodes, groups, err := m.Status(ctx)
		if err != nil {
			return nil, err
		}
		v := &api.Cluster{Node: cfg.node, IOGroup: cfg.iogrp, Serving: serving}
		owners := map[string]bool{}
		for _, g := range groups {
			v.Groups = append(v.Groups, api.IOGroup{ID: g.ID, Owner: g.Owner, Volumes: g.Volumes, Suspended: g.Suspended, Hosts: g.Hosts, VolumeNames: g.VolumeNames})
			owners[g.Owner] = true
		}
		for _, n := range nodes {
			v.Nodes = append(v.Nodes, api.ClusterNode{Name: n.Name, IOGroup: n.IOGroup, Addr: n.Addr, Online: n.Online, Owner: n.Name != "" && owners[n.Name]})
		}
		return v, nil
	}
}

// serveStandby answers the control socket while this node does not serve its I/O group: the
// listing commands, from what the group's owner last published in etcd (with every volume
// offline, and the mappings that need their bitmaps suspended, while no node serves the
// group); every other command is refused with NotServing. stop closes it, before the owner's
// own control server takes the socket.
func (cfg *clusterConfig) serveStandby(m *cluster.Member, socket string) (stop func(), err error) {
	l, err := api.ListenUnix(socket, 0o600)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := shareSocketWithGroup(socket); err != nil {
		l.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cfg.standbyHandler(r.Context(), m).ServeHTTP(w, r)
	}), ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(l)
	return func() { srv.Close() }, nil
}

// standbyHandler is the control API of a standby, as of now.
func (cfg *clusterConfig) standbyHandler(ctx context.Context, m *cluster.Member) *api.Handler {
	raw, owner, err := m.GroupState(ctx)
	var st publishedState
	if err == nil && raw != nil {
		err = json.Unmarshal(raw, &st)
	}
	var snap *driver.Snapshot
	refuse := func() error {
		if owner == "" {
			return fcerr.New(fcerr.NotServing, "no node serves io_grp%d (its catalogue can't be loaded, or no node of the group is up): its volumes and FlashCopy mappings are offline, and this node (%s) can only list them", cfg.iogrp, cfg.node)
		}
		return fcerr.New(fcerr.NotServing, "node %s is a standby of io_grp%d, which node %s serves: run the command there", cfg.node, cfg.iogrp, owner)
	}
	if err == nil {
		snap, err = driver.NewSnapshot(st.Model, st.Volumes, owner == "", refuse)
	}
	if err != nil {
		return api.NewRefusingHandler(cfg.log, func() error { return err })
	}
	return api.NewHandler(snap, cfg.log).WithFlashCopy(snap).WithClusterSystem(cfg.sharedDir, cfg.view(m, false)).WithFallback(refuse)
}

// watch stands the node down as soon as its lease is lost.
func (cfg *clusterConfig) watch(m *cluster.Member) {
	<-m.Lost()
	cfg.standDown(m.LostErr())
}

// standDown stops the node at once: no flush, no goodbye to clients. Whatever it still held in
// its write-back cache was never acknowledged as durable; the new owner serves from the store.
func (cfg *clusterConfig) standDown(why error) {
	cfg.log.Error().Err(why).Str("node", cfg.node).Int("iogrp", cfg.iogrp).
		Msg("cluster: standing down: this node no longer owns its I/O group; exiting so that a supervisor restarts it as a standby")
	os.Exit(standDownExit)
}

// publishedState is what an I/O group's owner publishes in etcd with each transition: the
// group's volumes and FlashCopy model, how many of its mappings are suspended (their bitmaps
// offline) and how many hosts it has, for the standbys' views and for operators.
type publishedState struct {
	Node      string           `json:"node"`
	Epoch     uint64           `json:"epoch"`
	Volumes   []catalog.Volume `json:"volumes"`
	Suspended int              `json:"suspended"`
	Hosts     int              `json:"hosts"`
	Model     json.RawMessage  `json:"flashcopy,omitempty"`
}

// controlState is the publishedState of tx. It is published before the catalogue commits, so
// a suspension shows even when the catalogue can't record it: the journal that failed is the
// catalogue.
func controlState(tx *catalog.Tx, node string, epoch uint64) ([]byte, error) {
	vols, err := tx.Volumes()
	if err != nil {
		return nil, err
	}
	hosts, err := tx.Hosts()
	if err != nil {
		return nil, err
	}
	model := tx.Model()
	var fc mappings.Model
	if model != nil {
		if err := json.Unmarshal(model, &fc); err != nil {
			return nil, fmt.Errorf("the catalogue's FlashCopy model: %w", err)
		}
	}
	suspended := 0
	for _, mp := range fc.Mappings {
		if mp.State == mappings.Suspended {
			suspended++
		}
	}
	return json.Marshal(publishedState{Node: node, Epoch: epoch, Volumes: vols, Suspended: suspended,
		Hosts: len(hosts), Model: model})
}

// The catalogue of an I/O group is one file per ownership epoch: catalog.e<EPOCH>/catalog.db in
// the group's directory. A new owner copies the latest one after its claim (so no write of the
// old owner is running) and works on its own copy: a paused old owner holds the lock of its own
// file only, and any commit it tries is refused by the fence.
const catEpochPrefix = "catalog.e"

// catalogueFor prepares the catalogue directory of epoch and returns it.
func (cfg *clusterConfig) catalogueFor(epoch uint64) (string, error) {
	dir := cfg.groupDir()
	ents, err := os.ReadDir(dir)
	if err != nil {
		return "", err
	}
	var epochs []uint64
	for _, e := range ents {
		name := e.Name()
		if !e.IsDir() || !strings.HasPrefix(name, catEpochPrefix) {
			continue
		}
		if strings.HasSuffix(name, ".tmp") {
			os.RemoveAll(filepath.Join(dir, name)) // a copy that a crash interrupted
			continue
		}
		if n, err := strconv.ParseUint(strings.TrimPrefix(name, catEpochPrefix), 10, 64); err == nil && n < epoch {
			epochs = append(epochs, n)
		}
	}
	sort.Slice(epochs, func(i, j int) bool { return epochs[i] < epochs[j] })
	mine := filepath.Join(dir, catEpochPrefix+strconv.FormatUint(epoch, 10))
	if len(epochs) == 0 {
		return mine, os.MkdirAll(mine, 0o700)
	}
	last := filepath.Join(dir, catEpochPrefix+strconv.FormatUint(epochs[len(epochs)-1], 10))
	tmp := mine + ".tmp"
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		return "", err
	}
	if err := copyFile(filepath.Join(last, catalog.FileName), filepath.Join(tmp, catalog.FileName)); err != nil {
		return "", fmt.Errorf("take the catalogue over from %s: %w", last, err)
	}
	if err := os.Rename(tmp, mine); err != nil {
		return "", err
	}
	if err := store.SyncDir(dir); err != nil {
		return "", err
	}
	// Keep the previous epoch's catalogue (for an operator's inspection); older ones go.
	for _, n := range epochs[:len(epochs)-1] {
		os.RemoveAll(filepath.Join(dir, catEpochPrefix+strconv.FormatUint(n, 10)))
	}
	return mine, nil
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if errors.Is(err, os.ErrNotExist) {
		return nil // the last owner never got as far as creating it
	}
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Sync(); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return store.SyncDir(filepath.Dir(to))
}
