package hosts

import (
	"fmt"
	"net"
	"strconv"
	"sync/atomic"
	"syscall"

	"fcnbd/internal/blockdev"
	"fcnbd/internal/catalog"
	"fcnbd/nbd"
)

// Identities returns what client is known as, for matching against host port names, and
// whether it is the administrator (root on the Unix socket), who sees every export:
//
//   - a TLS client with a verified certificate: its subject Common Name and its DNS SANs;
//   - a TCP client without a verified certificate: "ip:ADDRESS", its source address;
//   - a Unix-socket client of another user: "uid:N".
func Identities(client nbd.Client) (ids []string, admin bool) {
	if client.Network == "unix" {
		if client.UID == 0 {
			return nil, true
		}
		if client.UID > 0 {
			ids = append(ids, "uid:"+strconv.Itoa(client.UID))
		}
	}
	if client.CommonName != "" {
		ids = append(ids, client.CommonName)
		if len(client.VerifiedChains) > 0 && len(client.VerifiedChains[0]) > 0 {
			ids = append(ids, client.VerifiedChains[0][0].DNSNames...)
		}
	}
	if client.Network == "tcp" && client.CommonName == "" {
		if host, _, err := net.SplitHostPort(client.Addr); err == nil {
			if ip := net.ParseIP(host); ip != nil {
				ids = append(ids, "ip:"+canonicalIP(ip))
			}
		}
	}
	return ids, false
}

// visible returns the ids of the volumes client may see, or all=true if it sees every one
// (no host defined, or the administrator).
func (m *Manager) visible(client nbd.Client) (vols map[uint64]bool, all bool, err error) {
	ids, admin := Identities(client)
	if admin {
		return nil, true, nil
	}
	err = m.cat.View(func(tx *catalog.Tx) error {
		hosts, err := tx.Hosts()
		if err != nil || len(hosts) == 0 {
			all = true
			return err
		}
		mine := map[uint64]bool{}
		for _, h := range hosts {
			for _, p := range h.Ports {
				for _, id := range ids {
					if p.Name == id {
						mine[h.ID] = true
					}
				}
			}
		}
		maps, err := tx.HostMaps()
		if err != nil {
			return err
		}
		vols = map[uint64]bool{}
		for _, mp := range maps {
			if mine[mp.Host] {
				vols[mp.Volume] = true
			}
		}
		return nil
	})
	return vols, all, err
}

// allowed reports whether client may use the export called name.
func (m *Manager) allowed(client nbd.Client, name string) bool {
	vols, all, err := m.visible(client)
	if err != nil {
		m.log.Warn().Err(err).Stringer("client", client).Msg("access check failed: refusing")
		return false
	}
	if all {
		return true
	}
	var id uint64
	var ok bool
	if err := m.cat.View(func(tx *catalog.Tx) error {
		v, found, err := tx.VolumeByName(name)
		id, ok = v.ID, found
		return err
	}); err != nil || !ok {
		return false
	}
	return vols[id]
}

// Exports returns inner with access control: the NBD server then lists and opens, for each
// client, only the exports it may see (an invisible export is answered as an unknown one), and
// the devices it hands out check again after every change of hosts or mappings: a revoked
// client's next request fails with EPERM (nbd.ErrRevoked) and the server closes its
// connection.
// The administrator gets inner's devices as they are.
func (m *Manager) Exports(inner nbd.Exports) nbd.ClientExports {
	return &exports{Exports: inner, m: m}
}

type exports struct {
	nbd.Exports
	m *Manager
}

func (e *exports) LookupFor(client nbd.Client, name string) (nbd.Export, bool) {
	x, ok := e.Lookup(name)
	if !ok {
		return x, false
	}
	if _, admin := Identities(client); admin {
		return x, true
	}
	// The generation is read before the check: a change committed during it moves the
	// generation past this one, and the device's first request checks again.
	gen := e.m.gen.Load()
	if !e.m.allowed(client, name) {
		e.m.log.Debug().Stringer("client", client).Str("export", name).Msg("export refused: not mapped to the client's host")
		return nbd.Export{}, false
	}
	g := &guarded{m: e.m, client: client, name: name, inner: x.Device}
	g.state.Store(&access{gen: gen, ok: true})
	x.Device = g
	return x, true
}

