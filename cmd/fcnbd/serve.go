package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/mattn/go-isatty"
	"github.com/rs/zerolog"
	"github.com/urfave/cli/v2"

	"fcnbd/internal/api"
	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
	"fcnbd/internal/hosts"
	"fcnbd/internal/metrics"
	"fcnbd/internal/store"
	"fcnbd/internal/sysutil"
	"fcnbd/mappings/driver"
	"fcnbd/nbd"
)

// How long shutdown waits for the control API and for NBD requests in progress.
const (
	apiShutdownTimeout = 10 * time.Second
	nbdShutdownTimeout = 30 * time.Second
)

func serveCommand() *cli.Command {
	return &cli.Command{
		Name:  "serve",
		Usage: "run the daemon: serve the volumes over NBD and the control API",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "data-dir", Value: defaultDataDir, EnvVars: []string{"FCNBD_DATA_DIR"},
				Usage: "where the catalogue and the volumes' backing files live"},
			socketFlag(),
			&cli.StringFlag{Name: "nbd-unix", Value: defaultNBDUnix, EnvVars: []string{"FCNBD_NBD_UNIX"},
				Usage: "NBD Unix socket (\"\" disables it)"},
			&cli.StringFlag{Name: "nbd-tcp", Value: defaultNBDTCP, EnvVars: []string{"FCNBD_NBD_TCP"},
				Usage: "NBD TCP address (\"\" disables it); NBD has no authentication without --tls require and a CA: keep it on loopback"},
			&cli.StringFlag{Name: "log-level", Value: "info", EnvVars: []string{"FCNBD_LOG_LEVEL"},
				Usage: "trace, debug, info, warn or error"},
			&cli.BoolFlag{Name: "no-mlock", EnvVars: []string{"FCNBD_NO_MLOCK"},
				Usage: "don't lock the daemon's memory with mlockall (for memory-heavy hosts)"},
			&cli.StringFlag{Name: "metrics", EnvVars: []string{"FCNBD_METRICS"},
				Usage: "serve Prometheus metrics over HTTP on this address (e.g. 127.0.0.1:9810); off by default"},
			&cli.StringFlag{Name: "cache-size", Value: "256M", EnvVars: []string{"FCNBD_CACHE_SIZE"},
				Usage: "write-back cache shared by all volumes (e.g. 256M, 1G); 0: write-through, no write is acknowledged before it is below the cache"},
			&cli.StringFlag{Name: "tls", Value: "off", EnvVars: []string{"FCNBD_TLS"},
				Usage: "NBD over TLS (NBD_OPT_STARTTLS): off, on (clients choose) or require (TCP clients must use TLS; the Unix socket stays open to local root); on and require need --tls-certs"},
			&cli.StringFlag{Name: "tls-certs", EnvVars: []string{"FCNBD_TLS_CERTS"},
				Usage: "directory with server-cert.pem and server-key.pem, and optionally ca-cert.pem: then every TLS client must present a certificate that CA signed"},
			&cli.StringFlag{Name: "tls-psk", EnvVars: []string{"FCNBD_TLS_PSK"},
				Usage: "TLS with pre-shared keys: not supported (Go's TLS has none); the daemon refuses to start with it"},
			&cli.StringFlag{Name: "cluster", EnvVars: []string{"FCNBD_CLUSTER"},
				Usage: "cluster mode: etcd endpoints, comma-separated (e.g. http://10.0.0.1:2379,http://10.0.0.2:2379); with --node, --iogrp and --shared-dir"},
			&cli.StringFlag{Name: "node", EnvVars: []string{"FCNBD_NODE"}, Usage: "cluster mode: this node's name, unique in the cluster"},
			&cli.IntFlag{Name: "iogrp", EnvVars: []string{"FCNBD_IOGRP"}, Usage: "cluster mode: the I/O group this node serves (0, 1, …)"},
			&cli.StringFlag{Name: "shared-dir", EnvVars: []string{"FCNBD_SHARED_DIR"},
				Usage: "cluster mode: the storage every node of the I/O group sees (a local or cluster filesystem with coherent byte-range locks; not NFS); the group's volumes, catalogue and bitmaps live in iogrp<N>/ under it"},
			&cli.DurationFlag{Name: "lease", Value: 5 * time.Second, EnvVars: []string{"FCNBD_LEASE"},
				Usage: "cluster mode: a node that can't renew its etcd lease for this long is taken for dead and its partner takes over (whole seconds)"},
			&cli.DurationFlag{Name: "fence-timeout", Value: 5 * time.Second, EnvVars: []string{"FCNBD_FENCE_TIMEOUT"},
				Usage: "how long a FlashCopy start may hold the sources' I/O before it is abandoned"},
		},
		Action: func(c *cli.Context) error {
			if _, err := args(c, 0, 0, ""); err != nil {
				return err
			}
			level, err := zerolog.ParseLevel(c.String("log-level"))
			if err != nil || level == zerolog.NoLevel {
				return fmt.Errorf("bad --log-level %q", c.String("log-level"))
			}
			cacheSize, err := parseSize(c.String("cache-size"))
			if err != nil {
				return fmt.Errorf("bad --cache-size: %w", err)
			}
			if c.Duration("fence-timeout") <= 0 {
				return fmt.Errorf("bad --fence-timeout %s: must be positive", c.Duration("fence-timeout"))
			}
			tlsMode, tlsConfig, err := tlsSettings(c.String("tls"), c.String("tls-certs"), c.String("tls-psk"))
			if err != nil {
				return err
			}
			execErr := execWithMonitorAwake()
			log := newLogger(level)
			if execErr != nil {
				log.Warn().Err(execErr).Str("GODEBUG", monitorSetting).Msg("could not re-execute with the runtime setting; running without it")
			}
			cl, err := clusterSettings(c, log)
			if err != nil {
				return err
			}
			return serve(c.Context, serveConfig{
				cluster:      cl,
				metrics:      c.String("metrics"),
				cacheSize:    cacheSize,
				fenceTimeout: c.Duration("fence-timeout"),
				dataDir:      c.String("data-dir"),
				socket:       socketPath(c),
				nbdUnix:      c.String("nbd-unix"),
				nbdTCP:       c.String("nbd-tcp"),
				noMlock:      c.Bool("no-mlock"),
				tlsMode:      tlsMode,
				tlsConfig:    tlsConfig,
				log:          log,
			})
		},
	}
}

