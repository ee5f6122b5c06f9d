package blockdev

import (
	"errors"
	"syscall"
	"testing"
)

// plain is a Device with neither optional method.
type plain struct{ Device }

func (plain) Size() int64 { return 1 << 20 }

func TestOptionalFallbacks(t *testing.T) {
	d := plain{}
	if err := WriteZeroesFast(d, 0, 4096, true, false); !errors.Is(err, ErrNotFast) || !errors.Is(err, syscall.ENOTSUP) || !IsNotFast(err) {
		t.Fatalf("WriteZeroesFast without support: %v, want ErrNotFast (ENOTSUP)", err)
	}
	if err := WriteZeroesFast(d, 1<<20-4096, 8192, true, false); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("WriteZeroesFast past the end: %v, want EINVAL", err)
	}
	if err := Prefetch(d, 0, 1<<20); err != nil {
		t.Fatalf("Prefetch without support: %v, want nil", err)
	}
	if err := Prefetch(d, 1<<20, 1); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("Prefetch past the end: %v, want EINVAL", err)
	}
}
