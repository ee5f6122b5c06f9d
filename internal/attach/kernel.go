package attach

// The kernel NBD path without nbd-client (MethodNBD): a helper process (`fcnbd attach-helper`,
// started detached by Attach) connects to the daemon, negotiates, hands the socket to the kernel
// with the NBD ioctls and stays in NBD_DO_IT for as long as the device is attached. Detach
// disconnects the device (NBD_DISCONNECT, NBD_CLEAR_SOCK) and waits for the helper to exit.
//
// The ioctl numbers and Disconnect come from github.com/pojntfx/go-nbd (nbdioctl_gonbd.go; where
// go-nbd has none, a build without cgo on another architecture than amd64, nbdioctl_other.go). Its client.Connect is not
// used: v0.3.2 sends client flags 0 (not fixed newstyle) and then an NBD_OPT_GO whose option
// length is 0 with the export name sent after it, which no conforming server accepts (fcnbd
// closes the connection at the client flags already); it also never passes the transmission
// flags to the kernel (NBD_SET_FLAGS), so the device would get neither FLUSH nor FUA nor TRIM.
// The handshake here is our own (handshake.go); the kernel side is the same sequence of ioctls.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"fcnbd/internal/nbdproto"
	"golang.org/x/sys/unix"
)

// nbdSetFlags is NBD_SET_FLAGS (_IO(0xab, 10), linux/nbd.h), which go-nbd does not define.
const nbdSetFlags = 0xab0a

// HelperCommand is the subcommand of the fcnbd binary that runs RunHelper.
const HelperCommand = "attach-helper"

// HelperConfig configures RunHelper.
type HelperConfig struct {
	Device  string // /dev/nbdN
	Network string // "unix" or "tcp"
	Address string // the daemon's NBD socket path or host:port
	Export  string
	// Connections is the number of connections the kernel spreads requests over (1 if 0; more
	// need the server's NBD_FLAG_CAN_MULTI_CONN).
	Connections int
	Timeout     time.Duration // bounds connecting, negotiating and the device becoming ready
	// Status receives one line once the device is ready or setting it up failed: "ok",
	// "busy MESSAGE" (the device is taken: try another) or "error MESSAGE"; it is then closed.
	Status *os.File
	// Commit, if set, is read after "ok": the attaching process writes "commit" once it has
	// recorded the attachment. If it goes away first (EOF, or nothing within Timeout), nothing
	// could ever detach the device, so the helper disconnects it and exits.
	Commit *os.File
	Log    zerolog.Logger
}

// Status line kinds.
const (
	statusOK    = "ok"
	statusBusy  = "busy"
	statusError = "error"
)

