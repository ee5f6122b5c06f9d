package main

import (
	"fmt"

	"github.com/urfave/cli/v2"

	"fcnbd/internal/attach"
)

func nbdUnixFlag() cli.Flag {
	return &cli.StringFlag{Name: "nbd-unix", Value: defaultNBDUnix, EnvVars: []string{"FCNBD_NBD_UNIX"},
		Usage: "the daemon's NBD Unix socket"}
}

func attachDirFlag() cli.Flag {
	return &cli.StringFlag{Name: "attach-dir", Value: attach.DefaultDir, EnvVars: []string{"FCNBD_ATTACH_DIR"},
		Usage: "where attachment records and nbdfuse mounts live", Hidden: true}
}

func attachCommand() *cli.Command {
	return &cli.Command{
		Name:      "attach",
		Usage:     "make a volume a block device on this host (kernel NBD, else nbdfuse + loop); prints the device",
		UsageText: "fcnbd attach [--nbd-unix PATH] VOLUME",
		Flags:     []cli.Flag{socketFlag(), nbdUnixFlag(), attachDirFlag()},
		Action: func(c *cli.Context) error {
			a, err := args(c, 1, 1, "the volume (name or id)")
			if err != nil {
				return err
			}
			// The daemon resolves an id to the name, which is the export name.
			v, err := client(c).Volume(ctx(c), a[0])
			if err != nil {
				return err
			}
			rec, err := attach.Attach(ctx(c), v.Name, attach.Options{Dir: c.String("attach-dir"), Socket: c.String("nbd-unix")})
			if err != nil {
				return fmt.Errorf("attach %s: %w", v.Name, err)
			}
			fmt.Fprintln(c.App.Writer, rec.Device)
			return nil
		},
	}
}

func detachCommand() *cli.Command {
	return &cli.Command{
		Name:      "detach",
		Usage:     "undo an attach: sync and release the block device",
		UsageText: "fcnbd detach DEVICE",
		Flags:     []cli.Flag{attachDirFlag()},
		Action: func(c *cli.Context) error {
			a, err := args(c, 1, 1, "the device (e.g. /dev/loop0)")
			if err != nil {
				return err
			}
			return attach.Detach(ctx(c), a[0], attach.Options{Dir: c.String("attach-dir")})
		},
	}
}
