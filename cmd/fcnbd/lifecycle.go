package main

import (
	"context"

	"github.com/urfave/cli/v2"

	"fcnbd/internal/api"
)

// lifecycle describes what prestart, start, stop and rm act on — a mapping or a consistency
// group: the two sets of commands differ only in their words and their API calls.
type lifecycle struct {
	suffix   string // fcmap, fcconsistgrp
	arg      string // MAPPING, GROUP
	what     string // how a missing argument is named
	usage    [4]string
	force    string // -force of stop
	split    string // -split of stop
	rmForce  string // -force of rm
	prestart func(*api.Client, context.Context, string, bool) error
	start    func(*api.Client, context.Context, string, bool, bool) error
	stop     func(*api.Client, context.Context, string, bool, bool) error
	rm       func(*api.Client, context.Context, string, bool) error
}

var (
	fcmapLifecycle = lifecycle{
		suffix: "fcmap", arg: "MAPPING", what: "the mapping (name or id)",
		usage: [4]string{
			"prepare a FlashCopy mapping: flush the source, discard the target's cache",
			"start a prepared FlashCopy mapping: take the point-in-time copy",
			"stop a FlashCopy mapping",
			"delete a FlashCopy mapping",
		},
		force:    "stop at once, with the mappings that depend on this one",
		split:    "(progress 100 only) leave the dependency chain at once",
		rmForce:  "also delete a stopped mapping (the target comes back online as it is)",
		prestart: (*api.Client).PrestartFcmap, start: (*api.Client).StartFcmap,
		stop: (*api.Client).StopFcmap, rm: (*api.Client).RmFcmap,
	}
	consistGrpLifecycle = lifecycle{
		suffix: "fcconsistgrp", arg: "GROUP", what: "the consistency group (name or id)",
		usage: [4]string{
			"prepare every mapping of a FlashCopy consistency group",
			"start every mapping of a prepared FlashCopy consistency group at one instant",
			"stop every mapping of a FlashCopy consistency group",
			"delete a FlashCopy consistency group",
		},
		force:    "stop at once, with the mappings that depend on the group's",
		split:    "(progress 100 only) the mappings leave the dependency chain at once",
		rmForce:  "delete a group that has mappings; they become stand-alone",
		prestart: (*api.Client).PrestartConsistGrp, start: (*api.Client).StartConsistGrp,
		stop: (*api.Client).StopConsistGrp, rm: (*api.Client).RmConsistGrp,
	}
)

const restoreUsage = "allow it even though a target is the source of an active mapping (a restore)"

// commands returns prestart…, start…, stop… and rm… for l.
func (l lifecycle) commands() []*cli.Command {
	one := func(c *cli.Context) (string, error) {
		a, err := args(c, 1, 1, l.what)
		if err != nil {
			return "", err
		}
		return a[0], nil
	}
	return []*cli.Command{
		{
			Name: "prestart" + l.suffix, Usage: l.usage[0],
			UsageText: "fcnbd prestart" + l.suffix + " [-restore] " + l.arg,
			Flags:     []cli.Flag{socketFlag(), &cli.BoolFlag{Name: "restore", Usage: restoreUsage}},
			Action: func(c *cli.Context) error {
				ref, err := one(c)
				if err != nil {
					return err
				}
				return l.prestart(client(c), ctx(c), ref, c.Bool("restore"))
			},
		},
		{
			Name: "start" + l.suffix, Usage: l.usage[1],
			UsageText: "fcnbd start" + l.suffix + " [-prep] [-restore] " + l.arg,
			Flags: []cli.Flag{socketFlag(), &cli.BoolFlag{Name: "prep", Usage: "prepare first"},
				&cli.BoolFlag{Name: "restore", Usage: restoreUsage}},
			Action: func(c *cli.Context) error {
				ref, err := one(c)
				if err != nil {
					return err
				}
				return l.start(client(c), ctx(c), ref, c.Bool("prep"), c.Bool("restore"))
			},
		},
		{
			Name: "stop" + l.suffix, Usage: l.usage[2],
			UsageText: "fcnbd stop" + l.suffix + " [-force | -split] " + l.arg,
			Flags: []cli.Flag{socketFlag(), &cli.BoolFlag{Name: "force", Usage: l.force},
				&cli.BoolFlag{Name: "split", Usage: l.split}},
			Action: func(c *cli.Context) error {
				ref, err := one(c)
				if err != nil {
					return err
				}
				return l.stop(client(c), ctx(c), ref, c.Bool("force"), c.Bool("split"))
			},
		},
		{
			Name: "rm" + l.suffix, Usage: l.usage[3],
			UsageText: "fcnbd rm" + l.suffix + " [-force] " + l.arg,
			Flags:     []cli.Flag{socketFlag(), &cli.BoolFlag{Name: "force", Usage: l.rmForce}},
			Action: func(c *cli.Context) error {
				ref, err := one(c)
				if err != nil {
					return err
				}
				return l.rm(client(c), ctx(c), ref, c.Bool("force"))
			},
		},
	}
}
