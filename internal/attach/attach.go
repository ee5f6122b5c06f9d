// Package attach turns an fcnbd volume into a kernel block device on this host, and back: with
// the kernel NBD driver where it exists (from Go, through a helper process that holds the
// device: MethodNBD; or with nbd-client: MethodNBDClient), otherwise with nbdfuse (the export as
// a file on a FUSE mount) plus a loop device. Each attachment is recorded in a small JSON file
// under Options.Dir so that Detach, run by any later process, knows exactly what to undo.
//
// This package needs root and, depending on the method, host tools (nbd-client, nbdfuse,
// losetup, fusermount3); it knows nothing of the daemon beyond its NBD socket.
package attach

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"fcnbd/internal/fcerr"
)

// DefaultDir holds the attachment records and nbdfuse mount points.
const DefaultDir = "/run/fcnbd/attach"

// Methods.
const (
	MethodNBD       = "nbd"        // kernel NBD driver, from Go (a helper process holds the device)
	MethodNBDClient = "nbd-client" // kernel NBD driver via nbd-client
	MethodNBDFuse   = "nbdfuse"    // nbdfuse + losetup
)

// Methods lists the methods, for usage texts.
var Methods = []string{MethodNBD, MethodNBDClient, MethodNBDFuse}

// Record describes one attachment.
type Record struct {
	ID      string `json:"id"` // <volume>-<n>, unique under Dir
	Volume  string `json:"volume"`
	Device  string `json:"device"` // /dev/nbdN or /dev/loopN
	Method  string `json:"method"`
	Socket  string `json:"socket"`
	TCP     string `json:"tcp,omitempty"`      // the daemon's NBD TCP address, when used instead of Socket
	Mount   string `json:"mount,omitempty"`    // nbdfuse mount point
	Image   string `json:"image,omitempty"`    // the export as a file, on Mount
	FusePID int    `json:"fuse_pid,omitempty"` // nbdfuse's pid
	// HelperPID is the pid of the process holding a MethodNBD device (in NBD_DO_IT). A
	// MethodNBD record without it was made by nbd-client (before MethodNBDClient existed).
	HelperPID int `json:"helper_pid,omitempty"`
	// FollowPID is the pid of the `fcnbd follow` process the device reaches the volume
	// through (cluster mode: it follows the volume's I/O group across failovers); detach stops
	// it after the device.
	FollowPID int       `json:"follow_pid,omitempty"`
	Created   time.Time `json:"created"`
}

// Options configures Attach and Detach.
type Options struct {
	// Dir holds the records and mount points; empty means DefaultDir.
	Dir string
	// Socket is the daemon's NBD Unix socket.
	Socket string
	// TCP, if set, is the daemon's NBD TCP address (host:port), used instead of Socket.
	TCP string
	// Method forces a method; empty means MethodNBD if the kernel has the NBD driver, else
	// MethodNBDFuse.
	Method string
	// Timeout bounds each wait (connecting, the device ready, nbdfuse ready, loop released,
	// nbdfuse or the helper exited); 0 means 15 s.
	Timeout time.Duration
	// Connections is the number of connections of a kernel NBD device (MethodNBD and
	// MethodNBDClient); 0 means 1. nbdfuse takes one.
	Connections int
	// Helper is the command that runs RunHelper for MethodNBD; empty means this executable
	// with the argument HelperCommand.
	Helper []string
	// FollowPID, if set, is the `fcnbd follow` process serving Socket: recorded, and stopped
	// by the detach (or a failed attach) once the device is gone.
	FollowPID int
}

func (o *Options) defaults() {
	if o.Dir == "" {
		o.Dir = DefaultDir
	}
	if o.Timeout == 0 {
		o.Timeout = 15 * time.Second
	}
}

// KernelNBD reports whether the kernel NBD driver is available.
func KernelNBD() bool {
	for _, p := range []string{"/dev/nbd0", "/sys/module/nbd"} {
		if _, err := os.Stat(p); err == nil {
			return true
		}
	}
	return false
}

