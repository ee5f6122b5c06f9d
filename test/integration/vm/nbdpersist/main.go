// Command nbdpersist is a guest-side helper for the VM tests: it attaches an NBD export to a kernel
// /dev/nbdN through the kernel's netlink interface with a dead-connection timeout, and when the
// kernel reports a connection dead (the server restarted) it connects again and hands the new
// socket to the kernel with NBD_CMD_RECONFIGURE, so a mounted filesystem survives a server restart.
//
// nbd-client 3.24 cannot do this on a current kernel: in netlink mode it exits after connecting
// and never reconfigures, and in ioctl mode -persist gives up because NBD_DO_IT returns 0 when the
// server closes the connection (and a restart is refused with EBUSY while the device is open).
//
// Usage: nbdpersist HOST PORT /dev/nbdN EXPORT [CONNECTIONS] — runs until SIGTERM/SIGINT, then
// exits leaving the device attached (detach with nbd-client -d). After each successful reconnect
// it writes the number of reconnects so far to /run/nbdpersist-nbdN.reconnects.
package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// From linux/nbd-netlink.h.
const (
	nbdCmdConnect     = 1
	nbdCmdReconfigure = 3
	nbdCmdLinkDead    = 4

	nbdAttrIndex           = 1
	nbdAttrSizeBytes       = 2
	nbdAttrBlockSizeBytes  = 3
	nbdAttrTimeout         = 4
	nbdAttrServerFlags     = 5
	nbdAttrSockets         = 7
	nbdAttrDeadConnTimeout = 8

	nbdSockItem = 1
	nbdSockFD   = 1

	deadConnTimeout = 120 // seconds the kernel queues I/O for a dead connection
)

func main() {
	if len(os.Args) < 5 {
		fmt.Fprintln(os.Stderr, "usage: nbdpersist HOST PORT /dev/nbdN EXPORT [CONNECTIONS]")
		os.Exit(2)
	}
	addr := net.JoinHostPort(os.Args[1], os.Args[2])
	index, err := strconv.Atoi(strings.TrimPrefix(os.Args[3], "/dev/nbd"))
	if err != nil {
		fatal(fmt.Errorf("bad device %s", os.Args[3]))
	}
	export := os.Args[4]
	conns := 1
	if len(os.Args) > 5 {
		if conns, err = strconv.Atoi(os.Args[5]); err != nil || conns < 1 {
			fatal(fmt.Errorf("bad connection count %s", os.Args[5]))
		}
	}

	g, err := openGenl("nbd", "nbd_mc_group")
	if err != nil {
		fatal(err)
	}
	var fds []int
	var size uint64
	var flags uint16
	for i := 0; i < conns; i++ {
		fd, sz, fl, err := dialNBD(addr, export)
		if err != nil {
			fatal(err)
		}
		fds, size, flags = append(fds, fd), sz, fl
	}
	attrs := [][]byte{
		nla32(nbdAttrIndex, uint32(index)),
		nla64(nbdAttrSizeBytes, size),
		nla64(nbdAttrBlockSizeBytes, 4096),
		nla64(nbdAttrTimeout, 30),
		nla64(nbdAttrServerFlags, uint64(flags)),
		nla64(nbdAttrDeadConnTimeout, deadConnTimeout),
		sockets(fds),
	}
	if err := g.request(nbdCmdConnect, attrs); err != nil {
		fatal(fmt.Errorf("NBD_CMD_CONNECT: %w", err))
	}
	for _, fd := range fds {
		unix.Close(fd) // the kernel holds its own references
	}
	fmt.Printf("nbdpersist: connected /dev/nbd%d (%d bytes, %d connections)\n", index, size, conns)

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	dead := make(chan struct{}, 64)
	go func() {
		for {
			cmd, idx, err := g.receive()
			if err != nil {
				fatal(fmt.Errorf("netlink receive: %w", err))
			}
			if cmd == nbdCmdLinkDead && idx == uint32(index) {
				dead <- struct{}{}
			}
		}
	}()
	reconnects := 0
	for {
		select {
		case <-sigs:
			return
		case <-dead:
			fmt.Printf("nbdpersist: a connection of /dev/nbd%d is dead; reconnecting\n", index)
			if reconnect(g, addr, export, index) {
				reconnects++
				status := fmt.Sprintf("/run/nbdpersist-nbd%d.reconnects", index)
				if err := os.WriteFile(status, []byte(strconv.Itoa(reconnects)+"\n"), 0o644); err != nil {
					fatal(err)
				}
			}
		}
	}
}

