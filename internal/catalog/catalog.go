// Package catalog is fcnbd's persistent metadata store: one bbolt database, catalog.db, in the
// data directory. It holds typed records (volumes now; mappings, consistency groups and their
// bitmaps later) and the counters that hand out their ids, and commits any number of them
// atomically in one transaction.
//
// The catalogue only stores and checks records; it does not validate commands (the volume
// manager and the mappings control plane do) and it never touches volume data.
package catalog

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// FileName is the catalogue's file in the data directory.
const FileName = "catalog.db"

// Format is the version of the record layout written by this code. A catalogue of another
// format is refused at open rather than misread.
const Format = 1

// ErrCorrupt is wrapped by every error that reports a catalogue whose content can't be trusted.
var ErrCorrupt = errors.New("catalogue is corrupt")

// ErrLocked is returned by Open when another process holds the catalogue.
var ErrLocked = errors.New("catalogue is locked by another process")

// Bucket names. Each record kind has a bucket keyed by its id as 8 big-endian bytes, so that
// iteration is in id order; values are JSON.
var (
	bucketMeta     = []byte("meta")     // "format" → decimal Format
	bucketCounters = []byte("counters") // sequence name → next id, 8 big-endian bytes
	bucketVolumes  = []byte("volumes")
	bucketFC       = []byte("flashcopy") // "model" → the control plane's model, JSON
	bucketBitmaps  = []byte("bitmaps")   // bitmapKey → one chunk of a mapping's bitmap
)

// Sequences for Tx.NextID.
const (
	SeqVolume = "volume"
)

// Volume is the stored record of one volume.
type Volume struct {
	ID       uint64    `json:"id"`
	Name     string    `json:"name"`
	Capacity int64     `json:"capacity"`
	File     string    `json:"file"` // backing file name in the store
	Created  time.Time `json:"created"`
}

// DB is an open catalogue. It is safe for concurrent use; bbolt serialises Update calls.
type DB struct {
	bolt *bolt.DB
	path string
	opts Options
}

// Options tunes OpenWith. The zero value is what Open uses.
type Options struct {
	// CommitHook, if set, runs every read-write transaction (Update): it calls commit to run
	// and commit the transaction and returns its result, or returns an error without calling
	// it, and then nothing is written, as if the disk had refused the commit. Tests use it to
	// make the metadata store fail (and recover) and to hold commits off while they copy the
	// file to simulate a crash; production leaves it nil.
	CommitHook func(commit func() error) error
	// Transition, if set, runs inside every read-write transaction that changed a control-plane
	// record (the FlashCopy model, a volume, a host, a host mapping or an id counter), after
	// its function and before the commit; an error aborts the transaction and nothing is
	// written. Bitmap-only transactions don't call it. Cluster mode uses it to condition every
	// state transition on the owner's epoch in etcd and to publish the new state there.
	Transition func(*Tx) error
}

// Open opens (creating if needed) dir/catalog.db and checks it: the page structure, the format
// version and every record. An unreadable or inconsistent catalogue is an error wrapping
// ErrCorrupt; nothing is repaired silently.
func Open(dir string) (*DB, error) { return OpenWith(dir, Options{}) }

