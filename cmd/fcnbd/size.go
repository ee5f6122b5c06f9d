package main

import (
	"fmt"
	"math"
	"strconv"
	"strings"

	"fcnbd/internal/fcerr"
)

var units = []string{"B", "KB", "MB", "GB", "TB", "PB"}

// parseSize reads a size in bytes, or with a binary unit: 512K, 64M, 10G, 1T (also KB/KiB
// forms, any case).
func parseSize(s string) (int64, error) {
	bad := func() (int64, error) {
		return 0, fcerr.New(fcerr.BadValue, "the size %q is not valid: use bytes or a number with K, M, G, T or P", s)
	}
	t := strings.ToUpper(strings.TrimSpace(s))
	t = strings.TrimSuffix(strings.TrimSuffix(t, "IB"), "B")
	shift := 0
	if t != "" {
		if i := strings.IndexByte("KMGTP", t[len(t)-1]); i >= 0 {
			shift = 10 * (i + 1)
			t = t[:len(t)-1]
		}
	}
	if t == "" || strings.ContainsAny(t, "+-_") {
		return bad()
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n > math.MaxInt64>>shift {
		return bad()
	}
	return n << shift, nil
}

// formatCapacity is IBM's human form: two decimals in the largest unit that keeps the value
// at least 1 (64.00MB, 10.00GB), or the bytes with -bytes.
func formatCapacity(n int64, inBytes bool) string {
	if inBytes {
		return strconv.FormatInt(n, 10)
	}
	v, u := float64(n), 0
	for v >= 1024 && u < len(units)-1 {
		v /= 1024
		u++
	}
	return fmt.Sprintf("%.2f%s", v, units[u])
}
