package main

import (
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
)

// FCNBD_PPROF=ADDR (a loopback address, e.g. 127.0.0.1:6060) makes `fcnbd serve` serve Go's
// profiles (net/http/pprof, under /debug/pprof/) on ADDR: a tool for measuring the daemon, not
// an option of it, so it is not among serve's flags. A bad or non-loopback address is refused
// at start.
func init() {
	addr := os.Getenv("FCNBD_PPROF")
	if addr == "" || len(os.Args) < 2 || os.Args[1] != "serve" {
		return
	}
	if err := startPprof(addr); err != nil {
		fmt.Fprintf(os.Stderr, "fcnbd: FCNBD_PPROF: %v\n", err)
		os.Exit(2)
	}
}

// startPprof serves the profiles on addr, which must be loopback.
func startPprof(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("bad address %q: %w", addr, err)
	}
	if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return fmt.Errorf("address %q is not loopback: profiles are for local use only", addr)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	go http.Serve(ln, mux) //nolint:errcheck // ends with the process
	return nil
}