// RunHelper connects cfg.Device to the export and holds it until the device is disconnected
// (by Detach, or by SIGTERM/SIGINT/SIGHUP to this process, which disconnect it) or the daemon's
// connection is lost. It returns an error if the device could not be set up.
func RunHelper(cfg HelperConfig) error {
	if cfg.Timeout <= 0 {
		cfg.Timeout = 15 * time.Second
	}
	report := func(kind, msg string) {
		if cfg.Status == nil {
			return
		}
		fmt.Fprintf(cfg.Status, "%s %s\n", kind, strings.ReplaceAll(msg, "\n", " "))
		cfg.Status.Close()
		cfg.Status = nil
	}
	fail := func(kind string, err error) error {
		cfg.Log.Error().Err(err).Str("device", cfg.Device).Str("export", cfg.Export).Msg("attach failed")
		report(kind, err.Error())
		return err
	}

	if cfg.Connections <= 0 {
		cfg.Connections = 1
	}
	var socks []*os.File
	defer func() {
		for _, f := range socks {
			f.Close()
		}
	}()
	var info exportInfo
	for i := 0; i < cfg.Connections; i++ {
		sock, inf, err := dialExport(cfg)
		if err != nil {
			return fail(statusError, err)
		}
		socks = append(socks, sock)
		if i == 0 {
			info = inf
		} else if inf.Size != info.Size || inf.Flags != info.Flags {
			return fail(statusError, fmt.Errorf("the export changed between connections (size %d, flags %#x; then size %d, flags %#x)",
				info.Size, info.Flags, inf.Size, inf.Flags))
		}
	}
	if cfg.Connections > 1 && info.Flags&nbdproto.FlagCanMultiConn == 0 {
		return fail(statusError, fmt.Errorf("the server does not allow %d connections to %q (no NBD_FLAG_CAN_MULTI_CONN)", cfg.Connections, cfg.Export))
	}
	bs, err := kernelBlockSize(info)
	if err != nil {
		return fail(statusError, err)
	}

	dev, err := os.OpenFile(cfg.Device, os.O_RDWR, 0)
	if err != nil {
		return fail(statusError, fmt.Errorf("open %s: %w", cfg.Device, err))
	}
	defer dev.Close()
	// The kernel lets only the task (thread) that gave it the first socket add more.
	runtime.LockOSThread()
	for i, sock := range socks {
		if err := ioctlArg(dev, ioctlSetSock, sock.Fd()); err != nil {
			runtime.UnlockOSThread()
			if i == 0 {
				// Not ours: another process sets the device up or runs it (EBUSY), or it is
				// controlled through netlink (EINVAL). Clearing its socket would cut it off.
				if errors.Is(err, unix.EBUSY) || errors.Is(err, unix.EINVAL) {
					return fail(statusBusy, fmt.Errorf("%s is in use by another process (NBD_SET_SOCK: %v)", cfg.Device, err))
				}
				return fail(statusError, fmt.Errorf("NBD_SET_SOCK on %s: %w", cfg.Device, err))
			}
			ioctlArg(dev, ioctlClearSock, 0)
			return fail(statusError, fmt.Errorf("NBD_SET_SOCK (connection %d) on %s: %w", i+1, cfg.Device, err))
		}
	}
	runtime.UnlockOSThread()
	setup := []struct {
		name string
		req  uintptr
		arg  uintptr
	}{
		{"NBD_SET_BLKSIZE", ioctlSetBlksize, uintptr(bs)},
		{"NBD_SET_SIZE_BLOCKS", ioctlSetSizeBlocks, uintptr(info.Size / uint64(bs))},
		{"NBD_SET_FLAGS", nbdSetFlags, uintptr(info.Flags)},
	}
	for _, s := range setup {
		if err := ioctlArg(dev, s.req, s.arg); err != nil {
			ioctlArg(dev, ioctlClearSock, 0)
			return fail(statusError, fmt.Errorf("%s on %s: %w", s.name, cfg.Device, err))
		}
	}

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer signal.Stop(sigs)
	doIt := make(chan error, 1)
	go func() {
		// NBD_DO_IT waits interruptibly, and a signal taken while it waits tears the device
		// down: keep every signal away from its thread (the thread ends with this goroutine).
		runtime.LockOSThread()
		var all unix.Sigset_t
		for i := range all.Val {
			all.Val[i] = ^all.Val[i]
		}
		if err := unix.PthreadSigmask(unix.SIG_BLOCK, &all, nil); err != nil {
			doIt <- fmt.Errorf("block signals: %w", err)
			return
		}
		doIt <- ioctlArg(dev, ioctlDoIt, 0)
	}()

	name := filepath.Base(cfg.Device)
	deadline := time.Now().Add(cfg.Timeout)
	for !deviceReady(name) {
		select {
		case err := <-doIt:
			ioctlArg(dev, ioctlClearSock, 0)
			if err == nil {
				err = errors.New("the connection ended at once")
			}
			return fail(statusError, fmt.Errorf("NBD_DO_IT on %s: %w", cfg.Device, err))
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			disconnectDevice(dev)
			<-doIt
			return fail(statusError, fmt.Errorf("%s not ready after %v", cfg.Device, cfg.Timeout))
		}
	}
	cfg.Log.Info().Str("device", cfg.Device).Str("export", cfg.Export).Uint64("size", info.Size).
		Uint32("block_size", bs).Msg("attached")
	report(statusOK, "")
	if cfg.Commit != nil {
		if err := awaitCommit(cfg.Commit, cfg.Timeout); err != nil {
			cfg.Log.Error().Err(err).Str("device", cfg.Device).Msg("the attach was not recorded; disconnecting")
			disconnectDevice(dev)
			<-doIt
			ioctlArg(dev, ioctlClearSock, 0)
			return err
		}
	}

	for {
		select {
		case s := <-sigs:
			cfg.Log.Info().Str("signal", s.String()).Str("device", cfg.Device).Msg("disconnecting")
			if err := disconnectDevice(dev); err != nil {
				cfg.Log.Warn().Err(err).Str("device", cfg.Device).Msg("disconnect")
			}
		case err := <-doIt:
			// As nbd-client does once NBD_DO_IT returns; harmless if Detach did it already.
			ioctlArg(dev, ioctlClearSock, 0)
			if err != nil {
				cfg.Log.Error().Err(err).Str("device", cfg.Device).Msg("NBD_DO_IT ended with an error")
				return fmt.Errorf("NBD_DO_IT on %s: %w", cfg.Device, err)
			}
			cfg.Log.Info().Str("device", cfg.Device).Msg("detached")
			return nil
		}
	}
}

