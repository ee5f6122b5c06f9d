package main

// The system and topology commands of the SVC command line, truthful for one fcnbd host: one
// system, one node (online, in io_grp0), the five I/O groups SVC shows, one storage pool (the
// data directory's file system) and the licences fcnbd has (FlashCopy; no compression, no
// remote copy). Columns follow IBM Storage Virtualize's CLI reference, in its order.

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"

	"fcnbd/internal/api"
	"fcnbd/internal/fcerr"
	"fcnbd/mappings"
)

// codeLevel is what lssystem shows as code_level: SVC's version form, which automation parses
// (Cinder: ([0-9].){3}[0-9]), with fcnbd's build.
const codeLevel = "8.5.0.0 (build fcnbd-1)"

const (
	poolID   = 0
	poolName = "pool0"
	// extentSize is the pool's extent size in MB, as lsmdiskgrp shows it.
	extentSize = 1024
)

// systemView is what the system commands read: the daemon's system and its volumes.
type systemView struct {
	sys  api.System
	vols []api.Volume
}

func readSystemView(c *cli.Context) (systemView, error) {
	s, err := client(c).System(ctx(c))
	if err != nil {
		return systemView{}, err
	}
	vols, err := client(c).Volumes(ctx(c))
	return systemView{s, vols}, err
}

func (v systemView) virtual() int64 {
	var n int64
	for _, vol := range v.vols {
		n += vol.Capacity
	}
	return n
}

func (v systemView) used() int64 { return max(v.sys.Capacity-v.sys.Free, 0) }

func percent(n, of int64) string {
	if of <= 0 {
		return "0"
	}
	return strconv.FormatInt(n*100/of, 10)
}

// detailCommand is an ls command that shows one object in the detailed view and takes no
// argument (lssystem, lslicense, lsguicapabilities).
func detailCommand(name, usage string, build func(c *cli.Context, o viewOptions) (object, error)) *cli.Command {
	return &cli.Command{
		Name:      name,
		Usage:     usage,
		UsageText: "fcnbd " + name + " [-bytes] [-delim C] [-json]",
		Flags:     append([]cli.Flag{socketFlag()}, viewFlags()...),
		Action: func(c *cli.Context) error {
			if _, err := args(c, 0, 0, ""); err != nil {
				return err
			}
			o, err := viewOptionsFrom(c)
			if err != nil {
				return err
			}
			obj, err := build(c, o)
			if err != nil {
				return err
			}
			return renderDetail(c.App.Writer, obj, o)
		},
	}
}

func lssystemCommand() *cli.Command {
	return detailCommand("lssystem", "show the system: this fcnbd host", func(c *cli.Context, o viewOptions) (object, error) {
		v, err := readSystemView(c)
		if err != nil {
			return object{}, err
		}
		capf := func(n int64) string { return formatCapacity(n, o.bytes) }
		fields := []field{
			{"id", strings.ToUpper(v.sys.ID)}, {"name", v.sys.Name}, {"location", "local"}, {"partnership", ""},
			{"total_mdisk_capacity", capf(v.sys.Capacity)}, {"space_in_mdisk_grps", capf(v.sys.Capacity)},
			{"space_allocated_to_vdisks", capf(v.used())}, {"total_free_space", capf(v.sys.Free)},
			{"total_vdiskcopy_capacity", capf(v.virtual())}, {"total_used_capacity", capf(v.used())},
			{"total_overallocation", percent(v.virtual(), v.sys.Capacity)}, {"total_vdisk_capacity", capf(v.virtual())},
			{"total_allocated_extent_capacity", capf(v.used())},
			{"statistics_status", "off"}, {"statistics_frequency", "15"}, {"cluster_locale", "en_US"},
			{"time_zone", "UTC"}, {"code_level", codeLevel}, {"console_IP", ""}, {"id_alias", strings.ToUpper(v.sys.ID)},
			{"layer", "replication"}, {"topology", "standard"}, {"topology_status", ""},
			{"compression_active", "no"}, {"product_name", "fcnbd"}, {"data_dir", v.sys.DataDir},
		}
		return object{fields: fields, json: v.sys}, nil
	})
}

