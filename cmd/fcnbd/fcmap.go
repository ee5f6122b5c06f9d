package main

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/urfave/cli/v2"

	"fcnbd/internal/api"
	"fcnbd/internal/fcerr"
)

// The FlashCopy mapping commands, with IBM's names and flags (docs/flashcopy.md §3). Values are
// checked for form here; ranges and states are the daemon's to refuse.

func mkfcmapCommand() *cli.Command {
	return &cli.Command{
		Name:  "mkfcmap",
		Usage: "create a FlashCopy mapping from a source volume to a target volume of the same size",
		UsageText: "fcnbd mkfcmap -source VOLUME -target VOLUME [-name NAME] [-consistgrp GROUP] [-copyrate 0-150]\n" +
			"       [-cleanrate 0-150] [-grainsize 64|256] [-autodelete] [-incremental] [-iogrp 0]",
		Flags: []cli.Flag{
			socketFlag(),
			&cli.StringFlag{Name: "source", Usage: "the source volume (name or id)"},
			&cli.StringFlag{Name: "target", Usage: "the target volume (name or id)"},
			&cli.StringFlag{Name: "name", Usage: "the mapping's name (default fcmap<id>)"},
			&cli.StringFlag{Name: "consistgrp", Usage: "the consistency group to put the mapping in"},
			&cli.StringFlag{Name: "copyrate", Usage: "background copy rate, 0 (none) to 150 (default 50)"},
			&cli.StringFlag{Name: "cleanrate", Usage: "cleaning rate, 0 to 150 (default 50)"},
			&cli.StringFlag{Name: "grainsize", Usage: "grain size in KiB, 64 or 256 (default: that of the mappings linked to either volume, else 256)"},
			&cli.BoolFlag{Name: "autodelete", Usage: "delete the mapping when its copy completes"},
			&cli.BoolFlag{Name: "incremental", Usage: "keep a difference bitmap so a restart copies only what changed"},
			&cli.StringFlag{Name: "iogrp", Usage: "the I/O group of the mapping's bitmaps: 0 (io_grp0), the only one"},
			&cli.BoolFlag{Name: "keeptarget", Usage: "refused: fcnbd has no system-owned (volume group snapshot) mappings"},
		},
		Action: func(c *cli.Context) error {
			if _, err := args(c, 0, 0, ""); err != nil {
				return err
			}
			for _, f := range []string{"source", "target"} {
				if c.String(f) == "" {
					return fcerr.New(fcerr.MissingParameter, "-%s is missing", f)
				}
			}
			if c.IsSet("iogrp") {
				if err := checkIOGrp(c, c.String("iogrp")); err != nil {
					return err
				}
			}
			if c.Bool("keeptarget") {
				return fcerr.New(fcerr.Unsupported, "-keeptarget can't be honoured: fcnbd has no system-owned mappings")
			}
			src, err := volumeRef(c, c.String("source"))
			if err != nil {
				return err
			}
			tgt, err := volumeRef(c, c.String("target"))
			if err != nil {
				return err
			}
			req := api.MkFcmap{
				Source:      src,
				Target:      tgt,
				Name:        c.String("name"),
				ConsistGrp:  c.String("consistgrp"),
				Autodelete:  c.Bool("autodelete"),
				Incremental: c.Bool("incremental"),
			}
			if req.CopyRate, err = intFlag(c, "copyrate"); err != nil {
				return err
			}
			if req.CleanRate, err = intFlag(c, "cleanrate"); err != nil {
				return err
			}
			if req.GrainSize, err = intFlag(c, "grainsize"); err != nil {
				return err
			}
			id, err := client(c).MkFcmap(ctx(c), req)
			if code := fcerr.CodeOf(err); code == fcerr.NoSuchName || code == fcerr.NoSuchObject {
				err = inOtherIOGroup(c, err, src, tgt)
			}
			return created(c, "FlashCopy Mapping", id, err)
		},
	}
}

