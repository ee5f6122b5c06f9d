package main

import (
	"fcnbd/internal/volume"
	"fmt"
	"time"

	"github.com/urfave/cli/v2"

	"fcnbd/internal/api"
	"fcnbd/internal/fcerr"
)

func mkvolumeCommand() *cli.Command {
	return &cli.Command{
		Name:  "mkvolume",
		Usage: "create a volume",
		UsageText: "fcnbd mkvolume -name NAME -size SIZE   (SIZE in bytes or with K, M, G, T: 64M, 10G)\n" +
			"   fcnbd mkvolume -name NAME -pool POOL -size N [-unit b|kb|mb|gb|tb|pb]   (SVC's form: N in -unit, default mb)",
		Flags: []cli.Flag{
			socketFlag(),
			&cli.StringFlag{Name: "name", Usage: "the volume's name"},
			&cli.StringFlag{Name: "size", Usage: "capacity: bytes, or with a binary unit (512K, 64M, 10G, 1T); with -pool or -unit, a number of -unit"},
			&cli.StringFlag{Name: "pool", Usage: "the storage pool (SVC's form): " + poolName},
			&cli.StringFlag{Name: "unit", Usage: "the unit of -size (SVC's form): b, kb, mb (default), gb, tb, pb"},
		},
		Action: func(c *cli.Context) error {
			if _, err := args(c, 0, 0, ""); err != nil {
				return err
			}
			if !c.IsSet("name") {
				return fcerr.New(fcerr.MissingParameter, "-name is missing")
			}
			if !c.IsSet("size") {
				return fcerr.New(fcerr.MissingParameter, "-size is missing")
			}
			if c.IsSet("pool") {
				if err := checkPool(c.String("pool")); err != nil {
					return err
				}
			}
			var size int64
			var err error
			if c.IsSet("pool") || c.IsSet("unit") {
				size, err = sizeInUnit(c.String("size"), c.String("unit"))
			} else {
				size, err = parseSize(c.String("size"))
			}
			if err != nil {
				return err
			}
			v, err := client(c).CreateVolume(ctx(c), c.String("name"), size)
			return created(c, "Volume", v.ID, err)
		},
	}
}

var (
	volumeColumns = []string{"id", "name", "status", "capacity", "fc_map_count"}
	volumeFields  = []string{"id", "name", "status", "capacity", "fc_map_count", "created_time"}
)

func volumeObject(v api.Volume, o viewOptions) object {
	return object{
		fields: []field{
			{"id", fmt.Sprint(v.ID)},
			{"name", v.Name},
			{"status", v.Status},
			{"capacity", formatCapacity(v.Capacity, o.bytes)},
			{"fc_map_count", fmt.Sprint(v.FCMapCount)},
			{"created_time", v.Created.Local().Format(time.DateTime)},
		},
		json: v,
	}
}

func lsvolumeCommand() *cli.Command {
	return lsCommand(lsSpec[api.Volume]{
		name: "lsvolume", usage: "list volumes, or show one in detail", arg: "VOLUME", extra: "[-bytes] ",
		flags: viewFlags(), columns: volumeColumns, fields: volumeFields,
		one:    func(c *cli.Context, ref string) (api.Volume, error) { return client(c).Volume(ctx(c), ref) },
		all:    func(c *cli.Context) ([]api.Volume, error) { return client(c).Volumes(ctx(c)) },
		object: volumeObject,
	})
}

func rmvolumeCommand() *cli.Command { return removeVolumeCommand("rmvolume", "delete a volume") }

// removeVolumeCommand is rmvolume and rmvdisk: a volume in a FlashCopy mapping or mapped to a
// host is refused (CMMVC5840E) unless -force, which stops and deletes its FlashCopy mappings and
// removes its host mappings; -removehostmappings removes only the host mappings.
func removeVolumeCommand(name, usage string) *cli.Command {
	return &cli.Command{
		Name:      name,
		Usage:     usage,
		UsageText: "fcnbd " + name + " [-force] [-removehostmappings] VOLUME",
		Flags: []cli.Flag{
			socketFlag(),
			&cli.BoolFlag{Name: "force", Usage: "also stop and delete the FlashCopy mappings that use the volume, and remove its host mappings"},
			&cli.BoolFlag{Name: "removehostmappings", Usage: "also remove the volume's host mappings (FlashCopy mappings still refuse)"},
		},
		Action: func(c *cli.Context) error {
			a, err := args(c, 1, 1, "the volume (name or id)")
			if err != nil {
				return err
			}
			mode := volume.DeleteMode{Force: c.Bool("force"), HostMaps: c.Bool("removehostmappings")}
			return byName(a[0], client(c).DeleteVolume(ctx(c), a[0], mode))
		},
	}
}
