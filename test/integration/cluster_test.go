package integration

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"fcnbd/internal/nbdclient"
)

// Cluster mode (issue 16): a 3-member etcd on loopback ports, two fcnbd nodes of one I/O group
// sharing one directory, and the owner killed, paused or cut off.

// etcdCluster is three etcd members (Debian's etcd-server) started by the test.
type etcdCluster struct {
	t       testing.TB
	dir     string
	clients []string
	peers   []string
	cmds    []*exec.Cmd
	logs    []*syncBuffer
}

func startEtcd(t testing.TB) *etcdCluster {
	t.Helper()
	needTools(t, "etcd")
	dir, err := os.MkdirTemp("", "fcnbd-etcd-")
	if err != nil {
		t.Fatal(err)
	}
	e := &etcdCluster{t: t, dir: dir}
	for range 3 {
		e.clients = append(e.clients, "http://"+freeTCPAddr(t))
		e.peers = append(e.peers, "http://"+freeTCPAddr(t))
	}
	e.cmds = make([]*exec.Cmd, 3)
	e.logs = make([]*syncBuffer, 3)
	for i := range 3 {
		e.start(i)
	}
	t.Cleanup(func() {
		for i := range e.cmds {
			e.kill(i)
		}
		if t.Failed() {
			for i, l := range e.logs {
				out := l.String()
				if len(out) > 40000 {
					out = out[len(out)-40000:]
				}
				t.Logf("etcd member %d log (end):\n%s", i, out)
			}
		}
		os.RemoveAll(dir)
	})
	// Wait for a leader: a write through the first member.
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, err := exec.Command("etcdctl", "--endpoints", e.endpoints(), "--command-timeout=2s", "put", "/fcnbd-test/ready", "1").CombinedOutput()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("etcd did not elect a leader in 20s: %v %s", err, out)
		}
		time.Sleep(200 * time.Millisecond)
	}
	return e
}

func (e *etcdCluster) endpoints() string { return strings.Join(e.clients, ",") }

func (e *etcdCluster) start(i int) {
	var initial []string
	for j, p := range e.peers {
		initial = append(initial, fmt.Sprintf("m%d=%s", j, p))
	}
	cmd := exec.Command("etcd", "--name", fmt.Sprintf("m%d", i), "--data-dir", filepath.Join(e.dir, strconv.Itoa(i)),
		"--listen-client-urls", e.clients[i], "--advertise-client-urls", e.clients[i],
		"--listen-peer-urls", e.peers[i], "--initial-advertise-peer-urls", e.peers[i],
		"--initial-cluster", strings.Join(initial, ","), "--initial-cluster-state", "new",
		"--initial-cluster-token", "fcnbd-test", "--heartbeat-interval", "100", "--election-timeout", "1000")
	cmd.Env = append(os.Environ(), "ETCDCTL_API=3")
	if e.logs[i] == nil {
		e.logs[i] = &syncBuffer{}
	}
	cmd.Stdout, cmd.Stderr = e.logs[i], e.logs[i]
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	e.cmds[i] = cmd
}

func (e *etcdCluster) kill(i int) {
	if c := e.cmds[i]; c != nil {
		c.Process.Kill()
		c.Wait()
		e.cmds[i] = nil
	}
}

// clusterNode is one `fcnbd serve --cluster` process; it is restarted (as a standby) after it
// is killed or stands down.
type clusterNode struct {
	t      testing.TB
	name   string
	args   []string
	ctl    string
	tcp    string
	cmd    *exec.Cmd
	logs   *syncBuffer
	exited chan struct{}
	status error
}

func newClusterNode(t testing.TB, e *etcdCluster, shared, name string, lease time.Duration) *clusterNode {
	t.Helper()
	dir, err := os.MkdirTemp("", "fcnbd-node-")
	if err != nil {
		t.Fatal(err)
	}
	n := &clusterNode{t: t, name: name, ctl: filepath.Join(dir, "c.sock"), tcp: freeTCPAddr(t), logs: &syncBuffer{}}
	n.args = []string{"serve", "--cluster", e.endpoints(), "--node", name, "--iogrp", "0", "--shared-dir", shared,
		"--socket", n.ctl, "--nbd-unix", "", "--nbd-tcp", n.tcp, "--lease", lease.String(),
		"--no-mlock", "--cache-size", "64M", "--log-level", "debug"}
	t.Cleanup(func() {
		n.kill()
		if t.Failed() {
			out := n.logs.String()
			if len(out) > 20000 {
				out = out[len(out)-20000:]
			}
			t.Logf("node %s log (end):\n%s", name, out)
		}
		os.RemoveAll(dir)
	})
	return n
}

func (n *clusterNode) start() {
	n.t.Helper()
	n.cmd = exec.Command(fcnbdBin(n.t), n.args...)
	fmt.Fprintf(n.logs, "----- start %s\n", time.Now().Format(time.TimeOnly))
	n.cmd.Stdout, n.cmd.Stderr = n.logs, n.logs
	if err := n.cmd.Start(); err != nil {
		n.t.Fatal(err)
	}
	exited := make(chan struct{})
	n.exited = exited
	go func(c *exec.Cmd) {
		err := c.Wait()
		n.status = err
		close(exited)
	}(n.cmd)
}

func (n *clusterNode) running() bool {
	if n.cmd == nil {
		return false
	}
	select {
	case <-n.exited:
		return false
	default:
		return true
	}
}

func (n *clusterNode) kill() {
	if n.cmd == nil {
		return
	}
	n.cmd.Process.Signal(syscall.SIGCONT)
	n.cmd.Process.Kill()
	<-n.exited
	n.cmd = nil
}

func (n *clusterNode) signal(s syscall.Signal) { n.cmd.Process.Signal(s) }

// cli runs an fcnbd command against this node's control socket.
func (n *clusterNode) run(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, fcnbdBin(n.t), append([]string{"--socket", n.ctl}, args...)...).CombinedOutput()
	return string(out), err
}

func (n *clusterNode) cli(args ...string) string {
	n.t.Helper()
	out, err := n.run(args...)
	if err != nil {
		n.t.Fatalf("node %s: fcnbd %s: %v\n%s", n.name, strings.Join(args, " "), err, out)
	}
	return out
}

// owner waits until one of nodes serves export over NBD and returns it with a connection.
func waitOwner(t testing.TB, within time.Duration, export string, nodes ...*clusterNode) (*clusterNode, *nbdclient.Client) {
	t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		if n, c := dialServing(nodes, export); n != nil {
			return n, c
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no node served %s within %s", export, within)
	return nil, nil
}

// dialServing connects to export on the node of nodes that serves it now; nil if none does.
func dialServing(nodes []*clusterNode, export string) (*clusterNode, *nbdclient.Client) {
	for _, n := range nodes {
		if !n.running() {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, err := nbdclient.Dial(ctx, "tcp", n.tcp, export)
		cancel()
		if err == nil {
			return n, c
		}
	}
	return nil, nil
}

const (
	clBlock  = 64 << 10
	clBlocks = 256 // 16 MiB volumes
)

// fillBlocks writes every block of a 16 MiB volume with its tag, then flushes.
func fillBlocks(t testing.TB, c *nbdclient.Client, tag func(block int) uint64) {
	t.Helper()
	for i := range clBlocks {
		if err := c.WriteAt(pattern(tag(i)), uint64(i*clBlock), false); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
}

// pattern fills a block with its tag: 8 bytes, repeated.
func pattern(tag uint64) []byte {
	b := make([]byte, clBlock)
	for i := 0; i < clBlock; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], tag)
	}
	return b
}

