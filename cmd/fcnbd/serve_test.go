package main

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"fcnbd/internal/catalog"
	"fcnbd/internal/fcerr"
	"fcnbd/nbd"
)

// TestOpenFailure: a data directory that can't be opened stops the daemon with a message that
// names the file at fault and says what an operator can do, printed as plain text (an fcerr
// inside must not reduce it to its own code and message).
func TestOpenFailure(t *testing.T) {
	const dir = "/srv/fcnbd"
	tests := []struct {
		name string
		err  error
		want []string
	}{
		{"corrupt catalogue", fmt.Errorf("open %s/catalog.db: %w: invalid database", dir, catalog.ErrCorrupt),
			[]string{dir + "/catalog.db can't be read", "invalid database", "from a backup", "Keep a copy of the data directory"}},
		{"unwritable catalogue", fcerr.New(fcerr.MetadataUnwritable, "the catalogue could not be written: disk full"),
			[]string{dir + "/catalog.db can't be written", "disk full", "free space"}},
		{"missing backing file", errors.New("volume a (id 0): open vol-0.img: no such file or directory"),
			[]string{"data directory " + dir, "vol-0.img", "backing file from a backup"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := openFailure(dir, tc.err)
			var fe *fcerr.Error
			if errors.As(err, &fe) {
				t.Fatalf("the message is an fcerr (%v): the CLI would print only its own part", fe)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("message %q lacks %q", err, w)
				}
			}
		})
	}
	locked := fmt.Errorf("open x: %w (is another fcnbd daemon using this data directory?)", catalog.ErrLocked)
	if err := openFailure(dir, locked); err != locked {
		t.Errorf("a locked catalogue: %v, want the error as it is", err)
	}
}

// TestTLSSettings: every wrong combination of the TLS flags stops the daemon with a message
// naming the flag or the file at fault.
func TestTLSSettings(t *testing.T) {
	empty := t.TempDir()
	for _, tc := range []struct {
		name, mode, certs, psk string
		want                   []string
	}{
		{"psk", "require", "", "/etc/keys.psk", []string{"--tls-psk", "not supported", "--tls-certs"}},
		{"bad mode", "yes", "", "", []string{"bad --tls", "off, on or require"}},
		{"certs with off", "off", empty, "", []string{"--tls-certs", "--tls is off"}},
		{"on without certs", "on", "", "", []string{"--tls on needs --tls-certs", "server-cert.pem"}},
		{"require without certs", "require", "", "", []string{"--tls require needs --tls-certs"}},
		{"missing directory", "on", empty + "/nope", "", []string{"--tls-certs", empty + "/nope"}},
		{"empty directory", "require", empty, "", []string{"--tls-certs", empty + "/server-cert.pem"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := tlsSettings(tc.mode, tc.certs, tc.psk)
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("message %q lacks %q", err, w)
				}
			}
		})
	}
	if m, cfg, err := tlsSettings("off", "", ""); err != nil || m != nbd.TLSOff || cfg != nil {
		t.Errorf("default: %v %v %v", m, cfg, err)
	}
}
