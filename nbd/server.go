package nbd

import (
	"context"
	"errors"
	"net"

	"github.com/rs/zerolog"

	"fcnbd/internal/blockdev"
)

// Export is one named device offered to clients.
type Export struct {
	Name        string
	Description string
	Device      blockdev.Device
}

// Exports is what the server serves. It is consulted at negotiation time, so exports added or
// removed later are seen by new connections.
type Exports interface {
	// Lookup returns the export called name.
	Lookup(name string) (Export, bool)
	// List returns every export, for NBD_OPT_LIST.
	List() []Export
}

// Options tunes a Server. Zero values mean the defaults.
type Options struct {
	Logger zerolog.Logger
	// MaxConnections caps concurrent connections across all listeners (default 1024).
	MaxConnections int
	// MaxInFlight caps requests executing at once per connection (default 128).
	MaxInFlight int
}

// Server serves Exports over any number of listeners.
type Server struct {
	exports Exports
	opts    Options
}

// NewServer returns a server for exports.
func NewServer(exports Exports, opts Options) *Server {
	return &Server{exports: exports, opts: opts}
}

// Serve accepts connections on l until Shutdown is called (then it returns nil) or l fails.
func (s *Server) Serve(l net.Listener) error {
	return errors.New("nbd: not implemented yet")
}

// Shutdown stops accepting, lets every request already read finish and be replied to, then
// closes all connections. It returns ctx.Err() if ctx ends first (connections are then closed
// forcibly).
func (s *Server) Shutdown(ctx context.Context) error {
	return errors.New("nbd: not implemented yet")
}
