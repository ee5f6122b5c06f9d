package main

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"
)

// `fcnbd sshsetup install|remove`: the SSH account whose logins run the SVC command line
// (fcnbd svc-shell) and nothing else. install creates the account (shell /bin/sh, which
// OpenSSH needs to run the ForceCommand; no password), puts it in the fcnbd group (the
// daemon gives that group the control socket), installs its keys with restrict,command=…,
// writes the sshd drop-in (Match User, ForceCommand, no forwarding, no TTY, no rc) and checks
// it with sshd -t. remove undoes all of it. Both are idempotent.

const (
	sshAccountMarker = "fcnbd SVC command line" // the GECOS field of the accounts install creates
	sshGroup         = "fcnbd"                  // the group that may use the control socket
	sshdDropInDir    = "/etc/ssh/sshd_config.d"
	sshdPrivsepDir   = "/run/sshd" // sshd -t refuses to run without it
)

var (
	sshUserRE  = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,30}$`)
	sshPathRE  = regexp.MustCompile(`^/[A-Za-z0-9/._+-]*$`)
	sshKeyType = regexp.MustCompile(`^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com)$`)
	sshComment = regexp.MustCompile(`[^A-Za-z0-9@._+-]`)
)

func sshDropIn(name string) string { return filepath.Join(sshdDropInDir, "fcnbd-"+name+".conf") }

func sshsetupCommand() *cli.Command {
	userFlag := &cli.StringFlag{Name: "user", Usage: "the account's name", Required: true}
	return &cli.Command{
		Name:  "sshsetup",
		Usage: "install or remove the SSH account that runs the SVC command line (ssh USER@HOST svcinfo lsfcmap)",
		Subcommands: []*cli.Command{{
			Name:      "install",
			Usage:     "create the account, install its public key(s) and the sshd drop-in (run as root; then reload sshd)",
			UsageText: "fcnbd sshsetup install --user NAME --key PUBKEYFILE [--socket S]",
			Flags: []cli.Flag{userFlag,
				&cli.StringFlag{Name: "key", Usage: "file of OpenSSH public keys (one per line) allowed to log in", Required: true},
				socketFlag(),
			},
			Action: func(c *cli.Context) error {
				return sshInstall(c, c.String("user"), c.String("key"), socketPath(c))
			},
		}, {
			Name:      "remove",
			Usage:     "remove the account, its keys and its sshd drop-in (then reload sshd)",
			UsageText: "fcnbd sshsetup remove --user NAME",
			Flags:     []cli.Flag{userFlag},
			Action: func(c *cli.Context) error {
				return sshRemove(c, c.String("user"))
			},
		}},
	}
}

// ownAccount looks the account up: it returns nil if there is none, and refuses an account
// that install did not create.
func ownAccount(name string) (*user.User, error) {
	u, err := user.Lookup(name)
	if err != nil {
		var unknown user.UnknownUserError
		if errors.As(err, &unknown) {
			return nil, nil
		}
		return nil, fmt.Errorf("looking up %s: %w", name, err)
	}
	if u.Name != sshAccountMarker {
		return nil, fmt.Errorf("the account %s exists and was not created by fcnbd sshsetup (its comment is %q, not %q): choose another name", name, u.Name, sshAccountMarker)
	}
	return u, nil
}

func sshCheckUser(name string) error {
	if !sshUserRE.MatchString(name) || name == "root" {
		return fmt.Errorf("%q is not a usable account name: use lower-case letters, digits, '_' and '-', at most 31, starting with a letter or '_'", name)
	}
	return nil
}

// sshKeys reads and checks the public keys; it returns them without options, with a
// sanitized comment.
func sshKeys(path string) ([]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var keys []string
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 2 || !sshKeyType.MatchString(f[0]) {
			return nil, fmt.Errorf("%s:%d: not an OpenSSH public key (TYPE BASE64 [COMMENT]; options are not accepted, install adds its own)", path, n)
		}
		if _, err := base64.StdEncoding.DecodeString(f[1]); err != nil {
			return nil, fmt.Errorf("%s:%d: the key is not valid base64", path, n)
		}
		k := f[0] + " " + f[1]
		if len(f) > 2 {
			k += " " + sshComment.ReplaceAllString(strings.Join(f[2:], "_"), "_")
		}
		keys = append(keys, k)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("%s has no public key", path)
	}
	return keys, nil
}

func sshRun(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// writeFileAtomic writes data to path (mode perm, owned by root) through a rename.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	tmp := path + ".fcnbd-tmp"
	if err := os.WriteFile(tmp, data, perm); err != nil {
		return err
	}
	if err := os.Chmod(tmp, perm); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

func sshInstall(c *cli.Context, name, keyFile, socket string) error {
	w := c.App.Writer
	if err := sshCheckUser(name); err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return errors.New("sshsetup install must run as root")
	}
	bin, err := os.Executable()
	if err == nil {
		bin, err = filepath.EvalSymlinks(bin)
	}
	if err != nil {
		return fmt.Errorf("locating the fcnbd binary: %w", err)
	}
	if socket, err = filepath.Abs(socket); err != nil {
		return err
	}
	for _, p := range []string{bin, socket} {
		if !sshPathRE.MatchString(p) {
			return fmt.Errorf("%q has characters that cannot go in an sshd ForceCommand: use a path of letters, digits and / . _ + -", p)
		}
	}
	keys, err := sshKeys(keyFile)
	if err != nil {
		return err
	}
	u, err := ownAccount(name)
	if err != nil {
		return err
	}
	if _, err := user.LookupGroup(sshGroup); err != nil {
		if err := sshRun("groupadd", "--system", sshGroup); err != nil {
			if _, again := user.LookupGroup(sshGroup); again != nil {
				return err
			} // another install made it meanwhile
		} else {
			fmt.Fprintf(w, "created group %s\n", sshGroup)
		}
	}
	created := u == nil
	if created {
		// No password is set: the account's password is locked ('!'); keys are the only way in.
		if err := sshRun("useradd", "--create-home", "--shell", "/bin/sh", "--comment", sshAccountMarker,
			"--groups", sshGroup, name); err != nil {
			return err
		}
		fmt.Fprintf(w, "created account %s\n", name)
	} else if err := sshRun("usermod", "--shell", "/bin/sh", "--append", "--groups", sshGroup, name); err != nil {
		return err
	}
	if err := sshRun("passwd", "--lock", name); err != nil {
		return err
	}
	if u, err = user.Lookup(name); err != nil {
		return err
	}
	// The binary must be runnable by the account (a binary under a private directory is not).
	if err := sshRun("runuser", "-u", name, "--", bin, "--help"); err != nil {
		if created { // leave nothing behind
			sshRun("userdel", "--remove", name)
		}
		return fmt.Errorf("the account %s cannot run %s (%v): install fcnbd where every user can run it, e.g. /usr/local/bin", name, bin, err)
	}

	// A running daemon's socket goes to the group now; the daemon does it itself at each start.
	if fi, err := os.Stat(socket); err == nil && fi.Mode()&os.ModeSocket != 0 {
		if err := shareSocketWithGroup(socket); err != nil {
			return fmt.Errorf("giving %s to group %s: %w", socket, sshGroup, err)
		}
	}

	force := bin + " --socket " + socket + " svc-shell"
	// The keys live in a root-owned ~/.ssh: the account can't change them.
	sshDir := filepath.Join(u.HomeDir, ".ssh")
	if err := os.MkdirAll(sshDir, 0o755); err != nil {
		return err
	}
	if err := os.Chown(sshDir, 0, 0); err != nil {
		return err
	}
	if err := os.Chmod(sshDir, 0o755); err != nil {
		return err
	}
	var ak strings.Builder
	ak.WriteString("# Written by fcnbd sshsetup install: each key runs the SVC command line only.\n")
	for _, k := range keys {
		fmt.Fprintf(&ak, "restrict,command=\"%s\" %s\n", force, k)
	}
	if err := writeFileAtomic(filepath.Join(sshDir, "authorized_keys"), []byte(ak.String()), 0o644); err != nil {
		return err
	}

	dropIn := sshDropIn(name)
	conf := fmt.Sprintf(`# Written by fcnbd sshsetup install; fcnbd sshsetup remove --user %[1]s removes it.
