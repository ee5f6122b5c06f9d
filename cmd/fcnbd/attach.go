package main

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"
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
		UsageText: "fcnbd attach [--method nbd|nbd-client|nbdfuse] [--nbd-unix PATH | --nbd-tcp HOST:PORT] VOLUME",
		Flags: []cli.Flag{socketFlag(), nbdUnixFlag(), attachDirFlag(),
			&cli.StringFlag{Name: "nbd-tcp", Usage: "reach the daemon's NBD server at HOST:PORT instead of its Unix socket"},
			&cli.StringFlag{Name: "follow", Usage: "cluster mode: the NBD TCP addresses of the volume's I/O group's nodes, comma-separated; " +
				"the device goes through an `fcnbd follow` process that keeps it working across a failover (VOLUME is then the name)"},
			&cli.StringFlag{Name: "method", Usage: "nbd: the kernel NBD driver, set up by fcnbd itself; " +
				"nbd-client: the kernel NBD driver, set up by nbd-client; nbdfuse: nbdfuse + a loop device " +
				"(default: nbd where the kernel has the NBD driver, else nbdfuse)"},
			&cli.DurationFlag{Name: "timeout", Value: 15 * time.Second, Usage: "bound on each step (connecting, the device becoming ready)"},
			&cli.IntFlag{Name: "connections", Value: 1, Usage: "connections of a kernel NBD device (methods nbd and nbd-client; 1 to 16)"},
		},
		Action: func(c *cli.Context) error {
			a, err := args(c, 1, 1, "the volume (name or id)")
			if err != nil {
				return err
			}
			method := c.String("method")
			if method != "" && !slices.Contains(attach.Methods, method) {
				return fmt.Errorf("--method %q: want one of %s", method, strings.Join(attach.Methods, ", "))
			}
			name, socket, followPID := a[0], c.String("nbd-unix"), 0
			if nodes := c.String("follow"); nodes != "" {
				// Cluster mode: the device goes through a follow process, which finds the owner.
				if socket, followPID, err = startFollow(c, nodes, name); err != nil {
					return err
				}
			} else {
				// The daemon resolves an id to the name, which is the export name.
				v, err := client(c).Volume(ctx(c), a[0])
				if err != nil {
					return err
				}
				name = v.Name
			}
			// Interrupted, attach undoes what it did instead of leaving it unrecorded.
			sctx, stop := signal.NotifyContext(ctx(c), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
			defer stop()
			rec, err := attach.Attach(sctx, name, attach.Options{Dir: c.String("attach-dir"),
				Socket: socket, TCP: c.String("nbd-tcp"), Method: method, Timeout: c.Duration("timeout"),
				Connections: c.Int("connections"), FollowPID: followPID})
			if err != nil {
				if followPID > 0 {
					syscall.Kill(followPID, syscall.SIGTERM)
				}
				return fmt.Errorf("attach %s: %w", name, err)
			}
			fmt.Fprintln(c.App.Writer, rec.Device)
			return nil
		},
	}
}

// attachHelperCommand is the process `fcnbd attach` starts (detached) for the nbd method: it
// connects the device and stays in the kernel's NBD_DO_IT until the device is detached. Its
// status line goes to file descriptor 3, the commit of fcnbd attach comes on 4, its log goes to
// stderr (the attachment's .log file).
func attachHelperCommand() *cli.Command {
	return &cli.Command{
		Name:   attach.HelperCommand,
		Hidden: true,
		Usage:  "internal: hold a kernel NBD device for fcnbd attach",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "device", Required: true},
			&cli.StringFlag{Name: "export", Required: true},
			&cli.StringFlag{Name: "nbd-unix"},
			&cli.StringFlag{Name: "nbd-tcp"},
			&cli.DurationFlag{Name: "timeout", Value: 15 * time.Second},
			&cli.IntFlag{Name: "connections", Value: 1},
		},
		Action: func(c *cli.Context) error {
			network, addr := "unix", c.String("nbd-unix")
			if t := c.String("nbd-tcp"); t != "" {
				network, addr = "tcp", t
			}
			if addr == "" {
				return fmt.Errorf("--nbd-unix or --nbd-tcp is required")
			}
			// fd 3 and 4 are the pipes of fcnbd attach; run by hand, there are none.
			status, commit := os.NewFile(3, "status"), os.NewFile(4, "commit")
			if _, err := status.Stat(); err != nil {
				status = nil
			}
			if _, err := commit.Stat(); err != nil {
				commit = nil
			}
			return attach.RunHelper(attach.HelperConfig{Device: c.String("device"), Network: network,
				Address: addr, Export: c.String("export"), Timeout: c.Duration("timeout"), Connections: c.Int("connections"),
				Status: status, Commit: commit, Log: newLogger(zerolog.InfoLevel)})
		},
	}
}

func detachCommand() *cli.Command {
	return &cli.Command{
		Name:      "detach",
		Usage:     "undo an attach: sync and release the block device",
		UsageText: "fcnbd detach DEVICE",
		Flags: []cli.Flag{attachDirFlag(),
			&cli.DurationFlag{Name: "timeout", Value: 15 * time.Second, Usage: "bound on each wait (the device released, its helper exited)"}},
		Action: func(c *cli.Context) error {
			a, err := args(c, 1, 1, "the device (e.g. /dev/loop0)")
			if err != nil {
				return err
			}
			return attach.Detach(ctx(c), a[0], attach.Options{Dir: c.String("attach-dir"), Timeout: c.Duration("timeout")})
		},
	}
}

// startFollow starts `fcnbd follow` for volume, detached from this process, on a socket under
// the attach directory, and returns the socket and its pid once it listens.
func startFollow(c *cli.Context, nodes, volume string) (string, int, error) {
	if c.String("nbd-tcp") != "" {
		return "", 0, fmt.Errorf("--follow and --nbd-tcp: give the nodes' addresses to --follow only")
	}
	dir := c.String("attach-dir")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", 0, err
	}
	base := filepath.Join(dir, fmt.Sprintf("follow-%s-%d", volume, os.Getpid()))
	socket := base + ".sock"
	logf, err := os.OpenFile(base+".log", os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return "", 0, err
	}
	defer logf.Close()
	self, err := os.Executable()
	if err != nil {
		return "", 0, err
	}
	cmd := exec.Command(self, "follow", "--nodes", nodes, "--listen", socket, volume)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return "", 0, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.Now().Add(c.Duration("timeout") + time.Minute)
	for {
		if conn, err := net.Dial("unix", socket); err == nil {
			conn.Close()
			return socket, cmd.Process.Pid, nil
		}
		select {
		case err := <-exited:
			out, _ := os.ReadFile(base + ".log")
			return "", 0, fmt.Errorf("fcnbd follow exited (%v): %s", err, strings.TrimSpace(string(out)))
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			return "", 0, fmt.Errorf("fcnbd follow did not listen on %s in time", socket)
		}
	}
}
