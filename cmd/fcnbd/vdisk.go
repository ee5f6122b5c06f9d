package main

// The volume commands of the SVC command line with SVC's names, flags and columns: mkvdisk,
// lsvdisk, rmvdisk, lsvdiskfcmappings, lsfcmapcandidate. fcnbd's own mkvolume, lsvolume and
// rmvolume stay as they are. Every volume lives in the one pool (the data directory) and the
// one I/O group, and is thin (the sparse store allocates on write).

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"

	"fcnbd/internal/api"
	"fcnbd/internal/fcerr"
)

// unitShift is the -unit values of mkvdisk and expandvdisksize (binary, as SVC's are).
var unitShift = map[string]uint{"b": 0, "kb": 10, "mb": 20, "gb": 30, "tb": 40, "pb": 50}

// sizeInUnit reads -size N -unit U (default mb, as SVC's) into bytes.
func sizeInUnit(size, unit string) (int64, error) {
	if unit == "" {
		unit = "mb"
	}
	shift, ok := unitShift[strings.ToLower(unit)]
	if !ok {
		return 0, fcerr.New(fcerr.BadValue, "the -unit value %q is not valid: use b, kb, mb, gb, tb or pb", unit)
	}
	n, err := strconv.ParseInt(size, 10, 64)
	if err != nil || n <= 0 || n > math.MaxInt64>>shift {
		return 0, fcerr.New(fcerr.BadValue, "the -size value %q is not valid: use a positive whole number of -unit", size)
	}
	return n << shift, nil
}

// checkIOGrp refuses an I/O group other than this daemon's: io_grp0 for the single-node
// daemon; in cluster mode, the group of the node the command runs on. Another group's objects
// are made on its own owner (fcnbd does not forward commands between groups).
func checkIOGrp(c *cli.Context, ref string) error {
	s, err := client(c).System(ctx(c))
	if err != nil {
		return err
	}
	own := ioGroupOf(s)
	if ref == strconv.Itoa(own) || ref == "io_grp"+strconv.Itoa(own) {
		return nil
	}
	if s.Cluster != nil {
		for _, g := range s.Cluster.Groups {
			if ref == strconv.Itoa(g.ID) || ref == "io_grp"+strconv.Itoa(g.ID) {
				owner := g.Owner
				if owner == "" {
					owner = "no node (offline)"
				}
				return fcerr.New(fcerr.OtherIOGroup, "the I/O group %q is served by %s, not by this node (io_grp%d): run the command on its owner", ref, owner, own)
			}
		}
	}
	return fcerr.New(fcerr.NoSuchName, "the I/O group %q does not exist or has no nodes; this node serves io_grp%d", ref, own)
}

// inOtherIOGroup explains err, a refusal naming one of refs as unknown, when another I/O group
// has a volume of that name (as its owner last published them): fcnbd maps volumes of one I/O
// group only. Otherwise it returns err as it was.
func inOtherIOGroup(c *cli.Context, err error, refs ...string) error {
	s, serr := client(c).System(ctx(c))
	if serr != nil || s.Cluster == nil {
		return err
	}
	for _, ref := range refs {
		if _, verr := client(c).Volume(ctx(c), ref); verr == nil {
			continue
		}
		for _, g := range s.Cluster.Groups {
			if g.ID == s.Cluster.IOGroup || !slices.Contains(g.VolumeNames, ref) {
				continue
			}
			owner := g.Owner
			if owner == "" {
				owner = "no node (offline)"
			}
			return fcerr.New(fcerr.OtherIOGroup, "the volume %q is in io_grp%d, served by %s, not in this node's io_grp%d: a FlashCopy mapping joins volumes of one I/O group (fcnbd does not map across I/O groups)", ref, g.ID, owner, s.Cluster.IOGroup)
		}
	}
	return err
}

// ioGroupOf is the I/O group the daemon serves.
func ioGroupOf(s api.System) int {
	if s.Cluster != nil {
		return s.Cluster.IOGroup
	}
	return 0
}

func percentFlag(c *cli.Context, name string) error {
	v := c.String(name)
	n, err := strconv.Atoi(strings.TrimSuffix(v, "%"))
	if strings.HasSuffix(v, "%") && err == nil && n >= 0 && n <= 100 {
		return nil
	}
	if _, err := parseSize(v); err == nil && !strings.HasSuffix(v, "%") {
		return nil
	}
	return fcerr.New(fcerr.BadValue, "the -%s value %q is not valid: use a percentage (2%%) or a size", name, v)
}

