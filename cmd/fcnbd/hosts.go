package main

import (
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"

	"fcnbd/internal/api"
	"fcnbd/internal/fcerr"
)

// The host commands (issue 14), with IBM's names, flags and columns. A host's port names
// identify NBD clients: -nbdname (a TLS client certificate's CN or DNS name, ip:ADDRESS, or
// uid:N), -iscsiname and -fcwwpn (matched the same way). Lists: -nbdname and -iscsiname are
// comma-separated (their names may hold colons), -fcwwpn colon-separated, as IBM's.

func portFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "nbdname", Usage: "NBD client names, comma-separated: a TLS certificate CN or DNS name, ip:ADDRESS, uid:N"},
		&cli.StringFlag{Name: "iscsiname", Usage: "iSCSI names, comma-separated"},
		&cli.StringFlag{Name: "fcwwpn", Aliases: []string{"hbawwpn"}, Usage: "Fibre Channel WWPNs (16 hex digits), colon-separated"},
		&cli.BoolFlag{Name: "force", Usage: "accepted: fcnbd never checks that a port is logged in"},
	}
}

func splitList(s, sep string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(s, sep)
}

func hostPortsFrom(c *cli.Context) api.HostPorts {
	return api.HostPorts{
		NBDNames:   splitList(c.String("nbdname"), ","),
		ISCSINames: splitList(c.String("iscsiname"), ","),
		FCWWPNs:    splitList(c.String("fcwwpn"), ":"),
		Force:      c.Bool("force"),
	}
}

func mkhostCommand() *cli.Command {
	return &cli.Command{
		Name:      "mkhost",
		Usage:     "create a host: the NBD clients its port names identify see the volumes mapped to it",
		UsageText: "fcnbd mkhost [-name NAME] [-nbdname N[,N…]] [-iscsiname IQN[,IQN…]] [-fcwwpn W[:W…]] [-force] [-iogrp 0] [-type generic] [-protocol scsi]",
		Flags: append([]cli.Flag{
			socketFlag(),
			&cli.StringFlag{Name: "name", Usage: "the host's name (default host<id>)"},
			&cli.StringFlag{Name: "iogrp", Usage: "I/O groups, colon-separated (fcnbd has one: 0 or io_grp0)"},
			&cli.StringFlag{Name: "type", Usage: "generic, hpux, tpgs, openvms, adminlun or hide_secondary (shown only)"},
			&cli.StringFlag{Name: "protocol", Usage: "scsi (default), nvme, … (shown only)"},
		}, portFlags()...),
		Action: func(c *cli.Context) error {
			if _, err := args(c, 0, 0, ""); err != nil {
				return err
			}
			id, err := client(c).MkHost(ctx(c), api.MkHost{
				Name: c.String("name"), Type: c.String("type"), Protocol: c.String("protocol"),
				IOGrps: splitList(c.String("iogrp"), ":"), HostPorts: hostPortsFrom(c),
			})
			return created(c, "Host", id, err)
		},
	}
}

func chhostCommand() *cli.Command {
	return &cli.Command{
		Name:      "chhost",
		Usage:     "change a host's name or type",
		UsageText: "fcnbd chhost [-name NAME] [-type TYPE] HOST",
		Flags: []cli.Flag{
			socketFlag(),
			&cli.StringFlag{Name: "name", Usage: "the new name"},
			&cli.StringFlag{Name: "type", Usage: "the new type"},
		},
		Action: func(c *cli.Context) error {
			a, err := args(c, 1, 1, "the host (name or id)")
			if err != nil {
				return err
			}
			return client(c).ChHost(ctx(c), a[0], api.ChHost{Name: stringFlag(c, "name"), Type: stringFlag(c, "type")})
		},
	}
}

func rmhostCommand() *cli.Command {
	return &cli.Command{
		Name:      "rmhost",
		Usage:     "delete a host (its clients lose access; the last host's removal turns access control off)",
		UsageText: "fcnbd rmhost [-force] HOST",
		Flags: []cli.Flag{
			socketFlag(),
			&cli.BoolFlag{Name: "force", Usage: "also delete the host's mappings"},
		},
		Action: func(c *cli.Context) error {
			a, err := args(c, 1, 1, "the host (name or id)")
			if err != nil {
				return err
			}
			return client(c).RmHost(ctx(c), a[0], c.Bool("force"))
		},
	}
}

