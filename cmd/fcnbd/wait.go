package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/mattn/go-isatty"
	"github.com/urfave/cli/v2"

	"fcnbd/internal/api"
	"fcnbd/internal/fcerr"
)

// pollInterval is how often wait asks the daemon, unless -interval says otherwise (at least
// minPollInterval).
const (
	pollInterval    = 200 * time.Millisecond
	minPollInterval = 10 * time.Millisecond
)

// waitStates are the statuses wait accepts: a mapping's (docs/flashcopy.md §2) and a group's.
var waitStates = []string{"idle_or_copied", "preparing", "prepared", "copying", "stopping", "stopped", "suspended", "empty"}

func waitCommand() *cli.Command {
	return &cli.Command{
		Name:      "wait",
		Usage:     "wait until a FlashCopy mapping or consistency group reaches a status",
		UsageText: "fcnbd wait MAPPING|GROUP [-status STATUS] [-timeout DURATION] [-interval DURATION] [-group]",
		Description: "Polls every 200 ms (-interval); on a terminal, shows a progress bar. Without -group, a reference\n" +
			"that names no mapping is looked up as a group. A mapping deleted while waiting for\n" +
			"idle_or_copied (autodelete) counts as done. Exits non-zero on timeout, or if the object\n" +
			"stops (or is deleted) while waiting for another status.",
		Flags: []cli.Flag{
			socketFlag(),
			&cli.StringFlag{Name: "status", Value: "idle_or_copied", Usage: "the status to wait for: " + strings.Join(waitStates, ", ")},
			&cli.StringFlag{Name: "timeout", Usage: "give up after this long (e.g. 30s, 5m); default: wait for ever"},
			&cli.StringFlag{Name: "interval", Value: pollInterval.String(), Usage: "how often to ask the daemon (at least " + minPollInterval.String() + "): the end is seen up to this late"},
			&cli.BoolFlag{Name: "group", Usage: "the reference is a consistency group"},
		},
		Action: func(c *cli.Context) error {
			a, err := flagsAfterArgs(c)
			switch {
			case err != nil:
				return err
			case len(a) == 0:
				return fcerr.New(fcerr.MissingParameter, "the mapping or consistency group (name or id) is missing")
			case len(a) > 1:
				return fcerr.New(fcerr.BadValue, "unexpected argument %q", a[1])
			}
			w := &waiter{cl: client(c), want: c.String("status")}
			if !slices.Contains(waitStates, w.want) {
				return fcerr.New(fcerr.BadValue, "the -status value %q is not valid: use one of %s", w.want, strings.Join(waitStates, ", "))
			}
			if w.interval, err = time.ParseDuration(c.String("interval")); err != nil || w.interval < minPollInterval {
				return fcerr.New(fcerr.BadValue, "the -interval value %q is not valid: use a duration of at least %v, such as 50ms", c.String("interval"), minPollInterval)
			}
			if c.IsSet("timeout") {
				if w.timeout, err = time.ParseDuration(c.String("timeout")); err != nil || w.timeout <= 0 {
					return fcerr.New(fcerr.BadValue, "the -timeout value %q is not valid: use a duration such as 30s or 5m", c.String("timeout"))
				}
			}
			if isTerminal(c.App.ErrWriter) {
				w.bar = c.App.ErrWriter
			}
			return w.wait(ctx(c), c.App.Writer, a[0], c.Bool("group"))
		},
	}
}

// flagsAfterArgs parses the command's flags that follow its first argument, which urfave/cli
// leaves as arguments, so that "wait MAPPING -status copying" works as well as the IBM order
// (flags first). It returns the arguments that remain.
func flagsAfterArgs(c *cli.Context) ([]string, error) {
	a := c.Args().Slice()
	if len(a) < 2 {
		return a, nil
	}
	rest := []string{a[0]}
	for i := 1; i < len(a); i++ {
		arg := a[i]
		if arg == "--" {
			return append(rest, a[i+1:]...), nil
		}
		if !strings.HasPrefix(arg, "-") || arg == "-" {
			rest = append(rest, arg)
			continue
		}
		name, value, hasValue := strings.Cut(strings.TrimLeft(arg, "-"), "=")
		var flag cli.Flag
		for _, f := range c.Command.Flags {
			if slices.Contains(f.Names(), name) {
				flag = f
			}
		}
		switch _, isBool := flag.(*cli.BoolFlag); {
		case flag == nil:
			return nil, fcerr.New(fcerr.BadValue, "the flag %s is not valid for this command", arg)
		case isBool && !hasValue:
			value = "true"
		case !hasValue && i+1 == len(a):
			return nil, fcerr.New(fcerr.MissingParameter, "the flag %s needs a value", arg)
		case !hasValue:
			i++
			value = a[i]
		}
		if err := c.Set(name, value); err != nil {
			return nil, fcerr.New(fcerr.BadValue, "the value of %s is not valid: %v", arg, err)
		}
	}
	return rest, nil
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && isatty.IsTerminal(f.Fd())
}

// waiter polls one mapping or group until it reaches want.
type waiter struct {
	cl       *api.Client
	want     string
	timeout  time.Duration // 0: none
	interval time.Duration
	bar      io.Writer // where the progress bar goes, updated in place; nil: no bar
	barShown bool      // the bar's line is on the screen, not yet ended
}

// snapshot is what one poll saw of the object.
type snapshot struct {
	status   string
	progress int
	gone     bool
}

// waitTarget is the object being waited for.
type waitTarget struct {
	kind  string // "FlashCopy mapping" or "FlashCopy consistency group"
	label string // the name, for messages
	// autodelete says why the object may vanish once done.
	autodelete string
	poll       func(context.Context) (snapshot, error)
}