// tagOf returns the block's tag, or an error if it is not one tag repeated.
func tagOf(b []byte) (uint64, error) {
	tag := binary.LittleEndian.Uint64(b)
	if !bytes.Equal(b, pattern(tag)) {
		return 0, errors.New("block is not one tag repeated (torn or foreign data)")
	}
	return tag, nil
}

// blockModel is what each block of the source must hold: its last flushed tag, or one of the
// tags written after that flush and not yet flushed when the owner died.
type blockModel struct {
	durable []uint64
	pending [][]uint64
}

func (m *blockModel) check(t testing.TB, c *nbdclient.Client, what string) {
	t.Helper()
	buf := make([]byte, clBlock)
	for i := range clBlocks {
		if err := c.ReadAt(buf, uint64(i*clBlock)); err != nil {
			t.Fatalf("%s: read block %d: %v", what, i, err)
		}
		tag, err := tagOf(buf)
		if err != nil {
			t.Fatalf("%s: block %d: %v", what, i, err)
		}
		if tag != m.durable[i] && !slices.Contains(m.pending[i], tag) {
			t.Fatalf("%s: block %d holds tag %#x; its last flushed write was %#x (and unflushed %x): a flushed write was lost",
				what, i, tag, m.durable[i], m.pending[i])
		}
		m.durable[i], m.pending[i] = tag, nil
	}
}

// TestClusterFailover kills the owner of the I/O group with kill -9 at random moments while a
// client writes and flushes and a FlashCopy mapping copies: the partner must serve within a
// bounded time, no flushed write may be lost, and the target keeps its point-in-time image.
// FCNBD_CLUSTER_KILLS sets the number of kills (5 by default, beside TestClusterKernelDevice's
// 10; make soak runs 200).
func TestClusterFailover(t *testing.T) {
	// The cluster tests run beside each other: each has its own etcd, ports and directories.
	t.Parallel()
	needRoot(t)
	kills := 5
	if v := os.Getenv("FCNBD_CLUSTER_KILLS"); v != "" {
		kills, _ = strconv.Atoi(v)
	}
	lease := 2 * time.Second
	_, _, owner, standby := startPair(t, lease, "src", "tgt", "src2", "tgt2")
	nodes := []*clusterNode{owner, standby}
	_, c := waitOwner(t, 10*time.Second, "src", nodes...)
	m := &blockModel{durable: make([]uint64, clBlocks), pending: make([][]uint64, clBlocks)}
	for i := range clBlocks {
		tag := uint64(i) << 32
		if err := c.WriteAt(pattern(tag), uint64(i*clBlock), false); err != nil {
			t.Fatal(err)
		}
		m.durable[i] = tag
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	c.Close()
	snapshot := slices.Clone(m.durable)
	// A second source, idle, in the same consistency group.
	c = dialOwner(t, owner, "src2")
	fillBlocks(t, c, func(i int) uint64 { return uint64(i) << 40 })
	c.Close()
	owner.cli("mkfcconsistgrp", "-name", "g0")
	owner.cli("mkfcmap", "-source", "src", "-target", "tgt", "-name", "m0", "-copyrate", "30", "-consistgrp", "g0")
	owner.cli("mkfcmap", "-source", "src2", "-target", "tgt2", "-name", "m1", "-copyrate", "0", "-consistgrp", "g0")
	owner.cli("startfcconsistgrp", "-prep", "g0")

	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 16))
	var takeovers []time.Duration
	gen := uint64(1)
	for k := range kills {
		// The owner serves; check everything, then write and flush until it is killed.
		owner, c := waitOwner(t, 30*time.Second, "src", nodes...)
		m.check(t, c, fmt.Sprintf("after kill %d", k))
		stop := make(chan struct{})
		var wg sync.WaitGroup
		var mu sync.Mutex
		wrng := rand.New(rand.NewPCG(rng.Uint64(), 1)) // the writer's own
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				var batch []int
				for range 4 {
					i := wrng.IntN(clBlocks)
					gen++
					tag := gen<<8 | uint64(i)&0xff | 1<<63
					mu.Lock()
					m.pending[i] = append(m.pending[i], tag)
					mu.Unlock()
					if err := c.WriteAt(pattern(tag), uint64(i*clBlock), false); err != nil {
						return
					}
					batch = append(batch, i)
				}
				if err := c.Flush(); err != nil {
					return
				}
				mu.Lock()
				for _, i := range batch {
					if p := m.pending[i]; len(p) > 0 { // (a batch may write a block twice)
						m.durable[i], m.pending[i] = p[len(p)-1], nil
					}
				}
				mu.Unlock()
			}
		})
		time.Sleep(time.Duration(100+rng.IntN(1400)) * time.Millisecond)
		owner.kill()
		killed := time.Now()
		close(stop)
		c.Close()
		wg.Wait()
		other := nodes[0]
		if other == owner {
			other = nodes[1]
		}
		_, c2 := waitOwner(t, 30*time.Second, "src", other)
		took := time.Since(killed)
		takeovers = append(takeovers, took)
		c2.Close()
		owner.start() // back as a standby
	}
	owner, c = waitOwner(t, 30*time.Second, "src", nodes...)
	m.check(t, c, "at the end")
	c.Close()
	sorted := slices.Clone(takeovers)
	slices.Sort(sorted)
	if len(sorted) > 0 {
		t.Logf("%d kills: takeover (kill -9 to the partner serving NBD) median %s, max %s (lease %s)",
			len(sorted), sorted[len(sorted)/2].Round(time.Millisecond), sorted[len(sorted)-1].Round(time.Millisecond), lease)
		if max := sorted[len(sorted)-1]; max > 4*lease+5*time.Second {
			t.Errorf("a takeover took %s: more than 4 leases and 5 s", max)
		}
	}
	// The targets keep the sources' images of the group's start, through every failover.
	checkTargets := func(owner *clusterNode, when string) {
		t.Helper()
		buf := make([]byte, clBlock)
		for _, tg := range []string{"tgt", "tgt2"} {
			tc := dialOwner(t, owner, tg)
			for i := range clBlocks {
				if err := tc.ReadAt(buf, uint64(i*clBlock)); err != nil {
					t.Fatal(err)
				}
				want := snapshot[i]
				if tg == "tgt2" {
					want = uint64(i) << 40
				}
				if tag, err := tagOf(buf); err != nil || tag != want {
					t.Fatalf("%s: %s block %d: tag %#x (%v), want the point-in-time %#x", when, tg, i, tag, err, want)
				}
			}
			tc.Close()
		}
	}
	checkTargets(owner, "after the kills")
	maps := func(n *clusterNode) string {
		out := n.cli("lsfcmap", "-nohdr", "-delim", ":")
		var rows []string
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			f := strings.Split(l, ":")
			rows = append(rows, f[1]+" "+f[8]+" "+f[6]) // name, status, group
		}
		return strings.Join(rows, "; ")
	}
	before := maps(owner)
	// m0 copies in the background (it may have finished across the failovers), m1 does not.
	if strings.Contains(before, "suspended") || strings.Contains(before, "stopped") || !strings.Contains(before, "m1 copying") {
		t.Errorf("mappings after the kills: %s, want m0 copying or copied, m1 copying", before)
	}
	t.Logf("mappings after the kills: %s", before)

	// Both nodes down (bitmaps offline: no node can serve them), then one back: the mappings
	// come back where they were, and so do the targets.
	for _, n := range nodes {
		n.kill()
	}
	nodes[1].start()
	owner, c = waitOwner(t, 30*time.Second, "src", nodes[1])
	c.Close()
	if after := maps(owner); after != before {
		t.Errorf("mappings after both nodes were down: %s, want %s", after, before)
	}
	checkTargets(owner, "after both nodes were down")

	// lsnode and lsiogrp say what etcd knows: a is offline, b online and serving io_grp0.
	ln := owner.cli("lsnode", "-nohdr", "-delim", ":")
	for _, want := range []string{"a:", "b:"} {
		if !strings.Contains(ln, ":"+want) {
			t.Errorf("lsnode does not list node %s:\n%s", strings.TrimSuffix(want, ":"), ln)
		}
	}
	for _, l := range strings.Split(strings.TrimSpace(ln), "\n") {
		f := strings.Split(l, ":")
		status, config := f[4], f[7]
		if f[1] == "a" && (status != "offline" || config != "no") || f[1] == "b" && (status != "online" || config != "yes") {
			t.Errorf("lsnode row %q: node %s status %s config_node %s", l, f[1], status, config)
		}
	}
	if g := owner.cli("lsiogrp", "-delim", ":", "0"); !strings.Contains(g, "node_count:2") ||
		!strings.Contains(g, "vdisk_count:4") || !strings.Contains(g, "owner_node:b") || !strings.Contains(g, "status:online") {
		t.Errorf("lsiogrp 0:\n%s", g)
	}
}

