package cluster

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"fcnbd/internal/fcerr"
)

// etcd starts one etcd member (Debian's etcd-server) on a loopback port for the test and
// returns its client URL and a function that kills it. Without the etcd binary the test is
// skipped, except in CI, where scripts/install-deps.sh provides it.
func etcd(t *testing.T) (string, func()) {
	t.Helper()
	if _, err := exec.LookPath("etcd"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("etcd is not installed (scripts/install-deps.sh installs etcd-server)")
		}
		t.Skip("etcd is not installed")
	}
	free := func() string {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		return "http://" + l.Addr().String()
	}
	client, peer := free(), free()
	dir := t.TempDir()
	cmd := exec.Command("etcd", "--name", "m0", "--data-dir", filepath.Join(dir, "data"),
		"--listen-client-urls", client, "--advertise-client-urls", client,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
		"--initial-cluster", "m0="+peer, "--heartbeat-interval", "100", "--election-timeout", "1000")
	log, err := os.Create(filepath.Join(dir, "etcd.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	killed := false
	kill := func() {
		if !killed {
			killed = true
			cmd.Process.Kill()
			cmd.Wait()
		}
	}
	t.Cleanup(func() {
		kill()
		if t.Failed() {
			out, _ := os.ReadFile(log.Name())
			t.Logf("etcd log:\n%s", out)
		}
	})
	return client, kill
}

func joinTest(t *testing.T, ep, node string, ttl time.Duration) *Member {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	m, err := Join(ctx, Config{Endpoints: []string{ep}, Node: node, TTL: ttl, Addr: node + ":10809",
		Log: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func groupOf(t *testing.T, m *Member) GroupStatus {
	t.Helper()
	_, groups, err := m.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range groups {
		if g.ID == 0 {
			return g
		}
	}
	t.Fatal("no I/O group 0")
	return GroupStatus{}
}

// TestOwnership: the owner's transitions publish the group's state; once its partner has taken
// the group over, a transition of the old owner is refused, changes nothing and loses its lease;
// the owner shown is the node serving, until it resigns; a second live node of the same name is
// refused.
func TestOwnership(t *testing.T) {
	ep, _ := etcd(t)
	a, b := joinTest(t, ep, "a", 2*time.Second), joinTest(t, ep, "b", 2*time.Second)
	ea, err := a.Campaign(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if g := groupOf(t, b); g.Owner != "" {
		t.Errorf("owner %q before a serves", g.Owner)
	}
	a.Serving()
	if err := a.Transition([]byte(`{"volumes":[{},{}],"suspended":1,"hosts":3}`)); err != nil {
		t.Fatal(err)
	}
	state, owner, err := b.GroupState(context.Background())
	if err != nil || owner != "a" || string(state) != `{"volumes":[{},{}],"suspended":1,"hosts":3}` {
		t.Fatalf("b's view: %q owner %q %v", state, owner, err)
	}
	if g := groupOf(t, b); g.Volumes != 2 || g.Suspended != 1 || g.Hosts != 3 {
		t.Errorf("group 0 as published: %+v", g)
	}

	won := make(chan uint64, 1)
	go func() {
		e, err := b.Campaign(context.Background())
		if err != nil {
			t.Error(err)
		}
		won <- e
	}()
	select {
	case <-won:
		t.Fatal("b won the group while a owns it")
	case <-time.After(300 * time.Millisecond):
	}
	// a's owner key goes, as when its lease runs out while it is paused.
	if _, err := a.cli.Delete(context.Background(), a.elec.Key()); err != nil {
		t.Fatal(err)
	}
	var eb uint64
	select {
	case eb = <-won:
	case <-time.After(10 * time.Second):
		t.Fatal("b did not win the group after a resigned")
	}
	if eb <= ea {
		t.Errorf("epochs: a %d, then b %d", ea, eb)
	}
	// a, paused past its ownership, comes back and tries a transition.
	err = a.Transition([]byte(`{"stale":true}`))
	if fcerr.CodeOf(err) != fcerr.ClusterUnavailable {
		t.Errorf("a's transition after b took over: %v", err)
	}
	select {
	case <-a.Lost():
	default:
		t.Error("a's refused transition did not make it stand down")
	}
	if state, _, _ := b.GroupState(context.Background()); string(state) != `{"volumes":[{},{}],"suspended":1,"hosts":3}` {
		t.Errorf("the refused transition changed the state: %s", state)
	}
	b.Serving()
	if g := groupOf(t, b); g.Owner != "b" {
		t.Errorf("owner %q after b serves", g.Owner)
	}
	// A node that can't load the catalogue gives the group up.
	if err := b.Resign(); err != nil {
		t.Fatal(err)
	}
	if _, owner, _ := b.GroupState(context.Background()); owner != "" || b.Epoch() != 0 {
		t.Errorf("after b resigned: owner %q, b's epoch %d", owner, b.Epoch())
	}

	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	if m, err := Join(ctx, Config{Endpoints: []string{ep}, Node: "b", TTL: 2 * time.Second, Log: zerolog.Nop()}); err == nil {
		m.Close()
		t.Error("a second live node called b joined")
	}
}

// TestLeaseWithoutEtcd: with etcd gone, the owner stops being Valid within the lease, before
// Lost closes; after that a transition is refused at once.
func TestLeaseWithoutEtcd(t *testing.T) {
	ep, kill := etcd(t)
	const ttl = 2 * time.Second
	a := joinTest(t, ep, "a", ttl)
	if _, err := a.Campaign(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := a.Valid(); err != nil {
		t.Fatalf("valid right after the campaign: %v", err)
	}
	kill()
	stopped := time.Now()
	var invalid, lost time.Duration
	for invalid == 0 || lost == 0 {
		if time.Since(stopped) > 3*ttl {
			t.Fatalf("after %s without etcd: invalid after %s, lost after %s", 3*ttl, invalid, lost)
		}
		if invalid == 0 && a.Valid() != nil {
			invalid = time.Since(stopped)
		}
		select {
		case <-a.Lost():
			if lost == 0 {
				lost = time.Since(stopped)
			}
		default:
		}
		time.Sleep(10 * time.Millisecond)
	}
	if invalid > ttl || invalid > lost {
		t.Errorf("without etcd: invalid after %s, lost after %s (TTL %s)", invalid, lost, ttl)
	}
	start := time.Now()
	if err := a.Transition([]byte("{}")); fcerr.CodeOf(err) != fcerr.ClusterUnavailable || time.Since(start) > time.Second {
		t.Errorf("transition after the lease was lost: %v after %s", err, time.Since(start))
	}
	if a.LostErr() == nil {
		t.Error("no reason for the lost lease")
	}
}
