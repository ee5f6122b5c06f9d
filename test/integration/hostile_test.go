package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// logLines returns the daemon's JSON log lines whose message contains msg.
func logLines(t *testing.T, logs, msg string) []map[string]any {
	t.Helper()
	var out []map[string]any
	sc := bufio.NewScanner(strings.NewReader(logs))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) != nil {
			continue // not JSON (a panic would be): ignored here, the caller checks what it needs
		}
		if s, _ := m["message"].(string); strings.Contains(s, msg) {
			out = append(out, m)
		}
	}
	return out
}

// waitLog waits up to 10 s for a log line containing msg.
func waitLog(t *testing.T, d *daemon, msg string) []map[string]any {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if ls := logLines(t, d.logs.String(), msg); len(ls) > 0 || time.Now().After(deadline) {
			return ls
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestTCPNonLoopbackWarns: NBD on a non-loopback TCP address is allowed but warned about, in
// words that say what is at stake.
func TestTCPNonLoopbackWarns(t *testing.T) {
	_, port, _ := net.SplitHostPort(freeTCPAddr(t))
	for _, addr := range []string{"0.0.0.0:" + port, ":" + port} {
		t.Run(addr, func(t *testing.T) {
			d := startDaemon(t, "--nbd-tcp", addr)
			ls := waitLog(t, d, "NBD has no authentication")
			if len(ls) != 1 || ls[0]["level"] != "warn" || ls[0]["nbd_tcp"] != addr {
				t.Fatalf("warning lines %v\n%s", ls, d.logs.String())
			}
			// It really listens there, and serves.
			c, err := net.DialTimeout("tcp", "127.0.0.1:"+port, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			var g [8]byte
			if _, err := c.Read(g[:]); err != nil || string(g[:]) != "NBDMAGIC" {
				t.Fatalf("greeting %q %v", g, err)
			}
			c.Close()
			d.stop()
		})
	}
}

// TestTCPDefaultLoopback: without --nbd-tcp the daemon listens on loopback only and does not
// warn. The default port is fixed (10809), so the test skips if something else holds it.
func TestTCPDefaultLoopback(t *testing.T) {
	const def = "127.0.0.1:10809"
	l, err := net.Listen("tcp", def)
	if err != nil {
		t.Skipf("skipped: the default NBD port is in use (%v)", err)
	}
	l.Close()
	dir, err := os.MkdirTemp("", "fcnbd-it-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ctl := filepath.Join(dir, "c.sock")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cmd := exec.CommandContext(ctx, fcnbdBin(t), "serve", "--data-dir", filepath.Join(dir, "data"),
		"--socket", ctl, "--nbd-unix", filepath.Join(dir, "n.sock"), "--no-mlock")
	logs := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cancel()
		<-done
		if t.Failed() {
			t.Logf("daemon log:\n%s", logs.String())
		}
	})
	var serving []map[string]any
	for deadline := time.Now().Add(10 * time.Second); len(serving) == 0; {
		select {
		case err := <-done:
			done <- err
			t.Skipf("skipped: daemon exited at start (the default port was probably taken meanwhile): %v", err)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("daemon not serving after 10 s")
		}
		serving = logLines(t, logs.String(), "fcnbd serving")
	}
	if serving[0]["nbd_tcp"] != def {
		t.Fatalf("default nbd_tcp %v, want %s", serving[0]["nbd_tcp"], def)
	}
	if ls := logLines(t, logs.String(), "no authentication"); len(ls) != 0 {
		t.Fatalf("warned on loopback: %v", ls)
	}
	// The listening socket is bound to 127.0.0.1, not to every address.
	if !listensOn(t, "127.0.0.1", 10809) || listensOn(t, "0.0.0.0", 10809) {
		t.Fatalf("port 10809 not bound to loopback only:\n%s", readProcNetTCP(t))
	}
	if ls := logLines(t, logs.String(), "mlockall disabled by --no-mlock"); len(ls) != 1 {
		t.Fatalf("--no-mlock not reported once: %v", ls)
	}
}

func readProcNetTCP(t *testing.T) string {
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Skipf("skipped: %v", err)
	}
	return string(b)
}

// listensOn reports whether /proc/net/tcp has a socket in LISTEN state on ip:port.
func listensOn(t *testing.T, ip string, port int) bool {
	p := net.ParseIP(ip).To4()
	// /proc/net/tcp prints the address as the little-endian hex of the 32-bit value.
	want := fmt.Sprintf("%02X%02X%02X%02X:%04X", p[3], p[2], p[1], p[0], port)
	for _, line := range strings.Split(readProcNetTCP(t), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) > 3 && f[1] == want && f[3] == "0A" {
			return true
		}
	}
	return false
}

// TestHostileDaemonHardening: the daemon reports each same-host protection exactly once, at
// info when it took effect, at warn (with the error) when it did not.
func TestHostileDaemonHardening(t *testing.T) {
	d := startDaemon(t)
	for _, what := range []string{"PR_SET_IO_FLUSHER", "mlockall"} {
		ls := logLines(t, d.logs.String(), what)
		if len(ls) != 1 {
			t.Fatalf("%s reported %d times: %v", what, len(ls), ls)
		}
		switch ls[0]["level"] {
		case "info":
		case "warn":
			if ls[0]["error"] == nil {
				t.Fatalf("%s warning without the error: %v", what, ls[0])
			}
		default:
			t.Fatalf("%s logged at %v", what, ls[0]["level"])
		}
		t.Logf("%s: %v %v %v", what, ls[0]["level"], ls[0]["message"], ls[0]["error"])
	}
	d.stop()
}

// TestHostileDaemonGarbage sends random bytes to the control socket and to NBD over Unix and
// TCP; the daemon stays up, keeps serving, and exits cleanly.
func TestHostileDaemonGarbage(t *testing.T) {
	d := startDaemon(t)
	d.cli("mkvolume", "-name", "v0", "-size", "1M")
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 60 {
		network, addr := "unix", d.nbdSock
		switch i % 3 {
		case 1:
			network, addr = "tcp", d.tcp
		case 2:
			addr = d.ctl
		}
		c, err := net.DialTimeout(network, addr, 5*time.Second)
		if err != nil {
			t.Fatalf("dial %s %s: %v", network, addr, err)
		}
		b := make([]byte, 1+rng.IntN(16<<10))
		for j := range b {
			b[j] = byte(rng.Uint32())
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		c.Write(b)
		if cw, ok := c.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
		buf := make([]byte, 64<<10)
		for {
			if _, err := c.Read(buf); err != nil {
				if ne, ok := err.(net.Error); ok && ne.Timeout() {
					t.Fatalf("%s %s: the daemon kept a garbage connection open", network, addr)
				}
				break
			}
		}
		c.Close()
	}
	if out := d.cli("lsvolume"); !strings.Contains(out, "v0") {
		t.Fatalf("lsvolume after garbage: %s", out)
	}
	if strings.Contains(d.logs.String(), "panic") {
		t.Fatalf("panic in the log:\n%s", d.logs.String())
	}
	d.stop()
}