func addhostportCommand() *cli.Command {
	return &cli.Command{
		Name:      "addhostport",
		Usage:     "add port names to a host",
		UsageText: "fcnbd addhostport [-nbdname N[,N…]] [-iscsiname IQN[,IQN…]] [-fcwwpn W[:W…]] [-force] HOST",
		Flags:     append([]cli.Flag{socketFlag()}, portFlags()...),
		Action: func(c *cli.Context) error {
			a, err := args(c, 1, 1, "the host (name or id)")
			if err != nil {
				return err
			}
			return client(c).AddHostPorts(ctx(c), a[0], hostPortsFrom(c))
		},
	}
}

func rmhostportCommand() *cli.Command {
	flags := portFlags()
	flags[len(flags)-1] = &cli.BoolFlag{Name: "force", Usage: "remove port names of a host that has mappings"}
	return &cli.Command{
		Name:      "rmhostport",
		Usage:     "remove port names from a host (clients known by them lose access)",
		UsageText: "fcnbd rmhostport [-nbdname N[,N…]] [-iscsiname IQN[,IQN…]] [-fcwwpn W[:W…]] [-force] HOST",
		Flags:     append([]cli.Flag{socketFlag()}, flags...),
		Action: func(c *cli.Context) error {
			a, err := args(c, 1, 1, "the host (name or id)")
			if err != nil {
				return err
			}
			return client(c).RmHostPorts(ctx(c), a[0], hostPortsFrom(c))
		},
	}
}

var (
	hostColumns = []string{"id", "name", "port_count", "iogrp_count", "status", "site_id", "site_name",
		"host_cluster_id", "host_cluster_name", "protocol"}
	hostFields = []string{"id", "name", "port_count", "type", "mask", "iogrp_count", "status", "site_id", "site_name",
		"host_cluster_id", "host_cluster_name", "protocol"}
)

// hostObject shows h. fcnbd does not track port logins: a host's status is offline and its
// ports' node_logged_in_count 0, state offline. After the fields come the ports, as IBM's
// detailed view lists them (WWPN, iscsi_name, and fcnbd's nbd_name).
func hostObject(h api.Host) object {
	fields := zipFields(hostFields, []string{
		strconv.Itoa(h.ID), h.Name, strconv.Itoa(len(h.Ports)), h.Type, "1111111111111111111111111111111111111111111111111111111111111111",
		"1", "offline", "", "", "", "", h.Protocol,
	})
	for _, p := range h.Ports {
		key := map[string]string{"nbd": "nbd_name", "iscsi": "iscsi_name", "fc": "WWPN"}[p.Kind]
		fields = append(fields, field{key, p.Name}, field{"node_logged_in_count", "0"}, field{"state", "offline"})
	}
	return object{fields: fields, json: h}
}

func lshostCommand() *cli.Command {
	return lsCommand(lsSpec[api.Host]{
		name: "lshost", usage: "list hosts, or show one in detail with its port names", arg: "HOST",
		flags: fcViewFlags(), columns: hostColumns, fields: hostFields,
		one:    func(c *cli.Context, ref string) (api.Host, error) { return client(c).Host(ctx(c), ref) },
		all:    func(c *cli.Context) ([]api.Host, error) { return client(c).Hosts(ctx(c)) },
		object: func(h api.Host, _ viewOptions) object { return hostObject(h) },
	})
}

func mkvdiskhostmapCommand() *cli.Command {
	return &cli.Command{
		Name:      "mkvdiskhostmap",
		Usage:     "map a volume to a host: the host's NBD clients see its export",
		UsageText: "fcnbd mkvdiskhostmap -host HOST [-scsi N] [-force] VOLUME",
		Flags: []cli.Flag{
			socketFlag(),
			&cli.StringFlag{Name: "host", Usage: "the host (name or id)"},
			&cli.StringFlag{Name: "scsi", Usage: "the SCSI id (default: the host's lowest free one)"},
			&cli.BoolFlag{Name: "force", Usage: "map a volume already mapped to another host"},
		},
		Action: func(c *cli.Context) error {
			a, err := args(c, 1, 1, "the volume (name or id)")
			if err != nil {
				return err
			}
			if !c.IsSet("host") {
				return fcerr.New(fcerr.MissingParameter, "-host is missing")
			}
			req := api.MkHostMap{Host: c.String("host"), Volume: a[0], Force: c.Bool("force")}
			if c.IsSet("scsi") {
				n, err := strconv.Atoi(c.String("scsi"))
				if err != nil {
					return fcerr.New(fcerr.BadValue, "the -scsi value %q is not a number", c.String("scsi"))
				}
				req.SCSI = &n
			}
			scsi, err := client(c).MkHostMap(ctx(c), req)
			return created(c, "Virtual Disk to Host map", scsi, err)
		},
	}
}