func chfcmapCommand() *cli.Command {
	return &cli.Command{
		Name:      "chfcmap",
		Usage:     "change a FlashCopy mapping's name, rates, autodelete or group",
		UsageText: "fcnbd chfcmap -name NAME MAPPING\n   fcnbd chfcmap [-copyrate 0-150] [-cleanrate 0-150] [-autodelete on|off] [-consistgrp GROUP|0] MAPPING",
		Flags: []cli.Flag{
			socketFlag(),
			&cli.StringFlag{Name: "name", Usage: "the new name"},
			&cli.StringFlag{Name: "copyrate", Usage: "background copy rate, 0 to 150"},
			&cli.StringFlag{Name: "cleanrate", Usage: "cleaning rate, 0 to 150"},
			&cli.StringFlag{Name: "autodelete", Usage: "on or off: delete the mapping when its copy completes"},
			&cli.StringFlag{Name: "consistgrp", Usage: "move the mapping to this group; 0 makes it stand-alone"},
		},
		Action: func(c *cli.Context) error {
			a, err := args(c, 1, 1, "the mapping (name or id)")
			if err != nil {
				return err
			}
			if c.IsSet("name") {
				for _, f := range []string{"copyrate", "cleanrate", "autodelete", "consistgrp"} {
					if c.IsSet(f) {
						return fcerr.New(fcerr.ExclusiveFlags, "-name can't be used with -%s", f)
					}
				}
			}
			var req api.ChFcmap
			req.Name = stringFlag(c, "name")
			req.ConsistGrp = stringFlag(c, "consistgrp")
			if req.CopyRate, err = intFlag(c, "copyrate"); err != nil {
				return err
			}
			if req.CleanRate, err = intFlag(c, "cleanrate"); err != nil {
				return err
			}
			if req.Autodelete, err = onOffFlag(c, "autodelete"); err != nil {
				return err
			}
			if req == (api.ChFcmap{}) {
				return fcerr.New(fcerr.MissingParameter, "nothing to change: give -name, -copyrate, -cleanrate, -autodelete or -consistgrp")
			}
			return client(c).ChFcmap(ctx(c), a[0], req)
		},
	}
}

var (
	// fcmapColumns are lsfcmap's concise view, the product's columns in its order.
	fcmapColumns = []string{"id", "name", "source_vdisk_id", "source_vdisk_name", "target_vdisk_id",
		"target_vdisk_name", "group_id", "group_name", "status", "progress", "copy_rate", "clean_progress",
		"incremental", "partner_FC_id", "partner_FC_name", "restoring", "start_time", "rc_controlled"}
	// fcmapFields are every attribute, the detailed view's lines: the product's in its order,
	// then fcnbd's own.
	fcmapFields = []string{"id", "name", "source_vdisk_id", "source_vdisk_name", "target_vdisk_id",
		"target_vdisk_name", "group_id", "group_name", "status", "progress", "copy_rate", "start_time",
		"dependent_mappings", "autodelete", "clean_progress", "clean_rate", "incremental", "difference",
		"grain_size", "IO_group_id", "IO_group_name", "partner_FC_id", "partner_FC_name", "restoring",
		"rc_controlled", "keep_target", "type", "restore_progress", "fc_controlled", "owner_id", "owner_name",
		"grains_copied", "split_on_write", "bytes_copied", "copy_throughput", "status_reason"}
)

func fcmapObject(m api.Fcmap) object {
	groupID, partnerID := "", ""
	if m.GroupID != 0 {
		groupID = strconv.Itoa(m.GroupID)
	}
	if m.PartnerID != -1 {
		partnerID = strconv.Itoa(m.PartnerID)
	}
	v := map[string]string{
		"id": strconv.Itoa(m.ID), "name": m.Name,
		"source_vdisk_id": strconv.Itoa(m.SourceID), "source_vdisk_name": m.SourceName,
		"target_vdisk_id": strconv.Itoa(m.TargetID), "target_vdisk_name": m.TargetName,
		"group_id": groupID, "group_name": m.GroupName,
		"status": m.Status, "progress": strconv.Itoa(m.Progress), "copy_rate": strconv.Itoa(m.CopyRate),
		"start_time": ibmTime(m.StartTime), "dependent_mappings": strconv.Itoa(m.DependentMappings),
		"autodelete": onOff(m.Autodelete), "clean_progress": strconv.Itoa(m.CleanProgress),
		"clean_rate": strconv.Itoa(m.CleanRate), "incremental": onOff(m.Incremental),
		"difference": strconv.Itoa(m.Difference), "grain_size": strconv.Itoa(m.GrainSize),
		"IO_group_id": "0", "IO_group_name": "io_grp0",
		"partner_FC_id": partnerID, "partner_FC_name": m.PartnerName, "restoring": yesNo(m.Restoring),
		"rc_controlled": "no", "keep_target": "no", "type": "generic",
		"restore_progress": strconv.Itoa(m.RestoreProgress), "fc_controlled": "no", "owner_id": "", "owner_name": "",
		"grains_copied": fmt.Sprint(m.GrainsCopied), "split_on_write": fmt.Sprint(m.SplitOnWrite),
		"bytes_copied": fmt.Sprint(m.BytesCopied), "copy_throughput": fmt.Sprint(m.CopyThroughput),
		"status_reason": m.StatusReason,
	}
	fields := make([]field, len(fcmapFields))
	for i, name := range fcmapFields {
		fields[i] = field{name, v[name]}
	}
	return object{fields: fields, json: m}
}

