package integration

import (
	"regexp"
	"slices"
	"strings"
	"testing"
)

// svcCommands reads the SVC command set (svcinfo or svctask) from the binary's own help, so that
// a command added to the table is covered here without this test knowing it.
func svcCommands(t *testing.T, d *daemon, category string) []string {
	t.Helper()
	out, _, err := d.run("--help")
	if err != nil {
		t.Fatalf("fcnbd --help: %v", err)
	}
	var cmds []string
	in := false
	for _, line := range strings.Split(out, "\n") {
		switch {
		case strings.TrimSpace(line) == category+":":
			in = true
		case in && strings.HasPrefix(line, "     "):
			cmds = append(cmds, strings.Fields(line)[0])
		case in:
			return cmds
		}
	}
	return cmds
}

// TestSVCSSHEveryCommand: every command of the SVC set, over a real sshd and ssh client. Each
// svctask command is run (the test fails if the table has one it does not run), and every
// svcinfo command in its concise view, with -delim ! and :, -nohdr, -filtervalue, and in its
// detailed view, giving byte for byte what the local `fcnbd svcinfo` gives.
func TestSVCSSHEveryCommand(t *testing.T) {
	d := startDaemon(t)
	run, _, _, _, _ := startSVCSSH(t, d)
	ran := map[string]bool{}
	task := func(line string, want string) {
		t.Helper()
		out, errs, code := run(line)
		ran[strings.Fields(strings.TrimPrefix(line, "svctask "))[0]] = true
		if strings.HasPrefix(want, "CMMVC") {
			if code == 0 || !strings.HasPrefix(errs, want) {
				t.Fatalf("ssh %q: exit %d, stderr %q; want %s", line, code, errs, want)
			}
			return
		}
		if code != 0 || errs != "" || !regexp.MustCompile(want).MatchString(out) {
			t.Fatalf("ssh %q: exit %d\nstdout: %q\nstderr: %s\nwant stdout matching %q", line, code, out, errs, want)
		}
	}
	const none = `^$`
	task(`svctask mkvdisk -name "src-1" -mdiskgrp "pool0" -iogrp 0 -size 8 -unit mb -rsize 2% -autoexpand -warning 0% -grainsize 256 -easytier on`,
		`^Virtual Disk, id \[0\], successfully created\n$`)
	task(`svctask mkvdisk -name "tgt-1" -mdiskgrp pool0 -iogrp 0 -size 8388608 -unit b`, `^Virtual Disk, id \[1\], successfully created\n$`)
	task(`svctask mkvolume -name tgt-2 -size 8M`, `^Volume, id \[2\], successfully created\n$`)
	task(`svctask mkvolume -name gone -size 8M`, `^Volume, id \[3\], successfully created\n$`)
	task(`svctask chvdisk -name "tgt-two" tgt-2`, none)
	task(`svctask expandvdisksize -size 1 -unit mb gone`, none)
	task(`svctask rmvolume gone`, none)
	task(`svctask mkvolume -name gone2 -size 8M`, `successfully created`)
	task(`svctask rmvdisk -force gone2`, none)
	task(`svctask mkfcconsistgrp -name grp-1`, `^FlashCopy Consistency Group, id \[\d+\], successfully created\n$`)
	task(`svctask chfcconsistgrp -autodelete off grp-1`, none)
	task(`svctask mkfcmap -source "src-1" -target "tgt-1" -name map-1 -consistgrp grp-1 -copyrate 0`,
		`^FlashCopy Mapping, id \[0\], successfully created\n$`)
	task(`svctask mkfcmap -source src-1 -target tgt-two -name map-2 -copyrate 0 -cleanrate 20`,
		`^FlashCopy Mapping, id \[1\], successfully created\n$`)
	task(`svctask chfcmap -cleanrate 30 map-2`, none)
	task(`svctask mkhost -name "host-1" -nbdname host-1 -force`, `^Host, id \[0\], successfully created\n$`)
	task(`svctask addhostport -nbdname ip:192.0.2.9 host-1`, none)
	task(`svctask rmhostport -nbdname ip:192.0.2.9 host-1`, none)
	task(`svctask chhost -type generic host-1`, none)
	task(`svctask mkvdiskhostmap -host "host-1" -scsi 0 src-1`, `^Virtual Disk to Host map, id \[0\], successfully created\n$`)
	task(`svctask prestartfcconsistgrp grp-1`, none)
	task(`svctask startfcconsistgrp grp-1`, none)
	task(`svctask prestartfcmap map-2`, none)
	task(`svctask startfcmap map-2`, none)
	task(`svctask recoverfcmap`, `.*`)

	// Every svcinfo command, with an object to name where it takes (or needs) one.
	object := map[string]string{
		"lsvolume": "src-1", "lsvdisk": "src-1", "lsfcmap": "map-1", "lsfcmapprogress": "map-1",
		"lsfcmapdependentmaps": "map-1", "lsvdiskfcmapcopies": "src-1", "lsvdiskdependentmaps": "src-1",
		"lsfcconsistgrp": "grp-1", "lshost": "host-1", "lsvdiskhostmap": "src-1", "lshostvdiskmap": "host-1",
		"lsnode": "node1", "lsiogrp": "io_grp0", "lsmdiskgrp": "pool0", "lsvdiskfcmappings": "src-1",
	}
	filter := map[string]string{
		"lsvolume": "name=src*", "lsvdisk": "name=*-1", "lsfcmap": "name=map*", "lsfcconsistgrp": "name=grp*",
		"lshost": "name=host*", "lsnode": "name=node*", "lsiogrp": "name=io_grp0", "lsmdiskgrp": "name=pool*",
		"lsvdiskhostmap": "host_name=host*", "lshostvdiskmap": "vdisk_name=src*",
	}
	// Capacities and times move between two calls: compare them by shape.
	digits := regexp.MustCompile(`[0-9.]+`)
	infos := svcCommands(t, d, "svcinfo")
	if len(infos) < 15 {
		t.Fatalf("fcnbd --help lists %d svcinfo commands: %v", len(infos), infos)
	}
	bytes := map[string]bool{"lsvolume": true, "lsvdisk": true, "lsmdiskgrp": true, "lssystem": true}
	for _, name := range infos {
		// Commands that name no object have a concise view only (lssystem, lslicense… a
		// detailed one only); those that need an object always name it.
		obj, named := object[name]
		needs := name == "lsvdiskhostmap" || name == "lsfcmapprogress" || name == "lsfcmapdependentmaps" ||
			strings.HasPrefix(name, "lsvdiskfc") || strings.HasPrefix(name, "lsvdiskdep")
		tail := ""
		if needs {
			tail = " " + obj
		}
		lines := []string{name + " -delim !" + tail, name + " -delim : -nohdr" + tail}
		if v, ok := filter[name]; ok {
			lines = append(lines, name+" -delim : -filtervalue "+v+tail)
		}
		if bytes[name] {
			lines = append(lines, name+" -bytes -delim !"+tail)
		}
		if named && !needs {
			lines = append(lines, name+" -delim : "+obj, name+" -delim ! "+obj)
		}
		for _, line := range lines {
			line = strings.Join(strings.Fields(line), " ")
			out, errs, code := run("svcinfo " + line)
			lout, lerrs, lerr := d.run(append([]string{"svcinfo"}, strings.Fields(line)...)...)
			if code != 0 || lerr != nil || errs != "" {
				t.Errorf("%q: over SSH exit %d stderr %q; locally %v stderr %q", line, code, errs, lerr, lerrs)
				continue
			}
			if !strings.Contains(line, "-nohdr") && out == "" {
				t.Errorf("%q: no output", line)
			}
			got, want := out, lout
			if name == "lssystem" || name == "lsmdiskgrp" || strings.Contains(line, "-bytes") {
				got, want = digits.ReplaceAllString(got, "N"), digits.ReplaceAllString(want, "N")
			}
			if got != want {
				t.Errorf("%q over SSH:\n%s\nlocally:\n%s", line, out, lout)
			}
		}
	}

	// The rest of the life of the objects, and the teardown, over SSH too.
	task(`svctask stopfcconsistgrp -force grp-1`, none)
	task(`svctask stopfcmap -force map-2`, none)
	task(`svctask rmfcmap -force map-2`, none)
	task(`svctask rmfcconsistgrp -force grp-1`, none)
	task(`svctask rmvdiskhostmap -host host-1 src-1`, none)
	task(`svctask rmhost host-1`, none)
	for _, name := range svcCommands(t, d, "svctask") {
		if !ran[name] {
			t.Errorf("svctask %s is in the SVC command set but this test does not run it", name)
		}
	}
	if !slices.Contains(infos, "lsvdisk") {
		t.Errorf("svcinfo commands: %v", infos)
	}
}
