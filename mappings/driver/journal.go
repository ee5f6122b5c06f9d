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

// imgKey names one bitmap of one mapping: its split bitmap (while active) or its difference
// bitmap (incremental mappings, from creation to deletion).
type imgKey struct {
	id   int
	kind catalog.BitmapKind
}

func splitKey(id int) imgKey { return imgKey{id, catalog.SplitBitmap} }
func diffKey(id int) imgKey  { return imgKey{id, catalog.DifferenceBitmap} }

// startKey names an incremental mapping's difference bitmap as its last start found it
// (see Driver.dirtyBitmap).
func startKey(id int) imgKey { return imgKey{id, catalog.StartDifferenceBitmap} }

// chunks is a bitmap as stored: chunk number → chunkBits/8 bytes; absent chunks are all clear.
type chunks = map[uint32][]byte

// journal makes split and difference bits durable in the catalogue for the copy-on-write
// engine (cow.BitJournal). It keeps the durable image of every bitmap in chunks, so that a
// commit of new bits writes only the chunks they fall in, and so that a failed commit leaves
// the image as it was on disk.
type journal struct {
	db *catalog.DB

	mu     sync.Mutex
	images map[imgKey]chunks
}

func newJournal(db *catalog.DB) *journal {
	return &journal{db: db, images: map[imgKey]chunks{}}
}

func kindOf(k cow.BitKind) catalog.BitmapKind {
	if k == cow.DifferenceBits {
		return catalog.DifferenceBitmap
	}
	return catalog.SplitBitmap
}

