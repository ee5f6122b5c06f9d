package main

import (
	"context"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"fcnbd/internal/api"
)

// detail parses a detailed view printed with -delim !.
func detail(t *testing.T, out string) map[string]string {
	t.Helper()
	m := map[string]string{}
	for _, line := range strings.Split(strings.TrimSuffix(out, "\n"), "\n") {
		k, v, ok := strings.Cut(line, "!")
		if !ok {
			t.Fatalf("not a detailed view line: %q", line)
		}
		m[k] = v
	}
	return m
}

// table parses a concise view printed with -delim !, header first.
func table(t *testing.T, out string) []map[string]string {
	t.Helper()
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	hdr := strings.Split(lines[0], "!")
	var rows []map[string]string
	for _, l := range lines[1:] {
		vals := strings.Split(l, "!")
		if len(vals) != len(hdr) {
			t.Fatalf("row %q has %d values for %d columns", l, len(vals), len(hdr))
		}
		row := map[string]string{}
		for i, h := range hdr {
			row[h] = vals[i]
		}
		rows = append(rows, row)
	}
	return rows
}

func cliOK(t *testing.T, sock string, args ...string) string {
	t.Helper()
	out, errOut, code := runCLI(t, sock, args...)
	if code != 0 || errOut != "" {
		t.Fatalf("%v: code %d stderr %q", args, code, errOut)
	}
	return out
}