// Attach makes volume (an export name) a block device and returns its record. On error
// nothing is left behind, also when ctx ends midway (the cleanup runs regardless).
func Attach(ctx context.Context, volume string, o Options) (Record, error) {
	o.defaults()
	if o.Method == "" {
		o.Method = MethodNBDFuse
		if KernelNBD() {
			o.Method = MethodNBD
		}
	}
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return Record{}, err
	}
	switch o.Method {
	case MethodNBD, MethodNBDClient, MethodNBDFuse:
	default:
		return Record{}, fmt.Errorf("unknown attach method %q (want one of %s)", o.Method, strings.Join(Methods, ", "))
	}
	if o.Connections < 0 || o.Connections > 16 || (o.Connections > 1 && o.Method == MethodNBDFuse) {
		return Record{}, fmt.Errorf("%d connections: the kernel methods take 1 to 16, nbdfuse 1", o.Connections)
	}
	if o.TCP != "" {
		if _, _, err := net.SplitHostPort(o.TCP); err != nil {
			return Record{}, fmt.Errorf("NBD TCP address %q: %w", o.TCP, err)
		}
	}
	id, dir, err := reserve(o.Dir, volume)
	if err != nil {
		return Record{}, err
	}
	rec := Record{ID: id, Volume: volume, Method: o.Method, Socket: o.Socket, TCP: o.TCP, FollowPID: o.FollowPID, Created: time.Now().UTC()}
	if rec.TCP != "" {
		rec.Socket = ""
	}
	commit := func(bool) {}
	switch o.Method {
	case MethodNBD:
		var c func(bool)
		if c, err = attachKernel(ctx, &rec, o); c != nil {
			commit = c
		}
	case MethodNBDClient:
		err = attachNBDClient(ctx, &rec, o.Connections)
	case MethodNBDFuse:
		err = attachFuse(ctx, &rec, dir, o)
	default:
		err = fmt.Errorf("unknown attach method %q", o.Method)
	}
	if err == nil {
		err = writeRecord(o.Dir, rec)
		commit(err == nil)
		if err != nil {
			undo(context.WithoutCancel(ctx), rec, o)
		}
	}
	if err != nil {
		os.Remove(dir)
		removeFiles(o.Dir, id)
		return Record{}, err
	}
	return rec, nil
}

// reserve takes the first free <volume>-<n> under dir by creating its directory.
func reserve(dir, volume string) (string, string, error) {
	for n := 0; n < 1000; n++ {
		id := fmt.Sprintf("%s-%d", volume, n)
		p := filepath.Join(dir, id)
		err := os.Mkdir(p, 0o755)
		if err == nil {
			return id, p, nil
		}
		if !errors.Is(err, os.ErrExist) {
			return "", "", err
		}
	}
	return "", "", fmt.Errorf("too many attachments of %s", volume)
}

