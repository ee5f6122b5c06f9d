package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"

	"github.com/urfave/cli/v2"

	"fcnbd/internal/fcerr"
)

// The IBM-style output of every ls command lives here: a table by default (aligned, or joined
// by -delim), -nohdr, -json, -filtervalue attr=value[:attr=value…] with a '*' wildcard, and a
// detailed view (one "key value" per line) when an object is named. A command describes its
// objects as ordered fields and picks which of them are table columns.

// field is one attribute of an object as shown.
type field struct{ name, value string }

// object is one row: its fields in display order, and what -json prints for it.
type object struct {
	fields []field
	json   any
}

func (o object) get(name string) (string, bool) {
	for _, f := range o.fields {
		if f.name == name {
			return f.value, true
		}
	}
	return "", false
}

// viewOptions are the output flags common to ls commands.
type viewOptions struct {
	bytes, nohdr, json bool
	delim              string
	filters            []filter
}

type filter struct{ attr, pattern string }

func viewFlags() []cli.Flag {
	return []cli.Flag{
		&cli.BoolFlag{Name: "bytes", Usage: "show capacities in bytes"},
		&cli.StringFlag{Name: "delim", Usage: "separate columns with this character instead of aligning them"},
		&cli.BoolFlag{Name: "nohdr", Usage: "omit the header line"},
		&cli.BoolFlag{Name: "json", Usage: "print JSON"},
		&cli.StringFlag{Name: "filtervalue", Usage: "show only objects with `attr=value[:attr=value…]` ('*' matches any text)"},
	}
}

func viewOptionsFrom(c *cli.Context) (viewOptions, error) {
	o := viewOptions{bytes: c.Bool("bytes"), nohdr: c.Bool("nohdr"), json: c.Bool("json"), delim: c.String("delim")}
	if c.IsSet("delim") && len([]rune(o.delim)) != 1 {
		return o, fcerr.New(fcerr.BadValue, "the -delim value %q is not one character", o.delim)
	}
	if fv := c.String("filtervalue"); fv != "" {
		for _, term := range strings.Split(fv, ":") {
			attr, pattern, ok := strings.Cut(term, "=")
			if !ok || attr == "" || strings.Count(pattern, "*") > 1 {
				return o, fcerr.New(fcerr.BadValue, "the filter %q is not valid: use attr=value, with at most one '*'", term)
			}
			o.filters = append(o.filters, filter{attr, pattern})
		}
	}
	return o, nil
}

func match(pattern, value string) bool {
	prefix, suffix, wild := strings.Cut(pattern, "*")
	if !wild {
		return pattern == value
	}
	return len(value) >= len(prefix)+len(suffix) && strings.HasPrefix(value, prefix) && strings.HasSuffix(value, suffix)
}

// filterObjects keeps the objects every filter matches; a filter on an attribute the objects
// do not have is a refusal.
func filterObjects(objs []object, fields []string, filters []filter) ([]object, error) {
	for _, f := range filters {
		known := false
		for _, name := range fields {
			known = known || name == f.attr
		}
		if !known {
			return nil, fcerr.New(fcerr.BadValue, "the filter attribute %q is not valid; valid attributes: %s", f.attr, strings.Join(fields, ", "))
		}
	}
	var out []object
next:
	for _, o := range objs {
		for _, f := range filters {
			if v, _ := o.get(f.attr); !match(f.pattern, v) {
				continue next
			}
		}
		out = append(out, o)
	}
	return out, nil
}

// renderList prints objs as a table of columns (or JSON) after filtering. fields are every
// attribute name an object has (the filterable ones).
func renderList(w io.Writer, columns, fields []string, objs []object, o viewOptions) error {
	objs, err := filterObjects(objs, fields, o.filters)
	if err != nil {
		return err
	}
	if o.json {
		list := make([]any, 0, len(objs))
		for _, obj := range objs {
			list = append(list, obj.json)
		}
		return printJSON(w, list)
	}
	var rows [][]string
	if !o.nohdr {
		rows = append(rows, columns)
	}
	for _, obj := range objs {
		row := make([]string, len(columns))
		for i, col := range columns {
			row[i], _ = obj.get(col)
		}
		rows = append(rows, row)
	}
	printRows(w, rows, o.delim)
	return nil
}

// renderDetail prints one object's every field, one per line.
func renderDetail(w io.Writer, obj object, o viewOptions) error {
	if len(o.filters) > 0 {
		return fcerr.New(fcerr.ExclusiveFlags, "-filtervalue can't be used with an object name or id")
	}
	if o.json {
		return printJSON(w, obj.json)
	}
	var rows [][]string
	for _, f := range obj.fields {
		rows = append(rows, []string{f.name, f.value})
	}
	if o.delim == "" {
		o.delim = " " // IBM's detailed view separates key and value by one space, unaligned
	}
	printRows(w, rows, o.delim)
	return nil
}

// printRows aligns rows in space-padded columns, or joins each with delim if it is set.
func printRows(w io.Writer, rows [][]string, delim string) {
	if delim != "" {
		for _, r := range rows {
			fmt.Fprintln(w, strings.Join(r, delim))
		}
		return
	}
	var widths []int
	for _, r := range rows {
		for i, c := range r {
			if i >= len(widths) {
				widths = append(widths, 0)
			}
			widths[i] = max(widths[i], len(c))
		}
	}
	for _, r := range rows {
		var b strings.Builder
		for i, c := range r {
			if i == len(r)-1 {
				b.WriteString(c)
			} else {
				fmt.Fprintf(&b, "%-*s ", widths[i], c)
			}
		}
		fmt.Fprintln(w, b.String())
	}
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// lsSpec describes an IBM-style ls command: without an argument a table of every object, with
// one the detailed view of that object.
type lsSpec[T any] struct {
	name, usage, arg string
	extra            string     // usage of flags beyond the common view flags, e.g. "[-bytes] "
	flags            []cli.Flag // the view flags it takes
	columns, fields  []string
	one              func(c *cli.Context, ref string) (T, error)
	all              func(c *cli.Context) ([]T, error)
	object           func(T, viewOptions) object
}

func lsCommand[T any](s lsSpec[T]) *cli.Command {
	return &cli.Command{
		Name:      s.name,
		Usage:     s.usage,
		UsageText: "fcnbd " + s.name + " " + s.extra + "[-delim C] [-nohdr] [-json] [-filtervalue attr=value] [" + s.arg + "]",
		Flags:     append([]cli.Flag{socketFlag()}, s.flags...),
		Action: func(c *cli.Context) error {
			a, err := args(c, 0, 1, "")
			if err != nil {
				return err
			}
			o, err := viewOptionsFrom(c)
			if err != nil {
				return err
			}
			if len(a) == 1 {
				x, err := s.one(c, a[0])
				if err != nil {
					return err
				}
				return renderDetail(c.App.Writer, s.object(x, o), o)
			}
			xs, err := s.all(c)
			if err != nil {
				return err
			}
			objs := make([]object, len(xs))
			for i, x := range xs {
				objs[i] = s.object(x, o)
			}
			return renderList(c.App.Writer, s.columns, s.fields, objs, o)
		},
	}
}