// nodeRow is the one node.
type nodeRow struct {
	ID         int    `json:"id"`
	Name       string `json:"name"`
	WWNN       string `json:"WWNN"`
	Status     string `json:"status"`
	IOGroupID  int    `json:"IO_group_id"`
	IOGroup    string `json:"IO_group_name"`
	ConfigNode string `json:"config_node"`
	ISCSIName  string `json:"iscsi_name"`
}

// nodes are the cluster's nodes in cluster mode, else this host as the one node.
func nodes(s api.System) []nodeRow {
	if s.Cluster == nil {
		return []nodeRow{theNode(s)}
	}
	var rows []nodeRow
	for i, n := range s.Cluster.Nodes {
		sum := sha256.Sum256([]byte(n.Name))
		status, config := "offline", "no"
		if n.Online {
			status = "online"
		}
		if n.Owner {
			config = "yes"
		}
		rows = append(rows, nodeRow{ID: i + 1, Name: n.Name, WWNN: "5005076800" + strings.ToUpper(hex.EncodeToString(sum[:3])),
			Status: status, IOGroupID: n.IOGroup, IOGroup: "io_grp" + strconv.Itoa(n.IOGroup), ConfigNode: config,
			ISCSIName: "iqn.1986-03.com.ibm:2145." + strings.ToLower(n.Name)})
	}
	return rows
}

func theNode(s api.System) nodeRow {
	name := strings.ToLower(s.Name)
	return nodeRow{ID: 1, Name: "node1", WWNN: "5005076800" + strings.ToUpper(s.ID[:6]), Status: "online",
		IOGroupID: 0, IOGroup: "io_grp0", ConfigNode: "yes", ISCSIName: "iqn.1986-03.com.ibm:2145." + name + ".node1"}
}

var nodeColumns = []string{"id", "name", "UPS_serial_number", "WWNN", "status", "IO_group_id", "IO_group_name",
	"config_node", "UPS_unique_id", "hardware", "iscsi_name", "iscsi_alias", "panel_name", "enclosure_id",
	"canister_id", "enclosure_serial_number", "site_id", "site_name"}

func nodeObject(n nodeRow, _ viewOptions) object {
	values := []string{strconv.Itoa(n.ID), n.Name, "", n.WWNN, n.Status, strconv.Itoa(n.IOGroupID), n.IOGroup,
		n.ConfigNode, "", "fcnbd", n.ISCSIName, "", n.Name, "", "", "", "", ""}
	return object{fields: zipFields(nodeColumns, values), json: n}
}

func lsnodeCommand() *cli.Command {
	return lsCommand(lsSpec[nodeRow]{
		name: "lsnode", usage: "list the nodes (one: this host), or show one in detail", arg: "NODE",
		flags: viewFlags(), columns: nodeColumns, fields: nodeColumns,
		one: func(c *cli.Context, ref string) (nodeRow, error) {
			s, err := client(c).System(ctx(c))
			if err != nil {
				return nodeRow{}, err
			}
			for _, n := range nodes(s) {
				if ref == strconv.Itoa(n.ID) || ref == n.Name {
					return n, nil
				}
			}
			return nodeRow{}, noSuch("node", ref)
		},
		all: func(c *cli.Context) ([]nodeRow, error) {
			s, err := client(c).System(ctx(c))
			if err != nil {
				return nil, err
			}
			return nodes(s), nil
		},
		object: nodeObject,
	})
}

// iogrpRow is one I/O group.
type iogrpRow struct {
	ID         int    `json:"id"`
	Name       string `json:"name"`
	NodeCount  int    `json:"node_count"`
	VdiskCount int    `json:"vdisk_count"`
	HostCount  int    `json:"host_count"`
	// fcnbd's own, after the product's fields in the detailed view: the node serving the group
	// and whether it is served (cluster mode: offline while no node owns it, and so its volumes
	// and FlashCopy mappings are offline).
	Owner  string `json:"owner_node"`
	Status string `json:"status"`
	// FCBitmaps is offline while the group's FlashCopy bitmaps can't be reached: no node
	// serves the group, or its journal failed and Suspended of its mappings are suspended
	// (docs/flashcopy.md §3 "Bitmap offline"). "" for a group that has no node.
	FCBitmaps string `json:"fc_bitmaps"`
	Suspended int    `json:"suspended_fcmap_count"`
}