// startPair starts a 3-member etcd and two nodes of I/O group 0 with a shared directory: a,
// which becomes the owner and makes the 16 MiB volumes vols, then b, a standby.
func startPair(t testing.TB, lease time.Duration, vols ...string) (e *etcdCluster, shared string, a, b *clusterNode) {
	t.Helper()
	needRoot(t)
	e = startEtcd(t)
	shared = t.TempDir()
	a, b = newClusterNode(t, e, shared, "a", lease), newClusterNode(t, e, shared, "b", lease)
	a.start()
	waitOwnerCLI(t, a)
	for _, v := range vols {
		a.cli("mkvdisk", "-name", v, "-size", "16", "-unit", "mb", "-mdiskgrp", "0")
	}
	b.start()
	return e, shared, a, b
}

// waitOwnerCLI waits until one of nodes serves its I/O group (a standby answers listings
// too, so it asks lsnode whether the node is its group's config node).
func waitOwnerCLI(t testing.TB, nodes ...*clusterNode) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		for _, n := range nodes {
			if n.running() {
				if v, err := tryNodeField(n, "lsnode", n.name, "config_node"); err == nil && v == "yes" {
					return
				}
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatal("no node became the owner within 30s")
}

func dialOwner(t testing.TB, n *clusterNode, export string) *nbdclient.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := nbdclient.Dial(ctx, "tcp", n.tcp, export)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// waitStopped waits until every thread of process pid is stopped (state T in /proc).
func waitStopped(t testing.TB, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
		stopped := len(tasks) > 0
		for _, task := range tasks {
			data, err := os.ReadFile(task)
			// The state follows the command name in parentheses, which may itself hold spaces.
			i := bytes.LastIndexByte(data, ')')
			if err != nil || i < 0 || i+2 >= len(data) || (data[i+2] != 'T' && data[i+2] != 't') {
				stopped = false
				break
			}
		}
		if stopped {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("process %d did not stop within 10 s of SIGSTOP", pid)
}

// TestClusterSplitBrain pauses the owner (SIGSTOP) past its lease while a client of it has
// writes outstanding, lets the partner take over and write, then resumes the old owner: none
// of its writes may reach the store, and it must stand down.
func TestClusterSplitBrain(t *testing.T) {
	// The cluster tests run beside each other: each has its own etcd, ports and directories.
	t.Parallel()
	_, shared, a, b := startPair(t, 2*time.Second, "v")
	time.Sleep(500 * time.Millisecond) // b joins as a standby

	ca := dialOwner(t, a, "v")
	fillBlocks(t, ca, func(int) uint64 { return 1 })
	// Unflushed writes in a's cache, then a pause: its destage may be anywhere.
	for i := range clBlocks / 2 {
		if err := ca.WriteAt(pattern(2), uint64(i*clBlock), false); err != nil {
			t.Fatal(err)
		}
	}
	a.signal(syscall.SIGSTOP)
	// SIGSTOP takes effect asynchronously: until every thread of a has stopped, a may still
	// answer (rightly, it is still the owner) what is sent to it.
	waitStopped(t, a.cmd.Process.Pid)
	paused := time.Now()
	// While a is paused its client sends more: these reach a only when it resumes.
	// (The socket fills up while a is paused, so they are sent from a goroutine.)
	lateCh := make(chan []*nbdclient.Call, 1)
	staleCh := make(chan []*nbdclient.Call, 1)
	go func() {
		// Reads first: a would answer them from what it holds, older than b's writes.
		var reads []*nbdclient.Call
		for i := range 8 {
			reads = append(reads, ca.Submit(nbdclient.OpRead, 0, uint64(i*clBlock), clBlock, nil))
		}
		staleCh <- reads
		var late []*nbdclient.Call
		for i := range clBlocks {
			late = append(late, ca.Submit(nbdclient.OpWrite, 0, uint64(i*clBlock), clBlock, pattern(3)))
		}
		lateCh <- append(late, ca.Submit(nbdclient.OpFlush, 0, 0, 0, nil))
	}()

	_, cb := waitOwner(t, 30*time.Second, "v", b)
	t.Logf("b serves %s after a was paused", time.Since(paused).Round(time.Millisecond))
	buf := make([]byte, clBlock)
	for i := range clBlocks {
		if err := cb.ReadAt(buf, uint64(i*clBlock)); err != nil {
			t.Fatal(err)
		}
		tag, err := tagOf(buf)
		if err != nil || (tag != 1 && tag != 2) || (tag == 2 && i >= clBlocks/2) {
			t.Fatalf("b's view of block %d before its own writes: tag %d (%v)", i, tag, err)
		}
		if err := cb.WriteAt(pattern(4), uint64(i*clBlock), false); err != nil {
			t.Fatal(err)
		}
	}
	if err := cb.Flush(); err != nil {
		t.Fatal(err)
	}

	a.signal(syscall.SIGCONT)
	select {
	case <-a.exited:
	case <-time.After(15 * time.Second):
		t.Fatal("the old owner did not stand down within 15 s of resuming")
	}
	var ee *exec.ExitError
	if !errors.As(a.status, &ee) || ee.ExitCode() != 3 {
		t.Errorf("the old owner ended with %v, want exit status 3 (stood down)", a.status)
	}
	if !strings.Contains(a.logs.String(), "standing down") {
		t.Errorf("the old owner's log does not say it stood down")
	}
	late := <-lateCh
	for _, call := range late {
		<-call.Done
	}
	for i, call := range <-staleCh {
		<-call.Done
		if call.Err == nil {
			tag, _ := tagOf(call.Data)
			t.Errorf("the old owner answered a read of block %d (tag %d) after the new owner had written it: a stale read", i, tag)
		}
	}
	if err := late[len(late)-1].Err; err == nil {
		t.Errorf("the old owner acknowledged a FLUSH after it lost the I/O group")
	}
	// Every block is b's: nothing of a's reached the store after b took over.
	cb.Close()
	cb = dialOwner(t, b, "v")
	for i := range clBlocks {
		if err := cb.ReadAt(buf, uint64(i*clBlock)); err != nil {
			t.Fatal(err)
		}
		if tag, err := tagOf(buf); err != nil || tag != 4 {
			t.Fatalf("block %d after the old owner resumed: tag %d (%v), want the new owner's 4: split-brain", i, tag, err)
		}
	}
	cb.Close()
	// The store itself, read directly: b's reads above may come from its cache, which would hide
	// a write of a's below it. b flushed before a resumed and has written nothing since.
	data, err := os.ReadFile(filepath.Join(shared, "iogrp0", "vol-0.img"))
	if err != nil {
		t.Fatal(err)
	}
	for i := range clBlocks {
		if tag, err := tagOf(data[i*clBlock : (i+1)*clBlock]); err != nil || tag != 4 {
			t.Fatalf("the store's block %d: tag %d (%v), want the new owner's 4: the old owner wrote after the takeover", i, tag, err)
		}
	}
}

// TestClusterEtcdFailures: one etcd member lost changes nothing; with quorum lost, no state
// transition happens (CMMVC5786E, nothing changed), and the owner, unable to renew its lease,
// stops serving once the lease has run out; with quorum back, a node takes the group over again
// with everything as it was.
func TestClusterEtcdFailures(t *testing.T) {
	// The cluster tests run beside each other: each has its own etcd, ports and directories.
	t.Parallel()
	lease := 10 * time.Second
	e, _, a, b := startPair(t, lease, "v0")
	c := dialOwner(t, a, "v0")
	if err := c.WriteAt(pattern(1), 0, true); err != nil {
		t.Fatal(err)
	}

	// One member down: commands, I/O and ownership carry on past a whole lease.
	e.kill(2)
	a.cli("mkvdisk", "-name", "v1", "-size", "16", "-unit", "mb", "-mdiskgrp", "0")
	deadline := time.Now().Add(lease / 2)
	for time.Now().Before(deadline) {
		if err := c.WriteAt(pattern(2), 0, true); err != nil {
			t.Fatalf("I/O with one etcd member down: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !a.running() {
		t.Fatalf("the owner stopped with one etcd member down")
	}

	// Quorum lost: a command is refused with the cluster's code and changes nothing.
	e.kill(1)
	lost := time.Now()
	out, err := a.run("mkvdisk", "-name", "v2", "-size", "16", "-unit", "mb", "-mdiskgrp", "0")
	if err == nil || !strings.Contains(out, "CMMVC5786E") {
		t.Fatalf("mkvdisk without etcd quorum: %v\n%s\nwant a CMMVC5786E refusal", err, out)
	}
	t.Logf("refused %s after quorum was lost: %s", time.Since(lost).Round(time.Millisecond), strings.TrimSpace(out))
	// (The owner may stand down any moment now; the check after quorum is back covers that case.)
	if vols, err := a.run("lsvdisk", "-nohdr", "-delim", ":"); err == nil && strings.Contains(vols, "v2") {
		t.Fatalf("a refused mkvdisk left a volume:\n%s", vols)
	}
	// The owner can't renew its lease: it stops serving when the lease runs out, since it
	// can't tell whether its partner took over on the other side of a partition.
	select {
	case <-a.exited:
		t.Logf("the owner stood down %s after quorum was lost", time.Since(lost).Round(time.Millisecond))
	case <-time.After(lease + 10*time.Second):
		t.Fatal("the owner kept serving without etcd quorum for a lease and 10 s")
	}
	if b.running() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		if c, err := nbdclient.Dial(ctx, "tcp", b.tcp, "v0"); err == nil {
			c.Close()
			t.Fatal("the standby served without etcd quorum")
		}
		cancel()
	}

	// Quorum back: the group comes back with its volumes and data.
	e.start(1)
	e.start(2)
	b.kill() // the supervisor's part: both nodes start again, as standbys
	a.kill()
	a.start()
	b.start()
	owner, c2 := waitOwner(t, 60*time.Second, "v0", a, b)
	buf := make([]byte, clBlock)
	if err := c2.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	if tag, err := tagOf(buf); err != nil || tag != 2 {
		t.Fatalf("block 0 after quorum came back: tag %d (%v), want the last FUA write's 2", tag, err)
	}
	c2.Close()
	vols := owner.cli("lsvdisk", "-nohdr", "-delim", ":")
	if !strings.Contains(vols, ":v1:") || strings.Contains(vols, ":v2:") {
		t.Fatalf("volumes after quorum came back:\n%s\nwant v0 and v1, not v2", vols)
	}
	owner.cli("mkvdisk", "-name", "v2", "-size", "16", "-unit", "mb", "-mdiskgrp", "0")
}

// TestClusterKernelDevice is issue 16's failover test on kernel block devices (nbdfuse + loop,
// over `fcnbd attach --follow`): ext4 on one volume with files written and synced, fio with
// verify= on another, and a consistency group of two active mappings from them (one copying in
// the background, one not), while the I/O group's owner is killed with kill -9 at random
// moments. Every fio run must verify, the filesystem must pass e2fsck with every file intact
// (synced or not: follow replays what the dead owner had acknowledged from its cache), and both
// targets must hold the image the group's start took, byte for byte; the ext4 one passes e2fsck.
// FCNBD_CLUSTER_KILLS sets the number of kills (10 by default; make soak runs 200).
func TestClusterKernelDevice(t *testing.T) {
	// The cluster tests run beside each other: each has its own etcd, ports and directories.
	t.Parallel()
	needTools(t, "mkfs.ext4", "e2fsck", "mount", "umount", "nbdfuse", "losetup", "fio", "fsfreeze", "nbdcopy")
	_, fuseErr := os.Stat("/dev/fuse")
	need(t, "/dev/fuse does not exist", fuseErr == nil)
	kills := 10
	if v := os.Getenv("FCNBD_CLUSTER_KILLS"); v != "" {
		kills, _ = strconv.Atoi(v)
	}
	_, _, a, b := startPair(t, 2*time.Second)
	a.cli("mkvdisk", "-name", "fs", "-size", "256", "-unit", "mb", "-mdiskgrp", "0")
	a.cli("mkvdisk", "-name", "fsT", "-size", "256", "-unit", "mb", "-mdiskgrp", "0")
	a.cli("mkvdisk", "-name", "raw", "-size", "64", "-unit", "mb", "-mdiskgrp", "0")
	a.cli("mkvdisk", "-name", "rawT", "-size", "64", "-unit", "mb", "-mdiskgrp", "0")
	nodes := []*clusterNode{a, b}

	attachDir := t.TempDir()
	attachFollow := func(vol string) string {
		out, err := exec.Command(fcnbdBin(t), "attach", "--attach-dir", attachDir, "--follow", a.tcp+","+b.tcp,
			"--method", "nbdfuse", vol).CombinedOutput()
		if err != nil {
			t.Fatalf("fcnbd attach --follow %s: %v\n%s", vol, err, out)
		}
		dev := strings.TrimSpace(string(out))
		t.Cleanup(func() { exec.Command(fcnbdBin(t), "detach", "--attach-dir", attachDir, dev).Run() })
		return dev
	}
	followLog := func() string {
		logs, _ := filepath.Glob(filepath.Join(attachDir, "follow-*.log"))
		var all []byte
		for _, l := range logs {
			data, _ := os.ReadFile(l)
			all = append(all, data...)
		}
		return string(all)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("fcnbd follow logs:\n%s", followLog())
		}
	})
	dev, rawDev := attachFollow("fs"), attachFollow("raw")
	sh(t, "mkfs.ext4", "-q", "-F", dev)
	mnt := t.TempDir()
	sh(t, "mount", dev, mnt)
	mounted := true
	t.Cleanup(func() {
		if mounted {
			exec.Command("fsfreeze", "-u", mnt).Run()
			// Lazily if it is busy: the directory's own cleanup must not walk into a
			// filesystem whose nodes are gone.
			if exec.Command("umount", mnt).Run() != nil {
				exec.Command("umount", "-l", mnt).Run()
			}
		}
	})

	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	want := map[string]string{}
	write := func(name string, syncIt bool) {
		data := make([]byte, (1+rng.IntN(6))*50*1024)
		for i := range data {
			data[i] = byte(rng.Uint32())
		}
		f, err := os.Create(filepath.Join(mnt, name))
		if err == nil {
			_, err = f.Write(data)
		}
		if err == nil && syncIt {
			err = f.Sync()
		}
		if err == nil {
			err = f.Close()
		}
		if err != nil {
			t.Fatalf("write %s: %v", name, err)
		}
		want[name] = sum(data)
	}
	checked := 0
	// checkFiles checks the files whose names start with prefix and, with remove, removes them.
	checkFiles := func(prefix string, remove bool) {
		for name, s := range want {
			if !strings.HasPrefix(name, prefix) {
				continue
			}
			data, err := os.ReadFile(filepath.Join(mnt, name))
			if err != nil {
				t.Fatal(err)
			}
			if got := sum(data); got != s {
				t.Errorf("%s: checksum %s after the kills, want %s", name, got, s)
			}
			checked++
			if remove {
				if err := os.Remove(filepath.Join(mnt, name)); err != nil {
					t.Fatal(err)
				}
				delete(want, name)
			}
		}
	}
	fioLog := filepath.Join(t.TempDir(), "fio.log")
	// fio writes size bytes of raw at random (4-64 KiB blocks, direct I/O, at most 16 MiB/s),
	// each block with a checksum and a header naming its place; with verify, it writes nothing
	// and reads the same blocks back (same seed), checking each. The kernel's caches are
	// dropped before a verification, so that it reads what the nodes have.
	fio := func(seed int, size string, verify bool) error {
		args := []string{"--name=verify", "--filename=" + rawDev, "--rw=randwrite", "--bsrange=4k-64k",
			"--size=64M", "--io_size=" + size, "--ioengine=libaio", "--direct=1", "--iodepth=4", "--rate=16m",
			"--verify=crc32c", "--verify_fatal=1", "--randseed=" + strconv.Itoa(seed)}
		if verify {
			if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0); err != nil {
				return err
			}
			args = append(args, "--verify_only")
		} else {
			args = append(args, "--do_verify=0")
		}
		out, err := exec.Command("fio", args...).CombinedOutput()
		f, _ := os.OpenFile(fioLog, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
		fmt.Fprintf(f, "----- fio run %d (verify %v): %v\n%s", seed, verify, err, out)
		f.Close()
		if err != nil {
			return fmt.Errorf("fio run %d (verify %v): %v (its output is in the test log)", seed, verify, err)
		}
		return nil
	}
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := os.ReadFile(fioLog)
			t.Logf("fio:\n%s", out)
		}
	})

	// The group's point in time: ext4 frozen and raw idle while the group starts. The images
	// the targets must keep are read from the devices at that moment.
	for i := range 20 {
		write(fmt.Sprintf("pre-%d", i), i%2 == 0)
	}
	if err := fio(1000, "64M", false); err != nil {
		t.Fatal(err)
	}
	refDir := t.TempDir()
	sh(t, "fsfreeze", "-f", mnt)
	sh(t, "dd", "if="+dev, "of="+filepath.Join(refDir, "fs.img"), "bs=1M", "iflag=direct", "status=none")
	sh(t, "dd", "if="+rawDev, "of="+filepath.Join(refDir, "raw.img"), "bs=1M", "iflag=direct", "status=none")
	a.cli("mkfcconsistgrp", "-name", "g")
	a.cli("mkfcmap", "-name", "mfs", "-source", "fs", "-target", "fsT", "-consistgrp", "g", "-copyrate", "50")
	a.cli("mkfcmap", "-name", "mraw", "-source", "raw", "-target", "rawT", "-consistgrp", "g", "-copyrate", "0")
	a.cli("startfcconsistgrp", "-prep", "g")
	sh(t, "fsfreeze", "-u", mnt)

	var took []time.Duration
	spanned := 0 // fio runs under way when the owner was killed
	for k := range kills {
		owner, c := waitOwner(t, 30*time.Second, "fs", nodes...)
		c.Close()
		for i := range 4 {
			write(fmt.Sprintf("k%d-synced-%d", k, i), true)
		}
		fioDone := make(chan error, 1)
		var fioEnd time.Time
		go func() {
			err := fio(k, "24M", false)
			fioEnd = time.Now()
			fioDone <- err
		}()
		done := make(chan struct{})
		delay := time.Duration(200+rng.IntN(800)) * time.Millisecond
		var killed time.Time
		go func() {
			time.Sleep(delay)
			owner.kill()
			killed = time.Now()
			close(done)
		}()
		// Writes carry on through the kill: they pause while the partner takes over.
		for i := 0; ; i++ {
			select {
			case <-done:
			default:
				if i < 24 {
					write(fmt.Sprintf("k%d-during-%d", k, i), i%2 == 0)
				}
				time.Sleep(20 * time.Millisecond)
				continue
			}
			break
		}
		_, c = waitOwner(t, 30*time.Second, "fs", nodes...)
		took = append(took, time.Since(killed))
		c.Close()
		for i := range 4 {
			write(fmt.Sprintf("k%d-after-%d", k, i), i%2 == 0)
		}
		if err := <-fioDone; err != nil {
			t.Fatal(err)
		}
		if fioEnd.After(killed) {
			spanned++
		}
		if err := fio(k, "24M", true); err != nil {
			t.Fatal(err)
		}
		owner.start()
		// The files of two kills ago have lived through two failovers: check them and make
		// room (a long run would fill the filesystem).
		if k >= 2 {
			checkFiles(fmt.Sprintf("k%d-", k-2), true)
		}
	}
	sh(t, "umount", mnt)
	mounted = false
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0); err != nil {
		t.Fatal(err)
	}
	sh(t, "e2fsck", "-fn", dev)
	sh(t, "mount", "-o", "ro", dev, mnt)
	mounted = true
	checkFiles("", false)
	if !strings.Contains(followLog(), "failed over") {
		t.Errorf("fcnbd follow never logged a failover:\n%s", followLog())
	}

	// The targets, read from whichever node owns the group now.
	owner, c := waitOwner(t, 30*time.Second, "fs", nodes...)
	c.Close()
	for _, m := range []string{"mfs", "mraw"} {
		if st := nodeField(t, owner, "lsfcmap", m, "status"); st != "copying" && st != "idle_or_copied" {
			t.Errorf("%s is %s after the kills", m, st)
		}
	}
	for _, v := range []struct{ target, ref string }{{"fsT", "fs.img"}, {"rawT", "raw.img"}} {
		img := filepath.Join(refDir, v.target+".img")
		sh(t, "nbdcopy", "nbd://"+owner.tcp+"/"+v.target, img)
		if out, err := exec.Command("cmp", filepath.Join(refDir, v.ref), img).CombinedOutput(); err != nil {
			t.Errorf("%s is not the image of the group's start: %s", v.target, out)
		}
		if v.target == "fsT" {
			sh(t, "e2fsck", "-fn", img)
		}
		os.Remove(img)
	}
	slices.Sort(took)
	t.Logf("%d files and %d fio runs (%d of them writing across a kill) checked after %d kills of the owner; served again after a median %s, max %s",
		checked, kills+1, spanned, kills, took[len(took)/2].Round(time.Millisecond), took[len(took)-1].Round(time.Millisecond))
}

