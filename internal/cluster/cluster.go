// Package cluster is fcnbd's cluster mode: the nodes of an I/O group, coordinated through etcd.
// etcd holds membership (one lease-backed key per node), one owner per I/O group (an etcd
// election on the same lease) and so the fencing epoch (the owner key's creation revision,
// which only grows), and a published copy of the group's control-plane state. Every state
// transition is one etcd transaction conditioned on the owner key still being this node's
// (Member.Transition). fcnbd runs no consensus of its own.
//
// The data path never asks etcd: writes are fenced at the shared store (store.Fence) with the
// same epoch, so an old owner that was paused or cut off cannot write after a new one claimed
// the storage, whatever the clocks say.
package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"

	"fcnbd/internal/fcerr"
)

// Prefix is where fcnbd keeps its keys in etcd.
const Prefix = "/fcnbd/"

// ErrNotOwner is wrapped when this node no longer owns its I/O group.
var ErrNotOwner = errors.New("this node no longer owns its I/O group")

// Config says how a node joins the cluster.
type Config struct {
	Endpoints []string
	Node      string
	IOGroup   int
	// TTL is the lease of the node's keys: a node that can't renew it for this long is taken for
	// dead, and its partner takes over. Whole seconds, at least 1.
	TTL time.Duration
	// Addr is where the node serves NBD when it owns its I/O group (published for clients).
	Addr string
	// Timeout bounds each etcd request of a state transition (default: half the TTL, between 1 s
	// and 5 s, so that a command is refused before the lease runs out, and an etcd leader
	// election, a second or two, fits in it).
	Timeout time.Duration
	Log     zerolog.Logger
}

// Node is one node's published record.
type Node struct {
	Name    string    `json:"name"`
	IOGroup int       `json:"iogrp"`
	Addr    string    `json:"addr"`
	State   string    `json:"state"` // standby, owner
	Since   time.Time `json:"since"`
	Epoch   uint64    `json:"epoch,omitempty"`
}

// Member is this node's membership: its lease, its node key and its place in its I/O group's
// election.
type Member struct {
	cfg   Config
	cli   *clientv3.Client
	lease clientv3.LeaseID
	sess  *concurrency.Session
	elec  *concurrency.Election

	start         time.Time // the clock renewed counts from (monotonic)
	stopKeepalive context.CancelFunc
	renewed       atomic.Int64 // when the last renewal etcd answered was sent, in ns since start

	mu      sync.Mutex
	lost    chan struct{} // closed when the lease is lost or can't be renewed for TTL
	lostErr error
	epoch   uint64
}

func nodeKey(name string) string     { return Prefix + "nodes/" + name }
func memberKey(name string) string   { return Prefix + "members/" + name }
func ownerPrefix(iogrp int) string   { return Prefix + "iogrp/" + strconv.Itoa(iogrp) + "/owner" }
func stateKey(iogrp int) string      { return Prefix + "iogrp/" + strconv.Itoa(iogrp) + "/state" }
func ttlSeconds(d time.Duration) int { return max(1, int(d/time.Second)) }

// Join connects to etcd, takes a lease and publishes the node as a standby of its I/O group.
// While etcd can't be reached (no quorum yet), or another node holds the name (or this node's
// previous life does, until its lease runs out), it keeps trying, until ctx ends.
func Join(ctx context.Context, cfg Config) (*Member, error) {
	if cfg.Node == "" {
		return nil, fmt.Errorf("cluster: a node needs a name (--node)")
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = min(max(cfg.TTL/2, time.Second), 5*time.Second)
	}
	for wait := 200 * time.Millisecond; ; wait = min(2*wait, 5*time.Second) {
		m, err := join(ctx, cfg)
		if err == nil {
			return m, nil
		}
		cfg.Log.Warn().Err(err).Msg("cluster: can't join yet; retrying")
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("cluster: join as %s: %w (last: %v)", cfg.Node, ctx.Err(), err)
		case <-time.After(wait):
		}
	}
}

