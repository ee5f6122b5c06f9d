// Package errorfs is a fault-injecting store.FS decorator for tests, after cockroachdb/pebble's
// vfs/errorfs: an Injector sees every operation on the wrapped FS and its Files (its kind, file
// name, offset and length) and decides whether it fails. Injectors compose (OnOp, OnFile,
// InRange, OnIndex, WithProbability, And, Or) and a Switch turns one on and off while a test
// runs. No production code path checks a test flag: faults exist only where a test wraps the
// store.
//
// An injected failure happens before the operation reaches the wrapped FS, so the operation has
// no effect at all; the error is an *Error, which wraps syscall.EIO and names the injector that
// fired.
package errorfs

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"path"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"fcnbd/internal/store"
)

// OpKind is the kind of a store operation.
type OpKind int

// The operations an Injector sees. Close and List are never injected.
const (
	OpRead OpKind = iota
	OpWrite
	OpSync
	OpPunch
	OpCreate
	OpOpen
	OpRemove
)

var opNames = [...]string{"read", "write", "sync", "punch", "create", "open", "remove"}

func (k OpKind) String() string {
	if k >= 0 && int(k) < len(opNames) {
		return opNames[k]
	}
	return fmt.Sprintf("op(%d)", int(k))
}

// Op is one operation offered to an Injector. Off and Len describe the byte range of a read,
// write or punch; they are zero for the others (Len is the size for a create).
type Op struct {
	Kind OpKind
	Name string // the file's name in the FS
	Off  int64
	Len  int64
}

func (o Op) String() string {
	switch o.Kind {
	case OpRead, OpWrite, OpPunch:
		return fmt.Sprintf("%s %s [%d, +%d)", o.Kind, o.Name, o.Off, o.Len)
	case OpCreate:
		return fmt.Sprintf("%s %s (%d bytes)", o.Kind, o.Name, o.Len)
	}
	return fmt.Sprintf("%s %s", o.Kind, o.Name)
}

// Injector decides, per operation, whether it fails. Implementations must be safe for
// concurrent use. String names the injector; it appears in the errors it causes.
type Injector interface {
	// MaybeError returns a non-nil error if op must fail, nil to let it through.
	MaybeError(op Op) error
	String() string
}

// ErrInjected is matched by errors.Is for every error an Injector returns.
var ErrInjected = errors.New("injected error")

// Error is an injected failure. It wraps syscall.EIO, so the data path treats it as a real I/O
// error, and errors.Is(err, ErrInjected) holds.
type Error struct {
	By string // the injector that fired
	Op Op
}

func (e *Error) Error() string {
	return fmt.Sprintf("injected error by %s on %s: %v", e.By, e.Op, syscall.EIO)
}

// Unwrap returns syscall.EIO.
func (e *Error) Unwrap() error { return syscall.EIO }

// Is reports whether target is ErrInjected.
func (e *Error) Is(target error) bool { return target == ErrInjected }

func fire(i Injector, op Op) error { return &Error{By: i.String(), Op: op} }

// predicate is an Injector that fires whenever match says so.
type predicate struct {
	name  string
	match func(Op) bool
}

func (p *predicate) MaybeError(op Op) error {
	if p.match(op) {
		return fire(p, op)
	}
	return nil
}

func (p *predicate) String() string { return p.name }

// Always fails every operation.
func Always() Injector {
	return &predicate{name: "Always", match: func(Op) bool { return true }}
}

// OnOp fails every operation of the given kinds.
func OnOp(kinds ...OpKind) Injector {
	names := make([]string, len(kinds))
	for i, k := range kinds {
		names[i] = k.String()
	}
	return &predicate{
		name: "OnOp(" + strings.Join(names, ",") + ")",
		match: func(op Op) bool {
			for _, k := range kinds {
				if op.Kind == k {
					return true
				}
			}
			return false
		},
	}
}

// OnFile fails every operation on a file whose name matches the path.Match pattern glob. A
// malformed pattern matches nothing.
func OnFile(glob string) Injector {
	return &predicate{
		name: fmt.Sprintf("OnFile(%q)", glob),
		match: func(op Op) bool {
			ok, err := path.Match(glob, op.Name)
			return err == nil && ok
		},
	}
}

// InRange fails every read, write or punch that overlaps [off, off+length).
func InRange(off, length int64) Injector {
	return &predicate{
		name: fmt.Sprintf("InRange(%d,+%d)", off, length),
		match: func(op Op) bool {
			switch op.Kind {
			case OpRead, OpWrite, OpPunch:
				return op.Off < off+length && off < op.Off+op.Len
			}
			return false
		},
	}
}

// OnIndex fails the index-th operation it sees, counting from zero, and no other. Put it last
// in an And to count only the operations the other operands select: And(OnOp(OpSync),
// OnIndex(2)) fails the third sync.
func OnIndex(index int64) Injector { return &onIndex{index: index} }

type onIndex struct {
	index int64
	seen  atomic.Int64
}

func (i *onIndex) MaybeError(op Op) error {
	if i.seen.Add(1)-1 == i.index {
		return fire(i, op)
	}
	return nil
}

func (i *onIndex) String() string { return fmt.Sprintf("OnIndex(%d)", i.index) }

// WithProbability fails each operation independently with probability p, drawing from a
// generator seeded with seed, so a run that sees the same operations in the same order fails
// the same ones.
func WithProbability(p float64, seed uint64) Injector {
	return &withProbability{p: p, seed: seed, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))}
}

type withProbability struct {
	p    float64
	seed uint64
	mu   sync.Mutex
	rng  *rand.Rand
}

func (w *withProbability) MaybeError(op Op) error {
	w.mu.Lock()
	hit := w.rng.Float64() < w.p
	w.mu.Unlock()
	if hit {
		return fire(w, op)
	}
	return nil
}

