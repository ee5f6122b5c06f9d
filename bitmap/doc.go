// Package bitmap holds the per-mapping split and difference bitmaps over grains: one bit per
// grain of a volume, updated with atomic word operations so the copy-on-write layer can test and
// set bits without a lock. It does no I/O; making bits durable is the journal's job (the
// encoding from MarshalBinary is what the catalogue stores).
package bitmap
