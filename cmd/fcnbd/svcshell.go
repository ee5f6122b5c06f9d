package main

import (
	"fmt"
	"io"
	"log/syslog"
	"os"
	"os/user"
	"strings"
	"unicode/utf8"

	"github.com/rs/zerolog"
	"github.com/urfave/cli/v2"

	"fcnbd/internal/fcerr"
)

// The SVC front-ends: one command line of the SVC command set (svcinfo/svctask), from the
// restricted SSH account (`fcnbd svc-shell`, its ForceCommand, reading SSH_ORIGINAL_COMMAND)
// or from the local shell (`fcnbd svcinfo LINE…`, `fcnbd svctask LINE…`). Both run exactly one
// command of newApp's svc(...) table, in-process through run(), against a control socket the
// front-end chooses, never the user.

// maxSVCLine is the longest command line the SSH front-end accepts, in bytes.
const maxSVCLine = 4096

// lineError refuses a command line before anything runs.
func lineError(format string, a ...any) error {
	return fcerr.New(fcerr.BadCommandLine, format, a...)
}

// splitSVCLine splits one command line into words with the quoting rules of the POSIX shell:
// 'single quotes' (everything literal), "double quotes" (a backslash escapes " and \ only) and
// a backslash outside quotes (escapes the next character). It refuses, rather than
// interprets, everything else a shell would act on: unquoted ; & | < > ( ) { } and a # that
// starts a word, $ and ` anywhere, control characters anywhere, unterminated quotes, invalid
// UTF-8, empty lines and lines over maxSVCLine bytes. * ? [ ] ~ = : ! are plain characters:
// there is no globbing, no expansion of any kind.
func splitSVCLine(line string) ([]string, error) {
	if len(line) > maxSVCLine {
		return nil, lineError("the command line is %d bytes long; at most %d are accepted", len(line), maxSVCLine)
	}
	if !utf8.ValidString(line) {
		return nil, lineError("the command line is not valid UTF-8")
	}
	for i, r := range line {
		switch {
		case r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0):
			return nil, lineError("the command line has a control character (%U) at byte %d", r, i)
		case r == '$' || r == '`':
			return nil, lineError("the command line has %q at byte %d: no expansion or substitution is done here", r, i)
		}
	}
	var (
		words   []string
		cur     strings.Builder
		inWord  bool
		quote   rune // 0, '\'' or '"'
		escaped bool // the previous character was an unquoted backslash
		inDQEsc bool // the previous character was a backslash inside double quotes
	)
	for i, r := range line {
		switch {
		case escaped:
			cur.WriteRune(r)
			escaped = false
		case quote == '\'':
			if r == '\'' {
				quote = 0
			} else {
				cur.WriteRune(r)
			}
		case quote == '"':
			switch {
			case inDQEsc:
				if r != '"' && r != '\\' {
					cur.WriteByte('\\')
				}
				cur.WriteRune(r)
				inDQEsc = false
			case r == '\\':
				inDQEsc = true
			case r == '"':
				quote = 0
			default:
				cur.WriteRune(r)
			}
		case r == ' ':
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		case r == '\'' || r == '"':
			quote, inWord = r, true
		case r == '\\':
			escaped, inWord = true, true
		case strings.ContainsRune(";&|<>(){}", r):
			return nil, lineError("the command line has an unquoted %q at byte %d: one command, no shell operators", r, i)
		case r == '#' && !inWord:
			return nil, lineError("the command line has an unquoted '#' at byte %d starting a word", i)
		default:
			cur.WriteRune(r)
			inWord = true
		}
	}
	switch {
	case quote != 0:
		return nil, lineError("the command line has an unterminated %c quote", quote)
	case escaped:
		return nil, lineError("the command line ends with a backslash")
	}
	if inWord {
		words = append(words, cur.String())
	}
	if len(words) == 0 {
		return nil, lineError("the command line is empty")
	}
	return words, nil
}

// checkSVCWords applies to words that did not come through splitSVCLine (the local
// front-end's arguments, already split by the user's shell) the same limits, so that the
// local command line refuses what the SSH one refuses.
func checkSVCWords(words []string) error {
	n := 0
	for _, w := range words {
		n += len(w) + 1
		if !utf8.ValidString(w) {
			return lineError("the command line is not valid UTF-8")
		}
		for _, r := range w {
			switch {
			case r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0):
				return lineError("the command line has a control character (%U)", r)
			case r == '$' || r == '`':
				return lineError("the command line has %q: no expansion or substitution is done here", r)
			}
		}
	}
	if n > maxSVCLine+1 {
		return lineError("the command line is %d bytes long; at most %d are accepted", n-1, maxSVCLine)
	}
	if len(words) == 0 {
		return lineError("the command line is empty")
	}
	return nil
}

// isSocketFlag reports whether a word names the socket flag (-socket, --socket,
// -socket=X, --socket=X): the front-end picks the socket, the user may not.
func isSocketFlag(w string) bool {
	if !strings.HasPrefix(w, "-") {
		return false
	}
	name := strings.TrimPrefix(strings.TrimPrefix(w, "-"), "-")
	name, _, _ = strings.Cut(name, "=")
	return name == "socket"
}