# The account %[1]s runs one SVC command per connection (fcnbd svc-shell) and nothing else.
Match User %[1]s
	ForceCommand %[2]s
	PasswordAuthentication no
	KbdInteractiveAuthentication no
	DisableForwarding yes
	AllowTcpForwarding no
	AllowStreamLocalForwarding no
	AllowAgentForwarding no
	X11Forwarding no
	PermitTunnel no
	PermitListen none
	PermitOpen none
	PermitTTY no
	PermitUserRC no
	Banner none
`, name, force)
	old, oldErr := os.ReadFile(dropIn)
	if err := os.MkdirAll(sshdDropInDir, 0o755); err != nil {
		return err
	}
	if err := writeFileAtomic(dropIn, []byte(conf), 0o644); err != nil {
		return err
	}
	if err := os.MkdirAll(sshdPrivsepDir, 0o755); err != nil {
		return err
	}
	if err := sshRun("sshd", "-t"); err != nil {
		if oldErr == nil {
			writeFileAtomic(dropIn, old, 0o644)
		} else {
			os.Remove(dropIn)
		}
		return fmt.Errorf("sshd rejects the configuration with %s (left as it was): %w", dropIn, err)
	}
	// A check, not a condition: the daemon may be down now. (lsvolume only reads.)
	if out, err := exec.Command("runuser", "-u", name, "--", bin, "--socket", socket, "svcinfo", "lsvolume", "-nohdr").CombinedOutput(); err != nil {
		fmt.Fprintf(w, "warning: the account cannot use the daemon at %s now: %s\n", socket, strings.TrimSpace(string(out)))
	}
	fmt.Fprintf(w, "installed %s: %d key(s), sshd drop-in %s, control socket %s (group %s)\n", name, len(keys), dropIn, socket, sshGroup)
	fmt.Fprintln(w, "now reload sshd (systemctl reload ssh)")
	return nil
}

func sshRemove(c *cli.Context, name string) error {
	w := c.App.Writer
	if err := sshCheckUser(name); err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return errors.New("sshsetup remove must run as root")
	}
	u, err := ownAccount(name)
	if err != nil {
		return err
	}
	did := false
	if err := os.Remove(sshDropIn(name)); err == nil {
		fmt.Fprintf(w, "removed %s\n", sshDropIn(name))
		did = true
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if u != nil {
		// --remove removes the home directory and the keys in it.
		if err := sshRun("userdel", "--remove", name); err != nil {
			return err
		}
		fmt.Fprintf(w, "removed account %s\n", name)
		did = true
	}
	if g, err := user.LookupGroup(sshGroup); err == nil && !sshGroupUsed(g.Gid) {
		if err := sshRun("groupdel", sshGroup); err != nil {
			return err
		}
		fmt.Fprintf(w, "removed group %s (no account uses it)\n", sshGroup)
		did = true
	}
	if !did {
		fmt.Fprintf(w, "nothing to remove for %s\n", name)
		return nil
	}
	fmt.Fprintln(w, "now reload sshd (systemctl reload ssh)")
	return nil
}

// sshGroupUsed reports whether any account still has the group, as primary or supplementary.
func sshGroupUsed(gid string) bool {
	data, err := os.ReadFile("/etc/group")
	if err != nil {
		return true
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Split(line, ":")
		if len(f) == 4 && f[2] == gid && strings.TrimSpace(f[3]) != "" {
			return true
		}
	}
	data, err = os.ReadFile("/etc/passwd")
	if err != nil {
		return true
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Split(line, ":"); len(f) >= 4 && f[3] == gid {
			return true
		}
	}
	return false
}

// shareSocketWithGroup gives the control socket to the fcnbd group (mode 0660) when that
// group exists (fcnbd sshsetup install creates it), so that the SVC SSH accounts can use it;
// otherwise (or when the daemon does not run as root) the socket stays its owner's alone (0600).
func shareSocketWithGroup(path string) error {
	g, err := user.LookupGroup(sshGroup)
	if err != nil || os.Geteuid() != 0 {
		return nil
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return nil
	}
	if err := os.Lchown(path, -1, gid); err != nil {
		return err
	}
	return os.Chmod(path, 0o660)
}
