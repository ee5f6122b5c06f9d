// Package hosts is fcnbd's hosts and host mappings (issue 14) and the NBD access control they
// make: with no host defined every NBD client sees every volume; once one is, a client sees
// only the volumes mapped to the host it is identified as (see Identities), except root on the
// Unix socket, the administrator, who sees them all.
//
// Hosts and mappings are catalogue records (catalog/hosts.go); the Manager validates every
// command completely, then commits it in one transaction. It keeps no copy of them: the NBD
// server's lookups read the catalogue, so what they see is always what was committed.
package hosts

import (
	"fmt"
	"net"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/rs/zerolog"

	"fcnbd/internal/api"
	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
	"fcnbd/internal/volume"
)

// MaxSCSI is the highest SCSI id a mapping may have.
const MaxSCSI = 2047

// MaxPorts is the most port names one host may have.
const MaxPorts = 64

// Host types and protocols mkhost accepts (IBM's); they are shown, not acted on.
var (
	hostTypes = []string{"generic", "hpux", "tpgs", "openvms", "adminlun", "hide_secondary"}
	protocols = []string{"scsi", "nvme", "fcscsi", "iscsi", "fcnvme", "rdmanvme", "tcpnvme", "sas"}
)

// Manager runs the host commands and decides what each NBD client may see.
type Manager struct {
	cat *catalog.DB
	log zerolog.Logger
	mu  sync.Mutex // serialises changes, so that a validation holds until its commit
	// gen changes after every committed change: devices handed to clients check their access
	// again when it moved.
	gen atomic.Uint64
}

var _ api.Hosts = (*Manager)(nil)

// New returns the manager of the hosts in cat.
func New(cat *catalog.DB, log zerolog.Logger) (*Manager, error) {
	m := &Manager{cat: cat, log: log.With().Str("component", "hosts").Logger()}
	var n int
	err := cat.View(func(tx *catalog.Tx) error {
		hs, err := tx.Hosts()
		n = len(hs)
		return err
	})
	if err != nil {
		return nil, err
	}
	if n > 0 {
		m.log.Info().Int("hosts", n).Msg("NBD access control is on: clients see only the volumes mapped to their host")
	}
	return m, nil
}

// ---- validation ----

var wwpnRE = regexp.MustCompile(`^[0-9A-Fa-f]{16}$`)

// normalizePort checks one port name of kind and returns it as stored.
func normalizePort(kind, name string) (string, error) {
	bad := func(why string) error {
		return fcerr.New(fcerr.PortInUse, "the port name %q is not valid: %s", name, why)
	}
	if name == "" || len(name) > 255 {
		return "", bad("it must have 1 to 255 characters")
	}
	for _, c := range name {
		if c <= ' ' || c > '~' || c == ',' || c == '"' || c == '\'' {
			return "", bad("it must be printable ASCII without spaces, commas or quotes")
		}
	}
	switch kind {
	case catalog.PortFC:
		if !wwpnRE.MatchString(name) {
			return "", bad("a WWPN is 16 hexadecimal digits")
		}
		return strings.ToUpper(name), nil
	case catalog.PortISCSI:
		return strings.ToLower(name), nil
	}
	switch {
	case strings.HasPrefix(name, "ip:"):
		ip := net.ParseIP(strings.TrimPrefix(name, "ip:"))
		if ip == nil {
			return "", bad("ip: is followed by an IP address")
		}
		return "ip:" + canonicalIP(ip), nil
	case strings.HasPrefix(name, "uid:"):
		uid, err := strconv.ParseUint(strings.TrimPrefix(name, "uid:"), 10, 32)
		if err != nil {
			return "", bad("uid: is followed by a user id")
		}
		if uid == 0 {
			return "", bad("uid 0 (root) is the administrator and sees every volume")
		}
		return "uid:" + strconv.FormatUint(uid, 10), nil
	}
	return name, nil
}

func canonicalIP(ip net.IP) string {
	if v4 := ip.To4(); v4 != nil {
		return v4.String()
	}
	return ip.String()
}