func join(ctx context.Context, cfg Config) (*Member, error) {
	cli, err := clientv3.New(clientv3.Config{
		Endpoints: cfg.Endpoints, DialTimeout: cfg.Timeout,
		Logger: nil, AutoSyncInterval: 0,
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: etcd %v: %w", cfg.Endpoints, err)
	}
	m := &Member{cfg: cfg, cli: cli, lost: make(chan struct{}), start: time.Now()}
	gctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	grant, err := cli.Grant(gctx, int64(ttlSeconds(cfg.TTL)))
	cancel()
	if err != nil {
		cli.Close()
		return nil, fmt.Errorf("cluster: etcd %v: lease: %w", cfg.Endpoints, err)
	}
	m.lease = grant.ID
	// Refuse a second live node of the same name: the node key is created only if absent.
	rec, _ := json.Marshal(Node{Name: cfg.Node, IOGroup: cfg.IOGroup, Addr: cfg.Addr, State: "standby", Since: time.Now().UTC()})
	tctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	resp, err := cli.Txn(tctx).
		If(clientv3.Compare(clientv3.CreateRevision(nodeKey(cfg.Node)), "=", 0)).
		Then(clientv3.OpPut(nodeKey(cfg.Node), string(rec), clientv3.WithLease(m.lease)),
			clientv3.OpPut(memberKey(cfg.Node), string(rec))).Commit()
	cancel()
	if err == nil && !resp.Succeeded {
		err = fmt.Errorf("another live node is called %q (or this node's previous life, until its lease runs out)", cfg.Node)
	}
	if err != nil {
		cli.Revoke(context.Background(), m.lease)
		cli.Close()
		return nil, fmt.Errorf("cluster: join as %s: %w", cfg.Node, err)
	}
	kctx, kcancel := context.WithCancel(context.Background())
	m.stopKeepalive = kcancel
	go m.keepalive(kctx)
	m.sess, err = concurrency.NewSession(cli, concurrency.WithLease(m.lease))
	if err != nil {
		kcancel()
		cli.Close()
		return nil, fmt.Errorf("cluster: session: %w", err)
	}
	m.elec = concurrency.NewElection(m.sess, ownerPrefix(cfg.IOGroup))
	return m, nil
}

// keepalive renews the lease every third of its TTL. A renewal counts from when it was *sent*:
// etcd expires the lease no sooner than a TTL after it processed the renewal, which is after the
// send, whereas an answer may reach this node arbitrarily late (it was paused, say) and must not
// make its ownership look fresher than it is. The lease is lost when etcd says it is gone, or
// when no renewal sent in the last TTL was answered (etcd unreachable, or this node paused).
func (m *Member) keepalive(ctx context.Context) {
	ttl := time.Duration(ttlSeconds(m.cfg.TTL)) * time.Second
	for {
		sent := time.Since(m.start)
		rctx, cancel := context.WithTimeout(ctx, ttl/3)
		resp, err := m.cli.KeepAliveOnce(rctx, m.lease)
		cancel()
		switch {
		case ctx.Err() != nil:
			return
		case errors.Is(err, rpctypes.ErrLeaseNotFound) || err == nil && resp.TTL <= 0:
			m.loseLease(errors.New("etcd ended the node's lease"))
			return
		case err == nil:
			if int64(sent) > m.renewed.Load() {
				m.renewed.Store(int64(sent))
			}
		}
		if late := m.sinceRenewal(); late > ttl {
			m.loseLease(fmt.Errorf("the node's lease was not renewed for %s (TTL %s): etcd unreachable, or this node was paused", late.Round(time.Millisecond), ttl))
			return
		}
		next := ttl / 3
		if err != nil {
			next = 100 * time.Millisecond
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(next - min(next, time.Since(m.start)-sent)):
		}
	}
}

// sinceRenewal is how long ago the lease was last renewed, by the monotonic clock.
func (m *Member) sinceRenewal() time.Duration {
	return time.Since(m.start) - time.Duration(m.renewed.Load())
}

func (m *Member) loseLease(err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	select {
	case <-m.lost:
	default:
		m.lostErr = err
		close(m.lost)
	}
}

// Valid reports whether this node may still answer as the owner: its lease was renewed within
// the last three quarters of the TTL, by its own monotonic clock (which runs on while the
// process is paused). etcd expires the lease no sooner than a TTL after it processed the
// renewal, so the quarter left covers the renewal's round trip: a partner can take over only
// after Valid turned false here.
func (m *Member) Valid() error {
	ttl := time.Duration(ttlSeconds(m.cfg.TTL)) * time.Second
	select {
	case <-m.lost:
		return m.LostErr()
	default:
	}
	if late := m.sinceRenewal(); late > ttl*3/4 {
		return fmt.Errorf("the node's lease was last renewed %s ago (TTL %s): not answering as the owner", late.Round(time.Millisecond), ttl)
	}
	return nil
}

// Lost is closed when the node's lease is lost: an owner must stand down at once.
func (m *Member) Lost() <-chan struct{} { return m.lost }

// LostErr says why Lost closed.
func (m *Member) LostErr() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.lostErr
}