// TestClusterTwoIOGroups: a node of io_grp1 beside the pair of io_grp0. Each group has its own
// owner and volumes; lsiogrp and lsvdisk say which; a command naming another group is refused
// with the group's owner named, and a mapping can't join volumes of two groups. With both
// nodes of io_grp0 down, io_grp1's owner shows io_grp0 offline.
func TestClusterTwoIOGroups(t *testing.T) {
	// The cluster tests run beside each other: each has its own etcd, ports and directories.
	t.Parallel()
	e, shared, a, b := startPair(t, 2*time.Second, "v0")
	c := newClusterNode(t, e, shared, "c", 2*time.Second)
	for i, arg := range c.args {
		if arg == "--iogrp" {
			c.args[i+1] = "1"
		}
	}
	c.start()
	waitOwnerCLI(t, c)
	c.cli("mkvdisk", "-name", "w0", "-size", "16", "-unit", "mb", "-mdiskgrp", "0", "-iogrp", "io_grp1")
	c.cli("mkvdisk", "-name", "w1", "-size", "16", "-unit", "mb", "-mdiskgrp", "0")
	if out := c.cli("lsvdisk", "-delim", ":", "w0"); !strings.Contains(out, "IO_group_id:1\n") || !strings.Contains(out, "IO_group_name:io_grp1\n") {
		t.Errorf("lsvdisk w0 on io_grp1's owner:\n%s", out)
	}
	if out := a.cli("lsvdisk", "-delim", ":", "v0"); !strings.Contains(out, "IO_group_id:0\n") {
		t.Errorf("lsvdisk v0 on io_grp0's owner:\n%s", out)
	}
	out, err := c.run("mkvdisk", "-name", "w2", "-size", "16", "-unit", "mb", "-mdiskgrp", "0", "-iogrp", "0")
	if err == nil || !strings.Contains(out, "CMMVC9008E") || !strings.Contains(out, "served by a") {
		t.Errorf("mkvdisk -iogrp 0 on io_grp1's owner: %v\n%s", err, out)
	}
	out, err = c.run("mkfcmap", "-source", "w0", "-target", "v0")
	if err == nil || !strings.Contains(out, "CMMVC9008E") || !strings.Contains(out, `"v0" is in io_grp0, served by a`) {
		t.Errorf("mkfcmap across I/O groups: %v\n%s", err, out)
	}
	if out, err = c.run("mkfcmap", "-source", "w0", "-target", "nosuch"); err == nil || !strings.Contains(out, "CMMVC575") {
		t.Errorf("mkfcmap to an unknown volume: %v\n%s", err, out)
	}
	c.cli("mkfcmap", "-source", "w0", "-target", "w1") // within io_grp1
	deadline := time.Now().Add(10 * time.Second)
	for {
		g := a.cli("lsiogrp", "-delim", ":", "1")
		if strings.Contains(g, "node_count:1\n") && strings.Contains(g, "vdisk_count:2\n") && strings.Contains(g, "owner_node:c\n") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("lsiogrp 1 on io_grp0's owner:\n%s", g)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if g := c.cli("lsiogrp", "-delim", ":", "0"); !strings.Contains(g, "node_count:2\n") || !strings.Contains(g, "owner_node:a\n") {
		t.Errorf("lsiogrp 0 on io_grp1's owner:\n%s", g)
	}
	// Both nodes of io_grp0 down: io_grp1's owner shows it offline, its bitmaps with it.
	a.kill()
	b.kill()
	waitNodeField(t, c, "lsiogrp", "0", "status", "offline")
	if got := nodeField(t, c, "lsiogrp", "0", "fc_bitmaps"); got != "offline" {
		t.Errorf("lsiogrp 0 on io_grp1's owner with both its nodes down: fc_bitmaps %q", got)
	}
}

// faultFS is test/integration/faultfs mounted for one test: a directory seen again through
// FUSE, whose files of one name fail with EIO while faults are on.
type faultFS struct {
	t   testing.TB
	cmd *exec.Cmd
	out *syncBuffer
}

func startFaultFS(t testing.TB, backing, mount, match string) *faultFS {
	t.Helper()
	_, err := os.Stat("/dev/fuse")
	need(t, "FUSE (/dev/fuse)", err == nil)
	bin := filepath.Join(t.TempDir(), "faultfs")
	if out, err := exec.Command("go", "build", "-o", bin, "fcnbd/test/integration/faultfs").CombinedOutput(); err != nil {
		t.Fatalf("go build faultfs: %v\n%s", err, out)
	}
	f := &faultFS{t: t, out: &syncBuffer{}}
	f.cmd = exec.Command(bin, "-backing", backing, "-mount", mount, "-match", match)
	f.cmd.Stdout, f.cmd.Stderr = f.out, f.out
	if err := f.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		f.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { f.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			exec.Command("umount", "-l", mount).Run()
			f.cmd.Process.Kill()
			<-done
		}
	})
	f.await("ready")
	return f
}