// ports validates the port names of req, in order, refusing duplicates among them and names
// already used by a host other than self.
func ports(tx *catalog.Tx, req api.HostPorts, self uint64) ([]catalog.HostPort, error) {
	var out []catalog.HostPort
	seen := map[string]bool{}
	for _, group := range []struct {
		kind  string
		names []string
	}{{catalog.PortNBD, req.NBDNames}, {catalog.PortISCSI, req.ISCSINames}, {catalog.PortFC, req.FCWWPNs}} {
		for _, n := range group.names {
			name, err := normalizePort(group.kind, n)
			if err != nil {
				return nil, err
			}
			if seen[name] {
				return nil, fcerr.New(fcerr.PortInUse, "the port name %q is given twice", name)
			}
			seen[name] = true
			out = append(out, catalog.HostPort{Kind: group.kind, Name: name})
		}
	}
	hosts, err := tx.Hosts()
	if err != nil {
		return nil, err
	}
	for _, h := range hosts {
		if h.ID == self {
			continue
		}
		for _, p := range h.Ports {
			if seen[p.Name] {
				return nil, fcerr.New(fcerr.PortInUse, "the port name %q is already assigned to host %s", p.Name, h.Name)
			}
		}
	}
	return out, nil
}

func noSuchHost(ref string) error {
	return fcerr.New(fcerr.NoSuchName, "the host %q does not exist", ref)
}

// findHost returns host ref (an id if all digits, else a name).
func findHost(tx *catalog.Tx, ref string) (catalog.Host, error) {
	hosts, err := tx.Hosts()
	if err != nil {
		return catalog.Host{}, err
	}
	for _, h := range hosts {
		if volume.IsID(ref) && strconv.FormatUint(h.ID, 10) == ref || !volume.IsID(ref) && h.Name == ref {
			return h, nil
		}
	}
	return catalog.Host{}, noSuchHost(ref)
}

// findVolume returns volume ref (an id if all digits, else a name).
func findVolume(tx *catalog.Tx, ref string) (catalog.Volume, error) {
	var v catalog.Volume
	var ok bool
	var err error
	if volume.IsID(ref) {
		id, perr := strconv.ParseUint(ref, 10, 64)
		if perr == nil {
			v, ok, err = tx.Volume(id)
		}
	} else {
		v, ok, err = tx.VolumeByName(ref)
	}
	if err != nil {
		return v, err
	}
	if !ok {
		return v, fcerr.New(fcerr.NoSuchObject, "the volume %q does not exist", ref)
	}
	return v, nil
}

func nameInUse(tx *catalog.Tx, name string, self uint64) (bool, error) {
	hosts, err := tx.Hosts()
	if err != nil {
		return false, err
	}
	for _, h := range hosts {
		if h.Name == name && h.ID != self {
			return true, nil
		}
	}
	return false, nil
}

// update runs fn in one catalogue transaction under m.mu; a refusal (fcerr) from fn changes
// nothing and is returned as it is; a failed commit is MetadataUnwritable.
func (m *Manager) update(what string, fn func(tx *catalog.Tx) error) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	err := m.cat.Update(fn)
	switch {
	case fcerr.CodeOf(err) != "":
		return err
	case err != nil:
		return fcerr.Unwritable(err, "%s", what)
	}
	m.gen.Add(1)
	return nil
}

// ---- hosts ----

// MkHost creates a host and returns its id. The first host turns access control on.
func (m *Manager) MkHost(req api.MkHost) (int, error) {
	if req.Name != "" {
		if err := volume.ValidateName(req.Name); err != nil {
			return 0, err
		}
	}
	if req.Type == "" {
		req.Type = "generic"
	}
	if !slices.Contains(hostTypes, req.Type) {
		return 0, fcerr.New(fcerr.BadValue, "the host type %q is not valid: use %s", req.Type, strings.Join(hostTypes, ", "))
	}
	if req.Protocol == "" {
		req.Protocol = "scsi"
	}
	if !slices.Contains(protocols, req.Protocol) {
		return 0, fcerr.New(fcerr.BadValue, "the protocol %q is not valid: use %s", req.Protocol, strings.Join(protocols, ", "))
	}
	for _, g := range req.IOGrps {
		if g != "0" && g != "io_grp0" {
			return 0, fcerr.New(fcerr.NoSuchObject, "the I/O group %q does not exist (fcnbd has one: 0, io_grp0)", g)
		}
	}
	if len(req.NBDNames)+len(req.ISCSINames)+len(req.FCWWPNs) == 0 {
		return 0, fcerr.New(fcerr.MissingParameter, "a host needs at least one port name: -nbdname, -iscsiname or -fcwwpn")
	}
	if len(req.NBDNames)+len(req.ISCSINames)+len(req.FCWWPNs) > MaxPorts {
		return 0, fcerr.New(fcerr.BadValue, "a host has at most %d port names", MaxPorts)
	}
	var rec catalog.Host
	first := false
	err := m.update("mkhost", func(tx *catalog.Tx) error {
		id, err := tx.PeekID(catalog.SeqHost)
		if err != nil {
			return err
		}
		rec = catalog.Host{ID: id, Name: req.Name, Type: req.Type, Protocol: req.Protocol}
		if rec.Name == "" {
			rec.Name = "host" + strconv.FormatUint(id, 10)
		}
		if used, err := nameInUse(tx, rec.Name, id); err != nil {
			return err
		} else if used {
			return fcerr.New(fcerr.NameInUse, "the name %q is already in use by a host", rec.Name)
		}
		if rec.Ports, err = ports(tx, req.HostPorts, id); err != nil {
			return err
		}
		hosts, err := tx.Hosts()
		if err != nil {
			return err
		}
		first = len(hosts) == 0
		if _, err := tx.NextID(catalog.SeqHost); err != nil {
			return err
		}
		return tx.PutHost(rec)
	})
	if err != nil {
		return 0, err
	}
	m.log.Debug().Uint64("id", rec.ID).Str("name", rec.Name).Msg("host created")
	if first {
		m.log.Info().Str("host", rec.Name).Msg("first host defined: NBD access control is on; clients see only the volumes mapped to their host")
	}
	return int(rec.ID), nil
}