func lsfcmapCommand() *cli.Command {
	return lsCommand(lsSpec[api.Fcmap]{
		name: "lsfcmap", usage: "list FlashCopy mappings, or show one in detail", arg: "MAPPING",
		flags: fcViewFlags(), columns: fcmapColumns, fields: fcmapFields,
		one:    func(c *cli.Context, ref string) (api.Fcmap, error) { return client(c).Fcmap(ctx(c), ref) },
		all:    func(c *cli.Context) ([]api.Fcmap, error) { return client(c).Fcmaps(ctx(c)) },
		object: func(m api.Fcmap, _ viewOptions) object { return fcmapObject(m) },
	})
}

// fcmapProgress is what lsfcmapprogress shows, and prints with -json.
type fcmapProgress struct {
	ID       int `json:"id"`
	Progress int `json:"progress"`
}

func lsfcmapprogressCommand() *cli.Command {
	return tableCommand(tableSpec{
		name: "lsfcmapprogress", usage: "show the background copy progress of a FlashCopy mapping",
		arg: "MAPPING", what: "the mapping (name or id)", columns: []string{"id", "progress"},
		rows: func(c *cli.Context, ref string) ([]object, error) {
			m, err := client(c).Fcmap(ctx(c), ref)
			if err != nil {
				return nil, err
			}
			return []object{{fields: zipFields([]string{"id", "progress"}, []string{strconv.Itoa(m.ID), strconv.Itoa(m.Progress)}),
				json: fcmapProgress{m.ID, m.Progress}}}, nil
		},
	})
}

// fcmapRef names a mapping as lsfcmapdependentmaps shows it.
type fcmapRef struct {
	ID   int    `json:"fc_id"`
	Name string `json:"fc_name"`
}

func lsfcmapdependentmapsCommand() *cli.Command {
	cols := []string{"fc_id", "fc_name"}
	return tableCommand(tableSpec{
		name: "lsfcmapdependentmaps", usage: "list the FlashCopy mappings that depend on a mapping",
		arg: "MAPPING", what: "the mapping (name or id)", columns: cols,
		rows: func(c *cli.Context, ref string) ([]object, error) {
			ms, err := client(c).FcmapDependentMaps(ctx(c), ref)
			return mapObjects(ms, func(m api.Fcmap) object {
				return object{fields: zipFields(cols, []string{strconv.Itoa(m.ID), m.Name}), json: fcmapRef{m.ID, m.Name}}
			}), err
		},
	})
}

var vdiskFcmapCopiesColumns = []string{"id", "name", "status", "progress", "difference", "start_time",
	"target_vdisk_id", "target_vdisk_name", "group_id", "group_name"}

func lsvdiskfcmapcopiesCommand() *cli.Command {
	return volumeMapsCommand("lsvdiskfcmapcopies", "list the FlashCopy mappings whose targets hold a full copy of a volume",
		vdiskFcmapCopiesColumns, (*api.Client).VdiskFcmapCopies)
}

func lsvdiskdependentmapsCommand() *cli.Command {
	return volumeMapsCommand("lsvdiskdependentmaps", "list the FlashCopy mappings that depend on a volume",
		[]string{"id", "name"}, (*api.Client).VdiskDependentMaps)
}