// awaitCommit waits for the attaching process's "commit" line on f.
func awaitCommit(f *os.File, timeout time.Duration) error {
	defer f.Close()
	f.SetReadDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(f).ReadString('\n')
	if strings.TrimSpace(line) == commitLine {
		return nil
	}
	if err == nil {
		err = fmt.Errorf("got %q", line)
	}
	return fmt.Errorf("no commit from fcnbd attach: %w", err)
}

const commitLine = "commit"

// dialExport connects to the daemon and negotiates the export; it returns the socket as a file
// (blocking, out of the Go poller), for the kernel.
func dialExport(cfg HelperConfig) (*os.File, exportInfo, error) {
	d := net.Dialer{Timeout: cfg.Timeout}
	nc, err := d.Dial(cfg.Network, cfg.Address)
	if err != nil {
		return nil, exportInfo{}, fmt.Errorf("the daemon's NBD server is not reachable at %s: %w (is fcnbd serve running?)", cfg.Address, err)
	}
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(cfg.Timeout))
	info, err := handshake(nc, cfg.Export)
	if err != nil {
		return nil, exportInfo{}, fmt.Errorf("NBD handshake with %s: %w", cfg.Address, err)
	}
	nc.SetDeadline(time.Time{})
	fc, ok := nc.(interface{ File() (*os.File, error) })
	if !ok {
		return nil, exportInfo{}, fmt.Errorf("connection of type %T has no file descriptor", nc)
	}
	f, err := fc.File()
	if err != nil {
		return nil, exportInfo{}, err
	}
	return f, info, nil
}

func ioctlArg(f *os.File, req, arg uintptr) error {
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), req, arg); e != 0 {
		return e
	}
	return nil
}

// deviceReady reports whether the kernel shows /dev/NAME connected and sized.
func deviceReady(name string) bool {
	if _, err := os.Stat(filepath.Join("/sys/block", name, "pid")); err != nil {
		return false
	}
	data, err := os.ReadFile(filepath.Join("/sys/block", name, "size"))
	if err != nil {
		return false
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(data)), 10, 64)
	return err == nil && n > 0
}

// errBusy marks a device another process took.
var errBusy = errors.New("device busy")

