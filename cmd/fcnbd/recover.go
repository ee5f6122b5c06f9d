package main

import (
	"fmt"
	"strings"

	"github.com/urfave/cli/v2"
)

// recoverfcmapCommand is the operator's side of docs/flashcopy.md §3 "Bitmap online": after a
// metadata store failure suspended mappings (their volumes offline), retry the store now rather
// than at the daemon's next periodic retry.
func recoverfcmapCommand() *cli.Command {
	return &cli.Command{
		Name:      "recoverfcmap",
		Usage:     "retry the metadata store now and bring suspended FlashCopy mappings back to their state",
		UsageText: "fcnbd recoverfcmap",
		Flags:     []cli.Flag{socketFlag()},
		Action: func(c *cli.Context) error {
			if _, err := args(c, 0, 0, ""); err != nil {
				return err
			}
			res, err := client(c).RecoverFcmap(ctx(c))
			if len(res.Resumed) > 0 {
				fmt.Fprintf(c.App.Writer, "resumed: %s\n", strings.Join(res.Resumed, " "))
			}
			if err != nil {
				return err
			}
			if len(res.Resumed) == 0 {
				fmt.Fprintln(c.App.Writer, "no mapping was suspended")
			}
			return nil
		},
	}
}
