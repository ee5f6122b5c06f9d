// Command fcnbd is FlashCopy for Linux: `fcnbd serve` is the daemon that owns the volumes and
// serves them over NBD; every other command is the IBM SVC-style CLI, which talks to the
// daemon over its control socket.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	"github.com/urfave/cli/v2"

	"fcnbd/internal/api"
	"fcnbd/internal/fcerr"
)

const (
	defaultDataDir = "/var/lib/fcnbd"
	defaultSocket  = "/run/fcnbd/fcnbd.sock"
	defaultNBDUnix = "/run/fcnbd/nbd.sock"
	defaultNBDTCP  = "127.0.0.1:10809"
)

// globalSocketFlag is the control socket, for every command.
func globalSocketFlag() cli.Flag {
	return &cli.StringFlag{Name: "socket", Value: defaultSocket, EnvVars: []string{"FCNBD_SOCKET"},
		Usage: "the daemon's control socket"}
}

// socketFlag lets a command take --socket after its name too; when absent, the global one
// (flag, FCNBD_SOCKET, default) applies.
func socketFlag() cli.Flag {
	return &cli.StringFlag{Name: "socket", Usage: "the daemon's control socket (default: the global --socket)"}
}

func socketPath(c *cli.Context) string {
	for _, cc := range c.Lineage() {
		if s := cc.String("socket"); s != "" {
			return s
		}
	}
	return defaultSocket
}

func newApp(stdout, stderr io.Writer) *cli.App {
	return &cli.App{
		Name:            "fcnbd",
		Usage:           "FlashCopy for Linux: point-in-time copies of NBD-served volumes",
		Writer:          stdout,
		ErrWriter:       stderr,
		Flags:           []cli.Flag{globalSocketFlag()},
		HideHelpCommand: true,
		Commands: slices.Concat(
			[]*cli.Command{serveCommand(), attachCommand(), detachCommand(), attachHelperCommand(), waitCommand(), followCommand()},
			svcFrontCommands(), []*cli.Command{sshsetupCommand()},
			svc(
				mkvolumeCommand(), lsvolumeCommand(), rmvolumeCommand(),
				mkfcmapCommand(), chfcmapCommand(), lsfcmapCommand(), lsfcmapprogressCommand(),
				lsfcmapdependentmapsCommand(), lsvdiskfcmapcopiesCommand(), lsvdiskdependentmapsCommand(),
				mkfcconsistgrpCommand(), chfcconsistgrpCommand(), lsfcconsistgrpCommand(),
				recoverfcmapCommand(),
			),
			svc(fcmapLifecycle.commands()...),
			svc(consistGrpLifecycle.commands()...),
			svc(mkhostCommand(), lshostCommand(), chhostCommand(), rmhostCommand(), addhostportCommand(), rmhostportCommand()),
			svc(mkvdiskhostmapCommand(), rmvdiskhostmapCommand(), lsvdiskhostmapCommand(), lshostvdiskmapCommand()),
			svc(lssystemCommand(), lsnodeCommand(), lsiogrpCommand(), lsmdiskgrpCommand(), lslicenseCommand(), lsguicapabilitiesCommand()),
			svc(mkvdiskCommand(), lsvdiskCommand(), rmvdiskCommand(), chvdiskCommand(), expandvdisksizeCommand(), lsvdiskfcmappingsCommand(), lsfcmapcandidateCommand()),
		),
		// Errors are printed once, by run, in the CMMVC form.
		ExitErrHandler: func(*cli.Context, error) {},
	}
}

// run executes the CLI and returns the exit status.
func run(args []string, stdout, stderr io.Writer) int {
	app := newApp(stdout, stderr)
	// Flag errors in SVC's words (CMMVC5709E "[-x] is not a supported parameter"), for every
	// command and front-end alike.
	app.OnUsageError = usageError
	for _, c := range app.Commands {
		if c.OnUsageError == nil {
			c.OnUsageError = usageError
		}
	}
	err := app.Run(args)
	if err == nil {
		return 0
	}
	var fe *fcerr.Error
	var ec cli.ExitCoder
	switch {
	case errors.As(err, &fe):
		fmt.Fprintf(stderr, "%s %s\n", fe.Code, fe.Message)
	case errors.As(err, &ec) && ec.ExitCode() == 0:
		return 0
	case errors.As(err, &ec) && err.Error() == "":
		return ec.ExitCode() // a front-end's status, already reported
	default:
		fmt.Fprintf(stderr, "fcnbd: %v\n", err)
	}
	return 1
}

// usageError turns urfave's flag errors into SVC's CMMVC messages.
func usageError(_ *cli.Context, err error, _ bool) error {
	msg := err.Error()
	if f, ok := strings.CutPrefix(msg, "flag provided but not defined: "); ok {
		return fcerr.New(fcerr.UnsupportedParameter, "[%s] is not a supported parameter", f)
	}
	if f, ok := strings.CutPrefix(msg, "flag needs an argument: "); ok {
		return fcerr.New(fcerr.MissingParameter, "a value for [%s] is missing", f)
	}
	return fcerr.New(fcerr.BadValue, "%s", msg)
}

// svc marks the commands of the SVC command line: the ones the SVC front-ends (the restricted
// SSH shell and `fcnbd svcinfo|svctask LINE`) may run, and nothing else. The ls commands are
// svcinfo's, every other one svctask's. This category is the one table of what is reachable.
func svc(cmds ...*cli.Command) []*cli.Command {
	for _, c := range cmds {
		c.Category = "svctask"
		if strings.HasPrefix(c.Name, "ls") {
			c.Category = "svcinfo"
		}
	}
	return cmds
}

func main() {
	os.Exit(run(os.Args, os.Stdout, os.Stderr))
}

func client(c *cli.Context) *api.Client { return api.NewClient(socketPath(c)) }

func ctx(c *cli.Context) context.Context { return c.Context }

// created prints SVC's line for an object a mk command made, "<what>, id [N], successfully
// created" (automation reads the id from it), or returns the command's error.
func created[ID int | uint64](c *cli.Context, what string, id ID, err error) error {
	if err != nil {
		return err
	}
	fmt.Fprintf(c.App.Writer, "%s, id [%d], successfully created\n", what, id)
	return nil
}

// args checks the command's positional arguments: between min and max of them.
func args(c *cli.Context, min, max int, what string) ([]string, error) {
	a := c.Args().Slice()
	switch {
	case len(a) < min:
		return nil, fcerr.New(fcerr.MissingParameter, "%s is missing", what)
	case len(a) > max:
		return nil, fcerr.New(fcerr.BadValue, "unexpected argument %q", a[max])
	}
	return a, nil
}