func newLogger(level zerolog.Level) zerolog.Logger {
	var w = zerolog.New(os.Stderr)
	if isatty.IsTerminal(os.Stderr.Fd()) {
		w = zerolog.New(zerolog.ConsoleWriter{Out: os.Stderr, TimeFormat: time.DateTime})
	}
	return w.Level(level).With().Timestamp().Logger()
}

// memoryHeadroom is the memory the daemon may use beyond its cache before the Go runtime
// collects harder: request buffers in flight, metadata, stacks.
const memoryHeadroom = 128 << 20

// setMemoryLimit sets the Go runtime's soft memory limit to the cache size plus headroom,
// unless GOMEMLIMIT is set. Without it the heap grows to twice what is live before a
// collection, and the cache is most of what is live.
func setMemoryLimit(log zerolog.Logger, cacheSize int64) {
	if v := os.Getenv("GOMEMLIMIT"); v != "" {
		log.Info().Str("GOMEMLIMIT", v).Msg("soft memory limit from the environment")
		return
	}
	limit := cacheSize + memoryHeadroom
	debug.SetMemoryLimit(limit)
	log.Debug().Int64("bytes", limit).Msg("soft memory limit: cache size plus headroom")
}

type serveConfig struct {
	cluster                          *clusterConfig // nil: the single-node daemon
	dataDir, socket, nbdUnix, nbdTCP string
	cacheSize                        int64
	metrics                          string
	fenceTimeout                     time.Duration
	noMlock                          bool
	tlsMode                          nbd.TLSMode
	tlsConfig                        *tls.Config
	log                              zerolog.Logger
}

// tlsSettings checks the TLS flags and loads the certificates: a mistake stops the daemon
// before it serves anything, with the flag or file at fault named.
func tlsSettings(mode, certs, psk string) (nbd.TLSMode, *tls.Config, error) {
	if psk != "" {
		return nbd.TLSOff, nil, fmt.Errorf("--tls-psk %s: TLS with pre-shared keys is not supported: "+
			"Go's crypto/tls has no external-PSK support (golang/go#6379) and fcnbd does not link GnuTLS; "+
			"use X.509 certificates with --tls-certs", psk)
	}
	m, err := nbd.ParseTLSMode(mode)
	if err != nil {
		return nbd.TLSOff, nil, fmt.Errorf("bad --tls %q: want off, on or require", mode)
	}
	switch {
	case m == nbd.TLSOff && certs != "":
		return nbd.TLSOff, nil, fmt.Errorf("--tls-certs %s given but --tls is off: say --tls on or --tls require", certs)
	case m == nbd.TLSOff:
		return m, nil, nil
	case certs == "":
		return m, nil, fmt.Errorf("--tls %s needs --tls-certs DIR (with %s, %s and optionally %s)",
			m, nbd.TLSServerCertFile, nbd.TLSServerKeyFile, nbd.TLSCACertFile)
	}
	cfg, err := nbd.LoadTLSConfig(certs)
	if err != nil {
		return m, nil, fmt.Errorf("--tls-certs: %w", err)
	}
	return m, cfg, nil
}