func mkvdiskCommand() *cli.Command {
	return &cli.Command{
		Name:  "mkvdisk",
		Usage: "create a volume (SVC's form)",
		UsageText: "fcnbd mkvdisk -name NAME -mdiskgrp POOL -iogrp 0 -size N [-unit b|kb|mb|gb|tb|pb]\n" +
			"       [-rsize P% [-autoexpand] [-warning P%] [-grainsize 32|64|128|256]] [-easytier on|off] [-nofmtdisk]",
		Flags: []cli.Flag{
			socketFlag(),
			&cli.StringFlag{Name: "name", Usage: "the volume's name"},
			&cli.StringFlag{Name: "mdiskgrp", Usage: "the storage pool: " + poolName + " (the data directory)"},
			&cli.StringFlag{Name: "iogrp", Usage: "the I/O group: 0 (io_grp0)"},
			&cli.StringFlag{Name: "size", Usage: "the capacity, in -unit"},
			&cli.StringFlag{Name: "unit", Usage: "the unit of -size: b, kb, mb (default), gb, tb, pb"},
			&cli.StringFlag{Name: "rsize", Usage: "thin provisioning's real size: accepted, every fcnbd volume is thin"},
			&cli.BoolFlag{Name: "autoexpand", Usage: "accepted: fcnbd volumes allocate on write"},
			&cli.StringFlag{Name: "warning", Usage: "accepted with -rsize: fcnbd raises no capacity warnings"},
			&cli.StringFlag{Name: "grainsize", Usage: "thin provisioning grain in KiB, 32, 64, 128 or 256: accepted, the store allocates by file system block"},
			&cli.StringFlag{Name: "easytier", Usage: "on or off: accepted, fcnbd has one tier"},
			&cli.BoolFlag{Name: "nofmtdisk", Usage: "accepted: a new fcnbd volume reads as zeros without formatting"},
			&cli.BoolFlag{Name: "compressed", Usage: "refused: fcnbd does not compress"},
			&cli.StringFlag{Name: "copies", Usage: "refused unless 1: fcnbd has no volume mirroring"},
		},
		Action: func(c *cli.Context) error {
			if _, err := args(c, 0, 0, ""); err != nil {
				return err
			}
			for _, f := range []string{"mdiskgrp", "size"} {
				if !c.IsSet(f) {
					return fcerr.New(fcerr.MissingParameter, "-%s is missing", f)
				}
			}
			if err := checkPool(c.String("mdiskgrp")); err != nil {
				return err
			}
			if c.IsSet("iogrp") {
				if err := checkIOGrp(c, c.String("iogrp")); err != nil {
					return err
				}
			}
			size, err := sizeInUnit(c.String("size"), c.String("unit"))
			if err != nil {
				return err
			}
			if !c.IsSet("rsize") {
				for _, f := range []string{"autoexpand", "warning", "grainsize", "compressed"} {
					if c.IsSet(f) {
						return fcerr.New(fcerr.MissingParameter, "-%s needs -rsize", f)
					}
				}
			} else if err := percentFlag(c, "rsize"); err != nil {
				return err
			}
			if c.IsSet("warning") {
				if err := percentFlag(c, "warning"); err != nil {
					return err
				}
			}
			if c.IsSet("grainsize") {
				switch c.String("grainsize") {
				case "32", "64", "128", "256":
				default:
					return fcerr.New(fcerr.BadValue, "the -grainsize value %q is not valid: use 32, 64, 128 or 256", c.String("grainsize"))
				}
			}
			if c.IsSet("easytier") && c.String("easytier") != "on" && c.String("easytier") != "off" {
				return fcerr.New(fcerr.BadValue, "the -easytier value %q is not valid: use on or off", c.String("easytier"))
			}
			if c.Bool("compressed") {
				return fcerr.New(fcerr.Unsupported, "fcnbd does not compress volumes: -compressed can't be honoured")
			}
			if c.IsSet("copies") && c.String("copies") != "1" {
				return fcerr.New(fcerr.Unsupported, "fcnbd has no volume mirroring: -copies %s can't be honoured", c.String("copies"))
			}
			name := c.String("name")
			if name == "" {
				return fcerr.New(fcerr.MissingParameter, "-name is missing: fcnbd volumes are named")
			}
			v, err := client(c).CreateVolume(ctx(c), name, size)
			return created(c, "Virtual Disk", v.ID, err)
		},
	}
}

