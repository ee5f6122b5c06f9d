package catalog

import (
	"fmt"

	"fcnbd/internal/fcerr"
)

// Hosts and host mappings (issue 14): a host is a named set of port names that identify NBD
// clients; a host mapping gives one volume to one host under a SCSI id. Both are records of
// their own kinds, keyed by id like volumes. The rules that tie them to volumes live here, in
// the transactions that change volumes, so that a volume and its host mappings never disagree.

var (
	bucketHosts    = []byte("hosts")
	bucketHostMaps = []byte("hostmaps")
)

// Sequences of hosts and host mappings.
const (
	SeqHost    = "host"
	SeqHostMap = "hostmap"
)

// Port kinds of a host.
const (
	PortNBD   = "nbd"   // -nbdname: a TLS certificate name, ip:ADDRESS or uid:N
	PortISCSI = "iscsi" // -iscsiname: an iSCSI qualified name
	PortFC    = "fc"    // -fcwwpn/-hbawwpn: a Fibre Channel WWPN
)

// HostPort is one port name of a host.
type HostPort struct {
	Kind string `json:"kind"`
	Name string `json:"name"`
}

// Host is the stored record of one host.
type Host struct {
	ID       uint64     `json:"id"`
	Name     string     `json:"name"`
	Type     string     `json:"type"`
	Protocol string     `json:"protocol"`
	Ports    []HostPort `json:"ports"`
}

// HostMap is the stored record of one host mapping: volume Volume is given to host Host as
// SCSI id SCSI.
type HostMap struct {
	ID     uint64 `json:"id"`
	Host   uint64 `json:"host"`
	Volume uint64 `json:"volume"`
	SCSI   uint32 `json:"scsi"`
}

// Hosts returns every host, in id order.
func (t *Tx) Hosts() ([]Host, error) {
	return all(t.tx.Bucket(bucketHosts), func(h *Host) uint64 { return h.ID })
}

// Host returns the host with id, and whether it exists.
func (t *Tx) Host(id uint64) (Host, bool, error) {
	return get(t.tx.Bucket(bucketHosts), id, func(h *Host) uint64 { return h.ID })
}

// PutHost creates or replaces the record of h.ID.
func (t *Tx) PutHost(h Host) error { return put(t.change(bucketHosts), h.ID, h) }

// DeleteHost removes the record of id.
func (t *Tx) DeleteHost(id uint64) error { return t.change(bucketHosts).Delete(key(id)) }

// HostMaps returns every host mapping, in id order.
func (t *Tx) HostMaps() ([]HostMap, error) {
	return all(t.tx.Bucket(bucketHostMaps), func(m *HostMap) uint64 { return m.ID })
}

// PutHostMap creates or replaces the record of m.ID.
func (t *Tx) PutHostMap(m HostMap) error { return put(t.change(bucketHostMaps), m.ID, m) }

// DeleteHostMap removes the record of id.
func (t *Tx) DeleteHostMap(id uint64) error { return t.change(bucketHostMaps).Delete(key(id)) }

// VolumeHostMaps returns the host mappings of volume vol.
func (t *Tx) VolumeHostMaps(vol uint64) ([]HostMap, error) {
	maps, err := t.HostMaps()
	if err != nil {
		return nil, err
	}
	var out []HostMap
	for _, m := range maps {
		if m.Volume == vol {
			out = append(out, m)
		}
	}
	return out, nil
}

// CheckVolumeDelete is the host mapping rule of a volume deletion: a volume mapped to a host
// is not deleted (IBM's CMMVC5840E) unless force. It changes nothing.
func (t *Tx) CheckVolumeDelete(vol uint64, force bool) error {
	maps, err := t.VolumeHostMaps(vol)
	if err != nil {
		return err
	}
	if len(maps) > 0 && !force {
		return fcerr.New(fcerr.VolumeMapped, "the volume was not deleted because it is mapped to %d host(s); "+
			"remove the host mappings (rmvdiskhostmap) or use -force", len(maps))
	}
	return nil
}

// RemoveVolumeHostMaps applies CheckVolumeDelete and then deletes the volume's host mappings,
// in the transaction that deletes the volume.
func (t *Tx) RemoveVolumeHostMaps(vol uint64, force bool) error {
	if err := t.CheckVolumeDelete(vol, force); err != nil {
		return err
	}
	maps, err := t.VolumeHostMaps(vol)
	if err != nil {
		return err
	}
	for _, m := range maps {
		if err := t.DeleteHostMap(m.ID); err != nil {
			return err
		}
	}
	return nil
}

// checkHosts verifies the host and host mapping records: complete, unique names and port
// names, ids below their counters, mappings of existing hosts and volumes.
func checkHosts(t *Tx, path string) error {
	hosts, err := t.Hosts()
	if err != nil {
		return err
	}
	next, err := t.PeekID(SeqHost)
	if err != nil {
		return err
	}
	names, ports, ids := map[string]bool{}, map[string]bool{}, map[uint64]bool{}
	for _, h := range hosts {
		switch {
		case h.Name == "" || len(h.Ports) == 0:
			return fmt.Errorf("%s: %w: host %d is incomplete", path, ErrCorrupt, h.ID)
		case names[h.Name]:
			return fmt.Errorf("%s: %w: two hosts named %q", path, ErrCorrupt, h.Name)
		case h.ID >= next:
			return fmt.Errorf("%s: %w: host id %d not below the next id %d", path, ErrCorrupt, h.ID, next)
		}
		names[h.Name], ids[h.ID] = true, true
		for _, p := range h.Ports {
			if p.Name == "" || ports[p.Name] {
				return fmt.Errorf("%s: %w: host %d has an empty or duplicate port name %q", path, ErrCorrupt, h.ID, p.Name)
			}
			ports[p.Name] = true
		}
	}
	maps, err := t.HostMaps()
	if err != nil {
		return err
	}
	next, err = t.PeekID(SeqHostMap)
	if err != nil {
		return err
	}
	type pair struct{ a, b uint64 }
	seen, luns := map[pair]bool{}, map[pair]bool{}
	for _, m := range maps {
		_, volOK, err := t.Volume(m.Volume)
		if err != nil {
			return err
		}
		switch {
		case !ids[m.Host] || !volOK:
			return fmt.Errorf("%s: %w: host mapping %d of a missing host or volume", path, ErrCorrupt, m.ID)
		case m.ID >= next:
			return fmt.Errorf("%s: %w: host mapping id %d not below the next id %d", path, ErrCorrupt, m.ID, next)
		case seen[pair{m.Host, m.Volume}] || luns[pair{m.Host, uint64(m.SCSI)}]:
			return fmt.Errorf("%s: %w: host mapping %d duplicates another", path, ErrCorrupt, m.ID)
		}
		seen[pair{m.Host, m.Volume}], luns[pair{m.Host, uint64(m.SCSI)}] = true, true
	}
	return nil
}