func (w *waiter) wait(parent context.Context, out io.Writer, ref string, group bool) error {
	ctx := parent
	if w.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(parent, w.timeout)
		defer cancel()
	}
	t, err := w.resolve(ctx, ref, group)
	if err != nil {
		return w.timedOut(ctx, err, ref, snapshot{})
	}
	tick := time.NewTicker(w.interval)
	defer tick.Stop()
	var last snapshot
	for {
		s, err := t.poll(ctx)
		if err != nil {
			w.endBar()
			return w.timedOut(ctx, err, t.kind+" "+t.label, last)
		}
		last = s
		w.showBar(t, s)
		switch {
		case s.gone && w.want == "idle_or_copied":
			w.endBar()
			fmt.Fprintf(out, "%s %s was deleted (%s)\n", t.kind, t.label, t.autodelete)
			return nil
		case s.gone:
			w.endBar()
			return fmt.Errorf("%s %s was deleted while waiting for it to be %s", t.kind, t.label, w.want)
		case s.status == w.want:
			w.endBar()
			return nil
		case s.status == "stopped":
			w.endBar()
			return fmt.Errorf("%s %s stopped (progress %d%%) while waiting for it to be %s", t.kind, t.label, s.progress, w.want)
		}
		select {
		case <-ctx.Done():
			w.endBar()
			return w.timedOut(ctx, ctx.Err(), t.kind+" "+t.label, s)
		case <-tick.C:
		}
	}
}

// timedOut turns err into the timeout message if the deadline passed, else returns it as is.
func (w *waiter) timedOut(ctx context.Context, err error, what string, last snapshot) error {
	if !errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return err
	}
	now := ""
	if last.status != "" {
		now = fmt.Sprintf(" (it is %s, progress %d%%)", last.status, last.progress)
	}
	return fmt.Errorf("timed out after %v waiting for %s to be %s%s", w.timeout, what, w.want, now)
}

// resolve finds ref: a mapping, else (or with group, only) a consistency group. If it is
// neither, the refusal is the mapping's (or with group, the group's).
func (w *waiter) resolve(ctx context.Context, ref string, group bool) (waitTarget, error) {
	if !group {
		m, err := w.cl.Fcmap(ctx, ref)
		if err == nil {
			return w.mappingTarget(m), nil
		}
		if code := fcerr.CodeOf(err); code != fcerr.NoSuchObject && code != fcerr.NoSuchName {
			return waitTarget{}, err
		}
		g, gerr := w.cl.ConsistGrp(ctx, ref)
		if gerr != nil {
			return waitTarget{}, err
		}
		return w.groupTarget(g), nil
	}
	g, err := w.cl.ConsistGrp(ctx, ref)
	if err != nil {
		return waitTarget{}, err
	}
	return w.groupTarget(g), nil
}

// mappingTarget polls mapping m by id, so that a rename while waiting does not lose it.
func (w *waiter) mappingTarget(m api.Fcmap) waitTarget {
	id := strconv.Itoa(m.ID)
	return waitTarget{kind: "FlashCopy mapping", label: m.Name,
		autodelete: "autodelete does this when the copy completes", poll: func(ctx context.Context) (snapshot, error) {
			m, err := w.cl.Fcmap(ctx, id)
			if isGone(err) {
				return snapshot{gone: true}, nil
			}
			return snapshot{status: m.Status, progress: m.Progress}, err
		}}
}

// groupTarget polls a group; its progress is its members' average.
func (w *waiter) groupTarget(g api.ConsistGrp) waitTarget {
	id := strconv.Itoa(g.ID)
	return waitTarget{kind: "FlashCopy consistency group", label: g.Name,
		autodelete: "autodelete does this when its last mapping leaves", poll: func(ctx context.Context) (snapshot, error) {
			g, err := w.cl.ConsistGrp(ctx, id)
			if isGone(err) {
				return snapshot{gone: true}, nil
			}
			if err != nil {
				return snapshot{}, err
			}
			s := snapshot{status: g.Status}
			if len(g.Members) == 0 {
				return s, nil
			}
			ms, err := w.cl.Fcmaps(ctx)
			if err != nil {
				return s, err
			}
			sum := 0
			for _, m := range ms {
				if slices.ContainsFunc(g.Members, func(n api.FcmapName) bool { return n.ID == m.ID }) {
					sum += m.Progress
				}
			}
			s.progress = sum / len(g.Members)
			return s, nil
		}}
}

func isGone(err error) bool {
	code := fcerr.CodeOf(err)
	return code == fcerr.NoSuchObject || code == fcerr.NoSuchName
}

func (w *waiter) showBar(t waitTarget, s snapshot) {
	if w.bar != nil {
		fmt.Fprintf(w.bar, "\r%s\x1b[K", progressLine(t.label, s, 30))
		w.barShown = true
	}
}

// endBar ends the bar's line, so that what follows starts on a line of its own.
func (w *waiter) endBar() {
	if w.barShown {
		fmt.Fprintln(w.bar)
		w.barShown = false
	}
}

// progressLine renders one state of the progress bar, width characters wide between brackets.
func progressLine(label string, s snapshot, width int) string {
	p := min(max(s.progress, 0), 100)
	filled := p * width / 100
	status := s.status
	if s.gone {
		status = "deleted"
	}
	return fmt.Sprintf("%s [%s%s] %3d%% %s", label, strings.Repeat("#", filled), strings.Repeat(".", width-filled), p, status)
}
