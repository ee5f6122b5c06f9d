package main

import (
	"bytes"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rs/zerolog"

	"fcnbd/internal/api"
	"fcnbd/internal/catalog"
	"fcnbd/internal/hosts"
	"fcnbd/internal/store"
	"fcnbd/internal/volume"
)

// hostsDaemon serves the real API over a real volume manager and hosts manager on a Unix
// socket, with volumes vol1 and vol2.
func hostsDaemon(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	cat, err := catalog.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	vols, err := volume.Open(volume.Options{Catalog: cat, FS: store.Dir{Path: dir}})
	if err != nil {
		t.Fatal(err)
	}
	hm, err := hosts.New(cat, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"vol1", "vol2"} {
		if _, err := vols.Create(v, 1<<20); err != nil {
			t.Fatal(err)
		}
	}
	sock := filepath.Join(t.TempDir(), "c.sock")
	l, err := api.ListenUnix(sock, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(api.NewHandler(vols, zerolog.Nop()).WithHosts(hm).WithSystem(t.TempDir()))
	srv.Listener.Close()
	srv.Listener = l
	srv.Start()
	t.Cleanup(func() {
		srv.Close()
		vols.Close()
		cat.Close()
	})
	return sock
}

func TestHostCommands(t *testing.T) {
	sock := hostsDaemon(t)
	cli := func(args ...string) (string, string, int) {
		var out, errb bytes.Buffer
		code := run(append([]string{"fcnbd", "--socket", sock}, args...), &out, &errb)
		return out.String(), errb.String(), code
	}
	ok := func(want string, args ...string) {
		t.Helper()
		out, errs, code := cli(args...)
		if code != 0 || out != want {
			t.Errorf("fcnbd %s: exit %d, stdout %q, stderr %q; want stdout %q", strings.Join(args, " "), code, out, errs, want)
		}
	}
	refused := func(code string, args ...string) {
		t.Helper()
		out, errs, status := cli(args...)
		if status != 1 || out != "" || !strings.HasPrefix(errs, code+" ") {
			t.Errorf("fcnbd %s: exit %d, stdout %q, stderr %q; want %s", strings.Join(args, " "), status, out, errs, code)
		}
	}
	// Cinder's own lines (storwize_svc_common.py), then ours.
	ok("Host, id [0], successfully created\n", "mkhost", "-force", "-iscsiname", "iqn.1993-08.org.debian:01:abc", "-name", "cinder-host")
	ok("", "addhostport", "-force", "-hbawwpn", "500507680140ABCD", "cinder-host")
	ok("Host, id [1], successfully created\n", "mkhost", "-name", "hostA", "-nbdname", "hostA,ip:10.0.0.1", "-iogrp", "io_grp0", "-type", "generic", "-protocol", "scsi")
	ok("Host, id [2], successfully created\n", "mkhost", "-fcwwpn", "500507680140AB01:500507680140AB02")
	ok("Virtual Disk to Host map, id [0], successfully created\n", "mkvdiskhostmap", "-host", "hostA", "vol1")
	ok("Virtual Disk to Host map, id [3], successfully created\n", "mkvdiskhostmap", "-host", "hostA", "-scsi", "3", "vol2")
	ok("Virtual Disk to Host map, id [0], successfully created\n", "mkvdiskhostmap", "-force", "-host", "cinder-host", "-scsi", "0", "vol1")

	ok("id!name!port_count!iogrp_count!status!site_id!site_name!host_cluster_id!host_cluster_name!protocol\n"+
		"0!cinder-host!2!1!offline!!!!!scsi\n1!hostA!2!1!offline!!!!!scsi\n2!host2!2!1!offline!!!!!scsi\n",
		"lshost", "-delim", "!")
	ok("1:hostA:2:1:offline:::::scsi\n", "lshost", "-nohdr", "-delim", ":", "-filtervalue", "name=host*A")
	out, _, _ := cli("lshost", "-delim", "!", "cinder-host")
	for _, line := range []string{"id!0\n", "name!cinder-host\n", "iscsi_name!iqn.1993-08.org.debian:01:abc\n", "WWPN!500507680140ABCD\n", "type!generic\n"} {
		if !strings.Contains(out, line) {
			t.Errorf("lshost cinder-host misses %q:\n%s", line, out)
		}
	}
	// vdisk_UID is lsvdisk's: the system's id and the volume's.
	sys, _, _ := cli("lssystem", "-delim", "!")
	_, sysID, _ := strings.Cut(strings.SplitN(sys, "\n", 2)[0], "!")
	uid0, uid1 := vdiskUID(sysID, 0), vdiskUID(sysID, 1)
	ok("0!vol1!0!0!cinder-host!"+uid0+"!0!io_grp0!private!!!scsi\n0!vol1!0!1!hostA!"+uid0+"!0!io_grp0!private!!!scsi\n",
		"lsvdiskhostmap", "-delim", "!", "-nohdr", "vol1")
	ok("id:name:SCSI_id:vdisk_id:vdisk_name:vdisk_UID:IO_group_id:IO_group_name:mapping_type:host_cluster_id:host_cluster_name:protocol\n"+
		"1:hostA:0:0:vol1:"+uid0+":0:io_grp0:private:::scsi\n1:hostA:3:1:vol2:"+uid1+":0:io_grp0:private:::scsi\n",
		"lshostvdiskmap", "-delim", ":", "hostA")

	refused("CMMVC5707E", "mkhost", "-name", "x")
	refused("CMMVC6035E", "mkhost", "-name", "hostA", "-nbdname", "other")
	refused("CMMVC6581E", "mkhost", "-name", "x", "-nbdname", "ip:10.0.0.1")
	refused("CMMVC5707E", "mkvdiskhostmap", "vol2")
	refused("CMMVC5731E", "mkvdiskhostmap", "-host", "hostA", "-scsi", "x", "vol2")
	refused("CMMVC6071E", "mkvdiskhostmap", "-host", "host2", "vol2")
	refused("CMMVC5879E", "mkvdiskhostmap", "-host", "cinder-host", "-force", "-scsi", "0", "vol2")
	refused("CMMVC5871E", "rmhost", "hostA")
	refused("CMMVC5840E", "rmvolume", "vol1")
	refused("CMMVC5754E", "lshostvdiskmap", "nosuch")
	refused("CMMVC5753E", "lsvdiskhostmap", "nosuch")
	refused("CMMVC5707E", "lsvdiskhostmap")

	ok("", "rmvdiskhostmap", "-host", "hostA", "vol2")
	ok("", "chhost", "-name", "hostB", "hostA")
	ok("", "rmhostport", "-force", "-nbdname", "ip:10.0.0.1", "hostB")
	ok("1 hostB 1 1 offline     scsi\n", "lshost", "-nohdr", "-filtervalue", "id=1")
	ok("", "rmhost", "-force", "hostB")
	ok("", "rmvolume", "-force", "vol1")
	ok("", "lshostvdiskmap", "-nohdr")
}