func rmvdiskCommand() *cli.Command {
	return removeVolumeCommand("rmvdisk", "delete a volume (SVC's form)")
}

// byName gives a missing object named (not numbered) SVC's code for that, CMMVC5754E, which
// automation takes as "no such volume" (Cinder's lsvdisk does).
func byName(ref string, err error) error {
	var fe *fcerr.Error
	if _, nerr := strconv.ParseUint(ref, 10, 64); nerr != nil && errors.As(err, &fe) && fe.Code == fcerr.NoSuchObject {
		return fcerr.New(fcerr.NoSuchName, "%s", fe.Message)
	}
	return err
}

// vdiskRow is a volume with what lsvdisk derives for it.
type vdiskRow struct {
	api.Volume
	UID     string      `json:"vdisk_UID"`
	IOGroup int         `json:"IO_group_id"`
	Fcmaps  []api.Fcmap `json:"-"`
}

var (
	vdiskColumns = []string{"id", "name", "IO_group_id", "IO_group_name", "status", "mdisk_grp_id", "mdisk_grp_name",
		"capacity", "type", "FC_id", "FC_name", "RC_id", "RC_name", "vdisk_UID", "fc_map_count", "copy_count",
		"fast_write_state", "se_copy_count", "RC_change", "compressed_copy_count", "parent_mdisk_grp_id",
		"parent_mdisk_grp_name", "formatting", "encrypt", "volume_id", "volume_name", "function"}
	// vdiskFields are the detailed view's: the product's volume lines, its one copy's lines that
	// do not repeat a volume line, then fcnbd's.
	vdiskFields = []string{"id", "name", "IO_group_id", "IO_group_name", "status", "mdisk_grp_id", "mdisk_grp_name",
		"capacity", "type", "formatted", "formatting", "mdisk_id", "mdisk_name", "FC_id", "FC_name", "RC_id",
		"RC_name", "vdisk_UID", "preferred_node_id", "fast_write_state", "cache", "udid", "fc_map_count",
		"sync_rate", "copy_count", "se_copy_count", "filesystem", "mirror_write_priority", "RC_change",
		"compressed_copy_count", "access_IO_group_count", "last_access_time", "parent_mdisk_grp_id",
		"parent_mdisk_grp_name", "owner_type", "owner_id", "owner_name", "encrypt", "volume_id", "volume_name",
		"function", "copy_id", "sync", "auto_delete", "primary", "used_capacity", "real_capacity", "free_capacity",
		"overallocation", "autoexpand", "warning", "grainsize", "se_copy", "easy_tier", "easy_tier_status",
		"compressed_copy", "uncompressed_used_capacity", "created_time"}
)

func vdiskObject(r vdiskRow, o viewOptions) object {
	fcID, fcName := "", ""
	switch len(r.Fcmaps) {
	case 0:
	case 1:
		fcID, fcName = strconv.Itoa(r.Fcmaps[0].ID), r.Fcmaps[0].Name
	default:
		fcID, fcName = "many", "many"
	}
	id := strconv.FormatUint(r.ID, 10)
	capf := func(n int64) string { return formatCapacity(n, o.bytes) }
	v := map[string]string{
		"id": id, "name": r.Name, "IO_group_id": strconv.Itoa(r.IOGroup), "IO_group_name": "io_grp" + strconv.Itoa(r.IOGroup), "status": r.Status,
		"mdisk_grp_id": strconv.Itoa(poolID), "mdisk_grp_name": poolName, "capacity": capf(r.Capacity),
		"type": "striped", "formatted": "yes", "formatting": "no", "FC_id": fcID, "FC_name": fcName,
		"vdisk_UID": r.UID, "preferred_node_id": "1", "fast_write_state": "empty", "cache": "readwrite",
		"udid": "", "fc_map_count": strconv.Itoa(r.FCMapCount), "sync_rate": "50", "copy_count": "1",
		"se_copy_count": "1", "mirror_write_priority": "latency", "RC_change": "no", "compressed_copy_count": "0",
		"access_IO_group_count": "1", "parent_mdisk_grp_id": strconv.Itoa(poolID), "parent_mdisk_grp_name": poolName,
		"owner_type": "none", "encrypt": "no", "volume_id": id, "volume_name": r.Name,
		"copy_id": "0", "sync": "yes", "auto_delete": "no", "primary": "yes",
		"used_capacity": capf(0), "real_capacity": capf(r.Capacity), "free_capacity": capf(r.Capacity),
		"overallocation": "100", "autoexpand": "on", "warning": "0", "grainsize": "256", "se_copy": "yes",
		"easy_tier": "off", "easy_tier_status": "inactive", "compressed_copy": "no",
		"uncompressed_used_capacity": capf(0), "created_time": ibmTime(r.Created),
	}
	fields := make([]field, len(vdiskFields))
	for i, name := range vdiskFields {
		fields[i] = field{name, v[name]}
	}
	return object{fields: fields, json: r}
}

