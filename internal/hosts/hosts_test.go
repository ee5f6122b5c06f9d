package hosts

import (
	"crypto/x509"
	"errors"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/rs/zerolog"

	"fcnbd/internal/api"
	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
	"fcnbd/internal/memdev"
	"fcnbd/internal/store"
	"fcnbd/internal/volume"
	"fcnbd/nbd"
)

type env struct {
	dir  string
	cat  *catalog.DB
	vols *volume.Manager
	m    *Manager
}

func open(t *testing.T, dir string) *env {
	t.Helper()
	cat, err := catalog.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	vols, err := volume.Open(volume.Options{Catalog: cat, FS: store.Dir{Path: dir}})
	if err != nil {
		t.Fatal(err)
	}
	m, err := New(cat, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	e := &env{dir: dir, cat: cat, vols: vols, m: m}
	t.Cleanup(e.close)
	return e
}

func (e *env) close() {
	if e.vols != nil {
		e.vols.Close()
		e.cat.Close()
		e.vols = nil
	}
}

func newEnv(t *testing.T, vols ...string) *env {
	t.Helper()
	e := open(t, t.TempDir())
	for _, v := range vols {
		if _, err := e.vols.Create(v, 1<<20); err != nil {
			t.Fatal(err)
		}
	}
	return e
}

func wantCode(t *testing.T, err error, code string) {
	t.Helper()
	if fcerr.CodeOf(err) != code {
		t.Fatalf("got %v, want %s", err, code)
	}
}

// state is everything the manager shows, to check that refusals change nothing.
func (e *env) state(t *testing.T) ([]api.Host, []api.HostMap) {
	t.Helper()
	hs, err := e.m.Hosts()
	if err != nil {
		t.Fatal(err)
	}
	ms, err := e.m.HostMaps("", "")
	if err != nil {
		t.Fatal(err)
	}
	return hs, ms
}

func TestRefusalsChangeNothing(t *testing.T) {
	e := newEnv(t, "vol1", "vol2")
	if id, err := e.m.MkHost(api.MkHost{Name: "hostA", HostPorts: api.HostPorts{NBDNames: []string{"hostA", "ip:127.0.0.1"}}}); err != nil || id != 0 {
		t.Fatalf("mkhost: %d %v", id, err)
	}
	if _, err := e.m.MkHost(api.MkHost{Name: "hostB", HostPorts: api.HostPorts{FCWWPNs: []string{"500507680140abcd"}}}); err != nil {
		t.Fatal(err)
	}
	if scsi, err := e.m.MkHostMap(api.MkHostMap{Host: "hostA", Volume: "vol1"}); err != nil || scsi != 0 {
		t.Fatalf("mkvdiskhostmap: %d %v", scsi, err)
	}
	hs0, ms0 := e.state(t)
	seven, big := 7, MaxSCSI+1
	zero := 0
	for _, tc := range []struct {
		name string
		code string
		do   func() error
	}{
		{"name in use", fcerr.NameInUse, func() error {
			_, err := e.m.MkHost(api.MkHost{Name: "hostA", HostPorts: api.HostPorts{NBDNames: []string{"x"}}})
			return err
		}},
		{"port in use", fcerr.PortInUse, func() error {
			_, err := e.m.MkHost(api.MkHost{Name: "hostC", HostPorts: api.HostPorts{NBDNames: []string{"y", "ip:127.0.0.1"}}})
			return err
		}},
		{"wwpn in use, other case", fcerr.PortInUse, func() error {
			_, err := e.m.MkHost(api.MkHost{Name: "hostC", HostPorts: api.HostPorts{FCWWPNs: []string{"500507680140ABCD"}}})
			return err
		}},
		{"bad wwpn", fcerr.PortInUse, func() error {
			_, err := e.m.MkHost(api.MkHost{Name: "hostC", HostPorts: api.HostPorts{FCWWPNs: []string{"12"}}})
			return err
		}},
		{"bad ip", fcerr.PortInUse, func() error {
			_, err := e.m.MkHost(api.MkHost{Name: "hostC", HostPorts: api.HostPorts{NBDNames: []string{"ip:300.1.1.1"}}})
			return err
		}},
		{"uid 0", fcerr.PortInUse, func() error {
			_, err := e.m.MkHost(api.MkHost{Name: "hostC", HostPorts: api.HostPorts{NBDNames: []string{"uid:0"}}})
			return err
		}},
		{"no port", fcerr.MissingParameter, func() error { _, err := e.m.MkHost(api.MkHost{Name: "hostC"}); return err }},
		{"bad name", fcerr.BadName, func() error {
			_, err := e.m.MkHost(api.MkHost{Name: "1x", HostPorts: api.HostPorts{NBDNames: []string{"z"}}})
			return err
		}},
		{"bad type", fcerr.BadValue, func() error {
			_, err := e.m.MkHost(api.MkHost{Name: "hostC", Type: "aix", HostPorts: api.HostPorts{NBDNames: []string{"z"}}})
			return err
		}},
		{"bad iogrp", fcerr.NoSuchObject, func() error {
			_, err := e.m.MkHost(api.MkHost{Name: "hostC", IOGrps: []string{"1"}, HostPorts: api.HostPorts{NBDNames: []string{"z"}}})
			return err
		}},
		{"rmhost mapped", fcerr.HostMapped, func() error { return e.m.RmHost("hostA", false) }},
		{"rmhost unknown", fcerr.NoSuchName, func() error { return e.m.RmHost("hostZ", true) }},
		{"map twice", fcerr.VolumeHostMapped, func() error {
			_, err := e.m.MkHostMap(api.MkHostMap{Host: "hostA", Volume: "vol1", Force: true})
			return err
		}},
		{"map to another host", fcerr.VolumeHostMapped, func() error {
			_, err := e.m.MkHostMap(api.MkHostMap{Host: "hostB", Volume: "vol1"})
			return err
		}},
		{"scsi in use", fcerr.SCSIInUse, func() error {
			_, err := e.m.MkHostMap(api.MkHostMap{Host: "hostA", Volume: "vol2", SCSI: &zero})
			return err
		}},
		{"scsi too big", fcerr.BadValue, func() error {
			_, err := e.m.MkHostMap(api.MkHostMap{Host: "hostA", Volume: "vol2", SCSI: &big})
			return err
		}},
		{"map unknown volume", fcerr.NoSuchObject, func() error {
			_, err := e.m.MkHostMap(api.MkHostMap{Host: "hostA", Volume: "nosuch", SCSI: &seven})
			return err
		}},
		{"map unknown host", fcerr.NoSuchName, func() error {
			_, err := e.m.MkHostMap(api.MkHostMap{Host: "9", Volume: "vol2"})
			return err
		}},
		{"unmap not mapped", fcerr.NoSuchObject, func() error { return e.m.RmHostMap("hostB", "vol1") }},
		{"rmhostport last", fcerr.LastHostPort, func() error {
			return e.m.RmHostPorts("hostB", api.HostPorts{FCWWPNs: []string{"500507680140ABCD"}})
		}},
		{"rmhostport mapped", fcerr.HostMapped, func() error {
			return e.m.RmHostPorts("hostA", api.HostPorts{NBDNames: []string{"hostA"}})
		}},
		{"rmhostport unknown", fcerr.NoSuchObject, func() error {
			return e.m.RmHostPorts("hostA", api.HostPorts{NBDNames: []string{"nosuch"}, Force: true})
		}},
		{"addhostport in use", fcerr.PortInUse, func() error {
			return e.m.AddHostPorts("hostB", api.HostPorts{NBDNames: []string{"new", "hostA"}})
		}},
		{"chhost name in use", fcerr.NameInUse, func() error { n := "hostB"; return e.m.ChHost("hostA", api.ChHost{Name: &n}) }},
		{"rmvolume mapped", fcerr.VolumeMapped, func() error { return e.vols.Delete("vol1", volume.DeleteMode{}) }},
	} {
		wantCode(t, tc.do(), tc.code)
		if hs, ms := e.state(t); !slices.EqualFunc(hs, hs0, hostEqual) || !slices.Equal(ms, ms0) {
			t.Fatalf("%s: the refusal changed %v %v to %v %v", tc.name, hs0, ms0, hs, ms)
		}
	}
	if _, err := e.vols.Get("vol1"); err != nil {
		t.Fatalf("the refused rmvolume deleted vol1: %v", err)
	}
}

func hostEqual(a, b api.Host) bool {
	return a.ID == b.ID && a.Name == b.Name && a.Type == b.Type && a.Mappings == b.Mappings && slices.Equal(a.Ports, b.Ports)
}

// TestPersistence: hosts and mappings survive a reopen; a volume deleted with force takes its
// host mappings with it, in the same commit.
func TestPersistence(t *testing.T) {
	dir := t.TempDir()
	e := open(t, dir)
	for _, v := range []string{"vol1", "vol2"} {
		if _, err := e.vols.Create(v, 1<<20); err != nil {
			t.Fatal(err)
		}
	}
	e.m.MkHost(api.MkHost{Name: "hostA", HostPorts: api.HostPorts{NBDNames: []string{"hostA"}, ISCSINames: []string{"IQN.1993-08.org.debian:01:abc"}}})
	e.m.MkHost(api.MkHost{HostPorts: api.HostPorts{NBDNames: []string{"uid:1000"}}})
	e.m.MkHostMap(api.MkHostMap{Host: "hostA", Volume: "vol1"})
	e.m.MkHostMap(api.MkHostMap{Host: "hostA", Volume: "vol2"})
	e.m.MkHostMap(api.MkHostMap{Host: "host1", Volume: "vol2", Force: true})
	hs0, ms0 := e.state(t)
	if len(hs0) != 2 || hs0[1].Name != "host1" || hs0[0].Ports[1].Name != "iqn.1993-08.org.debian:01:abc" || len(ms0) != 3 || ms0[1].SCSI != 1 {
		t.Fatalf("hosts %+v maps %+v", hs0, ms0)
	}
	e.close()

	e = open(t, dir)
	if hs, ms := e.state(t); !slices.EqualFunc(hs, hs0, hostEqual) || !slices.Equal(ms, ms0) {
		t.Fatalf("after reopen %v %v, want %v %v", hs, ms, hs0, ms0)
	}
	if err := e.vols.Delete("vol2", volume.DeleteMode{Force: true}); err != nil {
		t.Fatal(err)
	}
	e.close()
	e = open(t, dir) // the catalogue's check would refuse mappings of a missing volume
	if _, ms := e.state(t); len(ms) != 1 || ms[0].VolumeName != "vol1" {
		t.Fatalf("after rmvolume -force: %+v", ms)
	}
}

func TestIdentities(t *testing.T) {
	cert := &x509.Certificate{DNSNames: []string{"a.example"}}
	for _, tc := range []struct {
		c     nbd.Client
		ids   []string
		admin bool
	}{
		{nbd.Client{Network: "unix", Addr: "unix", UID: 0}, nil, true},
		{nbd.Client{Network: "unix", Addr: "unix", UID: 1000}, []string{"uid:1000"}, false},
		{nbd.Client{Network: "unix", Addr: "unix", UID: -1}, nil, false},
		{nbd.Client{Network: "tcp", Addr: "127.0.0.1:5000", UID: -1}, []string{"ip:127.0.0.1"}, false},
		{nbd.Client{Network: "tcp", Addr: "[::ffff:10.0.0.1]:5000", UID: -1}, []string{"ip:10.0.0.1"}, false},
		{nbd.Client{Network: "tcp", Addr: "[::1]:5000", UID: -1, TLS: true}, []string{"ip:::1"}, false},
		{nbd.Client{Network: "tcp", Addr: "127.0.0.1:5000", UID: -1, TLS: true, CommonName: "hostA",
			VerifiedChains: [][]*x509.Certificate{{cert}}}, []string{"hostA", "a.example"}, false},
	} {
		ids, admin := Identities(tc.c)
		if !slices.Equal(ids, tc.ids) || admin != tc.admin {
			t.Errorf("%+v: %v %v, want %v %v", tc.c, ids, admin, tc.ids, tc.admin)
		}
	}
}

// TestAccess: the exports a client sees and opens, and revocation of a device handed out.
func TestAccess(t *testing.T) {
	e := newEnv(t, "vol1", "vol2")
	static := nbd.StaticExports{{Name: "vol1", Device: memdev.New(1 << 20)}, {Name: "vol2", Device: memdev.New(1 << 20)}}
	x := e.m.Exports(static)
	hostA := nbd.Client{Network: "tcp", Addr: "192.0.2.1:1000", UID: -1, TLS: true, CommonName: "hostA"}
	plain := nbd.Client{Network: "tcp", Addr: "192.0.2.9:1000", UID: -1}
	root := nbd.Client{Network: "unix", Addr: "unix", UID: 0}
	user := nbd.Client{Network: "unix", Addr: "unix", UID: 1000}
	names := func(c nbd.Client) []string {
		var out []string
		for _, ex := range x.ListFor(c) {
			out = append(out, ex.Name)
		}
		return out
	}
	for _, c := range []nbd.Client{hostA, plain, root, user} {
		if got := names(c); !slices.Equal(got, []string{"vol1", "vol2"}) {
			t.Fatalf("no host: %v sees %v", c, got)
		}
	}
	// A device handed out while access control is off is checked once it is on.
	early, ok := x.LookupFor(plain, "vol2")
	if !ok {
		t.Fatal("no host: vol2 refused")
	}

	e.m.MkHost(api.MkHost{Name: "hostA", HostPorts: api.HostPorts{NBDNames: []string{"hostA"}}})
	e.m.MkHost(api.MkHost{Name: "u", HostPorts: api.HostPorts{NBDNames: []string{"uid:1000"}}})
	e.m.MkHostMap(api.MkHostMap{Host: "hostA", Volume: "vol1"})
	e.m.MkHostMap(api.MkHostMap{Host: "u", Volume: "vol2"})
	buf := make([]byte, 512)
	if err := early.Device.ReadAt(buf, 0); !errors.Is(err, syscall.EPERM) {
		t.Fatalf("the unidentified client's device after mkhost: %v, want EPERM", err)
	}
	for c, want := range map[*nbd.Client][]string{&hostA: {"vol1"}, &plain: nil, &root: {"vol1", "vol2"}, &user: {"vol2"}} {
		if got := names(*c); !slices.Equal(got, want) {
			t.Errorf("%v sees %v, want %v", *c, got, want)
		}
	}
	if _, ok := x.LookupFor(hostA, "vol2"); ok {
		t.Error("hostA opened vol2")
	}
	if _, ok := x.LookupFor(plain, "vol1"); ok {
		t.Error("an unidentified client opened vol1")
	}
	dev, ok := x.LookupFor(hostA, "vol1")
	if !ok {
		t.Fatal("hostA can't open vol1")
	}
	if err := dev.Device.WriteAt(buf, 0, false); err != nil {
		t.Fatal(err)
	}
	rootDev, _ := x.LookupFor(root, "vol1")

	// A change elsewhere leaves the device working; removing its mapping revokes it.
	e.m.RmHostMap("u", "vol2")
	if err := dev.Device.ReadAt(buf, 0); err != nil {
		t.Fatalf("after an unrelated change: %v", err)
	}
	e.m.RmHostMap("hostA", "vol1")
	if err := dev.Device.ReadAt(buf, 0); !errors.Is(err, syscall.EPERM) {
		t.Fatalf("after rmvdiskhostmap: %v, want EPERM", err)
	}
	// Mapping it again does not bring the old connection back; a new one opens.
	e.m.MkHostMap(api.MkHostMap{Host: "hostA", Volume: "vol1"})
	if err := dev.Device.ReadAt(buf, 0); !errors.Is(err, syscall.EPERM) {
		t.Fatalf("a revoked device came back: %v", err)
	}
	if _, ok := x.LookupFor(hostA, "vol1"); !ok {
		t.Fatal("hostA can't open vol1 after mapping it again")
	}
	if err := rootDev.Device.ReadAt(buf, 0); err != nil {
		t.Fatalf("root's device: %v", err)
	}

	// No host left: open again.
	e.m.RmHost("hostA", true)
	e.m.RmHost("u", false)
	if got := names(plain); !slices.Equal(got, []string{"vol1", "vol2"}) {
		t.Fatalf("no host left: %v", got)
	}
}

func TestCatalogueCheck(t *testing.T) {
	dir := t.TempDir()
	e := open(t, dir)
	e.vols.Create("vol1", 1<<20)
	e.m.MkHost(api.MkHost{Name: "hostA", HostPorts: api.HostPorts{NBDNames: []string{"hostA"}}})
	e.m.MkHostMap(api.MkHostMap{Host: "hostA", Volume: "vol1"})
	// A mapping of a missing host is corruption, found at open.
	if err := e.cat.Update(func(tx *catalog.Tx) error { return tx.DeleteHost(0) }); err != nil {
		t.Fatal(err)
	}
	e.close()
	if _, err := catalog.Open(dir); !errors.Is(err, catalog.ErrCorrupt) {
		t.Fatalf("open with a dangling host mapping: %v", err)
	}
}

// TestRevocationConcurrent: requests racing with rmvdiskhostmap; once it has returned, every
// request fails, whichever goroutine stored the last verdict.
func TestRevocationConcurrent(t *testing.T) {
	e := newEnv(t, "vol1")
	x := e.m.Exports(nbd.StaticExports{{Name: "vol1", Device: memdev.New(1 << 20)}})
	hostA := nbd.Client{Network: "tcp", Addr: "192.0.2.1:1000", UID: -1, TLS: true, CommonName: "hostA"}
	e.m.MkHost(api.MkHost{Name: "hostA", HostPorts: api.HostPorts{NBDNames: []string{"hostA"}}})
	e.m.MkHostMap(api.MkHostMap{Host: "hostA", Volume: "vol1"})
	ex, ok := x.LookupFor(hostA, "vol1")
	if !ok {
		t.Fatal("hostA can't open vol1")
	}
	var revoked atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 512)
			for i := 0; i < 2000; i++ {
				after := revoked.Load()
				err := ex.Device.ReadAt(buf, 0)
				if after && err == nil {
					errs <- errors.New("a read succeeded after the revocation returned")
					return
				}
				if i%100 == 0 {
					e.m.MkHost(api.MkHost{HostPorts: api.HostPorts{NBDNames: []string{"n" + strconv.Itoa(g) + "-" + strconv.Itoa(i)}}}) // moves the generation
				}
			}
		}()
	}
	if err := e.m.RmHostMap("hostA", "vol1"); err != nil {
		t.Fatal(err)
	}
	revoked.Store(true)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}