// runSVC runs one SVC command line, already split into words, against the control socket
// socket, and returns the exit status. prefix is the category the front-end was invoked as
// ("svcinfo", "svctask"), or "" when the line may carry its own prefix or none.
func runSVC(words []string, prefix, socket string, stdout, stderr io.Writer) int {
	refuse := func(err error) int {
		fmt.Fprintln(stderr, err.Error())
		return 1
	}
	if prefix == "" && len(words) > 0 && (words[0] == "svcinfo" || words[0] == "svctask") {
		prefix, words = words[0], words[1:]
	}
	if len(words) == 0 {
		return refuse(fcerr.New(fcerr.MissingParameter, "the command is missing"))
	}
	name := words[0]
	var cmd *cli.Command
	for _, c := range newApp(io.Discard, io.Discard).Commands {
		if (c.Category == "svcinfo" || c.Category == "svctask") && c.Name == name {
			cmd = c
		}
	}
	if cmd == nil {
		return refuse(fcerr.New(fcerr.UnsupportedCommand, "the command failed because it is not supported: %q is not an SVC command of fcnbd", name))
	}
	if prefix != "" && prefix != cmd.Category {
		return refuse(fcerr.New(fcerr.UnsupportedCommand, "the command failed because it is not supported: %s is a %s command, not a %s one", name, cmd.Category, prefix))
	}
	for _, w := range words[1:] {
		if isSocketFlag(w) {
			return refuse(fcerr.New(fcerr.UnsupportedParameter, "[-socket] is not a supported parameter"))
		}
	}
	return run(append([]string{"fcnbd", "--socket", socket, name}, words[1:]...), stdout, stderr)
}

// svcFrontCommands are the local front-ends `fcnbd svcinfo …` and `fcnbd svctask …` and the
// SSH one, `fcnbd svc-shell`.
func svcFrontCommands() []*cli.Command {
	local := func(prefix string) *cli.Command {
		return &cli.Command{
			Name:            prefix,
			Usage:           "run one SVC " + prefix + " command line, as the SSH account would (e.g. fcnbd " + prefix + " " + map[string]string{"svcinfo": "lsfcmap -delim !", "svctask": "mkvolume -name v1 -size 1G"}[prefix] + ")",
			UsageText:       "fcnbd [--socket S] " + prefix + " COMMAND [ARGS…]",
			SkipFlagParsing: true,
			HideHelp:        true, // "help" and -h are words of the line, refused like any other
			Action: func(c *cli.Context) error {
				words := c.Args().Slice()
				if err := checkSVCWords(words); err != nil {
					return err
				}
				if code := runSVC(words, prefix, socketPath(c), c.App.Writer, c.App.ErrWriter); code != 0 {
					return cli.Exit("", code)
				}
				return nil
			},
		}
	}
	return []*cli.Command{local("svcinfo"), local("svctask"), {
		Name:      "svc-shell",
		Usage:     "the SSH account's ForceCommand: run the one SVC command line in SSH_ORIGINAL_COMMAND (see sshsetup)",
		UsageText: "fcnbd --socket S svc-shell   (set up by fcnbd sshsetup install)",
		Hidden:    true,
		Action: func(c *cli.Context) error {
			if c.Args().Len() > 0 {
				return fcerr.New(fcerr.BadCommandLine, "svc-shell takes no arguments; it reads SSH_ORIGINAL_COMMAND")
			}
			line, ok := os.LookupEnv("SSH_ORIGINAL_COMMAND")
			logger := svcShellLogger()
			from := os.Getenv("SSH_CONNECTION")
			if !ok || strings.TrimSpace(line) == "" {
				logger.Info().Str("user", currentUser()).Str("from", from).Msg("svc-shell: interactive login refused")
				return fcerr.New(fcerr.InteractiveLogin, "this account runs one SVC command per connection (ssh USER@HOST svcinfo lsvdisk); interactive logins are not supported")
			}
			words, err := splitSVCLine(line)
			if err != nil {
				logger.Info().Str("user", currentUser()).Str("from", from).Int("bytes", len(line)).Err(err).Msg("svc-shell: command line refused")
				return err
			}
			logger.Info().Str("user", currentUser()).Str("from", from).Strs("command", words).Msg("svc-shell")
			if code := runSVC(words, "", socketPath(c), c.App.Writer, c.App.ErrWriter); code != 0 {
				return cli.Exit("", code)
			}
			return nil
		},
	}}
}

// svcShellLogger logs to syslog (facility auth, tag fcnbd-svc) where there is one, and
// nowhere otherwise: never on the SSH session's stdout or stderr, which automation parses.
// A variable, so that a test can read what is logged.
var svcShellLogger = func() zerolog.Logger {
	w, err := syslog.New(syslog.LOG_AUTH|syslog.LOG_INFO, "fcnbd-svc")
	if err != nil {
		return zerolog.Nop()
	}
	return zerolog.New(zerolog.SyslogLevelWriter(w)).Level(zerolog.InfoLevel).With().Timestamp().Logger()
}

// currentUser is the account the shell runs as, from the password database (not from the
// environment).
func currentUser() string {
	if u, err := user.Current(); err == nil {
		return u.Username
	}
	return fmt.Sprint(os.Getuid())
}
