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
	// Hosts and host mappings (issue 14).
	HostMapped       = "CMMVC5871E" // the host has mappings (one or more of its port names is in a mapping)
	PortInUse        = "CMMVC6581E" // a port name is already assigned to a host, or is not valid
	VolumeHostMapped = "CMMVC6071E" // the volume is already mapped to a host (to another one: use -force)
	SCSIInUse        = "CMMVC5879E" // the host already has a volume mapped with this SCSI id
	LastHostPort     = "CMMVC9140E" // fcnbd: a host keeps at least one port name
	// The SVC command line (svcshell): IBM's codes for unknown commands and parameters; fcnbd's
	// own for what only a restricted shell refuses.
	UnsupportedCommand   = "CMMVC7205E" // the command is not supported (not an SVC command of fcnbd, or the wrong svcinfo/svctask prefix); IBM's code as we recall it, not verified against IBM's reference
	UnsupportedParameter = "CMMVC5709E" // [-x] is not a supported parameter (the text Cinder's Storwize test fake expects)
	BadCommandLine       = "CMMVC9040E" // fcnbd: the SVC command line has shell syntax, control characters, or is empty or too long
	InteractiveLogin     = "CMMVC9041E" // fcnbd: the SVC SSH account runs one command per connection, no interactive login
	// SVC objects (svcobjs).
	Unsupported = "CMMVC9006E" // fcnbd: a function fcnbd does not have (compression, mirroring)
	// expandvdisksize (expand): IBM's code for expanding a volume in a FlashCopy mapping is not
	// known to us.
	ExpandInMapping = "CMMVC9007E" // fcnbd: a volume in a FlashCopy mapping can't be expanded
	// Cluster mode (issue 16).
	ClusterUnavailable = "CMMVC5786E" // the action failed because the cluster is not in a stable state (no etcd quorum, or this node no longer owns the I/O group)
	OtherIOGroup       = "CMMVC9008E" // fcnbd: the I/O group named is served by another node: run the command there
	NotServing         = "CMMVC9009E" // fcnbd: this node does not serve its I/O group (a standby): it only lists; run changes on the owner
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

// Unwritable is the refusal for a catalogue commit that failed with err: MetadataUnwritable,
// or, when the cluster refused the transition (no etcd quorum, or this node lost its I/O
// group), the cluster's own ClusterUnavailable, so that the operator sees the cause's code.
// The message is the formatted context, then the cause.
func Unwritable(err error, format string, args ...any) *Error {
	msg := fmt.Sprintf(format, args...)
	var e *Error
	if errors.As(err, &e) && e.Code == ClusterUnavailable {
		return &Error{Code: ClusterUnavailable, Message: msg + ": " + e.Message}
	}
	return &Error{Code: MetadataUnwritable, Message: msg + ": the catalogue could not be written: " + err.Error()}
}
