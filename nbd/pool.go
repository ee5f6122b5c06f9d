package nbd

import (
	"math/bits"
	"sync"
)

// Payload buffers come from one sync.Pool per power-of-two size class, from minClass up to
// MaxPayload, so that a stream of requests of a given size allocates nothing once warm.
const (
	minClassShift = 12 // 4 KiB
	maxClassShift = 25 // 32 MiB == MaxPayload
)

var bufPools [maxClassShift - minClassShift + 1]sync.Pool

func classOf(n int) int {
	if n <= 1<<minClassShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minClassShift
}

// getBuf returns a buffer of length n (n <= MaxPayload). Its contents are arbitrary.
func getBuf(n int) *[]byte {
	c := classOf(n)
	if v := bufPools[c].Get(); v != nil {
		b := v.(*[]byte)
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, 1<<(c+minClassShift))
	return &b
}

// putBuf returns a buffer obtained from getBuf to its pool.
func putBuf(b *[]byte) {
	if b == nil {
		return
	}
	bufPools[classOf(cap(*b))].Put(b)
}