// serve runs the daemon until SIGTERM or SIGINT, then stops accepting, lets NBD requests in
// progress finish, flushes every volume and closes the catalogue.
func serve(parent context.Context, cfg serveConfig) (err error) {
	log := cfg.log
	ctx, stop := signal.NotifyContext(parent, syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	// Before anything else: a host that mounts our volumes must not deadlock on us.
	sysutil.Harden(log, sysutil.Options{NoMlock: cfg.noMlock})
	setMemoryLimit(log, cfg.cacheSize)

	var (
		cat         *catalog.DB
		fs          store.Dir
		clusterView func(context.Context) (*api.Cluster, error) // nil outside cluster mode
		gate        func() error                                // likewise
	)
	if cfg.cluster != nil {
		member, err := cfg.cluster.join(ctx, cfg.nbdTCP)
		if err != nil {
			return err
		}
		defer member.Close()
		stopStandby, err := cfg.cluster.serveStandby(member, cfg.socket)
		if err != nil {
			return err
		}
		var catDir string
		cat, fs, catDir, err = cfg.cluster.takeOver(ctx, member)
		stopStandby()
		if lost := member.LostErr(); err != nil && lost != nil {
			cfg.cluster.standDown(lost) // a standby whose lease ran out: start again, as a standby
		}
		if err != nil && ctx.Err() != nil {
			log.Info().Msg("fcnbd stopped (a standby)")
			return nil // SIGTERM or SIGINT while a standby: a clean stop
		}
		if err != nil {
			return err
		}
		cfg.dataDir = catDir
		go cfg.cluster.watch(member)
		clusterView = cfg.cluster.view(member, true)
		gate = member.Valid
	} else {
		if err := os.MkdirAll(cfg.dataDir, 0o700); err != nil {
			return err
		}
		cat, err = catalog.Open(cfg.dataDir)
		if err != nil {
			return openFailure(cfg.dataDir, err)
		}
		fs = store.Dir{Path: cfg.dataDir}
	}
	defer func() {
		if cerr := cat.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("close catalogue: %w", cerr)
		}
	}()
	vols, err := driver.Open(driver.Options{
		Catalog: cat, FS: fs, Logger: log,
		CacheSize: cfg.cacheSize, WriteThrough: cfg.cacheSize == 0, FenceTimeout: cfg.fenceTimeout,
	})
	if err != nil {
		return openFailure(cfg.dataDir, err)
	}
	closeVolumes := func() error {
		if err := vols.Close(); err != nil {
			return fmt.Errorf("flush volumes: %w", err)
		}
		return nil
	}

	apiL, err := api.ListenUnix(cfg.socket, 0o600)
	if err != nil {
		closeVolumes()
		return fmt.Errorf("control socket: %w", err)
	}
	if err := shareSocketWithGroup(cfg.socket); err != nil {
		apiL.Close()
		closeVolumes()
		return fmt.Errorf("control socket: %w", err)
	}
	var nbdLs []net.Listener
	closeAll := func() {
		apiL.Close()
		for _, l := range nbdLs {
			l.Close()
		}
	}
	if cfg.nbdUnix != "" {
		l, err := api.ListenUnix(cfg.nbdUnix, 0o600)
		if err != nil {
			closeAll()
			closeVolumes()
			return fmt.Errorf("NBD socket: %w", err)
		}
		nbdLs = append(nbdLs, l)
	}
	if cfg.nbdTCP != "" {
		l, err := net.Listen("tcp", cfg.nbdTCP)
		if err != nil {
			closeAll()
			closeVolumes()
			return fmt.Errorf("NBD TCP: %w", err)
		}
		nbdLs = append(nbdLs, l)
		verified := cfg.tlsConfig != nil && cfg.tlsConfig.ClientCAs != nil
		switch {
		case isLoopback(cfg.nbdTCP) || cfg.tlsMode == nbd.TLSRequire && verified:
		case cfg.tlsMode == nbd.TLSRequire:
			log.Warn().Str("nbd_tcp", cfg.nbdTCP).Msg("TLS without client certificates (no " + nbd.TLSCACertFile + " in --tls-certs): the traffic is encrypted, but anyone who can reach this address can read and write every volume")
		case cfg.tlsMode == nbd.TLSOn:
			log.Warn().Str("nbd_tcp", cfg.nbdTCP).Msg("TLS is optional (--tls on): anyone who can reach this address can read and write every volume without it; --tls require enforces it")
		default:
			log.Warn().Str("nbd_tcp", cfg.nbdTCP).Msg("NBD has no authentication: anyone who can reach this address can read and write every volume")
		}
	}

	hostMgr, err := hosts.New(cat, log) // hosts and host mappings: NBD access control
	if err != nil {
		closeAll()
		closeVolumes()
		return openFailure(cfg.dataDir, err)
	}
	nbdSrv := nbd.NewServer(hostMgr.Exports(vols), nbd.Options{Logger: log, TLSMode: cfg.tlsMode, TLSConfig: cfg.tlsConfig, Gate: gate})
	httpSrv := &http.Server{Handler: api.NewHandler(vols, log).WithFlashCopy(vols).WithRecover(vols).WithHosts(hostMgr).WithClusterSystem(cfg.dataDir, clusterView).WithVolumeChanges(vols).WithVolumeExpand(vols), ReadHeaderTimeout: 10 * time.Second}
	failed := make(chan error, len(nbdLs)+2)
	if cfg.metrics != "" {
		ml, err := net.Listen("tcp", cfg.metrics)
		if err != nil {
			closeAll()
			closeVolumes()
			return fmt.Errorf("metrics: %w", err)
		}
		msrv := &http.Server{Handler: metrics.Handler(vols), ReadHeaderTimeout: 10 * time.Second}
		defer msrv.Close()
		go func() {
			if err := msrv.Serve(ml); err != nil && !errors.Is(err, http.ErrServerClosed) {
				failed <- fmt.Errorf("metrics: %w", err)
			}
		}()
	}
	for _, l := range nbdLs {
		go func() {
			if err := nbdSrv.Serve(l); err != nil {
				failed <- fmt.Errorf("NBD on %s: %w", l.Addr(), err)
			}
		}()
	}
	go func() {
		if err := httpSrv.Serve(apiL); err != nil && !errors.Is(err, http.ErrServerClosed) {
			failed <- fmt.Errorf("control API: %w", err)
		}
	}()
	log.Info().Str("control", cfg.socket).Str("nbd_unix", cfg.nbdUnix).Str("nbd_tcp", cfg.nbdTCP).
		Str("data_dir", cfg.dataDir).Int("volumes", len(vols.Volumes())).
		Stringer("tls", cfg.tlsMode).Bool("tls_verify_clients", cfg.tlsConfig != nil && cfg.tlsConfig.ClientCAs != nil).
		Msg("fcnbd serving")

	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-failed:
		log.Error().Err(runErr).Msg("listener failed; shutting down")
	}

	// Control first, so that no command changes anything while the data path winds down.
	actx, cancel := context.WithTimeout(context.Background(), apiShutdownTimeout)
	defer cancel()
	if err := httpSrv.Shutdown(actx); err != nil {
		log.Warn().Err(err).Msg("control API shutdown")
	}
	nctx, cancel2 := context.WithTimeout(context.Background(), nbdShutdownTimeout)
	defer cancel2()
	if err := nbdSrv.Shutdown(nctx); err != nil {
		log.Warn().Err(err).Msg("NBD shutdown did not finish cleanly")
	}
	for _, l := range nbdLs {
		l.Close() // the server closes them too; this covers a Serve that never started
	}
	flushErr := closeVolumes()
	if flushErr != nil {
		log.Error().Err(flushErr).Msg("flushing volumes")
	}
	log.Info().Msg("fcnbd stopped")
	return errors.Join(runErr, flushErr)
}

