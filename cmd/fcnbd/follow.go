package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"github.com/urfave/cli/v2"

	"fcnbd/internal/api"
	"fcnbd/internal/follow"
	"fcnbd/nbd"
)

// followCommand serves one cluster-mode volume on a local Unix socket and follows its I/O
// group's owner across failovers (internal/follow): point nbdfuse, nbd-client or qemu at the
// socket instead of at a node.
func followCommand() *cli.Command {
	return &cli.Command{
		Name:      "follow",
		Usage:     "serve a cluster-mode volume on a local NBD socket that follows its I/O group across failovers",
		ArgsUsage: "VOLUME",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "nodes", Required: true, Usage: "the NBD TCP addresses of the I/O group's nodes, comma-separated"},
			&cli.StringFlag{Name: "listen", Required: true, Usage: "the Unix socket to serve the volume on"},
			&cli.DurationFlag{Name: "wait", Value: time.Minute, Usage: "how long to look for a new owner before requests fail"},
			&cli.StringFlag{Name: "log-level", Value: "info"},
		},
		Action: func(c *cli.Context) error {
			a, err := args(c, 1, 1, "VOLUME")
			if err != nil {
				return err
			}
			level, err := zerolog.ParseLevel(c.String("log-level"))
			if err != nil || level == zerolog.NoLevel {
				return fmt.Errorf("bad --log-level %q", c.String("log-level"))
			}
			log := newLogger(level)
			var nodes []string
			for _, n := range strings.Split(c.String("nodes"), ",") {
				if n = strings.TrimSpace(n); n != "" {
					nodes = append(nodes, n)
				}
			}
			ctx, stop := signal.NotifyContext(c.Context, syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			dev, err := follow.Open(ctx, follow.Options{Nodes: nodes, Export: a[0], Wait: c.Duration("wait"), Log: log})
			if err != nil {
				return err
			}
			defer dev.Close()
			l, err := api.ListenUnix(c.String("listen"), 0o600)
			if err != nil {
				return fmt.Errorf("--listen: %w", err)
			}
			srv := nbd.NewServer(nbd.StaticExports{{Name: a[0], Device: dev}}, nbd.Options{Logger: log})
			go func() {
				<-ctx.Done()
				sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				srv.Shutdown(sctx)
			}()
			log.Info().Str("volume", a[0]).Strs("nodes", nodes).Str("listen", c.String("listen")).Msg("following the volume's I/O group")
			if err := srv.Serve(l); err != nil && ctx.Err() == nil {
				return err
			}
			if err := dev.Flush(); err != nil {
				fmt.Fprintf(os.Stderr, "fcnbd follow: final flush: %v\n", err)
			}
			return nil
		},
	}
}