// ChHost changes a host's name or type.
func (m *Manager) ChHost(ref string, req api.ChHost) error {
	if req.Name == nil && req.Type == nil {
		return fcerr.New(fcerr.MissingParameter, "nothing to change: give -name or -type")
	}
	if req.Name != nil {
		if err := volume.ValidateName(*req.Name); err != nil {
			return err
		}
	}
	if req.Type != nil && !slices.Contains(hostTypes, *req.Type) {
		return fcerr.New(fcerr.BadValue, "the host type %q is not valid: use %s", *req.Type, strings.Join(hostTypes, ", "))
	}
	return m.update("chhost", func(tx *catalog.Tx) error {
		h, err := findHost(tx, ref)
		if err != nil {
			return err
		}
		if req.Name != nil {
			if used, err := nameInUse(tx, *req.Name, h.ID); err != nil {
				return err
			} else if used {
				return fcerr.New(fcerr.NameInUse, "the name %q is already in use by a host", *req.Name)
			}
			h.Name = *req.Name
		}
		if req.Type != nil {
			h.Type = *req.Type
		}
		return tx.PutHost(h)
	})
}

// RmHost deletes a host; one with mappings is refused (CMMVC5871E) unless force, which deletes
// them with it. Connections of the host lose access (Exports). The last host's removal turns
// access control off.
func (m *Manager) RmHost(ref string, force bool) error {
	var name string
	last := false
	err := m.update("rmhost", func(tx *catalog.Tx) error {
		h, err := findHost(tx, ref)
		if err != nil {
			return err
		}
		name = h.Name
		maps, err := tx.HostMaps()
		if err != nil {
			return err
		}
		var mine []catalog.HostMap
		for _, mp := range maps {
			if mp.Host == h.ID {
				mine = append(mine, mp)
			}
		}
		if len(mine) > 0 && !force {
			return fcerr.New(fcerr.HostMapped, "the host %s was not deleted because %d volume(s) are mapped to it; "+
				"remove the mappings (rmvdiskhostmap) or use -force", h.Name, len(mine))
		}
		for _, mp := range mine {
			if err := tx.DeleteHostMap(mp.ID); err != nil {
				return err
			}
		}
		if err := tx.DeleteHost(h.ID); err != nil {
			return err
		}
		hosts, err := tx.Hosts()
		last = len(hosts) == 0
		return err
	})
	if err != nil {
		return err
	}
	m.log.Debug().Str("name", name).Msg("host deleted")
	if last {
		m.log.Info().Str("host", name).Msg("last host deleted: NBD access control is off; every client sees every volume")
	}
	return nil
}

// AddHostPorts adds port names to a host.
func (m *Manager) AddHostPorts(ref string, req api.HostPorts) error {
	if len(req.NBDNames)+len(req.ISCSINames)+len(req.FCWWPNs) == 0 {
		return fcerr.New(fcerr.MissingParameter, "no port name given: -nbdname, -iscsiname or -fcwwpn")
	}
	return m.update("addhostport", func(tx *catalog.Tx) error {
		h, err := findHost(tx, ref)
		if err != nil {
			return err
		}
		add, err := ports(tx, req, h.ID)
		if err != nil {
			return err
		}
		for _, p := range add {
			if slices.ContainsFunc(h.Ports, func(q catalog.HostPort) bool { return q.Name == p.Name }) {
				return fcerr.New(fcerr.PortInUse, "the port name %q is already assigned to host %s", p.Name, h.Name)
			}
		}
		if len(h.Ports)+len(add) > MaxPorts {
			return fcerr.New(fcerr.BadValue, "a host has at most %d port names", MaxPorts)
		}
		h.Ports = append(h.Ports, add...)
		return tx.PutHost(h)
	})
}