func (e *exports) ListFor(client nbd.Client) []nbd.Export {
	list := e.List()
	vols, all, err := e.m.visible(client)
	if err != nil {
		e.m.log.Warn().Err(err).Stringer("client", client).Msg("access check failed: listing nothing")
		return nil
	}
	if all {
		return list
	}
	var out []nbd.Export
	e.m.cat.View(func(tx *catalog.Tx) error {
		for _, x := range list {
			if v, ok, err := tx.VolumeByName(x.Name); err == nil && ok && vols[v.ID] {
				out = append(out, x)
			}
		}
		return nil
	})
	return out
}

// access is a guarded device's verdict as of generation gen of the hosts.
type access struct {
	gen uint64
	ok  bool
}

// guarded is an export's device as handed to one client: every request first checks that the
// client still may use it, which costs an atomic load unless hosts or mappings changed.
type guarded struct {
	m      *Manager
	client nbd.Client
	name   string
	inner  blockdev.Device
	state  atomic.Pointer[access]
}

func (d *guarded) check() error {
	gen := d.m.gen.Load()
	st := d.state.Load()
	if st.gen != gen {
		ok := st.ok && d.m.allowed(d.client, d.name) // once revoked, always revoked
		next := &access{gen: gen, ok: ok}
		// A concurrent request may have stored a verdict meanwhile; a revocation, or a later
		// generation, must not be overwritten by an older one.
		if d.state.CompareAndSwap(st, next) {
			if st.ok && !ok {
				d.m.log.Info().Stringer("client", d.client).Str("export", d.name).
					Msg("access revoked: requests on this connection now fail")
			}
			st = next
		} else if cur := d.state.Load(); !cur.ok || !ok {
			st = &access{ok: false}
		} else {
			st = cur
		}
	}
	if !st.ok {
		return fmt.Errorf("export %s of %s: %w: %w", d.name, d.client, nbd.ErrRevoked, syscall.EPERM)
	}
	return nil
}

func (d *guarded) Size() int64 { return d.inner.Size() }

func (d *guarded) ReadAt(p []byte, off int64) error {
	if err := d.check(); err != nil {
		return err
	}
	return d.inner.ReadAt(p, off)
}

func (d *guarded) WriteAt(p []byte, off int64, fua bool) error {
	if err := d.check(); err != nil {
		return err
	}
	return d.inner.WriteAt(p, off, fua)
}

func (d *guarded) Flush() error {
	if err := d.check(); err != nil {
		return err
	}
	return d.inner.Flush()
}

func (d *guarded) Trim(off, length int64) error {
	if err := d.check(); err != nil {
		return err
	}
	return d.inner.Trim(off, length)
}

func (d *guarded) WriteZeroes(off, length int64, mayPunch, fua bool) error {
	if err := d.check(); err != nil {
		return err
	}
	return d.inner.WriteZeroes(off, length, mayPunch, fua)
}

func (d *guarded) Extents(off, length int64) ([]blockdev.Extent, error) {
	if err := d.check(); err != nil {
		return nil, err
	}
	return blockdev.Extents(d.inner, off, length)
}

func (d *guarded) WriteZeroesFast(off, length int64, mayPunch, fua bool) error {
	if err := d.check(); err != nil {
		return err
	}
	return blockdev.WriteZeroesFast(d.inner, off, length, mayPunch, fua)
}

func (d *guarded) Prefetch(off, length int64) error {
	if err := d.check(); err != nil {
		return err
	}
	return blockdev.Prefetch(d.inner, off, length)
}

func (d *guarded) DirtyBitmapNames() []string {
	db, ok := d.inner.(blockdev.DirtyBitmaps)
	if !ok || d.check() != nil {
		return nil
	}
	return db.DirtyBitmapNames()
}

func (d *guarded) DirtyExtents(name string, off, length int64) ([]blockdev.DirtyExtent, error) {
	if err := d.check(); err != nil {
		return nil, err
	}
	db, ok := d.inner.(blockdev.DirtyBitmaps)
	if !ok {
		return nil, fmt.Errorf("export %s has no dirty bitmap %q: %w", d.name, name, syscall.ENOENT)
	}
	return db.DirtyExtents(name, off, length)
}