// vdiskUID is the volume's SCSI identity as SVC shows it: 32 hex digits, IBM's prefix, the
// system's id and the volume's.
func vdiskUID(sysID string, id uint64) string {
	return fmt.Sprintf("6005076%s%09X", strings.ToUpper(sysID), id)
}

func vdiskRows(c *cli.Context, vols []api.Volume) ([]vdiskRow, error) {
	s, err := client(c).System(ctx(c))
	if err != nil {
		return nil, err
	}
	ms, err := client(c).Fcmaps(ctx(c))
	if err != nil {
		return nil, err
	}
	rows := make([]vdiskRow, len(vols))
	for i, v := range vols {
		rows[i] = vdiskRow{Volume: v, UID: vdiskUID(s.ID, v.ID), IOGroup: ioGroupOf(s)}
		for _, m := range ms {
			if uint64(m.SourceID) == v.ID || uint64(m.TargetID) == v.ID {
				rows[i].Fcmaps = append(rows[i].Fcmaps, m)
			}
		}
	}
	return rows, nil
}

func lsvdiskCommand() *cli.Command {
	return lsCommand(lsSpec[vdiskRow]{
		name: "lsvdisk", usage: "list volumes with SVC's columns, or show one in detail", arg: "VDISK", extra: "[-bytes] ",
		flags: viewFlags(), columns: vdiskColumns, fields: vdiskFields,
		one: func(c *cli.Context, ref string) (vdiskRow, error) {
			v, err := client(c).Volume(ctx(c), ref)
			if err != nil {
				return vdiskRow{}, byName(ref, err)
			}
			rows, err := vdiskRows(c, []api.Volume{v})
			if err != nil {
				return vdiskRow{}, err
			}
			return rows[0], nil
		},
		all: func(c *cli.Context) ([]vdiskRow, error) {
			vols, err := client(c).Volumes(ctx(c))
			if err != nil {
				return nil, err
			}
			return vdiskRows(c, vols)
		},
		object: vdiskObject,
	})
}

// lsvdiskfcmappingsCommand lists the mappings a volume is the source or target of, in SVC's
// columns id and name (which Cinder's driver reads).
func lsvdiskfcmappingsCommand() *cli.Command {
	cols := []string{"id", "name"}
	return tableCommand(tableSpec{
		name: "lsvdiskfcmappings", usage: "list the FlashCopy mappings a volume is the source or target of",
		arg: "VDISK", what: "the volume (name or id)", columns: cols,
		rows: func(c *cli.Context, ref string) ([]object, error) {
			v, err := client(c).Volume(ctx(c), ref)
			if err != nil {
				return nil, err
			}
			rows, err := vdiskRows(c, []api.Volume{v})
			if err != nil {
				return nil, err
			}
			return mapObjects(rows[0].Fcmaps, func(m api.Fcmap) object {
				return object{fields: zipFields(cols, []string{strconv.Itoa(m.ID), m.Name}), json: fcmapRef{m.ID, m.Name}}
			}), nil
		},
	})
}

// lsfcmapcandidateCommand lists the volumes that can still be in another mapping.
func lsfcmapcandidateCommand() *cli.Command {
	return tableCommand(tableSpec{
		name: "lsfcmapcandidate", usage: "list the volumes that can be the source or target of another FlashCopy mapping",
		columns: []string{"id"},
		rows: func(c *cli.Context, _ string) ([]object, error) {
			vols, err := client(c).Volumes(ctx(c))
			var objs []object
			for _, v := range vols {
				if v.FCMapCount < maxMapsPerVolume {
					id := strconv.FormatUint(v.ID, 10)
					objs = append(objs, object{fields: []field{{"id", id}}, json: map[string]uint64{"id": v.ID}})
				}
			}
			return objs, err
		},
	})
}

// maxMapsPerVolume is SVC's limit of mappings per source volume.
const maxMapsPerVolume = 256