func (f *faultFS) await(line string) {
	f.t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if strings.Count(f.out.String(), line+"\n") > 0 {
			return
		}
	}
	f.t.Fatalf("faultfs did not say %q: %s", line, f.out.String())
}

// faults turns the faults on or off, and waits until faultfs says so.
func (f *faultFS) faults(on bool) {
	f.t.Helper()
	before := f.out.String()
	sig, line := syscall.SIGUSR2, "faults off"
	if on {
		sig, line = syscall.SIGUSR1, "faults on"
	}
	f.cmd.Process.Signal(sig)
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if strings.Count(f.out.String(), line+"\n") > strings.Count(before, line+"\n") {
			return
		}
	}
	f.t.Fatalf("faultfs did not turn %s", line)
}

// TestClusterJournalOffline: the I/O group's journal (its catalogue, which holds the split
// bitmaps) fails at the kernel while the owner runs. The mapping whose bits could not be
// committed is suspended and its volumes go offline, and lsfcmap, lsvdisk and lsiogrp say so;
// no command changes anything meanwhile. Once the journal works again the mapping comes back
// online where it was. Then the owner is killed while the journal fails, so that no node can
// load it: both nodes, standbys, show the group, its volumes and mappings offline, until the
// journal works again and a node takes the group over with the targets' point-in-time images.
func TestClusterJournalOffline(t *testing.T) {
	// The cluster tests run beside each other: each has its own etcd, ports and directories.
	t.Parallel()
	needRoot(t)
	e := startEtcd(t)
	backing, shared := t.TempDir(), t.TempDir()
	ff := startFaultFS(t, backing, shared, "catalog.db")
	a, b := newClusterNode(t, e, shared, "a", 2*time.Second), newClusterNode(t, e, shared, "b", 2*time.Second)
	a.start()
	waitOwnerCLI(t, a)
	for _, v := range []string{"s1", "t1", "s2", "t2"} {
		a.cli("mkvdisk", "-name", v, "-size", "16", "-unit", "mb", "-mdiskgrp", "0")
	}
	b.start()
	for _, v := range []string{"s1", "s2"} {
		c := dialOwner(t, a, v)
		fillBlocks(t, c, func(int) uint64 { return 1 })
		c.Close()
	}
	a.cli("mkfcconsistgrp", "-name", "g")
	a.cli("mkfcmap", "-name", "m1", "-source", "s1", "-target", "t1", "-consistgrp", "g", "-copyrate", "0")
	a.cli("mkfcmap", "-name", "m2", "-source", "s2", "-target", "t2", "-consistgrp", "g", "-copyrate", "0")
	a.cli("startfcconsistgrp", "-prep", "g")
	waitNodeField(t, a, "lsfcmap", "m1", "status", "copying")

	ff.faults(true)
	lsvdiskBefore := a.cli("lsvdisk", "-delim", ":")
	c1 := dialOwner(t, a, "s1")
	// The write needs m1's split bit: its commit fails, so the write (or the flush that
	// destages it) fails and m1 is suspended.
	werr := c1.WriteAt(pattern(2), 0, false)
	if werr == nil {
		werr = c1.Flush()
	}
	if werr == nil {
		t.Fatal("a write needing a split bit was acknowledged as durable while the journal failed")
	}
	t.Logf("write while the journal fails: %v", werr)
	c1.Close()
	waitNodeField(t, a, "lsfcmap", "m1", "status", "suspended")
	for _, v := range []string{"s1", "t1"} {
		if got := nodeField(t, a, "lsvdisk", v, "status"); got != "offline" {
			t.Errorf("%s is %s while m1 is suspended; want offline", v, got)
		}
	}
	if got := nodeField(t, a, "lsiogrp", "0", "fc_bitmaps"); got != "offline" {
		t.Errorf("lsiogrp 0: fc_bitmaps %s while m1 is suspended", got)
	}
	if ct := dialOwner(t, a, "t1"); ct.ReadAt(make([]byte, clBlock), 0) == nil {
		t.Error("a read of t1 succeeded while its mapping is suspended")
	}
	// A command needing the catalogue is refused and changes nothing.
	if out, err := a.run("mkvdisk", "-name", "x", "-size", "16", "-unit", "mb", "-mdiskgrp", "0"); err == nil {
		t.Errorf("mkvdisk succeeded while the journal fails: %s", out)
	} else {
		t.Logf("mkvdisk while the journal fails: %s", strings.TrimSpace(out))
	}
	if out, err := a.run("stopfcconsistgrp", "g"); err == nil {
		t.Errorf("stopfcconsistgrp succeeded while the journal fails: %s", out)
	}
	ff.faults(false)
	waitNodeField(t, a, "lsfcmap", "m1", "status", "copying")
	if got := nodeField(t, a, "lsfcmap", "m2", "status"); got != "copying" {
		t.Errorf("m2 is %s after the journal came back", got)
	}
	if got := a.cli("lsvdisk", "-delim", ":"); got != lsvdiskBefore {
		t.Errorf("lsvdisk changed across the journal's failure:\nbefore:\n%s\nafter:\n%s", lsvdiskBefore, got)
	}
	if got := nodeField(t, a, "lsiogrp", "0", "fc_bitmaps"); got != "online" {
		t.Errorf("lsiogrp 0: fc_bitmaps %s after the journal came back", got)
	}
	c1 = dialOwner(t, a, "s1")
	if err := c1.WriteAt(pattern(2), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := c1.Flush(); err != nil {
		t.Fatal(err)
	}
	c1.Close()

	// The standby lists what the owner published, and refuses changes, naming the owner.
	waitNodeField(t, b, "lsfcmap", "m1", "status", "copying")
	if got := nodeField(t, b, "lsvdisk", "t1", "status"); got != "online" {
		t.Errorf("t1 on the standby: %s", got)
	}
	if out, err := b.run("mkvdisk", "-name", "x", "-size", "16", "-unit", "mb", "-mdiskgrp", "0"); err == nil ||
		!strings.Contains(out, "CMMVC9009E") || !strings.Contains(out, "node a serves") {
		t.Errorf("mkvdisk on the standby: %v: %s", err, out)
	}

	// No node can load the journal: kill -9 the owner while it fails. Both nodes stay up and
	// can't serve the group; they show it offline, with every volume offline and the copying
	// mappings suspended. Once the journal works again a node takes the group over, and the
	// mappings are back where they were.
	ff.faults(true)
	a.kill()
	a.start()
	for _, n := range []*clusterNode{a, b} {
		waitNodeField(t, n, "lsiogrp", "0", "status", "offline")
		waitNodeField(t, n, "lsfcmap", "m1", "status", "suspended")
		for key, want := range map[string]string{"fc_bitmaps": "offline", "node_count": "2", "owner_node": ""} {
			if got := nodeField(t, n, "lsiogrp", "0", key); got != want {
				t.Errorf("lsiogrp 0 on %s: %s is %q, want %q", n.name, key, got, want)
			}
		}
		if got := nodeField(t, n, "lsfcmap", "m2", "status"); got != "suspended" {
			t.Errorf("m2 on %s while no node serves the group: %s", n.name, got)
		}
		for _, v := range []string{"s1", "t1", "s2", "t2"} {
			if got := nodeField(t, n, "lsvdisk", v, "status"); got != "offline" {
				t.Errorf("%s on %s while no node serves the group: %s", v, n.name, got)
			}
		}
		if out := n.cli("lsnode", "-delim", ":"); strings.Count(out, ":online:") != 2 {
			t.Errorf("lsnode on %s: both nodes should be online, neither the config node:\n%s", n.name, out)
		}
		if out, err := n.run("stopfcconsistgrp", "g"); err == nil || !strings.Contains(out, "CMMVC9009E") {
			t.Errorf("stopfcconsistgrp on %s while no node serves the group: %v: %s", n.name, err, out)
		}
	}
	if n := whoServes([]*clusterNode{a, b}, "s1"); n != nil {
		t.Errorf("node %s serves s1 while the journal can't be read", n.name)
	}
	ff.faults(false)
	owner, _ := waitOwner(t, 30*time.Second, "s1", a, b)
	waitNodeField(t, owner, "lsfcmap", "m1", "status", "copying")
	for _, n := range []*clusterNode{a, b} {
		waitNodeField(t, n, "lsiogrp", "0", "fc_bitmaps", "online")
	}
	expect := map[string]func(i int) uint64{
		"s1": func(i int) uint64 { return map[bool]uint64{true: 2, false: 1}[i == 0] },
		"t1": func(int) uint64 { return 1 },
		"t2": func(int) uint64 { return 1 },
	}
	for v, want := range expect {
		c := dialOwner(t, owner, v)
		buf := make([]byte, clBlock)
		for i := range clBlocks {
			if err := c.ReadAt(buf, uint64(i*clBlock)); err != nil {
				t.Fatalf("%s on %s: block %d: %v", v, owner.name, i, err)
			}
			if tag, err := tagOf(buf); err != nil || tag != want(i) {
				t.Fatalf("%s on %s: block %d has tag %d (%v), want %d", v, owner.name, i, tag, err, want(i))
			}
		}
		c.Close()
	}
}

// nodeField returns one field of an object's detailed view (`fcnbd CMD -delim : REF`).
func nodeField(t testing.TB, n *clusterNode, cmd, ref, key string) string {
	t.Helper()
	v, err := tryNodeField(n, cmd, ref, key)
	if err != nil {
		t.Fatalf("node %s: %v", n.name, err)
	}
	return v
}

func tryNodeField(n *clusterNode, cmd, ref, key string) (string, error) {
	out, err := n.run(cmd, "-delim", ":", ref)
	if err != nil {
		return "", fmt.Errorf("fcnbd %s %s: %v: %s", cmd, ref, err, out)
	}
	for _, l := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && k == key {
			return v, nil
		}
	}
	return "", fmt.Errorf("%s %s has no field %s:\n%s", cmd, ref, key, out)
}