// reconnect replaces one dead connection, retrying until the server is back; false if there
// was no dead connection left to replace.
func reconnect(g *genl, addr, export string, index int) bool {
	deadline := time.Now().Add(deadConnTimeout * time.Second)
	for {
		fd, _, _, err := dialNBD(addr, export)
		if err == nil {
			err = g.request(nbdCmdReconfigure, [][]byte{nla32(nbdAttrIndex, uint32(index)), sockets([]int{fd})})
			unix.Close(fd)
			if err == nil {
				fmt.Printf("nbdpersist: reconnected /dev/nbd%d\n", index)
				return true
			}
			if errors.Is(err, unix.ENOSPC) { // no dead connection left to replace
				return false
			}
		}
		if time.Now().After(deadline) {
			fatal(fmt.Errorf("could not reconnect: %w", err))
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// dialNBD connects and negotiates (fixed newstyle, NBD_OPT_EXPORT_NAME); it returns the socket's
// fd (a dup the caller owns), the export size and the transmission flags.
func dialNBD(addr, export string) (int, uint64, uint16, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return -1, 0, 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	var hello [18]byte
	if _, err := io.ReadFull(c, hello[:]); err != nil {
		return -1, 0, 0, fmt.Errorf("handshake: %w", err)
	}
	if string(hello[:8]) != "NBDMAGIC" || string(hello[8:16]) != "IHAVEOPT" {
		return -1, 0, 0, errors.New("handshake: not a newstyle NBD server")
	}
	serverFlags := binary.BigEndian.Uint16(hello[16:])
	clientFlags := uint32(1) // NBD_FLAG_C_FIXED_NEWSTYLE
	noZeroes := serverFlags&2 != 0
	if noZeroes {
		clientFlags |= 2 // NBD_FLAG_C_NO_ZEROES
	}
	msg := binary.BigEndian.AppendUint32(nil, clientFlags)
	msg = append(msg, "IHAVEOPT"...)
	msg = binary.BigEndian.AppendUint32(msg, 1) // NBD_OPT_EXPORT_NAME
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(export)))
	msg = append(msg, export...)
	if _, err := c.Write(msg); err != nil {
		return -1, 0, 0, err
	}
	var reply [10]byte
	if _, err := io.ReadFull(c, reply[:]); err != nil {
		return -1, 0, 0, fmt.Errorf("export %q refused: %w", export, err)
	}
	if !noZeroes {
		var pad [124]byte
		if _, err := io.ReadFull(c, pad[:]); err != nil {
			return -1, 0, 0, err
		}
	}
	c.SetDeadline(time.Time{})
	f, err := c.(*net.TCPConn).File() // a blocking dup of the socket
	if err != nil {
		return -1, 0, 0, err
	}
	fd, err := unix.Dup(int(f.Fd()))
	f.Close()
	if err != nil {
		return -1, 0, 0, err
	}
	return fd, binary.BigEndian.Uint64(reply[:8]), binary.BigEndian.Uint16(reply[8:]), nil
}

// ---- a minimal generic netlink client ----

type genl struct {
	fd     int // requests
	mc     int // multicast notifications
	family uint16
	seq    uint32
}

func openGenl(family, group string) (*genl, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_GENERIC)
	if err != nil {
		return nil, err
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, err
	}
	g := &genl{fd: fd, family: unix.GENL_ID_CTRL}
	name := append([]byte(family), 0)
	msgs, err := g.roundTrip(unix.CTRL_CMD_GETFAMILY, [][]byte{nla(unix.CTRL_ATTR_FAMILY_NAME, name)})
	if err != nil {
		return nil, fmt.Errorf("generic netlink family %s (is the nbd module loaded?): %w", family, err)
	}
	var groupID uint32
	for _, a := range parseAttrs(msgs[0][unix.GENL_HDRLEN:]) {
		switch a.typ {
		case unix.CTRL_ATTR_FAMILY_ID:
			g.family = binary.LittleEndian.Uint16(a.data)
		case unix.CTRL_ATTR_MCAST_GROUPS:
			for _, grp := range parseAttrs(a.data) {
				var id uint32
				var gname string
				for _, f := range parseAttrs(grp.data) {
					switch f.typ {
					case unix.CTRL_ATTR_MCAST_GRP_ID:
						id = binary.LittleEndian.Uint32(f.data)
					case unix.CTRL_ATTR_MCAST_GRP_NAME:
						gname = strings.TrimRight(string(f.data), "\x00")
					}
				}
				if gname == group {
					groupID = id
				}
			}
		}
	}
	if groupID == 0 {
		return nil, fmt.Errorf("generic netlink family %s has no group %s", family, group)
	}
	mc, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_GENERIC)
	if err != nil {
		return nil, err
	}
	if err := unix.Bind(mc, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, err
	}
	if err := unix.SetsockoptInt(mc, unix.SOL_NETLINK, unix.NETLINK_ADD_MEMBERSHIP, int(groupID)); err != nil {
		return nil, err
	}
	g.mc = mc
	return g, nil
}

