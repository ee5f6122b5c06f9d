package catalog

import (
	"encoding/binary"
	"fmt"
)

// The FlashCopy control plane stores its whole model as one value, so that a command or a group
// start is one commit; the mappings' bitmaps are stored in fixed-size chunks so that a commit of
// a few new bits writes a few small values, not whole bitmaps.

var keyModel = []byte("model")

// Model returns the stored FlashCopy model, or nil if none was ever stored.
func (t *Tx) Model() []byte {
	v := t.tx.Bucket(bucketFC).Get(keyModel)
	if v == nil {
		return nil
	}
	return append([]byte(nil), v...)
}

// PutModel replaces the stored FlashCopy model.
func (t *Tx) PutModel(data []byte) error { return t.change(bucketFC).Put(keyModel, data) }

// BitmapKind tells a mapping's bitmaps apart.
type BitmapKind byte

const (
	SplitBitmap      BitmapKind = 's'
	DifferenceBitmap BitmapKind = 'd'
	// StartDifferenceBitmap is an incremental mapping's difference bitmap as its last start
	// found it (every grain set if that start copied everything), written by the start commit.
	// It always has chunk 0, so that an absent record (never started) is told from a clear one.
	StartDifferenceBitmap BitmapKind = 'l'
	// FailureRecord is one chunk (0) saying the mapping was stopped by a failed grain copy;
	// it is written before anything relies on the stop, and removed when the mapping starts.
	FailureRecord BitmapKind = 'f'
)

func bitmapKey(mapID uint64, kind BitmapKind, chunk uint32) []byte {
	k := binary.BigEndian.AppendUint64(nil, mapID)
	k = append(k, byte(kind))
	return binary.BigEndian.AppendUint32(k, chunk)
}

// BitmapChunks calls fn for every stored chunk of the mapping's bitmap of kind, in chunk order.
func (t *Tx) BitmapChunks(mapID uint64, kind BitmapKind, fn func(chunk uint32, data []byte) error) error {
	c := t.tx.Bucket(bucketBitmaps).Cursor()
	prefix := bitmapKey(mapID, kind, 0)[:9]
	for k, v := c.Seek(prefix); len(k) >= 9 && string(k[:9]) == string(prefix); k, v = c.Next() {
		if len(k) != 13 {
			return fmt.Errorf("bitmap key of %d bytes: %w", len(k), ErrCorrupt)
		}
		if err := fn(binary.BigEndian.Uint32(k[9:]), v); err != nil {
			return err
		}
	}
	return nil
}

// PutBitmapChunk stores one chunk of a mapping's bitmap.
func (t *Tx) PutBitmapChunk(mapID uint64, kind BitmapKind, chunk uint32, data []byte) error {
	return t.tx.Bucket(bucketBitmaps).Put(bitmapKey(mapID, kind, chunk), data)
}

// DeleteBitmap removes every chunk of a mapping's bitmap of kind.
func (t *Tx) DeleteBitmap(mapID uint64, kind BitmapKind) error {
	b := t.tx.Bucket(bucketBitmaps)
	prefix := bitmapKey(mapID, kind, 0)[:9]
	var keys [][]byte
	c := b.Cursor()
	for k, _ := c.Seek(prefix); len(k) >= 9 && string(k[:9]) == string(prefix); k, _ = c.Next() {
		keys = append(keys, append([]byte(nil), k...))
	}
	for _, k := range keys {
		if err := b.Delete(k); err != nil {
			return err
		}
	}
	return nil
}