// attachKernel picks a free /dev/nbdN and has a helper process connect it. Once the attachment
// is recorded, the caller must call commit(true); commit(false) (or this process's end) makes the
// helper disconnect the device.
func attachKernel(ctx context.Context, rec *Record, o Options) (commit func(ok bool), err error) {
	unlock, err := lockNBD(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	var busyErr error
	for n := 0; ; n++ {
		dev := fmt.Sprintf("/dev/nbd%d", n)
		if _, err := os.Stat(dev); err != nil {
			if busyErr != nil {
				return nil, busyErr
			}
			return nil, noFreeNBD(n)
		}
		if nbdInUse(n) {
			continue
		}
		pid, commit, err := startHelper(ctx, rec, dev, o)
		if errors.Is(err, errBusy) {
			busyErr = err
			continue
		}
		if err != nil {
			return nil, err
		}
		rec.Device, rec.HelperPID = dev, pid
		return commit, nil
	}
}

// noFreeNBD is the error when /dev/nbd0 to /dev/nbd(n-1) are all taken.
func noFreeNBD(n int) error {
	if n == 0 {
		return errors.New("the kernel has no NBD device (no /dev/nbd0: modprobe nbd, or use --method nbdfuse)")
	}
	return fmt.Errorf("no free NBD device (/dev/nbd0 to /dev/nbd%d are in use)", n-1)
}

// helperArgv is the command that runs RunHelper.
func (o Options) helperArgv() ([]string, error) {
	if len(o.Helper) > 0 {
		return o.Helper, nil
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find the fcnbd binary for the attach helper: %w", err)
	}
	return []string{exe, HelperCommand}, nil
}

// startHelper starts the helper for dev, detached (its own session), and waits for its status
// line. On any failure the helper is gone when it returns. On success the helper waits for
// commit.
func startHelper(ctx context.Context, rec *Record, dev string, o Options) (pid int, commit func(ok bool), err error) {
	argv, err := o.helperArgv()
	if err != nil {
		return 0, nil, err
	}
	args := append(append([]string{}, argv[1:]...), "--device", dev, "--export", rec.Volume,
		"--timeout", o.Timeout.String(), "--connections", strconv.Itoa(max(o.Connections, 1)))
	if rec.TCP != "" {
		args = append(args, "--nbd-tcp", rec.TCP)
	} else {
		args = append(args, "--nbd-unix", rec.Socket)
	}
	logPath := filepath.Join(o.Dir, rec.ID+".log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return 0, nil, err
	}
	defer logFile.Close()
	r, w, err := os.Pipe()
	if err != nil {
		return 0, nil, err
	}
	defer r.Close()
	cr, cw, err := os.Pipe()
	if err != nil {
		w.Close()
		return 0, nil, err
	}
	cmd := exec.Command(argv[0], args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.ExtraFiles = []*os.File{w, cr} // fd 3: the status line; fd 4: the commit
	cmd.Dir = "/"                      // not to keep the caller's working directory busy (unmountable)
	// Its own session: the helper outlives this process and must not get its terminal's signals.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	w.Close()
	cr.Close()
	if err != nil {
		cw.Close()
		return 0, nil, fmt.Errorf("start the attach helper: %w", err)
	}
	commit = func(ok bool) {
		if ok {
			fmt.Fprintln(cw, commitLine)
		}
		cw.Close()
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	helperLog := func() string {
		out, _ := os.ReadFile(logPath)
		return strings.TrimSpace(string(out))
	}

	// The helper bounds its own steps by o.Timeout; this is the backstop.
	r.SetReadDeadline(time.Now().Add(o.Timeout + 5*time.Second))
	stop := context.AfterFunc(ctx, func() { r.SetReadDeadline(time.Now()) })
	line, rerr := bufio.NewReader(r).ReadString('\n')
	stop()
	kind, msg, _ := strings.Cut(strings.TrimSpace(line), " ")
	if rerr == nil && kind == statusOK {
		return cmd.Process.Pid, commit, nil
	}
	commit(false)
	switch {
	case rerr == nil && (kind == statusBusy || kind == statusError):
		waitExit(cmd, exited, 5*time.Second)
		if kind == statusBusy {
			return 0, nil, fmt.Errorf("%w: %s", errBusy, msg)
		}
		return 0, nil, errors.New(msg)
	case errors.Is(rerr, os.ErrDeadlineExceeded):
		if ctx.Err() != nil {
			cmd.Process.Signal(syscall.SIGTERM) // interrupted: no need to wait for the helper
			waitExit(cmd, exited, 5*time.Second)
			return 0, nil, ctx.Err()
		}
		werr := waitExit(cmd, exited, 5*time.Second)
		return 0, nil, fmt.Errorf("the attach helper did not report within %v (%v): %s", o.Timeout+5*time.Second, werr, helperLog())
	default:
		werr := waitExit(cmd, exited, 5*time.Second)
		return 0, nil, fmt.Errorf("the attach helper exited (%v) without reporting: %s", werr, helperLog())
	}
}

// waitExit waits for the helper to exit, asks it to (SIGTERM: it disconnects its device) after
// grace, and kills it after as long again.
func waitExit(cmd *exec.Cmd, exited chan error, grace time.Duration) error {
	select {
	case err := <-exited:
		return err
	case <-time.After(grace):
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		return err
	case <-time.After(grace):
	}
	cmd.Process.Kill()
	return <-exited
}

// detachKernel disconnects a MethodNBD device and waits until its helper has exited and the
// kernel shows the device free. A helper already gone (killed, or the daemon's connection lost)
// is not an error: its device is then left alone, as it may be another attachment's by now.
func detachKernel(ctx context.Context, rec Record, o Options) error {
	n, err := nbdIndex(rec.Device)
	if err != nil {
		return err
	}
	if !helperAlive(rec.HelperPID, rec.Device) {
		return nil
	}
	f, err := os.OpenFile(rec.Device, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", rec.Device, err)
	}
	derr := disconnectDevice(f)
	f.Close()
	err = waitFor(ctx, o.Timeout, func() bool { return !helperAlive(rec.HelperPID, rec.Device) && !nbdInUse(n) })
	if err != nil {
		if derr != nil {
			return fmt.Errorf("disconnect %s: %w", rec.Device, derr)
		}
		return fmt.Errorf("%s still held by its attach helper (pid %d): %w", rec.Device, rec.HelperPID, err)
	}
	return nil
}

func nbdIndex(dev string) (int, error) {
	s, ok := strings.CutPrefix(dev, "/dev/nbd")
	n, err := strconv.Atoi(s)
	if !ok || err != nil || n < 0 {
		return 0, fmt.Errorf("%q is not an NBD device", dev)
	}
	return n, nil
}

// helperAlive reports whether pid is still the attach helper of dev (not exited, not a zombie
// waiting for its reaper, not a reused pid).
func helperAlive(pid int, dev string) bool {
	if pid <= 0 {
		return false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the command name, which is in parentheses and may hold anything.
	if i := strings.LastIndexByte(string(stat), ')'); i < 0 || i+2 >= len(stat) || stat[i+2] == 'Z' {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && strings.Contains(string(cmdline), "\x00--device\x00"+dev+"\x00")
}
