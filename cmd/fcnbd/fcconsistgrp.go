package main

import (
	"strconv"

	"github.com/urfave/cli/v2"

	"fcnbd/internal/api"
	"fcnbd/internal/fcerr"
)

// The FlashCopy consistency group commands, with IBM's names and flags.

func mkfcconsistgrpCommand() *cli.Command {
	return &cli.Command{
		Name:      "mkfcconsistgrp",
		Usage:     "create a FlashCopy consistency group",
		UsageText: "fcnbd mkfcconsistgrp [-name NAME] [-autodelete]",
		Flags: []cli.Flag{
			socketFlag(),
			&cli.StringFlag{Name: "name", Usage: "the group's name (default fccstgrp<id>)"},
			&cli.BoolFlag{Name: "autodelete", Usage: "delete the group when its last mapping leaves"},
		},
		Action: func(c *cli.Context) error {
			if _, err := args(c, 0, 0, ""); err != nil {
				return err
			}
			id, err := client(c).MkConsistGrp(ctx(c), api.MkConsistGrp{Name: c.String("name"), Autodelete: c.Bool("autodelete")})
			return created(c, "FlashCopy Consistency Group", id, err)
		},
	}
}

func chfcconsistgrpCommand() *cli.Command {
	return &cli.Command{
		Name:      "chfcconsistgrp",
		Usage:     "change a FlashCopy consistency group's name or autodelete",
		UsageText: "fcnbd chfcconsistgrp [-name NAME] [-autodelete on|off] GROUP",
		Flags: []cli.Flag{
			socketFlag(),
			&cli.StringFlag{Name: "name", Usage: "the new name"},
			&cli.StringFlag{Name: "autodelete", Usage: "on or off: delete the group when its last mapping leaves"},
		},
		Action: func(c *cli.Context) error {
			a, err := args(c, 1, 1, "the consistency group (name or id)")
			if err != nil {
				return err
			}
			req := api.ChConsistGrp{Name: stringFlag(c, "name")}
			if req.Autodelete, err = onOffFlag(c, "autodelete"); err != nil {
				return err
			}
			if req == (api.ChConsistGrp{}) {
				return fcerr.New(fcerr.MissingParameter, "nothing to change: give -name or -autodelete")
			}
			return client(c).ChConsistGrp(ctx(c), a[0], req)
		},
	}
}

var (
	// consistGrpColumns are lsfcconsistgrp's concise view, the product's columns in its order.
	consistGrpColumns = []string{"id", "name", "status", "start_time", "owner_id", "owner_name"}
	// consistGrpFields are every attribute: the product's detailed view, then fcnbd's.
	consistGrpFields = []string{"id", "name", "status", "autodelete", "start_time", "owner_id", "owner_name", "last_hold_ms"}
)

// consistGrpObject shows g as the product's detailed view does: its attributes, then an
// FC_mapping_id and an FC_mapping_name line per member; fcnbd's own field comes last.
func consistGrpObject(g api.ConsistGrp) object {
	hold := ""
	if g.LastHold > 0 {
		hold = strconv.FormatFloat(g.LastHold.Seconds()*1000, 'f', 3, 64)
	}
	fields := zipFields(consistGrpFields[:7], []string{
		strconv.Itoa(g.ID), g.Name, g.Status, onOff(g.Autodelete), ibmTime(g.StartTime), "", "",
	})
	for _, m := range g.Members {
		fields = append(fields, field{"FC_mapping_id", strconv.Itoa(m.ID)}, field{"FC_mapping_name", m.Name})
	}
	fields = append(fields, field{"last_hold_ms", hold})
	return object{fields: fields, json: g}
}

func lsfcconsistgrpCommand() *cli.Command {
	return lsCommand(lsSpec[api.ConsistGrp]{
		name: "lsfcconsistgrp", usage: "list FlashCopy consistency groups, or show one in detail with its mappings",
		arg: "GROUP", flags: fcViewFlags(), columns: consistGrpColumns, fields: consistGrpFields,
		one:    func(c *cli.Context, ref string) (api.ConsistGrp, error) { return client(c).ConsistGrp(ctx(c), ref) },
		all:    func(c *cli.Context) ([]api.ConsistGrp, error) { return client(c).ConsistGrps(ctx(c)) },
		object: func(g api.ConsistGrp, _ viewOptions) object { return consistGrpObject(g) },
	})
}