func (w *withProbability) String() string {
	return fmt.Sprintf("WithProbability(%g,seed=%d)", w.p, w.seed)
}

// And fails an operation when every operand would. Operands are asked left to right and
// the first that lets the operation through ends the evaluation, so stateful operands (OnIndex,
// WithProbability) only see the operations the ones before them selected. The error names the
// whole conjunction.
func And(injectors ...Injector) Injector { return and(injectors) }

type and []Injector

func (a and) MaybeError(op Op) error {
	for _, i := range a {
		if i.MaybeError(op) == nil {
			return nil
		}
	}
	return fire(a, op)
}

func (a and) String() string { return "And(" + joinNames(a) + ")" }

// Or fails an operation when any operand does. Operands are asked left to right and the first
// to fire decides; its error (naming it) is returned and later operands do not see the
// operation.
func Or(injectors ...Injector) Injector { return or(injectors) }

type or []Injector

func (o or) MaybeError(op Op) error {
	for _, i := range o {
		if err := i.MaybeError(op); err != nil {
			return err
		}
	}
	return nil
}

func (o or) String() string { return "Or(" + joinNames(o) + ")" }

func joinNames(is []Injector) string {
	names := make([]string, len(is))
	for i, in := range is {
		names[i] = in.String()
	}
	return strings.Join(names, ",")
}

// Switch is an Injector that a test turns on and off while operations run, for example to make
// the metadata store unwritable and then writable again. While off it lets everything through
// (its inner injector does not see the operations); while on it defers to its inner injector.
// The zero value is off and, once on, fails everything.
type Switch struct {
	on    atomic.Bool
	inner Injector
}

// NewSwitch returns a Switch, off, around inner (nil: fail every operation while on).
func NewSwitch(inner Injector) *Switch { return &Switch{inner: inner} }

// On makes the switch inject faults.
func (s *Switch) On() { s.on.Store(true) }

// Off makes the switch let every operation through.
func (s *Switch) Off() { s.on.Store(false) }

// Set turns the switch on or off.
func (s *Switch) Set(on bool) { s.on.Store(on) }

// Enabled reports whether the switch is on.
func (s *Switch) Enabled() bool { return s.on.Load() }

// MaybeError implements Injector.
func (s *Switch) MaybeError(op Op) error {
	if !s.on.Load() {
		return nil
	}
	if s.inner == nil {
		return fire(s, op)
	}
	return s.inner.MaybeError(op)
}

func (s *Switch) String() string {
	if s.inner == nil {
		return "Switch"
	}
	return "Switch(" + s.inner.String() + ")"
}

// FS is a store.FS whose operations, and those of its Files, pass an Injector first.
type FS struct {
	inner store.FS
	inj   Injector
}

var _ store.FS = (*FS)(nil)

// Wrap returns fs with faults injected by inj.
func Wrap(fs store.FS, inj Injector) *FS { return &FS{inner: fs, inj: inj} }

// Unwrap returns the wrapped FS.
func (fs *FS) Unwrap() store.FS { return fs.inner }

// Create implements store.FS.
func (fs *FS) Create(name string, size int64) (store.File, error) {
	if err := fs.inj.MaybeError(Op{Kind: OpCreate, Name: name, Len: size}); err != nil {
		return nil, err
	}
	f, err := fs.inner.Create(name, size)
	if err != nil {
		return nil, err
	}
	return &file{inner: f, name: name, inj: fs.inj}, nil
}

// Open implements store.FS.
func (fs *FS) Open(name string) (store.File, error) {
	if err := fs.inj.MaybeError(Op{Kind: OpOpen, Name: name}); err != nil {
		return nil, err
	}
	f, err := fs.inner.Open(name)
	if err != nil {
		return nil, err
	}
	return &file{inner: f, name: name, inj: fs.inj}, nil
}

// Remove implements store.FS.
func (fs *FS) Remove(name string) error {
	if err := fs.inj.MaybeError(Op{Kind: OpRemove, Name: name}); err != nil {
		return err
	}
	return fs.inner.Remove(name)
}

// List returns the wrapped FS's file names if it can list them (it has a List method, as
// store.Dir has); otherwise it returns an error wrapping errors.ErrUnsupported. It is never
// injected.
func (fs *FS) List() ([]string, error) {
	if l, ok := fs.inner.(interface{ List() ([]string, error) }); ok {
		return l.List()
	}
	return nil, fmt.Errorf("errorfs: %T cannot list its files: %w", fs.inner, errors.ErrUnsupported)
}

type file struct {
	inner store.File
	name  string
	inj   Injector
}

func (f *file) ReadAt(p []byte, off int64) (int, error) {
	if err := f.inj.MaybeError(Op{Kind: OpRead, Name: f.name, Off: off, Len: int64(len(p))}); err != nil {
		return 0, err
	}
	return f.inner.ReadAt(p, off)
}

func (f *file) WriteAt(p []byte, off int64) (int, error) {
	if err := f.inj.MaybeError(Op{Kind: OpWrite, Name: f.name, Off: off, Len: int64(len(p))}); err != nil {
		return 0, err
	}
	return f.inner.WriteAt(p, off)
}

func (f *file) Sync() error {
	if err := f.inj.MaybeError(Op{Kind: OpSync, Name: f.name}); err != nil {
		return err
	}
	return f.inner.Sync()
}

func (f *file) Punch(off, length int64) error {
	if err := f.inj.MaybeError(Op{Kind: OpPunch, Name: f.name, Off: off, Len: length}); err != nil {
		return err
	}
	return f.inner.Punch(off, length)
}

func (f *file) Close() error { return f.inner.Close() }