func rmvdiskhostmapCommand() *cli.Command {
	return &cli.Command{
		Name:      "rmvdiskhostmap",
		Usage:     "unmap a volume from a host: the host's clients lose access to its export",
		UsageText: "fcnbd rmvdiskhostmap -host HOST VOLUME",
		Flags: []cli.Flag{
			socketFlag(),
			&cli.StringFlag{Name: "host", Usage: "the host (name or id)"},
		},
		Action: func(c *cli.Context) error {
			a, err := args(c, 1, 1, "the volume (name or id)")
			if err != nil {
				return err
			}
			if !c.IsSet("host") {
				return fcerr.New(fcerr.MissingParameter, "-host is missing")
			}
			return client(c).RmHostMap(ctx(c), c.String("host"), a[0])
		},
	}
}

// The host mapping lists: IBM's columns. fcnbd has one I/O group and no host clusters.
var (
	vdiskHostMapColumns = []string{"id", "name", "SCSI_id", "host_id", "host_name", "vdisk_UID",
		"IO_group_id", "IO_group_name", "mapping_type", "host_cluster_id", "host_cluster_name", "protocol"}
	hostVdiskMapColumns = []string{"id", "name", "SCSI_id", "vdisk_id", "vdisk_name", "vdisk_UID",
		"IO_group_id", "IO_group_name", "mapping_type", "host_cluster_id", "host_cluster_name", "protocol"}
)

func hostMapObject(m api.HostMap, sysID string, byVolume bool) object {
	id, name := strconv.Itoa(m.HostID), m.HostName
	if byVolume {
		id, name = strconv.Itoa(m.VolumeID), m.VolumeName
	}
	fields := []field{{"id", id}, {"name", name}, {"SCSI_id", strconv.Itoa(m.SCSI)}}
	if byVolume {
		fields = append(fields, field{"host_id", strconv.Itoa(m.HostID)}, field{"host_name", m.HostName})
	} else {
		fields = append(fields, field{"vdisk_id", strconv.Itoa(m.VolumeID)}, field{"vdisk_name", m.VolumeName})
	}
	fields = append(fields, field{"vdisk_UID", vdiskUID(sysID, uint64(m.VolumeID))}, field{"IO_group_id", "0"}, field{"IO_group_name", "io_grp0"},
		field{"mapping_type", "private"}, field{"host_cluster_id", ""}, field{"host_cluster_name", ""}, field{"protocol", "scsi"})
	return object{fields: fields, json: m}
}

func hostMapListCommand(name, usage, arg string, min int, byVolume bool) *cli.Command {
	columns := hostVdiskMapColumns
	if byVolume {
		columns = vdiskHostMapColumns
	}
	return tableCommand(tableSpec{
		name: name, usage: usage, arg: arg, what: arg, optional: min == 0, columns: columns,
		rows: func(c *cli.Context, ref string) ([]object, error) {
			host, vol := ref, ""
			if byVolume {
				host, vol = "", ref
			}
			maps, err := client(c).HostMaps(ctx(c), host, vol)
			if err != nil {
				return nil, err
			}
			s, err := client(c).System(ctx(c))
			if err != nil {
				return nil, err
			}
			return mapObjects(maps, func(m api.HostMap) object { return hostMapObject(m, s.ID, byVolume) }), nil
		},
	})
}

func lsvdiskhostmapCommand() *cli.Command {
	return hostMapListCommand("lsvdiskhostmap", "list the hosts a volume is mapped to", "VOLUME", 1, true)
}

func lshostvdiskmapCommand() *cli.Command {
	return hostMapListCommand("lshostvdiskmap", "list the volumes mapped to a host, or every mapping", "[HOST]", 0, false)
}