// RmHostPorts removes port names from a host. A host keeps at least one; removing one from a
// host with mappings needs force (its clients on that port lose access).
func (m *Manager) RmHostPorts(ref string, req api.HostPorts) error {
	if len(req.NBDNames)+len(req.ISCSINames)+len(req.FCWWPNs) == 0 {
		return fcerr.New(fcerr.MissingParameter, "no port name given: -nbdname, -iscsiname or -fcwwpn")
	}
	return m.update("rmhostport", func(tx *catalog.Tx) error {
		h, err := findHost(tx, ref)
		if err != nil {
			return err
		}
		var drop []string
		for _, group := range []struct {
			kind  string
			names []string
		}{{catalog.PortNBD, req.NBDNames}, {catalog.PortISCSI, req.ISCSINames}, {catalog.PortFC, req.FCWWPNs}} {
			for _, n := range group.names {
				name, err := normalizePort(group.kind, n)
				if err != nil {
					return err
				}
				if !slices.ContainsFunc(h.Ports, func(q catalog.HostPort) bool { return q.Name == name && q.Kind == group.kind }) {
					return fcerr.New(fcerr.NoSuchObject, "the host %s has no port name %q", h.Name, name)
				}
				drop = append(drop, name)
			}
		}
		keep := slices.DeleteFunc(slices.Clone(h.Ports), func(q catalog.HostPort) bool { return slices.Contains(drop, q.Name) })
		if len(keep) == 0 {
			return fcerr.New(fcerr.LastHostPort, "the host %s keeps at least one port name; use rmhost to delete it", h.Name)
		}
		maps, err := tx.HostMaps()
		if err != nil {
			return err
		}
		if !req.Force && slices.ContainsFunc(maps, func(mp catalog.HostMap) bool { return mp.Host == h.ID }) {
			return fcerr.New(fcerr.HostMapped, "the host %s has mappings: use -force to remove its port names", h.Name)
		}
		h.Ports = keep
		return tx.PutHost(h)
	})
}

func hostView(h catalog.Host, maps []catalog.HostMap) api.Host {
	v := api.Host{ID: int(h.ID), Name: h.Name, Type: h.Type, Protocol: h.Protocol}
	for _, p := range h.Ports {
		v.Ports = append(v.Ports, api.HostPort{Kind: p.Kind, Name: p.Name})
	}
	for _, mp := range maps {
		if mp.Host == h.ID {
			v.Mappings++
		}
	}
	return v
}

// Hosts lists every host, in id order.
func (m *Manager) Hosts() ([]api.Host, error) {
	out := []api.Host{}
	err := m.cat.View(func(tx *catalog.Tx) error {
		hosts, err := tx.Hosts()
		if err != nil {
			return err
		}
		maps, err := tx.HostMaps()
		if err != nil {
			return err
		}
		for _, h := range hosts {
			out = append(out, hostView(h, maps))
		}
		return nil
	})
	return out, err
}

// Host returns host ref.
func (m *Manager) Host(ref string) (api.Host, error) {
	var out api.Host
	err := m.cat.View(func(tx *catalog.Tx) error {
		h, err := findHost(tx, ref)
		if err != nil {
			return err
		}
		maps, err := tx.HostMaps()
		out = hostView(h, maps)
		return err
	})
	return out, err
}

// ---- host mappings ----

