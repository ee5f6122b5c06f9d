package main

import (
	"bytes"
	"os"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/rs/zerolog"

	"fcnbd/internal/fcerr"
)

func TestSplitSVCLine(t *testing.T) {
	ok := []struct {
		line string
		want []string
	}{
		{"lsvdisk", []string{"lsvdisk"}},
		{"  svcinfo   lsfcmap  -delim ! ", []string{"svcinfo", "lsfcmap", "-delim", "!"}},
		{"lsvdisk -filtervalue name=vol* -delim :", []string{"lsvdisk", "-filtervalue", "name=vol*", "-delim", ":"}},
		{`mkvdisk -name "volume-1f3e" -size 1`, []string{"mkvdisk", "-name", "volume-1f3e", "-size", "1"}},
		{`mkvdisk -name 'a b' x`, []string{"mkvdisk", "-name", "a b", "x"}},
		{`a "b\"c\\d\e"`, []string{"a", `b"c\d\e`}},
		{`a 'b\"c'`, []string{"a", `b\"c`}},
		{`a b\ c \;`, []string{"a", "b c", ";"}},
		{`a "x;y|z&<>()" 'p{q}#'`, []string{"a", "x;y|z&<>()", "p{q}#"}},
		{`a ""`, []string{"a", ""}},
		{`a b#c ?[x]~ !`, []string{"a", "b#c", "?[x]~", "!"}},
		{`a pre"mid"'end'`, []string{"a", "premidend"}},
		{"a é", []string{"a", "é"}},
	}
	for _, c := range ok {
		got, err := splitSVCLine(c.line)
		if err != nil || !slices.Equal(got, c.want) {
			t.Errorf("splitSVCLine(%q) = %q, %v; want %q", c.line, got, err, c.want)
		}
	}
	refused := []string{
		"", "   ", "lsvdisk; id", "lsvdisk && id", "lsvdisk || id", "lsvdisk | cat", "lsvdisk & id",
		"lsvdisk > /tmp/x", "lsvdisk < /etc/passwd", "lsvdisk $(id)", "lsvdisk `id`", `lsvdisk "$(id)"`,
		"lsvdisk \"`id`\"", "lsvdisk '$HOME'", "lsvdisk $HOME", "(lsvdisk)", "{ lsvdisk; }", "lsvdisk #x",
		"lsvdisk\nid", "lsvdisk\rid", "lsvdisk\x00", "lsvdisk\tx", "lsvdisk\x1b[2J", "lsvdisk \x7f", "a \u0085",
		`lsvdisk "x`, `lsvdisk 'x`, `lsvdisk x\`, "a \xff", strings.Repeat("a", maxSVCLine+1),
	}
	for _, line := range refused {
		if got, err := splitSVCLine(line); fcerr.CodeOf(err) != fcerr.BadCommandLine {
			t.Errorf("splitSVCLine(%q) = %q, %v; want a %s refusal", line, got, err, fcerr.BadCommandLine)
		}
	}
	if _, err := splitSVCLine(strings.Repeat("a", maxSVCLine)); err != nil {
		t.Errorf("a line of exactly %d bytes: %v", maxSVCLine, err)
	}
}

// FuzzSVCLine: the tokenizer never panics, and what it accepts has no control character,
// no $ or `, fits the limit, and joins back (single-quoted) into a line that splits the same.
func FuzzSVCLine(f *testing.F) {
	for _, s := range []string{"lsvdisk -delim !", `mkvdisk -name "a\"b" 'c d'`, "a\\ b", "x;y", "$(id)", "a\nb", `"\\`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, line string) {
		words, err := splitSVCLine(line)
		if err != nil {
			if fcerr.CodeOf(err) != fcerr.BadCommandLine || words != nil {
				t.Fatalf("refusal %v with words %q", err, words)
			}
			return
		}
		if len(words) == 0 || len(line) > maxSVCLine || !utf8.ValidString(line) {
			t.Fatalf("accepted %q as %q", line, words)
		}
		for _, w := range words {
			if strings.ContainsAny(w, "$`") || strings.ContainsFunc(w, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
				t.Fatalf("accepted %q with word %q", line, w)
			}
		}
		if err := checkSVCWords(words); err != nil && len(line) <= maxSVCLine-2*len(words) {
			t.Fatalf("checkSVCWords refuses the words of an accepted line %q: %v", line, err)
		}
		var quoted []string
		for _, w := range words {
			quoted = append(quoted, "'"+strings.ReplaceAll(w, "'", `'\''`)+"'")
		}
		if again, err := splitSVCLine(strings.Join(quoted, " ")); err == nil && !slices.Equal(again, words) {
			t.Fatalf("%q: words %q, requoted %q", line, words, again)
		}
	})
}

func runLine(t *testing.T, socket, prefix, line string) (string, string, int) {
	t.Helper()
	var out, errOut bytes.Buffer
	if prefix == "svc-shell" {
		t.Setenv("SSH_ORIGINAL_COMMAND", line)
		code := run([]string{"fcnbd", "--socket", socket, "svc-shell"}, &out, &errOut)
		return out.String(), errOut.String(), code
	}
	words, err := splitSVCLine(line)
	if err != nil {
		t.Fatal(err)
	}
	code := run(append([]string{"fcnbd", "--socket", socket, prefix}, words...), &out, &errOut)
	return out.String(), errOut.String(), code
}

// The front-ends run svc commands against the socket they are given, and refuse (with
// nothing run: the volume list is unchanged) everything else.
func TestSVCFrontEnds(t *testing.T) {
	sock := daemon(t)
	for _, fe := range []string{"svc-shell", "svcinfo", "svctask"} {
		t.Run(fe, func(t *testing.T) {
			mk := "mkvolume -name v-" + strings.ReplaceAll(fe, "-", "") + " -size 1M"
			if fe != "svcinfo" {
				if fe == "svc-shell" {
					mk = "svctask " + mk
				}
				if out, errs, code := runLine(t, sock, fe, mk); code != 0 || !strings.Contains(out, "successfully created") {
					t.Fatalf("%s: %q %q %d", mk, out, errs, code)
				}
			}
			before, _, _ := runCLI(t, sock, "lsvolume", "-delim", ":")
			if fe == "svcinfo" || fe == "svc-shell" {
				out, errs, code := runLine(t, sock, fe, "lsvolume -delim :")
				if code != 0 || out != before {
					t.Fatalf("lsvolume: %q %q %d; want %q", out, errs, code, before)
				}
				out, _, code = runLine(t, sock, fe, "lsvolume -nohdr -delim ! -filtervalue name=v-s*")
				if code != 0 || !strings.Contains(out, "!v-svcshell!") || strings.Contains(out, "id!") {
					t.Fatalf("filtered lsvolume: %q %d", out, code)
				}
			}
			cmd := "lsvolume" // a command of this front-end's category
			if fe == "svctask" {
				cmd = "rmvolume"
			}
			refusals := []struct{ line, code string }{
				{cmd + " -socket /tmp/other.sock", fcerr.UnsupportedParameter},
				{cmd + " --socket=/tmp/other.sock", fcerr.UnsupportedParameter},
				{cmd + " -force -socket /x v-svctask", fcerr.UnsupportedParameter},
				{cmd + " -nosuchflag v-svctask", fcerr.UnsupportedParameter},
				{"-h", fcerr.UnsupportedCommand},
				{"--socket /x lsvolume", fcerr.UnsupportedCommand},
				{"serve", fcerr.UnsupportedCommand},
				{"attach v", fcerr.UnsupportedCommand},
				{"sshsetup remove --user root", fcerr.UnsupportedCommand},
				{"svc-shell", fcerr.UnsupportedCommand},
				{"/bin/sh", fcerr.UnsupportedCommand},
				{"../fcnbd serve", fcerr.UnsupportedCommand},
				{"help", fcerr.UnsupportedCommand},
				{"svcinfo svctask rmvolume v-svctask", fcerr.UnsupportedCommand},
			}
			if fe != "svctask" {
				refusals = append(refusals, struct{ line, code string }{"svcinfo rmvolume v-svctask", fcerr.UnsupportedCommand})
			}
			if fe != "svcinfo" {
				refusals = append(refusals, struct{ line, code string }{"svctask lsvolume", fcerr.UnsupportedCommand})
			}
			if fe == "svc-shell" {
				refusals = append(refusals, []struct{ line, code string }{
					{"rmvolume v-svctask; rmvolume v-svcshell", fcerr.BadCommandLine},
					{"rmvolume $(echo v-svctask)", fcerr.BadCommandLine},
					{"rmvolume v-svctask\nrmvolume v-svcshell", fcerr.BadCommandLine},
					{"", fcerr.InteractiveLogin},
					{"   ", fcerr.InteractiveLogin},
				}...)
			}
			for _, r := range refusals {
				out, errs, code := runLine(t, sock, fe, r.line)
				if code != 1 || out != "" || !strings.HasPrefix(errs, r.code+" ") || strings.Count(errs, "\n") != 1 {
					t.Errorf("%q: stdout %q stderr %q code %d; want %s", r.line, out, errs, code, r.code)
				}
			}
			if after, _, _ := runCLI(t, sock, "lsvolume", "-delim", ":"); after != before {
				t.Errorf("refused lines changed the volumes:\n%s\nthen\n%s", before, after)
			}
		})
	}
	// urfave leaves flags after the first positional argument alone: both orders work.
	if _, errs, code := runLine(t, sock, "svctask", `rmvolume -force "v-svctask"`); code != 0 {
		t.Fatalf("rmvolume -force NAME: %s", errs)
	}
}

// The local CLI maps flag errors to CMMVC codes too.
func TestUsageErrorCodes(t *testing.T) {
	for _, c := range []struct {
		args []string
		code string
	}{
		{[]string{"lsvolume", "-x"}, fcerr.UnsupportedParameter},
		{[]string{"lsvolume", "-delim"}, fcerr.MissingParameter},
		{[]string{"svcinfo", "lsvolume", "-x"}, fcerr.UnsupportedParameter},
	} {
		out, errs, code := runCLI(t, "/nonexistent.sock", c.args...)
		if code != 1 || out != "" || !strings.HasPrefix(errs, c.code+" ") {
			t.Errorf("%q: %q %q %d; want %s", c.args, out, errs, code, c.code)
		}
	}
}

func TestSSHKeys(t *testing.T) {
	dir := t.TempDir()
	write := func(s string) string {
		p := dir + "/k"
		if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	keys, err := sshKeys(write("# c\n\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5 me@host; x\n"))
	if err != nil || len(keys) != 1 || keys[0] != "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 me@host__x" {
		t.Errorf("keys %q %v", keys, err)
	}
	for _, bad := range []string{"", "# only\n", `command="sh" ssh-ed25519 AAAA`, "ssh-ed25519 !!!", "ssh-dss AAAA"} {
		if k, err := sshKeys(write(bad)); err == nil {
			t.Errorf("%q accepted as %q", bad, k)
		}
	}
	for _, name := range []string{"root", "Admin", "a b", "-x", "a;b", strings.Repeat("a", 40), ""} {
		if sshCheckUser(name) == nil {
			t.Errorf("account name %q accepted", name)
		}
	}
}

// svc-shell logs each line, accepted or refused, with the account and SSH_CONNECTION, at info.
func TestSVCShellLog(t *testing.T) {
	var logs bytes.Buffer
	saved := svcShellLogger
	svcShellLogger = func() zerolog.Logger { return zerolog.New(&logs).Level(zerolog.InfoLevel) }
	t.Cleanup(func() { svcShellLogger = saved })
	t.Setenv("SSH_CONNECTION", "192.0.2.7 50000 192.0.2.1 22")
	sock := daemon(t)
	for _, line := range []string{"lsvolume -delim :", "lsvolume; id", ""} {
		runLine(t, sock, "svc-shell", line)
	}
	got := strings.Split(strings.TrimSpace(logs.String()), "\n")
	want := []string{`"command":["lsvolume","-delim",":"]`, `"message":"svc-shell: command line refused"`, `"message":"svc-shell: interactive login refused"`}
	if len(got) != len(want) {
		t.Fatalf("log:\n%s", logs.String())
	}
	for i, w := range want {
		if !strings.Contains(got[i], w) || !strings.Contains(got[i], `"from":"192.0.2.7 50000 192.0.2.1 22"`) || !strings.Contains(got[i], `"level":"info"`) || !strings.Contains(got[i], `"user":"`) {
			t.Errorf("log line %d: %s; want %s", i, got[i], w)
		}
	}
}
