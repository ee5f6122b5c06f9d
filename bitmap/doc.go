// Package bitmap holds the per-mapping split and difference bitmaps over grains.
package bitmap