// request sends a command and waits for its acknowledgement.
func (g *genl) request(cmd uint8, attrs [][]byte) error {
	_, err := g.roundTrip(cmd, attrs)
	return err
}

func (g *genl) roundTrip(cmd uint8, attrs [][]byte) ([][]byte, error) {
	g.seq++
	body := []byte{cmd, 1, 0, 0} // genlmsghdr: cmd, version
	for _, a := range attrs {
		body = append(body, a...)
	}
	msg := make([]byte, unix.NLMSG_HDRLEN, unix.NLMSG_HDRLEN+len(body))
	binary.LittleEndian.PutUint32(msg[0:], uint32(unix.NLMSG_HDRLEN+len(body)))
	binary.LittleEndian.PutUint16(msg[4:], g.family)
	binary.LittleEndian.PutUint16(msg[6:], unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	binary.LittleEndian.PutUint32(msg[8:], g.seq)
	msg = append(msg, body...)
	if err := unix.Sendto(g.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, err
	}
	var out [][]byte
	buf := make([]byte, 65536)
	for {
		n, _, err := unix.Recvfrom(g.fd, buf, 0)
		if err != nil {
			return nil, err
		}
		for b := buf[:n]; len(b) >= unix.NLMSG_HDRLEN; {
			l := int(binary.LittleEndian.Uint32(b))
			if l < unix.NLMSG_HDRLEN || l > len(b) {
				return nil, errors.New("netlink: bad message length")
			}
			typ := binary.LittleEndian.Uint16(b[4:])
			payload := b[unix.NLMSG_HDRLEN:l]
			if typ == unix.NLMSG_ERROR {
				if errno := int32(binary.LittleEndian.Uint32(payload)); errno != 0 {
					return nil, unix.Errno(-errno)
				}
				return out, nil
			}
			out = append(out, append([]byte(nil), payload...)) // buf is reused by the next read
			b = b[align4(l):]
		}
	}
}

// receive returns the next multicast notification's command and NBD_ATTR_INDEX.
func (g *genl) receive() (uint8, uint32, error) {
	buf := make([]byte, 65536)
	for {
		n, _, err := unix.Recvfrom(g.mc, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return 0, 0, err
		}
		b := buf[:n]
		if len(b) < unix.NLMSG_HDRLEN+unix.GENL_HDRLEN {
			continue
		}
		l := int(binary.LittleEndian.Uint32(b))
		if l > len(b) {
			continue
		}
		payload := b[unix.NLMSG_HDRLEN:l]
		var idx uint32
		for _, a := range parseAttrs(payload[unix.GENL_HDRLEN:]) {
			if a.typ == nbdAttrIndex && len(a.data) >= 4 {
				idx = binary.LittleEndian.Uint32(a.data)
			}
		}
		return payload[0], idx, nil
	}
}

type attr struct {
	typ  uint16
	data []byte
}

func parseAttrs(b []byte) []attr {
	var out []attr
	for len(b) >= 4 {
		l := int(binary.LittleEndian.Uint16(b))
		if l < 4 || l > len(b) {
			break
		}
		out = append(out, attr{typ: binary.LittleEndian.Uint16(b[2:]) & 0x3fff, data: b[4:l]})
		b = b[min(align4(l), len(b)):]
	}
	return out
}

func align4(n int) int { return (n + 3) &^ 3 }

func nla(typ uint16, data []byte) []byte {
	b := make([]byte, 4, align4(4+len(data)))
	binary.LittleEndian.PutUint16(b, uint16(4+len(data)))
	binary.LittleEndian.PutUint16(b[2:], typ)
	b = append(b, data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func nla32(typ uint16, v uint32) []byte { return nla(typ, binary.LittleEndian.AppendUint32(nil, v)) }
func nla64(typ uint16, v uint64) []byte { return nla(typ, binary.LittleEndian.AppendUint64(nil, v)) }

func nested(typ uint16, children ...[]byte) []byte {
	var data []byte
	for _, c := range children {
		data = append(data, c...)
	}
	return nla(typ|unix.NLA_F_NESTED, data)
}

func sockets(fds []int) []byte {
	var items [][]byte
	for _, fd := range fds {
		items = append(items, nested(nbdSockItem, nla32(nbdSockFD, uint32(fd))))
	}
	return nested(nbdAttrSockets, items...)
}

func fatal(err error) {
	fmt.Fprintf(os.Stderr, "nbdpersist: %v\n", err)
	os.Exit(1)
}