// OpenWith is Open with opts. The hook does not see the transactions of the open itself.
func OpenWith(dir string, opts Options) (*DB, error) {
	path := filepath.Join(dir, FileName)
	b, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	switch {
	case errors.Is(err, bolterrors.ErrTimeout):
		return nil, fmt.Errorf("open %s: %w (is another fcnbd daemon using this data directory?)", path, ErrLocked)
	case errors.Is(err, bolterrors.ErrInvalid), errors.Is(err, bolterrors.ErrChecksum),
		errors.Is(err, bolterrors.ErrVersionMismatch):
		return nil, fmt.Errorf("open %s: %w: %v", path, ErrCorrupt, err)
	case err != nil:
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	db := &DB{bolt: b, path: path}
	if err := db.init(); err != nil {
		b.Close()
		return nil, err
	}
	if err := db.check(); err != nil {
		b.Close()
		return nil, err
	}
	db.opts = opts
	return db, nil
}

// Path is the catalogue file's path.
func (db *DB) Path() string { return db.path }

// Close closes the catalogue. Every committed transaction is already durable.
func (db *DB) Close() error { return db.bolt.Close() }

// init creates the buckets of a new catalogue and refuses one of an unknown format.
func (db *DB) init() error {
	return db.bolt.Update(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		if meta == nil {
			if tx.Bucket(bucketVolumes) != nil || tx.Bucket(bucketCounters) != nil {
				return fmt.Errorf("%s: %w: records without a meta bucket", db.path, ErrCorrupt)
			}
			var err error
			if meta, err = tx.CreateBucket(bucketMeta); err != nil {
				return err
			}
			if err := meta.Put([]byte("format"), fmt.Appendf(nil, "%d", Format)); err != nil {
				return err
			}
		}
		if got := string(meta.Get([]byte("format"))); got != fmt.Sprint(Format) {
			return fmt.Errorf("%s: %w: format %q, this fcnbd reads format %d", db.path, ErrCorrupt, got, Format)
		}
		for _, name := range [][]byte{bucketCounters, bucketVolumes, bucketFC, bucketBitmaps, bucketHosts, bucketHostMaps} {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		return nil
	})
}

// check verifies bbolt's page structure, then every record and counter.
func (db *DB) check() (err error) {
	defer func() {
		// bbolt may panic on pages it can't decode; that is corruption, not a crash of ours.
		if r := recover(); r != nil {
			err = fmt.Errorf("%s: %w: %v", db.path, ErrCorrupt, r)
		}
	}()
	return db.View(func(tx *Tx) error {
		for cerr := range tx.tx.Check() {
			return fmt.Errorf("%s: %w: %v", db.path, ErrCorrupt, cerr)
		}
		vols, err := tx.Volumes()
		if err != nil {
			return err
		}
		names := map[string]bool{}
		next, err := tx.PeekID(SeqVolume)
		if err != nil {
			return err
		}
		for _, v := range vols {
			if v.Name == "" || v.File == "" || v.Capacity <= 0 {
				return fmt.Errorf("%s: %w: volume %d is incomplete", db.path, ErrCorrupt, v.ID)
			}
			if names[v.Name] {
				return fmt.Errorf("%s: %w: two volumes named %q", db.path, ErrCorrupt, v.Name)
			}
			names[v.Name] = true
			if v.ID >= next {
				return fmt.Errorf("%s: %w: volume id %d not below the next id %d", db.path, ErrCorrupt, v.ID, next)
			}
		}
		return checkHosts(tx, db.path)
	})
}

// Tx is one catalogue transaction. A Tx is valid only inside the function it was passed to.
type Tx struct {
	tx *bolt.Tx
	// transition is set by every write of a control-plane record (Options.Transition).
	transition bool
}

// View runs fn in a read-only transaction.
func (db *DB) View(fn func(*Tx) error) error {
	return db.bolt.View(func(tx *bolt.Tx) error { return fn(&Tx{tx: tx}) })
}

// Update runs fn in a read-write transaction and commits it if fn returns nil: every record
// written in fn becomes durable together, or (on any error, or a crash before Update returns)
// none does.
func (db *DB) Update(fn func(*Tx) error) error {
	commit := func() error {
		return db.bolt.Update(func(btx *bolt.Tx) error {
			tx := &Tx{tx: btx}
			if err := fn(tx); err != nil {
				return err
			}
			if tx.transition && db.opts.Transition != nil {
				return db.opts.Transition(tx)
			}
			return nil
		})
	}
	if db.opts.CommitHook != nil {
		return db.opts.CommitHook(commit)
	}
	return commit()
}

// CopyTo writes a consistent copy of the catalogue as of its last commit to w: a valid
// catalogue file. Every commit is synced before Update returns, so between commits this is
// also what a crash would leave on disk.
func (db *DB) CopyTo(w io.Writer) error {
	return db.bolt.View(func(tx *bolt.Tx) error {
		_, err := tx.WriteTo(w)
		return err
	})
}

// PeekID returns the id that NextID(seq) would hand out, without taking it.
func (t *Tx) PeekID(seq string) (uint64, error) {
	v := t.tx.Bucket(bucketCounters).Get([]byte(seq))
	switch len(v) {
	case 0:
		return 0, nil
	case 8:
		return binary.BigEndian.Uint64(v), nil
	default:
		return 0, fmt.Errorf("counter %q: %w: %d bytes", seq, ErrCorrupt, len(v))
	}
}

// NextID takes the next id of seq (0, 1, 2, …). Ids are never handed out twice, even after
// the object that had one is deleted.
func (t *Tx) NextID(seq string) (uint64, error) {
	id, err := t.PeekID(seq)
	if err != nil {
		return 0, err
	}
	if err := t.change(bucketCounters).Put([]byte(seq), key(id+1)); err != nil {
		return 0, err
	}
	return id, nil
}

// Volumes returns every volume, in id order.
func (t *Tx) Volumes() ([]Volume, error) {
	return all(t.tx.Bucket(bucketVolumes), func(v *Volume) uint64 { return v.ID })
}

// Volume returns the volume with id, and whether it exists.
func (t *Tx) Volume(id uint64) (Volume, bool, error) {
	return get(t.tx.Bucket(bucketVolumes), id, func(v *Volume) uint64 { return v.ID })
}

// VolumeByName returns the volume called name, and whether it exists.
func (t *Tx) VolumeByName(name string) (Volume, bool, error) {
	vols, err := t.Volumes()
	if err != nil {
		return Volume{}, false, err
	}
	for _, v := range vols {
		if v.Name == name {
			return v, true, nil
		}
	}
	return Volume{}, false, nil
}

// PutVolume creates or replaces the record of v.ID.
func (t *Tx) PutVolume(v Volume) error { return put(t.change(bucketVolumes), v.ID, v) }

// DeleteVolume removes the record of id; deleting a missing record is not an error.
func (t *Tx) DeleteVolume(id uint64) error { return t.change(bucketVolumes).Delete(key(id)) }

// change returns the bucket of a control-plane record kind for writing, and marks the
// transaction as a state transition (Options.Transition).
func (t *Tx) change(bucket []byte) *bolt.Bucket {
	t.transition = true
	return t.tx.Bucket(bucket)
}

// The generic record helpers below are how every kind is stored: a later kind (mappings,
// groups) adds a bucket to init and three one-line methods on Tx.

func key(id uint64) []byte { return binary.BigEndian.AppendUint64(nil, id) }

func put[T any](b *bolt.Bucket, id uint64, rec T) error {
	data, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	return b.Put(key(id), data)
}

func decode[T any](k, data []byte, idOf func(*T) uint64) (T, error) {
	var rec T
	if len(k) != 8 {
		return rec, fmt.Errorf("%w: key of %d bytes", ErrCorrupt, len(k))
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&rec); err != nil {
		return rec, fmt.Errorf("record %d: %w: %v", binary.BigEndian.Uint64(k), ErrCorrupt, err)
	}
	if id := binary.BigEndian.Uint64(k); idOf(&rec) != id {
		return rec, fmt.Errorf("record %d: %w: holds id %d", id, ErrCorrupt, idOf(&rec))
	}
	return rec, nil
}

func get[T any](b *bolt.Bucket, id uint64, idOf func(*T) uint64) (T, bool, error) {
	data := b.Get(key(id))
	if data == nil {
		var zero T
		return zero, false, nil
	}
	rec, err := decode(key(id), data, idOf)
	return rec, err == nil, err
}

func all[T any](b *bolt.Bucket, idOf func(*T) uint64) ([]T, error) {
	var out []T
	err := b.ForEach(func(k, v []byte) error {
		rec, err := decode(k, v, idOf)
		if err != nil {
			return err
		}
		out = append(out, rec)
		return nil
	})
	return out, err
}