// openFailure says, for an operator, why the data directory could not be opened, which file is
// at fault and what to do. Only the catalogue and the volumes' backing files stop the daemon
// from starting: a mapping whose state can't be restored comes up stopped instead, with its
// reason in lsfcmap. The message is one line (the CLI prints it after "fcnbd: "), and keeps no
// code of its own: an fcerr inside is shown as text.
func openFailure(dataDir string, err error) error {
	path := filepath.Join(dataDir, catalog.FileName)
	switch {
	case errors.Is(err, catalog.ErrLocked):
		return err // it says what to check
	case errors.Is(err, catalog.ErrCorrupt):
		return fmt.Errorf("the catalogue %s can't be read (%v); the daemon did not start. "+
			"Keep a copy of the data directory %s as it is, then put back %s from a backup. "+
			"Don't start the daemon with the file removed: it would take every volume's backing file for an orphan and delete it",
			path, err, dataDir, catalog.FileName)
	case fcerr.CodeOf(err) == fcerr.MetadataUnwritable:
		return fmt.Errorf("the catalogue %s can't be written (%v); the daemon did not start. "+
			"Check the file system of %s (free space, permissions, read-only mount, disk errors in the kernel log) and start again",
			path, err, dataDir)
	}
	return fmt.Errorf("the data directory %s could not be opened (%v); the daemon did not start. "+
		"Check that the file named exists and is readable (permissions, disk errors in the kernel log); "+
		"keep a copy of the data directory as it is before repairing anything, and put back a lost backing file from a backup",
		dataDir, err)
}

// isLoopback reports whether a TCP listen address is only reachable from this host.
func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