var (
	iogrpColumns = []string{"id", "name", "node_count", "vdisk_count", "host_count", "site_id", "site_name"}
	iogrpFields  = append(slicesClone(iogrpColumns), "owner_node", "status", "fc_bitmaps", "suspended_fcmap_count")
)

func iogrps(c *cli.Context) ([]iogrpRow, error) {
	s, err := client(c).System(ctx(c))
	if err != nil {
		return nil, err
	}
	vols, err := client(c).Volumes(ctx(c))
	if err != nil {
		return nil, err
	}
	maps, err := client(c).Fcmaps(ctx(c))
	if err != nil {
		return nil, err
	}
	// A standby lists its group's volumes and mappings as the owner published them, and has no
	// hosts of its own: their count is the published one.
	standby := s.Cluster != nil && !s.Cluster.Serving
	var hosts []api.Host
	if !standby {
		if hosts, err = client(c).Hosts(ctx(c)); err != nil {
			return nil, err
		}
	}
	rows := []iogrpRow{{ID: 0, Name: "io_grp0"}, {ID: 1, Name: "io_grp1"}, {ID: 2, Name: "io_grp2"},
		{ID: 3, Name: "io_grp3"}, {ID: 4, Name: "recovery_io_grp"}}
	// This node's group, from its own mappings; the others as their owners published them.
	suspended := 0
	for _, m := range maps {
		if m.Status == string(mappings.Suspended) {
			suspended++
		}
	}
	bitmaps := func(r *iogrpRow) {
		switch {
		case r.Status == "":
		case r.Status == "offline" || r.Suspended > 0:
			r.FCBitmaps = "offline"
		default:
			r.FCBitmaps = "online"
		}
	}
	if s.Cluster == nil {
		// Every volume and host is io_grp0's: the single-node daemon is one I/O group.
		rows[0].NodeCount, rows[0].VdiskCount, rows[0].HostCount = 1, len(vols), len(hosts)
		rows[0].Owner, rows[0].Status, rows[0].Suspended = theNode(s).Name, "online", suspended
		bitmaps(&rows[0])
		return rows, nil
	}
	for _, n := range s.Cluster.Nodes {
		if n.IOGroup >= 0 && n.IOGroup < 4 {
			rows[n.IOGroup].NodeCount++
		}
	}
	for _, g := range s.Cluster.Groups {
		if g.ID >= 0 && g.ID < 4 {
			rows[g.ID].VdiskCount, rows[g.ID].Owner, rows[g.ID].Suspended, rows[g.ID].HostCount = g.Volumes, g.Owner, g.Suspended, g.Hosts
		}
	}
	for i := range rows[:4] {
		switch {
		case rows[i].NodeCount == 0:
		case rows[i].Owner == "":
			rows[i].Status = "offline"
		default:
			rows[i].Status = "online"
		}
	}
	// This node's own group, as it is now (hosts are defined per I/O group's catalogue).
	own := &rows[s.Cluster.IOGroup]
	own.VdiskCount, own.Suspended = len(vols), suspended
	if !standby {
		own.HostCount = len(hosts)
	}
	for i := range rows[:4] {
		bitmaps(&rows[i])
	}
	return rows, nil
}

func lsiogrpCommand() *cli.Command {
	return lsCommand(lsSpec[iogrpRow]{
		name: "lsiogrp", usage: "list the I/O groups, or show one in detail", arg: "IOGRP",
		flags: viewFlags(), columns: iogrpColumns, fields: iogrpFields,
		one: func(c *cli.Context, ref string) (iogrpRow, error) {
			gs, err := iogrps(c)
			if err != nil {
				return iogrpRow{}, err
			}
			for _, g := range gs {
				if ref == g.Name || ref == strconv.Itoa(g.ID) {
					return g, nil
				}
			}
			return iogrpRow{}, noSuch("I/O group", ref)
		},
		all: iogrps,
		object: func(g iogrpRow, _ viewOptions) object {
			return object{fields: zipFields(iogrpFields, []string{strconv.Itoa(g.ID), g.Name,
				strconv.Itoa(g.NodeCount), strconv.Itoa(g.VdiskCount), strconv.Itoa(g.HostCount), "", "", g.Owner, g.Status, g.FCBitmaps,
				strconv.Itoa(g.Suspended)}), json: g}
		},
	})
}