// MkHostMap maps a volume to a host and returns its SCSI id (the lowest free one of the host
// unless req.SCSI). A volume already mapped to another host needs req.Force (shared access,
// e.g. a cluster file system); the same volume twice to one host is refused.
func (m *Manager) MkHostMap(req api.MkHostMap) (int, error) {
	switch {
	case req.Host == "":
		return 0, fcerr.New(fcerr.MissingParameter, "the host is missing (-host)")
	case req.Volume == "":
		return 0, fcerr.New(fcerr.MissingParameter, "the volume is missing")
	case req.SCSI != nil && (*req.SCSI < 0 || *req.SCSI > MaxSCSI):
		return 0, fcerr.New(fcerr.BadValue, "the SCSI id %d is not valid: use 0 to %d", *req.SCSI, MaxSCSI)
	}
	var rec catalog.HostMap
	var hostName, volName string
	err := m.update("mkvdiskhostmap", func(tx *catalog.Tx) error {
		v, err := findVolume(tx, req.Volume)
		if err != nil {
			return err
		}
		h, err := findHost(tx, req.Host)
		if err != nil {
			return err
		}
		hostName, volName = h.Name, v.Name
		maps, err := tx.HostMaps()
		if err != nil {
			return err
		}
		used := map[uint32]bool{}
		for _, mp := range maps {
			switch {
			case mp.Volume == v.ID && mp.Host == h.ID:
				return fcerr.New(fcerr.VolumeHostMapped, "the volume %s is already mapped to host %s", v.Name, h.Name)
			case mp.Volume == v.ID && !req.Force:
				return fcerr.New(fcerr.VolumeHostMapped, "the volume %s is already mapped to another host: use -force to map it to %s too", v.Name, h.Name)
			case mp.Host == h.ID:
				used[mp.SCSI] = true
			}
		}
		var scsi uint32
		if req.SCSI != nil {
			scsi = uint32(*req.SCSI)
			if used[scsi] {
				return fcerr.New(fcerr.SCSIInUse, "the host %s already has a volume mapped with SCSI id %d", h.Name, scsi)
			}
		} else {
			for used[scsi] {
				scsi++
			}
			if scsi > MaxSCSI {
				return fcerr.New(fcerr.SCSIInUse, "the host %s has no free SCSI id", h.Name)
			}
		}
		id, err := tx.NextID(catalog.SeqHostMap)
		if err != nil {
			return err
		}
		rec = catalog.HostMap{ID: id, Host: h.ID, Volume: v.ID, SCSI: scsi}
		return tx.PutHostMap(rec)
	})
	if err != nil {
		return 0, err
	}
	m.log.Debug().Str("host", hostName).Str("volume", volName).Uint32("scsi", rec.SCSI).Msg("volume mapped to host")
	return int(rec.SCSI), nil
}

// RmHostMap removes the mapping of a volume to a host. The host's connections to the volume
// lose access (Exports).
func (m *Manager) RmHostMap(host, vol string) error {
	return m.update("rmvdiskhostmap", func(tx *catalog.Tx) error {
		v, err := findVolume(tx, vol)
		if err != nil {
			return err
		}
		h, err := findHost(tx, host)
		if err != nil {
			return err
		}
		maps, err := tx.HostMaps()
		if err != nil {
			return err
		}
		for _, mp := range maps {
			if mp.Host == h.ID && mp.Volume == v.ID {
				return tx.DeleteHostMap(mp.ID)
			}
		}
		return fcerr.New(fcerr.NoSuchObject, "the volume %s is not mapped to host %s", v.Name, h.Name)
	})
}

// HostMaps lists the mappings of host, or of vol, or (both "") every one, by host then SCSI id
// (for a host or all) or by host id (for a volume).
func (m *Manager) HostMaps(host, vol string) ([]api.HostMap, error) {
	out := []api.HostMap{}
	err := m.cat.View(func(tx *catalog.Tx) error {
		var hostID, volID uint64
		if host != "" {
			h, err := findHost(tx, host)
			if err != nil {
				return err
			}
			hostID = h.ID
		}
		if vol != "" {
			v, err := findVolume(tx, vol)
			if err != nil {
				return err
			}
			volID = v.ID
		}
		maps, err := tx.HostMaps()
		if err != nil {
			return err
		}
		for _, mp := range maps {
			if host != "" && mp.Host != hostID || vol != "" && mp.Volume != volID {
				continue
			}
			h, hok, err := tx.Host(mp.Host)
			if err != nil {
				return err
			}
			v, vok, err := tx.Volume(mp.Volume)
			if err != nil {
				return err
			}
			if !hok || !vok {
				return fmt.Errorf("host mapping %d: %w: its host or volume is missing", mp.ID, catalog.ErrCorrupt)
			}
			out = append(out, api.HostMap{HostID: int(h.ID), HostName: h.Name, VolumeID: int(v.ID), VolumeName: v.Name, SCSI: int(mp.SCSI)})
		}
		return nil
	})
	slices.SortStableFunc(out, func(a, b api.HostMap) int {
		if a.HostID != b.HostID {
			return a.HostID - b.HostID
		}
		return a.SCSI - b.SCSI
	})
	return out, err
}