func TestSystemCommands(t *testing.T) {
	sock := daemon(t)
	cliOK(t, sock, "mkvdisk", "-name", "a", "-mdiskgrp", "pool0", "-iogrp", "0", "-size", "1", "-unit", "gb")

	sys := detail(t, cliOK(t, sock, "lssystem", "-delim", "!", "-bytes"))
	if !regexp.MustCompile(`^([0-9].){3}[0-9]`).MatchString(sys["code_level"]) || sys["topology"] != "standard" ||
		len(sys["id"]) != 16 || sys["name"] == "" || sys["total_vdisk_capacity"] != strconv.Itoa(1<<30) {
		t.Errorf("lssystem: %v", sys)
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(sys["data_dir"], &st); err != nil {
		t.Fatal(err)
	}
	pool := detail(t, cliOK(t, sock, "lsmdiskgrp", "-bytes", "-delim", "!", "pool0"))
	if pool["capacity"] != strconv.FormatInt(int64(st.Blocks)*st.Bsize, 10) || pool["name"] != "pool0" ||
		pool["vdisk_count"] != "1" || pool["virtual_capacity"] != strconv.Itoa(1<<30) || pool["data_reduction"] != "no" {
		t.Errorf("lsmdiskgrp pool0: %v (statfs blocks %d bsize %d)", pool, st.Blocks, st.Bsize)
	}
	if free, _ := strconv.ParseInt(pool["free_capacity"], 10, 64); free <= 0 || free > int64(st.Blocks)*st.Bsize {
		t.Errorf("lsmdiskgrp free_capacity %q", pool["free_capacity"])
	}
	if rows := table(t, cliOK(t, sock, "lsmdiskgrp", "-delim", "!")); len(rows) != 1 || rows[0]["id"] != "0" {
		t.Errorf("lsmdiskgrp: %v", rows)
	}

	nodes := table(t, cliOK(t, sock, "lsnode", "-delim", "!"))
	if len(nodes) != 1 || nodes[0]["id"] != "1" || nodes[0]["status"] != "online" || nodes[0]["IO_group_id"] != "0" ||
		!strings.HasPrefix(nodes[0]["iscsi_name"], "iqn.") || len(nodes[0]["WWNN"]) != 16 || nodes[0]["name"] != "node1" {
		t.Errorf("lsnode: %v", nodes)
	}
	iogrps := table(t, cliOK(t, sock, "lsiogrp", "-delim", "!"))
	if len(iogrps) != 5 || iogrps[0]["name"] != "io_grp0" || iogrps[0]["node_count"] != "1" ||
		iogrps[0]["vdisk_count"] != "1" || iogrps[1]["node_count"] != "0" || iogrps[4]["name"] != "recovery_io_grp" {
		t.Errorf("lsiogrp: %v", iogrps)
	}
	lic := detail(t, cliOK(t, sock, "lslicense", "-delim", "!"))
	if lic["license_compression_capacity"] != "0" || lic["license_compression_enclosures"] != "0" {
		t.Errorf("lslicense: %v", lic)
	}
	gui := detail(t, cliOK(t, sock, "lsguicapabilities", "-delim", "!"))
	if gui["license_scheme"] == "flex" || gui["license_scheme"] == "9846" || gui["product_key"] == "" {
		t.Errorf("lsguicapabilities: %v", gui)
	}
	for _, args := range [][]string{{"lsmdiskgrp", "other"}, {"lsnode", "2"}, {"lsiogrp", "io_grp9"}} {
		if _, errOut, code := runCLI(t, sock, args...); code != 1 || !strings.HasPrefix(errOut, "CMMVC5754E ") {
			t.Errorf("%v: code %d stderr %q", args, code, errOut)
		}
	}
}

func TestVdiskCommands(t *testing.T) {
	sock := daemon(t)
	created := []struct {
		args []string
		size int64
	}{
		{[]string{"-name", "v0", "-mdiskgrp", "pool0", "-iogrp", "0", "-size", "64"}, 64 << 20}, // -unit mb by default
		{[]string{"-name", "v1", "-mdiskgrp", "0", "-iogrp", "io_grp0", "-size", "67108864", "-unit", "b",
			"-rsize", "2%", "-autoexpand", "-warning", "0%", "-grainsize", "256", "-easytier", "on"}, 64 << 20},
		{[]string{"-name", "v2", "-mdiskgrp", "pool0", "-size", "1", "-unit", "GB", "-nofmtdisk", "-easytier", "off"}, 1 << 30},
	}
	for i, c := range created {
		out := cliOK(t, sock, append([]string{"mkvdisk"}, c.args...)...)
		if want := "Virtual Disk, id [" + strconv.Itoa(i) + "], successfully created\n"; out != want {
			t.Errorf("mkvdisk %v: %q", c.args, out)
		}
		d := detail(t, cliOK(t, sock, "lsvdisk", "-bytes", "-delim", "!", strconv.Itoa(i)))
		if d["capacity"] != strconv.FormatInt(c.size, 10) || d["mdisk_grp_name"] != "pool0" || d["IO_group_id"] != "0" {
			t.Errorf("lsvdisk %d: %v", i, d)
		}
	}
	// SVC's mkvolume form.
	cliOK(t, sock, "mkvolume", "-name", "v3", "-pool", "pool0", "-size", "2", "-unit", "mb")
	if d := detail(t, cliOK(t, sock, "lsvdisk", "-bytes", "-delim", "!", "v3")); d["capacity"] != strconv.Itoa(2<<20) {
		t.Errorf("mkvolume -pool -unit: capacity %s", d["capacity"])
	}
	before := cliOK(t, sock, "lsvdisk", "-delim", "!")

	// Refusals change nothing.
	refused := []struct {
		args []string
		code string
	}{
		{[]string{"mkvdisk", "-name", "x", "-size", "64"}, "CMMVC5707E"},
		{[]string{"mkvdisk", "-name", "x", "-mdiskgrp", "pool0"}, "CMMVC5707E"},
		{[]string{"mkvdisk", "-name", "x", "-mdiskgrp", "other", "-size", "64"}, "CMMVC5754E"},
		{[]string{"mkvdisk", "-name", "x", "-mdiskgrp", "pool0", "-iogrp", "1", "-size", "64"}, "CMMVC5754E"},
		{[]string{"mkvdisk", "-name", "x", "-mdiskgrp", "pool0", "-size", "64", "-unit", "xb"}, "CMMVC5731E"},
		{[]string{"mkvdisk", "-name", "x", "-mdiskgrp", "pool0", "-size", "-1"}, "CMMVC5731E"},
		{[]string{"mkvdisk", "-name", "x", "-mdiskgrp", "pool0", "-size", "64", "-rsize", "2%", "-compressed"}, "CMMVC9006E"},
		{[]string{"mkvdisk", "-name", "x", "-mdiskgrp", "pool0", "-size", "64", "-copies", "2"}, "CMMVC9006E"},
		{[]string{"mkvdisk", "-name", "x", "-mdiskgrp", "pool0", "-size", "64", "-rsize", "2%", "-grainsize", "48"}, "CMMVC5731E"},
		{[]string{"mkvdisk", "-name", "x", "-mdiskgrp", "pool0", "-size", "64", "-rsize", "200%"}, "CMMVC5731E"},
		{[]string{"mkvdisk", "-name", "x", "-mdiskgrp", "pool0", "-size", "64", "-autoexpand"}, "CMMVC5707E"},
		{[]string{"mkvdisk", "-name", "x", "-mdiskgrp", "pool0", "-size", "64", "-easytier", "maybe"}, "CMMVC5731E"},
		{[]string{"mkvdisk", "-name", "v0", "-mdiskgrp", "pool0", "-size", "64"}, "CMMVC6035E"},
		{[]string{"mkvolume", "-name", "x", "-pool", "other", "-size", "64"}, "CMMVC5754E"},
		{[]string{"lsvdisk", "nope"}, "CMMVC5754E"},
		{[]string{"rmvdisk", "nope"}, "CMMVC5754E"},
		{[]string{"lsvdiskfcmappings"}, "CMMVC5707E"},
		{[]string{"expandvdisksize", "-size", "300", "-unit", "tb", "v0"}, "CMMVC5731E"},
		{[]string{"expandvdisksize", "-size", "1", "-unit", "b", "v0"}, "CMMVC5731E"},
		{[]string{"expandvdisksize", "-size", "1", "-rsize", "1", "v0"}, "CMMVC5713E"},
		{[]string{"expandvdisksize", "-rsize", "1", "-copy", "1", "v0"}, "CMMVC5731E"},
		{[]string{"expandvdisksize", "-size", "1", "-unit", "gb", "nope"}, "CMMVC5754E"},
		{[]string{"expandvdisksize", "-size", "x", "v0"}, "CMMVC5731E"},
		{[]string{"expandvdisksize", "v0"}, "CMMVC5707E"},
	}
	for _, r := range refused {
		out, errOut, code := runCLI(t, sock, r.args...)
		if code != 1 || out != "" || !strings.HasPrefix(errOut, r.code+" ") {
			t.Errorf("%v: code %d stdout %q stderr %q; want %s", r.args, code, out, errOut, r.code)
		}
	}
	if after := cliOK(t, sock, "lsvdisk", "-delim", "!"); after != before {
		t.Errorf("a refused command changed the volumes:\n%s\nwas\n%s", after, before)
	}

	// FC_id/FC_name: empty, the one mapping, or many.
	// expandvdisksize adds -size (default unit mb); -rsize changes nothing (every volume is thin).
	if out := cliOK(t, sock, "expandvdisksize", "-size", "3", "v2"); out != "" {
		t.Errorf("expandvdisksize printed %q", out)
	}
	cliOK(t, sock, "expandvdisksize", "-rsize", "5", "-unit", "gb", "-copy", "0", "v2")
	if d := detail(t, cliOK(t, sock, "lsvdisk", "-bytes", "-delim", "!", "v2")); d["capacity"] != strconv.Itoa(1<<30+3<<20) {
		t.Errorf("after expandvdisksize v2 has capacity %s", d["capacity"])
	}
	cliOK(t, sock, "mkfcmap", "-source", "v0", "-target", "v1", "-copyrate", "0")
	if _, errOut, code := runCLI(t, sock, "expandvdisksize", "-size", "1", "v1"); code != 1 || !strings.HasPrefix(errOut, "CMMVC9007E ") {
		t.Errorf("expandvdisksize of a mapping's target: code %d stderr %q", code, errOut)
	}
	rows := table(t, cliOK(t, sock, "lsvdisk", "-delim", "!"))
	if len(rows) != 4 || rows[0]["FC_id"] != "0" || rows[0]["FC_name"] != "fcmap0" || rows[0]["fc_map_count"] != "1" ||
		rows[2]["FC_id"] != "" || rows[0]["vdisk_UID"] == rows[1]["vdisk_UID"] || len(rows[0]["vdisk_UID"]) != 32 {
		t.Errorf("lsvdisk after one mapping: %v", rows)
	}
	cliOK(t, sock, "mkfcmap", "-source", "v1", "-target", "v0", "-copyrate", "0", "-name", "back")
	if rows := table(t, cliOK(t, sock, "lsvdisk", "-delim", "!", "-filtervalue", "name=v1")); len(rows) != 1 ||
		rows[0]["FC_id"] != "many" || rows[0]["FC_name"] != "many" {
		t.Errorf("lsvdisk with two mappings: %v", rows)
	}
	if out := cliOK(t, sock, "lsvdiskfcmappings", "-delim", "!", "v1"); out != "id!name\n0!fcmap0\n1!back\n" {
		t.Errorf("lsvdiskfcmappings v1: %q", out)
	}
	if out := cliOK(t, sock, "lsvdiskfcmappings", "-delim", "!", "v2"); out != "id!name\n" {
		t.Errorf("lsvdiskfcmappings v2: %q", out)
	}
	if out := cliOK(t, sock, "lsfcmapcandidate", "-nohdr"); out != "0\n1\n2\n3\n" {
		t.Errorf("lsfcmapcandidate: %q", out)
	}
	m := table(t, cliOK(t, sock, "lsfcmap", "-filtervalue", "id=0", "-delim", "!"))
	if len(m) != 1 || m[0]["rc_controlled"] != "no" || m[0]["copy_rate"] != "0" {
		t.Errorf("lsfcmap -filtervalue id=0: %v", m)
	}

	// rmvdisk: refused while mapped, then -force.
	if _, errOut, code := runCLI(t, sock, "rmvdisk", "v1"); code != 1 || !strings.HasPrefix(errOut, "CMMVC5840E ") {
		t.Errorf("rmvdisk of a mapped volume: code %d stderr %q", code, errOut)
	}
	cliOK(t, sock, "rmvdisk", "-force", "-removehostmappings", "v1")
	cliOK(t, sock, "rmvdisk", "v2")
	if out := cliOK(t, sock, "lsvdisk", "-nohdr", "-delim", "!"); !strings.HasPrefix(out, "0!v0!") || strings.Count(out, "\n") != 2 {
		t.Errorf("lsvdisk after rmvdisk: %q", out)
	}
	if out := cliOK(t, sock, "lsfcmap", "-nohdr"); out != "" {
		t.Errorf("mappings left after rmvdisk -force: %q", out)
	}

	// mkfcmap takes a volume's vdisk_UID for -source and -target, as SVC's does.
	cliOK(t, sock, "mkvdisk", "-name", "v4", "-mdiskgrp", "pool0", "-size", "64")
	uid := func(v string) string { return detail(t, cliOK(t, sock, "lsvdisk", "-delim", "!", v))["vdisk_UID"] }
	bad := "6005076" + strings.Repeat("0", 25)
	if _, errOut, code := runCLI(t, sock, "mkfcmap", "-source", bad, "-target", "v4"); code != 1 || !strings.HasPrefix(errOut, "CMMVC5754E ") {
		t.Errorf("mkfcmap with an unknown UID: code %d stderr %q", code, errOut)
	}
	cliOK(t, sock, "mkfcmap", "-source", uid("v0"), "-target", strings.ToLower(uid("v4")))
	if m := table(t, cliOK(t, sock, "lsfcmap", "-delim", "!")); len(m) != 1 || m[0]["source_vdisk_name"] != "v0" || m[0]["target_vdisk_name"] != "v4" {
		t.Errorf("mkfcmap by UID: %v", m)
	}
}

// serveIn runs serve in-process on dir until stop is called; it returns the control socket.
func serveIn(t *testing.T, dir string) (string, func()) {
	t.Helper()
	cfg := serveConfig{
		dataDir: filepath.Join(dir, "data"),
		socket:  filepath.Join(dir, "run", "c.sock"),
		nbdUnix: filepath.Join(dir, "run", "nbd.sock"),
		log:     zerolog.Nop(),
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- serve(ctx, cfg) }()
	stop := func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	}
	for i := 0; ; i++ {
		if _, err := api.NewClient(cfg.socket).Volumes(context.Background()); err == nil {
			return cfg.socket, stop
		}
		if i == 200 {
			stop()
			t.Fatal("daemon did not start")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestChvdisk(t *testing.T) {
	dir := t.TempDir()
	sock, stop := serveIn(t, dir)
	cliOK(t, sock, "mkvdisk", "-name", "a", "-mdiskgrp", "pool0", "-size", "4")
	cliOK(t, sock, "mkvdisk", "-name", "b", "-mdiskgrp", "pool0", "-size", "4")
	cliOK(t, sock, "mkfcmap", "-source", "a", "-target", "b", "-copyrate", "0")
	before := cliOK(t, sock, "lsvdisk", "-delim", "!") + cliOK(t, sock, "lsfcmap", "-delim", "!")
	for _, r := range []struct {
		args []string
		code string
	}{
		{[]string{"chvdisk", "-name", "b", "a"}, "CMMVC6035E"},
		{[]string{"chvdisk", "-name", "1x", "a"}, "CMMVC6527E"},
		{[]string{"chvdisk", "-name", "c", "nope"}, "CMMVC5754E"},
		{[]string{"chvdisk", "-name", "c", "7"}, "CMMVC5753E"},
		{[]string{"chvdisk", "a"}, "CMMVC5707E"},
		{[]string{"chvdisk", "-name", "c"}, "CMMVC5707E"},
	} {
		out, errOut, code := runCLI(t, sock, r.args...)
		if code != 1 || out != "" || !strings.HasPrefix(errOut, r.code+" ") {
			t.Errorf("%v: code %d stdout %q stderr %q; want %s", r.args, code, out, errOut, r.code)
		}
	}
	if after := cliOK(t, sock, "lsvdisk", "-delim", "!") + cliOK(t, sock, "lsfcmap", "-delim", "!"); after != before {
		t.Errorf("a refused chvdisk changed something:\n%s\nwas\n%s", after, before)
	}

	check := func(when string) {
		t.Helper()
		if d := detail(t, cliOK(t, sock, "lsvdisk", "-delim", "!", "renamed")); d["id"] != "0" || d["FC_name"] != "fcmap0" {
			t.Errorf("%s: lsvdisk renamed: %v", when, d)
		}
		if _, errOut, _ := runCLI(t, sock, "lsvdisk", "a"); !strings.HasPrefix(errOut, "CMMVC5754E ") {
			t.Errorf("%s: the old name still answers: %q", when, errOut)
		}
		if m := table(t, cliOK(t, sock, "lsfcmap", "-delim", "!")); len(m) != 1 || m[0]["source_vdisk_name"] != "renamed" {
			t.Errorf("%s: lsfcmap: %v", when, m)
		}
	}
	if out := cliOK(t, sock, "chvdisk", "-name", "renamed", "a"); out != "" {
		t.Errorf("chvdisk printed %q", out)
	}
	check("after chvdisk")
	cliOK(t, sock, "chvdisk", "-name", "renamed", "0") // its own name: nothing to refuse
	stop()
	sock, stop = serveIn(t, dir)
	defer stop()
	check("after a restart")
	// The name is free again: a new volume may take it.
	cliOK(t, sock, "mkvdisk", "-name", "a", "-mdiskgrp", "pool0", "-size", "4")
}
