package main

import (
	"strings"
	"testing"
)

// TestStartPprof: profiles are served only on a loopback address.
func TestStartPprof(t *testing.T) {
	for _, addr := range []string{"0.0.0.0:0", "192.0.2.1:6060", ":6060", "example.com:6060", "127.0.0.1"} {
		if err := startPprof(addr); err == nil {
			t.Errorf("%q accepted", addr)
		}
	}
	if err := startPprof("127.0.0.1:0"); err != nil {
		t.Errorf("127.0.0.1:0: %v", err)
	}
	if err := startPprof("10.0.0.1:6060"); err == nil || !strings.Contains(err.Error(), "not loopback") {
		t.Errorf("10.0.0.1:6060: %v, want a refusal naming loopback", err)
	}
}