// volumeMapsCommand lists the mappings list returns for a volume, in columns (a subset of
// lsfcmap's, so every lsfcmap attribute can be filtered on).
func volumeMapsCommand(name, usage string, columns []string,
	list func(*api.Client, context.Context, string) ([]api.Fcmap, error)) *cli.Command {
	return tableCommand(tableSpec{
		name: name, usage: usage, arg: "VOLUME", what: "the volume (name or id)", columns: columns, fields: fcmapFields,
		rows: func(c *cli.Context, ref string) ([]object, error) {
			ms, err := list(client(c), ctx(c), ref)
			return mapObjects(ms, fcmapObject), err
		},
	})
}

// tableSpec describes an ls command that prints one table (never a detailed view): about the
// object it names — arg is its placeholder in the usage, what its description in a refusal —
// or, without arg or with optional and no object named, about everything.
type tableSpec struct {
	name, usage, arg, what string
	optional               bool     // the object may be left out
	columns, fields        []string // fields: the filterable attributes; nil means the columns
	rows                   func(c *cli.Context, ref string) ([]object, error)
}

func tableCommand(s tableSpec) *cli.Command {
	usage, min, max := "fcnbd "+s.name+" [-delim C] [-nohdr] [-json] [-filtervalue attr=value]", 0, 0
	switch {
	case s.arg != "" && s.optional:
		usage, max = usage+" ["+s.arg+"]", 1
	case s.arg != "":
		usage, min, max = usage+" "+s.arg, 1, 1
	}
	fields := s.fields
	if fields == nil {
		fields = s.columns
	}
	return &cli.Command{
		Name:      s.name,
		Usage:     s.usage,
		UsageText: usage,
		Flags:     append([]cli.Flag{socketFlag()}, fcViewFlags()...),
		Action: func(c *cli.Context) error {
			a, err := args(c, min, max, s.what)
			if err != nil {
				return err
			}
			o, err := viewOptionsFrom(c)
			if err != nil {
				return err
			}
			ref := ""
			if len(a) == 1 {
				ref = a[0]
			}
			objs, err := s.rows(c, ref)
			if err != nil {
				return err
			}
			return renderList(c.App.Writer, s.columns, fields, objs, o)
		},
	}
}

// fcViewFlags are the ls flags without -bytes, which FlashCopy objects have no use for.
func fcViewFlags() []cli.Flag {
	var fs []cli.Flag
	for _, f := range viewFlags() {
		if f.Names()[0] != "bytes" {
			fs = append(fs, f)
		}
	}
	return fs
}

func mapObjects[T any](xs []T, f func(T) object) []object {
	objs := make([]object, len(xs))
	for i, x := range xs {
		objs[i] = f(x)
	}
	return objs
}

func zipFields(names, values []string) []field {
	fs := make([]field, len(names))
	for i, n := range names {
		fs[i] = field{n, values[i]}
	}
	return fs
}

// ibmTime formats t as the IBM CLI does, YYMMDDHHMMSS in local time; "" for the zero time.
func ibmTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.Local().Format("060102150405")
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// stringFlag returns the flag's value if it was given, else nil.
func stringFlag(c *cli.Context, name string) *string {
	if !c.IsSet(name) {
		return nil
	}
	v := c.String(name)
	return &v
}

// intFlag returns the flag's value if it was given, else nil; a value that is not a decimal
// number is refused.
func intFlag(c *cli.Context, name string) (*int, error) {
	if !c.IsSet(name) {
		return nil, nil
	}
	n, err := strconv.Atoi(c.String(name))
	if err != nil {
		return nil, fcerr.New(fcerr.BadValue, "the -%s value %q is not a number", name, c.String(name))
	}
	return &n, nil
}

// onOffFlag returns the on|off flag's value if it was given, else nil.
func onOffFlag(c *cli.Context, name string) (*bool, error) {
	if !c.IsSet(name) {
		return nil, nil
	}
	switch v := c.String(name); v {
	case "on":
		b := true
		return &b, nil
	case "off":
		b := false
		return &b, nil
	}
	return nil, fcerr.New(fcerr.BadValue, "the -%s value %q is not valid: use on or off", name, c.String(name))
}