func attachNBDClient(ctx context.Context, rec *Record, conns int) error {
	unlock, err := lockNBD(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	var busyErr error
	for n := 0; ; n++ {
		dev := fmt.Sprintf("/dev/nbd%d", n)
		if _, err := os.Stat(dev); err != nil {
			if busyErr != nil {
				return busyErr
			}
			return noFreeNBD(n)
		}
		if nbdInUse(n) {
			continue
		}
		args := []string{"-unix", rec.Socket, dev}
		if rec.TCP != "" {
			host, port, _ := net.SplitHostPort(rec.TCP)
			args = []string{host, port, dev}
		}
		args = append(args, "-N", rec.Volume, "-b", "4096")
		if conns > 1 {
			args = append(args, "-C", strconv.Itoa(conns))
		}
		if _, err := run(ctx, "nbd-client", args...); err != nil {
			if nbdInUse(n) {
				// Something other than fcnbd attach took the device meanwhile: try the next.
				busyErr = err
				continue
			}
			return err
		}
		rec.Device = dev
		return nil
	}
}

// nbdInUse reports whether the kernel has /dev/nbdN connected.
func nbdInUse(n int) bool {
	_, err := os.Stat(fmt.Sprintf("/sys/block/nbd%d/pid", n))
	return err == nil
}

// NBDLockPath is locked (flock) while an attach picks a free /dev/nbdN and connects it, so that
// concurrent attaches do not pick the same device (the kernel refuses the second: "nbd0 already
// in use"). NBD devices belong to the machine, so the lock does too, whatever Options.Dir is.
var NBDLockPath = "/run/fcnbd/nbd-attach.lock"

func lockNBD(ctx context.Context) (func(), error) {
	if err := os.MkdirAll(filepath.Dir(NBDLockPath), 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(NBDLockPath, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil // closing the file releases the lock
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", NBDLockPath, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// exportURI is the NBD URI of volume on the Unix socket, or at the TCP address if tcp is set.
func exportURI(socket, tcp, volume string) string {
	if tcp != "" {
		return "nbd://" + tcp + "/" + url.PathEscape(volume)
	}
	return "nbd+unix:///" + url.PathEscape(volume) + "?socket=" + (&url.URL{Path: socket}).EscapedPath()
}

func attachFuse(ctx context.Context, rec *Record, dir string, o Options) (err error) {
	rec.Mount = dir
	rec.Image = filepath.Join(dir, rec.Volume)
	pidFile := filepath.Join(o.Dir, rec.ID+".pid")
	logPath := filepath.Join(o.Dir, rec.ID+".log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer logFile.Close()
	cmd := exec.Command("nbdfuse", "-P", pidFile, rec.Image, exportURI(rec.Socket, rec.TCP, rec.Volume))
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Its own session: nbdfuse outlives this process and must not get its terminal's signals.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start nbdfuse: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	rec.FusePID = cmd.Process.Pid
	defer func() {
		if err != nil {
			// Even when ctx ended (the attach was interrupted): the cleanup must run.
			undo(context.WithoutCancel(ctx), *rec, o)
		}
	}()

	deadline := time.Now().Add(o.Timeout)
	for {
		if _, perr := os.Stat(pidFile); perr == nil {
			if fi, serr := os.Stat(rec.Image); serr == nil && fi.Mode().IsRegular() {
				break
			}
		}
		select {
		case werr := <-exited:
			out, _ := os.ReadFile(logPath)
			return fmt.Errorf("nbdfuse exited (%v): %s", werr, strings.TrimSpace(string(out)))
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			out, _ := os.ReadFile(logPath)
			return fmt.Errorf("nbdfuse not ready after %v: %s", o.Timeout, strings.TrimSpace(string(out)))
		}
	}

	// losetup is not interrupted: killed midway it could leave a loop device it never printed.
	lctx := context.WithoutCancel(ctx)
	dev, lerr := run(lctx, "losetup", "--show", "-f", "--direct-io=on", rec.Image)
	if lerr != nil {
		// Direct I/O on the FUSE file is not available everywhere; the buffered loop is still
		// correct because the loop driver passes flushes down as fsync.
		dev, lerr = run(lctx, "losetup", "--show", "-f", rec.Image)
	}
	if lerr != nil {
		return lerr
	}
	rec.Device = strings.TrimSpace(dev)
	if !strings.HasPrefix(rec.Device, "/dev/loop") {
		return fmt.Errorf("losetup printed %q", rec.Device)
	}
	return ctx.Err() // interrupted meanwhile: undone
}

// List returns every attachment recorded under dir (DefaultDir if empty).
func List(dir string) ([]Record, error) {
	if dir == "" {
		dir = DefaultDir
	}
	paths, err := filepath.Glob(filepath.Join(dir, "*.json"))
	if err != nil {
		return nil, err
	}
	var out []Record
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		var r Record
		if err := json.Unmarshal(data, &r); err != nil {
			return nil, fmt.Errorf("attachment record %s: %w", p, err)
		}
		out = append(out, r)
	}
	return out, nil
}

// Detach undoes the attachment whose device is device (/dev/loopN, /dev/nbdN, or just the
// name). It refuses (fcerr.BadState) while the device is mounted or held, and an unknown device
// is fcerr.NoSuchObject. Data reaches the daemon before the device goes: the device is synced
// first.
func Detach(ctx context.Context, device string, o Options) error {
	o.defaults()
	if !strings.HasPrefix(device, "/") {
		device = "/dev/" + device
	}
	recs, err := List(o.Dir)
	if err != nil {
		return err
	}
	var rec *Record
	for i := range recs {
		r := &recs[i]
		if r.Device != device {
			continue
		}
		// A device whose helper died may have been attached again since: the record of the
		// live attachment goes first (the stale one is for a later detach to drop).
		if rec == nil || (r.HelperPID != 0 && helperAlive(r.HelperPID, r.Device)) {
			rec = r
		}
	}
	if rec == nil {
		return fcerr.New(fcerr.NoSuchObject, "%s is not attached by fcnbd", device)
	}
	if where := mountedAt(rec.Device); where != "" {
		return fcerr.New(fcerr.BadState, "%s is mounted on %s; unmount it first", rec.Device, where)
	}
	if holders, _ := os.ReadDir(filepath.Join("/sys/block", filepath.Base(rec.Device), "holders")); len(holders) > 0 {
		return fcerr.New(fcerr.BadState, "%s is in use by %s", rec.Device, holders[0].Name())
	}
	if n, err := nbdIndex(rec.Device); err == nil && !nbdInUse(n) {
		// The kernel no longer has the device connected (its helper was killed, or the daemon's
		// connection was lost): nothing can be synced through it, and a flush would only fail.
	} else if err := syncDevice(rec.Device); err != nil {
		return fmt.Errorf("sync %s: %w", rec.Device, err)
	}
	if err := undo(ctx, *rec, o); err != nil {
		return err
	}
	os.Remove(filepath.Join(o.Dir, rec.ID))
	return removeFiles(o.Dir, rec.ID)
}

// undo takes an attachment apart; each step is skipped if already done, so it can finish a
// Detach that was interrupted.
func undo(ctx context.Context, rec Record, o Options) error {
	if err := undoDevice(ctx, rec, o); err != nil {
		return err
	}
	if rec.FollowPID > 0 && alive(rec.FollowPID) {
		// Its last act is a FLUSH, which makes durable what the device wrote through it.
		syscall.Kill(rec.FollowPID, syscall.SIGTERM)
		if err := waitFor(ctx, o.Timeout, func() bool { return !alive(rec.FollowPID) }); err != nil {
			return fmt.Errorf("fcnbd follow (pid %d) did not exit: %w", rec.FollowPID, err)
		}
	}
	return nil
}

func undoDevice(ctx context.Context, rec Record, o Options) error {
	switch rec.Method {
	case MethodNBD:
		if rec.HelperPID != 0 {
			return detachKernel(ctx, rec, o)
		}
		fallthrough // a record of nbd-client from before MethodNBDClient existed
	case MethodNBDClient:
		if rec.Device != "" {
			if _, err := run(ctx, "nbd-client", "-d", rec.Device); err != nil {
				return err
			}
		}
		return nil
	case MethodNBDFuse:
	default:
		return fmt.Errorf("unknown attach method %q", rec.Method)
	}
	loops := []string{rec.Device}
	if rec.Device == "" {
		// The attach did not get as far as recording its loop device: find it, if any.
		loops = loopsOf(rec.Image)
	}
	for _, dev := range loops {
		if dev == "" || loopBacking(dev) != rec.Image {
			continue
		}
		if _, err := run(ctx, "losetup", "-d", dev); err != nil {
			return err
		}
		if err := waitFor(ctx, o.Timeout, func() bool { return loopBacking(dev) != rec.Image }); err != nil {
			return fmt.Errorf("loop device %s did not release %s: %w", dev, rec.Image, err)
		}
	}
	if rec.FusePID > 0 && alive(rec.FusePID) && !isMountPoint(rec.Mount) {
		// An attach that failed or was interrupted while nbdfuse was starting: stop it rather
		// than wait for a mount that may still come.
		syscall.Kill(rec.FusePID, syscall.SIGTERM)
	}
	if err := unmountFuse(ctx, rec.Mount, o.Timeout); err != nil {
		return err
	}
	if rec.FusePID > 0 {
		// nbdfuse flushes and disconnects when unmounted; wait so that detach returns only once
		// the daemon has everything.
		if err := waitFor(ctx, o.Timeout, func() bool { return !alive(rec.FusePID) }); err != nil {
			return fmt.Errorf("nbdfuse (pid %d) did not exit: %w", rec.FusePID, err)
		}
	}
	// A mount made just before nbdfuse was stopped outlives it.
	return unmountFuse(ctx, rec.Mount, o.Timeout)
}

// unmountFuse unmounts dir if it is a mount point.
func unmountFuse(ctx context.Context, dir string, timeout time.Duration) error {
	if dir == "" || !isMountPoint(dir) {
		return nil
	}
	var lastErr error
	err := waitFor(ctx, timeout, func() bool {
		_, lastErr = run(ctx, "fusermount3", "-u", dir)
		return lastErr == nil || !isMountPoint(dir)
	})
	if err != nil {
		return fmt.Errorf("unmount %s: %v", dir, lastErr)
	}
	return nil
}

func writeRecord(dir string, rec Record) error {
	data, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, rec.ID+".json.tmp")
	if err := os.WriteFile(tmp, append(data, '\n'), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, rec.ID+".json"))
}

func removeFiles(dir, id string) error {
	for _, suffix := range []string{".pid", ".log", ".json.tmp"} { // nbdfuse's pid file, nbdfuse's or the helper's log
		os.Remove(filepath.Join(dir, id+suffix))
	}
	if err := os.Remove(filepath.Join(dir, id+".json")); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func run(ctx context.Context, name string, args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

func waitFor(ctx context.Context, timeout time.Duration, done func() bool) error {
	deadline := time.Now().Add(timeout)
	for !done() {
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %v", timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

// loopsOf returns the loop devices whose backing file is image.
func loopsOf(image string) []string {
	if image == "" {
		return nil
	}
	var out []string
	paths, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, p := range paths {
		if data, err := os.ReadFile(p); err == nil && strings.TrimSpace(string(data)) == image {
			out = append(out, "/dev/"+filepath.Base(filepath.Dir(filepath.Dir(p))))
		}
	}
	return out
}

// loopBacking is the file behind a loop device, or "" if it has none.
func loopBacking(dev string) string {
	data, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(data))
}

func alive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// mountInfo calls fn with the source and mount point of every mount of this process's
// namespace (unescaped).
func mountInfo(fn func(source, target string) bool) {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) >= 2 && fn(unescape(fields[0]), unescape(fields[1])) {
			return
		}
	}
}

func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func mountedAt(dev string) string {
	where := ""
	mountInfo(func(source, target string) bool {
		if source == dev {
			where = target
			return true
		}
		return false
	})
	return where
}

func isMountPoint(dir string) bool {
	found := false
	mountInfo(func(_, target string) bool {
		found = target == dir
		return found
	})
	return found
}

// syncDevice writes the device's cached blocks down and has the device flush them through to
// the daemon (for a loop device: fsync of the nbdfuse file, which nbdfuse sends as NBD FLUSH).
func syncDevice(dev string) error {
	f, err := os.Open(dev)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}