// Campaign waits until this node owns its I/O group, and returns the epoch of its ownership.
// The node is published as the group's owner only once it serves the group (Serving).
func (m *Member) Campaign(ctx context.Context) (uint64, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-m.lost:
			cancel()
		case <-ctx.Done():
		}
	}()
	if err := m.elec.Campaign(ctx, m.cfg.Node); err != nil {
		if e := m.LostErr(); e != nil {
			return 0, e
		}
		return 0, fmt.Errorf("cluster: campaign for I/O group %d: %w", m.cfg.IOGroup, err)
	}
	m.mu.Lock()
	m.epoch = uint64(m.elec.Rev())
	m.mu.Unlock()
	return m.Epoch(), nil
}

// Serving publishes this node as the owner that serves its I/O group: lsnode's config node,
// lsiogrp's owner_node.
func (m *Member) Serving() { m.publishNode("owner") }

// Resign gives the I/O group up after Campaign, when this node could not take it over (its
// catalogue could not be loaded), so that its partner may try; this node stays a standby.
func (m *Member) Resign() error {
	ctx, cancel := context.WithTimeout(context.Background(), m.cfg.Timeout)
	defer cancel()
	err := m.elec.Resign(ctx)
	m.mu.Lock()
	m.epoch = 0
	m.mu.Unlock()
	m.publishNode("standby")
	if err != nil {
		return fmt.Errorf("cluster: resign from I/O group %d: %w", m.cfg.IOGroup, err)
	}
	return nil
}

// GroupState returns what the owner of this node's I/O group last published with a transition
// (nil if nothing yet), and the node serving the group now ("" if none).
func (m *Member) GroupState(ctx context.Context) (state []byte, owner string, err error) {
	_, groups, err := m.Status(ctx)
	if err != nil {
		return nil, "", err
	}
	for _, g := range groups {
		if g.ID == m.cfg.IOGroup {
			return g.state, g.Owner, nil
		}
	}
	return nil, "", nil
}

// Epoch is this node's ownership epoch (0 while a standby).
func (m *Member) Epoch() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.epoch
}

func (m *Member) publishNode(state string) {
	rec, _ := json.Marshal(Node{Name: m.cfg.Node, IOGroup: m.cfg.IOGroup, Addr: m.cfg.Addr, State: state, Since: time.Now().UTC(), Epoch: m.Epoch()})
	ctx, cancel := context.WithTimeout(context.Background(), m.cfg.Timeout)
	defer cancel()
	if _, err := m.cli.Put(ctx, nodeKey(m.cfg.Node), string(rec), clientv3.WithLease(m.lease)); err != nil {
		m.cfg.Log.Warn().Err(err).Str("state", state).Msg("cluster: could not publish the node's state")
	}
}

// Transition conditions one state transition on this node still owning its I/O group: one etcd
// transaction that succeeds only if the owner key is still this node's, and that publishes
// state (the group's control-plane state after the transition) with it. It fails with a
// ClusterUnavailable refusal if etcd can't be reached in time (no quorum), and wraps
// ErrNotOwner if another node owns the group.
func (m *Member) Transition(state []byte) error {
	select {
	case <-m.lost:
		return fcerr.New(fcerr.ClusterUnavailable, "this node lost its cluster lease (%v): no state transition is possible here", m.LostErr())
	default:
	}
	// Attempts of at most a second, within Timeout: a request caught by an etcd leader
	// election is dropped by etcd and only times out on its side, while a new one succeeds.
	// Repeating the transaction is harmless: it compares and writes the same state.
	var (
		resp     *clientv3.TxnResponse
		err      error
		deadline = time.Now().Add(m.cfg.Timeout)
	)
	for {
		attempt := time.Now().Add(time.Second)
		if attempt.After(deadline) {
			attempt = deadline
		}
		ctx, cancel := context.WithDeadline(context.Background(), attempt)
		resp, err = m.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.CreateRevision(m.elec.Key()), "=", m.elec.Rev())).
			Then(clientv3.OpPut(stateKey(m.cfg.IOGroup), string(state))).Commit()
		cancel()
		if err == nil || time.Until(deadline) < 100*time.Millisecond {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		return fcerr.New(fcerr.ClusterUnavailable, "the cluster's etcd did not confirm the transition within %s (%v): no quorum? Nothing was changed", m.cfg.Timeout, err)
	}
	if !resp.Succeeded {
		m.loseLease(fmt.Errorf("%w: another node took I/O group %d over", ErrNotOwner, m.cfg.IOGroup))
		return fcerr.New(fcerr.ClusterUnavailable, "%v", m.LostErr())
	}
	return nil
}

