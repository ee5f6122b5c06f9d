// Package fcerr carries refusals with the stable, IBM-style message codes of docs/flashcopy.md
// §4 from wherever a command is validated to the CLI that prints them.
package fcerr

import (
	"errors"
	"fmt"
)

// Codes. IBM's where one is known; fcnbd's own (CMMVC9xxxE) otherwise.
const (
	SizeMismatch       = "CMMVC5924E" // source and target are different sizes
	SameVolume         = "CMMVC6303E" // source and target are the same volume
	DuplicateMapping   = "CMMVC6466E" // an identical mapping exists
	TargetInUse        = "CMMVC6425E" // the target is already the target of another mapping
	TooManyMappings    = "CMMVC6426E" // source, group or connected set limit reached
	NoSuchObject       = "CMMVC5753E" // the specified object does not exist
	NoSuchName         = "CMMVC5754E" // the specified object does not exist, or the name supplied does not meet the naming rules
	BadName            = "CMMVC6527E" // the name is not valid
	MissingParameter   = "CMMVC5707E" // required parameters are missing
	ExclusiveFlags     = "CMMVC5713E" // some parameters are mutually exclusive
	BadState           = "CMMVC5903E" // not valid in the current state
	AlreadyCopying     = "CMMVC5907E" // start while copying
	AlreadyStopped     = "CMMVC5912E" // stop while stopped
	GroupMember        = "CMMVC5935E" // a group member can't be prepared, started or stopped on its own
	NeedsRestore       = "CMMVC6298E" // prepare of a mapping whose target is an active source, without -restore
	VolumeMapped       = "CMMVC5840E" // the volume is used by a mapping
	NameInUse          = "CMMVC6035E" // the name is already in use
	BadValue           = "CMMVC5731E" // a parameter value is not valid
	DuplicateRestore   = "CMMVC6299E" // another linked mapping is already restoring
	NotCopied          = "CMMVC6300E" // -split needs progress 100
	Internal           = "CMMVC9000E" // fcnbd: unexpected internal failure
	MetadataUnwritable = "CMMVC9001E" // fcnbd: the metadata store could not be written
	FenceTimeout       = "CMMVC9002E" // fcnbd: the start fence did not drain in time
	NoDaemon           = "CMMVC9003E" // fcnbd: no daemon is listening on the control socket
	GrainMismatch      = "CMMVC9004E" // fcnbd: the grain size differs within a connected set (IBM's code is not known to us)
	ChainLoop          = "CMMVC9005E" // fcnbd: one group start would make a volume read through itself
	Unsupported        = "CMMVC9006E" // fcnbd: a function fcnbd does not have (compression, mirroring)
)

// Error is a refusal: a stable code and a sentence for the operator.
type Error struct {
	Code    string
	Message string
}

func (e *Error) Error() string { return e.Code + " " + e.Message }

// New returns an *Error with a formatted message.
func New(code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// CodeOf returns the code carried by err, or "" if err is not (or does not wrap) an *Error.
func CodeOf(err error) string {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return ""
}
