package driver

import (
	"fmt"
	"sync"

	"fcnbd/bitmap"
	"fcnbd/cow"
	"fcnbd/internal/catalog"
)

// chunkBits is how many grains one stored bitmap chunk covers (4 KiB of bits).
const chunkBits = 4096 * 8

// journal makes split bits durable in the catalogue for the copy-on-write engine
// (cow.BitJournal). It keeps the durable image of every active mapping's split bitmap in
// chunks, so that a commit of new bits writes only the chunks they fall in, and so that a
// failed commit leaves the image as it was on disk.
type journal struct {
	db *catalog.DB

	mu     sync.Mutex
	images map[int]map[uint32][]byte // mapping → chunk → bits
}

func newJournal(db *catalog.DB) *journal {
	return &journal{db: db, images: map[int]map[uint32][]byte{}}
}

// SetBits implements cow.BitJournal: every bit of updates is durable when it returns nil, and
// none is recorded (in memory or on disk) when it returns an error.
func (j *journal) SetBits(updates []cow.BitUpdate) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	type ck struct {
		m int
		c uint32
	}
	changed := map[ck][]byte{}
	for _, u := range updates {
		img := j.images[u.Mapping]
		if img == nil {
			return fmt.Errorf("split bits for mapping %d, which has no bitmap", u.Mapping)
		}
		for _, g := range u.Grains {
			k := ck{u.Mapping, uint32(g / chunkBits)}
			buf, ok := changed[k]
			if !ok {
				buf = make([]byte, chunkBits/8)
				copy(buf, img[k.c])
				changed[k] = buf
			}
			bit := g % chunkBits
			buf[bit/8] |= 1 << (bit % 8)
		}
	}
	// failpoint: journal-before-commit
	err := j.db.Update(func(tx *catalog.Tx) error {
		for k, buf := range changed {
			if err := tx.PutBitmapChunk(uint64(k.m), catalog.SplitBitmap, k.c, buf); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("commit split bits: %w", err)
	}
	// failpoint: journal-after-commit
	for k, buf := range changed {
		j.images[k.m][k.c] = buf
	}
	return nil
}

// commitImages runs fn and writes the current images of ids as their whole stored bitmaps, in
// one catalogue commit (the start commit). Bits committed by SetBits meanwhile are never lost:
// the journal is locked for the whole commit.
func (j *journal) commitImages(ids []int, fn func(tx *catalog.Tx) error) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.db.Update(func(tx *catalog.Tx) error {
		if err := fn(tx); err != nil {
			return err
		}
		for _, id := range ids {
			if err := tx.DeleteBitmap(uint64(id), catalog.SplitBitmap); err != nil {
				return err
			}
			for c, buf := range j.images[id] {
				if err := tx.PutBitmapChunk(uint64(id), catalog.SplitBitmap, c, buf); err != nil {
					return err
				}
			}
		}
		return nil
	})
}

// image returns bm as a chunked image.
func image(bm *bitmap.Bitmap) map[uint32][]byte {
	img := map[uint32][]byte{}
	for g := bm.NextSet(0); g >= 0; g = bm.NextSet(g + 1) {
		c := uint32(g / chunkBits)
		buf := img[c]
		if buf == nil {
			buf = make([]byte, chunkBits/8)
			img[c] = buf
		}
		bit := g % chunkBits
		buf[bit/8] |= 1 << (bit % 8)
	}
	return img
}

// install records img as mapping id's durable image (after the commit that wrote it).
func (j *journal) install(id int, img map[uint32][]byte) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.images[id] = img
}

// drop forgets mapping id's image.
func (j *journal) drop(id int) {
	j.mu.Lock()
	defer j.mu.Unlock()
	delete(j.images, id)
}

// bitmap returns mapping id's durable split bitmap for a volume of size and grain, or all
// clear if it has none.
func (j *journal) bitmap(id int, size, grain int64) *bitmap.Bitmap {
	j.mu.Lock()
	defer j.mu.Unlock()
	bm := bitmap.New(size, grain)
	for c, buf := range j.images[id] {
		for i, b := range buf {
			for bit := 0; b != 0; bit++ {
				if b&1 != 0 {
					if g := int(c)*chunkBits + i*8 + bit; g < bm.Len() {
						bm.Set(g)
					}
				}
				b >>= 1
			}
		}
	}
	return bm
}

// load reads mapping id's stored split bitmap into the journal.
func (j *journal) load(tx *catalog.Tx, id int) error {
	img := map[uint32][]byte{}
	err := tx.BitmapChunks(uint64(id), catalog.SplitBitmap, func(c uint32, data []byte) error {
		if len(data) != chunkBits/8 {
			return fmt.Errorf("mapping %d split bitmap chunk %d: %d bytes: %w", id, c, len(data), catalog.ErrCorrupt)
		}
		img[c] = append([]byte(nil), data...)
		return nil
	})
	if err != nil {
		return err
	}
	j.install(id, img)
	return nil
}