var (
	mdiskgrpColumns = []string{"id", "name", "status", "mdisk_count", "vdisk_count", "capacity", "extent_size",
		"free_capacity", "virtual_capacity", "used_capacity", "real_capacity", "overallocation", "warning",
		"easy_tier", "easy_tier_status", "compression_active", "compression_virtual_capacity",
		"compression_compressed_capacity", "compression_uncompressed_capacity", "parent_mdisk_grp_id",
		"parent_mdisk_grp_name", "child_mdisk_grp_count", "child_mdisk_grp_capacity", "type", "encrypt",
		"owner_type", "site_id", "site_name", "data_reduction"}
	mdiskgrpFields = append(slicesClone(mdiskgrpColumns), "data_dir")
)

func slicesClone(s []string) []string { return append([]string(nil), s...) }

func mdiskgrpObject(v systemView, o viewOptions) object {
	capf := func(n int64) string { return formatCapacity(n, o.bytes) }
	values := []string{strconv.Itoa(poolID), poolName, "online", "1", strconv.Itoa(len(v.vols)), capf(v.sys.Capacity),
		strconv.Itoa(extentSize), capf(v.sys.Free), capf(v.virtual()), capf(v.used()), capf(v.used()),
		percent(v.virtual(), v.sys.Capacity), "0", "off", "inactive", "no", capf(0), capf(0), capf(0),
		strconv.Itoa(poolID), poolName, "0", capf(0), "parent", "no", "none", "", "", "no", v.sys.DataDir}
	return object{fields: zipFields(mdiskgrpFields, values), json: v.sys}
}

func lsmdiskgrpCommand() *cli.Command {
	return lsCommand(lsSpec[systemView]{
		name: "lsmdiskgrp", usage: "list the storage pools (one: the data directory), or show one in detail",
		arg: "POOL", extra: "[-bytes] ", flags: viewFlags(), columns: mdiskgrpColumns, fields: mdiskgrpFields,
		one: func(c *cli.Context, ref string) (systemView, error) {
			if err := checkPool(ref); err != nil {
				return systemView{}, err
			}
			return readSystemView(c)
		},
		all: func(c *cli.Context) ([]systemView, error) {
			v, err := readSystemView(c)
			return []systemView{v}, err
		},
		object: mdiskgrpObject,
	})
}

// checkPool refuses a pool other than fcnbd's one.
func checkPool(ref string) error {
	if ref != poolName && ref != strconv.Itoa(poolID) {
		return noSuch("storage pool", ref)
	}
	return nil
}

func lslicenseCommand() *cli.Command {
	return detailCommand("lslicense", "show the licensed functions: FlashCopy only", func(c *cli.Context, o viewOptions) (object, error) {
		s, err := client(c).System(ctx(c))
		if err != nil {
			return object{}, err
		}
		tb := func(n int64) string { return fmt.Sprintf("%.2f", float64(n)/(1<<40)) }
		fields := []field{
			{"used_flash", "0.00"}, {"used_remote", "0.00"}, {"used_virtualization", tb(max(s.Capacity-s.Free, 0))},
			{"license_flash", tb(s.Capacity)}, {"license_remote", "0"}, {"license_virtualization", tb(s.Capacity)},
			{"license_physical_disks", "0"}, {"license_physical_flash", "on"}, {"license_physical_remote", "off"},
			{"used_compression_capacity", "0.00"}, {"license_compression_capacity", "0"},
			{"license_compression_enclosures", "0"},
		}
		return object{fields: fields, json: fieldMap(fields)}, nil
	})
}

func lsguicapabilitiesCommand() *cli.Command {
	return detailCommand("lsguicapabilities", "show the product's capabilities", func(c *cli.Context, o viewOptions) (object, error) {
		if _, err := client(c).System(ctx(c)); err != nil {
			return object{}, err
		}
		fields := []field{{"license_scheme", "fcnbd"}, {"product_key", "fcnbd"}}
		return object{fields: fields, json: fieldMap(fields)}, nil
	})
}

func fieldMap(fs []field) map[string]string {
	m := make(map[string]string, len(fs))
	for _, f := range fs {
		m[f.name] = f.value
	}
	return m
}

// noSuch is the refusal for an object that does not exist.
func noSuch(what, ref string) error {
	return fcerr.New(fcerr.NoSuchName, "the %s %q does not exist", what, ref)
}