func chvdiskCommand() *cli.Command {
	return &cli.Command{
		Name:      "chvdisk",
		Usage:     "rename a volume (new NBD connections use the new name; open ones keep going)",
		UsageText: "fcnbd chvdisk -name NEW_NAME VDISK",
		Flags: []cli.Flag{
			socketFlag(),
			&cli.StringFlag{Name: "name", Usage: "the new name"},
		},
		Action: func(c *cli.Context) error {
			a, err := args(c, 1, 1, "the volume (name or id)")
			if err != nil {
				return err
			}
			if !c.IsSet("name") {
				return fcerr.New(fcerr.MissingParameter, "nothing to change: give -name")
			}
			name := c.String("name")
			return byName(a[0], client(c).ChVolume(ctx(c), a[0], api.ChVolume{Name: &name}))
		},
	}
}

// expandvdisksizeCommand grows a volume by -size (SVC's form: the amount to add, default unit
// mb). -rsize, SVC's expansion of a thin volume's real capacity, is accepted and changes
// nothing: every fcnbd volume is sparse. It prints nothing on success, as SVC.
func expandvdisksizeCommand() *cli.Command {
	return &cli.Command{
		Name:  "expandvdisksize",
		Usage: "grow a volume by -size (new NBD connections see the new size; open ones keep theirs)",
		UsageText: "fcnbd expandvdisksize -size N [-unit b|kb|mb|gb|tb|pb] VDISK\n" +
			"       fcnbd expandvdisksize -rsize N [-unit U] [-copy 0] VDISK (accepted, no change: fcnbd volumes are sparse)",
		Flags: []cli.Flag{
			socketFlag(),
			&cli.StringFlag{Name: "size", Usage: "how much to add to the capacity, in -unit"},
			&cli.StringFlag{Name: "rsize", Usage: "how much to add to a thin volume's real capacity: accepted, no change (every fcnbd volume is sparse)"},
			&cli.StringFlag{Name: "unit", Usage: "the unit of -size or -rsize: b, kb, mb (default), gb, tb, pb"},
			&cli.StringFlag{Name: "copy", Usage: "the volume copy for -rsize: 0 (fcnbd volumes have one copy)"},
		},
		Action: func(c *cli.Context) error {
			a, err := args(c, 1, 1, "the volume (name or id)")
			if err != nil {
				return err
			}
			switch {
			case c.IsSet("size") && c.IsSet("rsize"):
				return fcerr.New(fcerr.ExclusiveFlags, "-size and -rsize are mutually exclusive")
			case !c.IsSet("size") && !c.IsSet("rsize"):
				return fcerr.New(fcerr.MissingParameter, "-size or -rsize is missing")
			case c.IsSet("copy") && !c.IsSet("rsize"):
				return fcerr.New(fcerr.MissingParameter, "-copy needs -rsize")
			case c.IsSet("copy") && c.String("copy") != "0":
				return fcerr.New(fcerr.BadValue, "the -copy value %q is not valid: fcnbd volumes have one copy, 0", c.String("copy"))
			}
			if c.IsSet("rsize") {
				if _, err := sizeInUnit(c.String("rsize"), c.String("unit")); err != nil {
					return err
				}
				_, err := client(c).Volume(ctx(c), a[0])
				return byName(a[0], err)
			}
			add, err := sizeInUnit(c.String("size"), c.String("unit"))
			if err != nil {
				return err
			}
			_, err = client(c).ExpandVolume(ctx(c), a[0], add)
			return byName(a[0], err)
		},
	}
}

// volumeRef turns a volume's vdisk_UID (as lsvdisk shows it) into its id, so commands that
// take SVC's "id, name or UID" accept it; any other ref is returned as it is.
func volumeRef(c *cli.Context, ref string) (string, error) {
	if len(ref) != 32 || !strings.HasPrefix(ref, "6005076") {
		return ref, nil
	}
	if !isHex(ref) {
		return ref, nil
	}
	s, err := client(c).System(ctx(c))
	if err != nil {
		return "", err
	}
	prefix := "6005076" + strings.ToUpper(s.ID)
	if !strings.EqualFold(ref[:len(prefix)], prefix) {
		return "", fcerr.New(fcerr.NoSuchName, "no volume has the UID %s", ref)
	}
	id, err := strconv.ParseUint(ref[len(prefix):], 16, 64)
	if err != nil {
		return "", fcerr.New(fcerr.NoSuchName, "no volume has the UID %s", ref)
	}
	return strconv.FormatUint(id, 10), nil
}

func isHex(s string) bool {
	for _, c := range s {
		if !strings.ContainsRune("0123456789abcdefABCDEF", c) {
			return false
		}
	}
	return true
}