// SetBits implements cow.BitJournal: every bit of updates (split and difference bits alike)
// is durable when it returns nil, and none is recorded (in memory or on disk) when it returns
// an error.
func (j *journal) SetBits(updates []cow.BitUpdate) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	type ck struct {
		k imgKey
		c uint32
	}
	changed := map[ck][]byte{}
	for _, u := range updates {
		key := imgKey{u.Mapping, kindOf(u.Kind)}
		img := j.images[key]
		if img == nil {
			return fmt.Errorf("%v bits for mapping %d, which has no such bitmap", u.Kind, u.Mapping)
		}
		for _, g := range u.Grains {
			k := ck{key, uint32(g / chunkBits)}
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
	failpoint("journal-before-commit")
	err := j.db.Update(func(tx *catalog.Tx) error {
		for k, buf := range changed {
			if err := tx.PutBitmapChunk(uint64(k.k.id), k.k.kind, k.c, buf); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("commit bitmap bits: %w", err)
	}
	failpoint("journal-after-commit")
	for k, buf := range changed {
		j.images[k.k][k.c] = buf
	}
	return nil
}

// startImages is what a start commit writes besides the model: the split images of the
// mappings starting (installed before, whole), and new difference images computed from the
// current ones under the journal's lock (so that no bit committed meanwhile is lost).
type startImages struct {
	splits []int
	diffs  map[int]func(old *bitmap.Bitmap) *bitmap.Bitmap
	geom   map[int][2]int64 // mapping → volume size, grain (for diffs)
	// starts are the incremental mappings starting, whose difference bitmap the start resets:
	// the bitmap as it is now (true: the start copies only its grains) or every grain (false:
	// the start copies everything) becomes their start difference (startKey). Their geometry
	// is in geom.
	starts map[int]bool
}

// commitStart runs fn and writes the images of s in one catalogue commit (the start commit).
// It returns the difference bitmaps it wrote, installed as the durable images once the commit
// succeeded; after an error nothing changed.
func (j *journal) commitStart(s startImages, fn func(tx *catalog.Tx) error) (map[int]*bitmap.Bitmap, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	starts := map[int]chunks{}
	for id, fromDiff := range s.starts {
		geo := s.geom[id]
		bm := bitmapOf(j.images[diffKey(id)], geo[0], geo[1])
		if !fromDiff {
			bm.Fill()
		}
		img := image(bm)
		if img[0] == nil {
			img[0] = make([]byte, chunkBits/8) // the record exists even when clear
		}
		starts[id] = img
	}
	diffs := map[int]*bitmap.Bitmap{}
	for id, f := range s.diffs {
		geo := s.geom[id]
		diffs[id] = f(bitmapOf(j.images[diffKey(id)], geo[0], geo[1]))
	}
	err := j.db.Update(func(tx *catalog.Tx) error {
		if err := fn(tx); err != nil {
			return err
		}
		for _, id := range s.splits {
			if err := writeImage(tx, splitKey(id), j.images[splitKey(id)]); err != nil {
				return err
			}
			if err := tx.DeleteBitmap(uint64(id), catalog.FailureRecord); err != nil {
				return err
			}
		}
		for id, bm := range diffs {
			if err := writeImage(tx, diffKey(id), image(bm)); err != nil {
				return err
			}
		}
		for id, img := range starts {
			if err := writeImage(tx, startKey(id), img); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	for id, bm := range diffs {
		j.images[diffKey(id)] = image(bm)
	}
	for id, img := range starts {
		j.images[startKey(id)] = img
	}
	return diffs, nil
}

func writeImage(tx *catalog.Tx, k imgKey, img chunks) error {
	if err := tx.DeleteBitmap(uint64(k.id), k.kind); err != nil {
		return err
	}
	for c, buf := range img {
		if err := tx.PutBitmapChunk(uint64(k.id), k.kind, c, buf); err != nil {
			return err
		}
	}
	return nil
}

// image returns bm as a chunked image.
func image(bm *bitmap.Bitmap) chunks {
	img := chunks{}
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

// bitmapOf returns img as a bitmap of a volume of size and grain.
func bitmapOf(img chunks, size, grain int64) *bitmap.Bitmap {
	bm := bitmap.New(size, grain)
	for c, buf := range img {
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

// install records img as mapping id's durable split image (after the commit that wrote it).
func (j *journal) install(id int, img chunks) { j.installKind(splitKey(id), img) }

func (j *journal) installKind(k imgKey, img chunks) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.images[k] = img
}

// merge adds the bits of bm to mapping id's split image (the engine's seed of a start, which
// it may have completed; bits committed meanwhile stay).
func (j *journal) merge(id int, bm *bitmap.Bitmap) {
	j.mu.Lock()
	defer j.mu.Unlock()
	img := j.images[splitKey(id)]
	for c, buf := range image(bm) {
		old := img[c]
		for i := range old {
			buf[i] |= old[i]
		}
		img[c] = buf
	}
}

// has reports whether the journal holds bitmap k.
func (j *journal) has(k imgKey) bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.images[k] != nil
}

// drop forgets mapping id's split image.
func (j *journal) drop(id int) { j.dropKind(splitKey(id)) }

func (j *journal) dropKind(k imgKey) {
	j.mu.Lock()
	defer j.mu.Unlock()
	delete(j.images, k)
}

// bitmap returns mapping id's durable split bitmap for a volume of size and grain, or all
// clear if it has none.
func (j *journal) bitmap(id int, size, grain int64) *bitmap.Bitmap {
	return j.bitmapKind(splitKey(id), size, grain)
}

func (j *journal) bitmapKind(k imgKey, size, grain int64) *bitmap.Bitmap {
	j.mu.Lock()
	defer j.mu.Unlock()
	return bitmapOf(j.images[k], size, grain)
}

// bitmapIfAny returns bitmap k for a volume of size and grain, or nil if the journal has none.
func (j *journal) bitmapIfAny(k imgKey, size, grain int64) *bitmap.Bitmap {
	j.mu.Lock()
	defer j.mu.Unlock()
	img, ok := j.images[k]
	if !ok {
		return nil
	}
	return bitmapOf(img, size, grain)
}

// loadIfAny reads bitmap k into the journal if the catalogue has a record of it (a chunk).
func (j *journal) loadIfAny(tx *catalog.Tx, k imgKey) error {
	found := false
	if err := tx.BitmapChunks(uint64(k.id), k.kind, func(uint32, []byte) error {
		found = true
		return nil
	}); err != nil || !found {
		return err
	}
	return j.loadKind(tx, k)
}

// load reads mapping id's stored split bitmap into the journal.
func (j *journal) load(tx *catalog.Tx, id int) error { return j.loadKind(tx, splitKey(id)) }

func (j *journal) loadKind(tx *catalog.Tx, k imgKey) error {
	img := chunks{}
	err := tx.BitmapChunks(uint64(k.id), k.kind, func(c uint32, data []byte) error {
		if len(data) != chunkBits/8 {
			return fmt.Errorf("mapping %d bitmap %q chunk %d: %d bytes: %w", k.id, k.kind, c, len(data), catalog.ErrCorrupt)
		}
		img[c] = append([]byte(nil), data...)
		return nil
	})
	if err != nil {
		return err
	}
	j.installKind(k, img)
	return nil
}

// MarkFailed implements cow.FailureJournal: it records, durably, that mapping id was stopped by
// a failed grain copy, so that a restart stops it rather than resuming it.
func (j *journal) MarkFailed(id int) error {
	// failpoint: journal-before-mark-failed
	err := j.db.Update(func(tx *catalog.Tx) error {
		return tx.PutBitmapChunk(uint64(id), catalog.FailureRecord, 0, []byte{1})
	})
	if err != nil {
		return fmt.Errorf("record the failure of mapping %d: %w", id, err)
	}
	return nil
}

// failed reports whether mapping id has a failure record.
func failedRecord(tx *catalog.Tx, id int) (bool, error) {
	found := false
	err := tx.BitmapChunks(uint64(id), catalog.FailureRecord, func(uint32, []byte) error {
		found = true
		return nil
	})
	return found, err
}