// Close resigns (if owner), ends the lease and disconnects.
func (m *Member) Close() error {
	m.stopKeepalive()
	ctx, cancel := context.WithTimeout(context.Background(), m.cfg.Timeout)
	defer cancel()
	m.cli.Revoke(ctx, m.lease)
	return m.cli.Close()
}

// NodeStatus is one node as lsnode shows it: every node that ever joined, online while its
// lease lives.
type NodeStatus struct {
	Node
	Online bool `json:"online"`
}

// GroupStatus is one I/O group as lsiogrp shows it.
type GroupStatus struct {
	ID      int    `json:"id"`
	Owner   string `json:"owner,omitempty"` // "" while no node owns it: its volumes and mappings are offline
	Volumes int    `json:"volumes"`         // as its owner last published them
	// Suspended counts the group's mappings suspended because their bitmaps are offline (the
	// journal failed), and Hosts its host objects, as its owner last published them.
	Suspended int `json:"suspended"`
	Hosts     int `json:"hosts"`
	// VolumeNames are its volumes' names, as its owner last published them.
	VolumeNames []string `json:"volume_names,omitempty"`

	state []byte // what its owner last published
}

// Status reads the cluster's nodes (in name order) and I/O groups (in id order) from etcd.
func (m *Member) Status(ctx context.Context) ([]NodeStatus, []GroupStatus, error) {
	ctx, cancel := context.WithTimeout(ctx, m.cfg.Timeout)
	defer cancel()
	resp, err := m.cli.Get(ctx, Prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, nil, fcerr.New(fcerr.ClusterUnavailable, "etcd: %v", err)
	}
	live := map[string]Node{}
	members := map[string]Node{}
	groups := map[int]*GroupStatus{}
	group := func(id int) *GroupStatus {
		if groups[id] == nil {
			groups[id] = &GroupStatus{ID: id}
		}
		return groups[id]
	}
	// The election's leader of each group: its owner key of the lowest creation revision.
	type lead struct {
		node string
		rev  int64
	}
	leaders := map[int]lead{}
	for _, kv := range resp.Kvs {
		k := string(kv.Key)
		var n Node
		switch {
		case strings.HasPrefix(k, Prefix+"nodes/") && json.Unmarshal(kv.Value, &n) == nil:
			live[n.Name] = n
		case strings.HasPrefix(k, Prefix+"members/") && json.Unmarshal(kv.Value, &n) == nil:
			members[n.Name] = n
		case strings.HasPrefix(k, Prefix+"iogrp/") && strings.Contains(k, "/owner/"):
			id, err := strconv.Atoi(strings.TrimPrefix(k[:strings.Index(k, "/owner/")], Prefix+"iogrp/"))
			if err != nil {
				continue
			}
			if l, ok := leaders[id]; !ok || kv.CreateRevision < l.rev {
				leaders[id] = lead{string(kv.Value), kv.CreateRevision}
			}
		case strings.HasPrefix(k, Prefix+"iogrp/") && strings.HasSuffix(k, "/state"):
			id, err := strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(k, Prefix+"iogrp/"), "/state"))
			if err != nil {
				continue
			}
			var st struct {
				Volumes []struct {
					Name string `json:"name"`
				} `json:"volumes"`
				Suspended int `json:"suspended"`
				Hosts     int `json:"hosts"`
			}
			group(id).state = kv.Value
			if json.Unmarshal(kv.Value, &st) == nil {
				g := group(id)
				g.Volumes, g.Suspended, g.Hosts = len(st.Volumes), st.Suspended, st.Hosts
				for _, v := range st.Volumes {
					g.VolumeNames = append(g.VolumeNames, v.Name)
				}
			}
		}
	}
	var nodes []NodeStatus
	for name, n := range members {
		ns := NodeStatus{Node: n}
		if l, ok := live[name]; ok {
			ns.Node, ns.Online = l, true
		}
		group(ns.IOGroup)
		// The owner is the election's leader, once it serves (it may have won and not yet, or
		// no longer, be able to load the group's catalogue).
		if l, ok := leaders[ns.IOGroup]; ok && l.node == name && ns.Online && ns.State == "owner" {
			group(ns.IOGroup).Owner = name
		}
		nodes = append(nodes, ns)
	}
	sort.Slice(nodes, func(i, j int) bool { return nodes[i].Name < nodes[j].Name })
	var gs []GroupStatus
	for _, g := range groups {
		gs = append(gs, *g)
	}
	sort.Slice(gs, func(i, j int) bool { return gs[i].ID < gs[j].ID })
	return nodes, gs, nil
}