// waitNodeField waits up to 20 s until a field of an object's detailed view reads want (a
// node that does not answer yet is asked again).
func waitNodeField(t testing.TB, n *clusterNode, cmd, ref, key, want string) {
	t.Helper()
	var (
		got string
		err error
	)
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if got, err = tryNodeField(n, cmd, ref, key); err == nil && got == want {
			return
		}
	}
	t.Fatalf("node %s: %s %s: %s is %q (%v) after 20s, want %q", n.name, cmd, ref, key, got, err, want)
}

// TestVMClusterFailover runs guest/cluster-failover.sh: the guest kernel's NBD driver (nbd-client)
// on a cluster-mode volume, through `fcnbd follow` on the host, with ext4 taking writes while the
// host kills the I/O group's owner with kill -9 in each of the guest's rounds (4, or
// FCNBD_VM_CLUSTER_ROUNDS).
func TestVMClusterFailover(t *testing.T) {
	vmRequire(t)
	rounds := 4
	if v := os.Getenv("FCNBD_VM_CLUSTER_ROUNDS"); v != "" {
		rounds, _ = strconv.Atoi(v)
	}
	_, _, a, b := startPair(t, 2*time.Second)
	a.cli("mkvdisk", "-name", "fs", "-size", "128", "-unit", "mb", "-mdiskgrp", "0")
	nodes := []*clusterNode{a, b}

	dir := t.TempDir()
	sock := filepath.Join(dir, "follow.sock")
	followLog := &syncBuffer{}
	follow := exec.Command(fcnbdBin(t), "follow", "--nodes", a.tcp+","+b.tcp, "--listen", sock, "fs")
	follow.Stdout, follow.Stderr = followLog, followLog
	if err := follow.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		follow.Process.Signal(syscall.SIGTERM)
		follow.Wait()
		if t.Failed() {
			t.Logf("fcnbd follow log:\n%s", followLog.String())
		}
	})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("fcnbd follow did not listen within 10s")
		}
	}

	ctlPath := filepath.Join(dir, "ctl.sock")
	ln, err := net.Listen("unix", ctlPath)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		took   []time.Duration
		kerr   error
		killed = make(chan struct{}, 1)
	)
	killed <- struct{}{}
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 9))
	wg.Add(1)
	go func() { // the host side of the guest's control port
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			line, _ := bufio.NewReader(c).ReadString('\n')
			switch f := strings.Fields(line); {
			case len(f) == 2 && f[0] == "KILL":
				<-killed
				fmt.Fprintln(c, "OK") // the guest writes on while the owner dies
				delay := time.Duration(100+rng.IntN(700)) * time.Millisecond
				go func() {
					defer func() { killed <- struct{}{} }()
					time.Sleep(delay)
					owner := whoServes(nodes, "fs")
					if owner == nil {
						mu.Lock()
						kerr = fmt.Errorf("round %s: no node serves fs", f[1])
						mu.Unlock()
						return
					}
					owner.kill()
					start := time.Now()
					for whoServes(nodes, "fs") == nil && time.Since(start) < 30*time.Second {
						time.Sleep(20 * time.Millisecond)
					}
					mu.Lock()
					took = append(took, time.Since(start))
					mu.Unlock()
					owner.start()
				}()
			case len(f) == 2 && f[0] == "WAIT":
				<-killed
				killed <- struct{}{}
				fmt.Fprintln(c, "OK")
			default:
				fmt.Fprintf(c, "BAD %q\n", line)
			}
			c.Close()
		}
	}()
	r := runVM(t, vmGuestScript(t, "cluster-failover.sh"),
		VMForward(10809, "unix:"+sock), VMForward(10810, "unix:"+ctlPath),
		VMEnv("NBD_EXPORT", "fs"), VMEnv("ROUNDS", strconv.Itoa(rounds)), VMTimeout(2*time.Minute+time.Duration(rounds)*15*time.Second))
	ln.Close()
	wg.Wait()
	requireVMOK(t, r)
	if kerr != nil {
		t.Fatal(kerr)
	}
	if len(took) != rounds {
		t.Fatalf("%d kills, want %d", len(took), rounds)
	}
	if n := strings.Count(followLog.String(), "failed over"); n < rounds {
		t.Errorf("fcnbd follow logged %d failovers, want %d", n, rounds)
	}
	slices.Sort(took)
	t.Logf("%d kills of the owner under the guest's ext4: served again after a median %s, max %s",
		rounds, took[len(took)/2].Round(time.Millisecond), took[len(took)-1].Round(time.Millisecond))
}

// whoServes returns the node that serves export over NBD now, or nil.
func whoServes(nodes []*clusterNode, export string) *clusterNode {
	n, c := dialServing(nodes, export)
	if c != nil {
		c.Close()
	}
	return n
}
