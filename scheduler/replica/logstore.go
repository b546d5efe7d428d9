package replica

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	wal "github.com/hashicorp/raft-wal"
	"github.com/hashicorp/raft-wal/metadb"
	"go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
)

// The replica's log lives in a write-ahead log (raft-wal: append-only
// segment files, one write and one fsync per append), in DataDir/wal.
// Servers before it kept the log in BoltDB (DataDir/raft.db), whose
// commit is a copy-on-write B+tree update with two fsyncs: a log append
// measured 1.8 ms there against 0.7 ms in the WAL on this project's CI
// machine, and each Raft entry pays one on the leader and then one on a
// follower before it commits. A data directory of the old layout is
// moved to the WAL the first time a new server opens it; the BoltDB file
// is kept, renamed, until the operator removes it, and a directory takes
// its name, so that an older server started on the directory fails
// instead of starting on an empty log (which would forget its term and
// vote, and break Raft's promises).
const (
	walDir      = "wal"
	boltFile    = "raft.db"
	boltMovedTo = "raft.db.migrated"
	lockFile    = "LOCK"
)

// Raft's own keys in its stable store (unexported in hashicorp/raft).
// The two stores encode integers differently, so a migration copies
// each by its kind instead of byte for byte.
var (
	termKey     = []byte("CurrentTerm")
	voteTermKey = []byte("LastVoteTerm")
	candKey     = []byte("LastVoteCand")
)

// openLog locks dir for this process, then opens the replica's log and
// stable store there, moving an old BoltDB log into the WAL first.
func openLog(dir string, bolt bool, log hclog.Logger) (raft.LogStore, raft.StableStore, []func() error, error) {
	unlock, err := lockDir(dir)
	if err != nil {
		return nil, nil, nil, err
	}
	fail := func(err error) (raft.LogStore, raft.StableStore, []func() error, error) {
		unlock()
		return nil, nil, nil, err
	}
	if bolt {
		s, err := openBolt(filepath.Join(dir, boltFile))
		if err != nil {
			return fail(err)
		}
		return s, s, []func() error{unlock, s.Close}, nil
	}
	if err := migrateBolt(dir, log); err != nil {
		return fail(err)
	}
	w, err := openWAL(filepath.Join(dir, walDir), log)
	if err != nil {
		return fail(err)
	}
	return w, w, []func() error{unlock, w.Close}, nil
}

// lockDir takes an exclusive lock on dir: a second server on the same
// data would otherwise wait for ever on the WAL's metadata file (opened
// without a timeout), or, worse, share its files.
func lockDir(dir string) (func() error, error) {
	f, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(time.Second)
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return f.Close, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) || time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("data directory %s is in use by another server: %w", dir, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// walStore is the WAL with its metadata store, which the WAL's own
// Close leaves open (raft-wal v0.4.0): that file's lock would make the
// next open of the directory in this process wait for ever, as a
// replica restarted on its data does in tests, and as openLog does after
// a migration.
type walStore struct {
	*wal.WAL
	meta *metadb.BoltMetaDB
}

func (w *walStore) Close() error {
	err := w.WAL.Close()
	if merr := w.meta.Close(); err == nil {
		err = merr
	}
	return err
}

func openWAL(dir string, log hclog.Logger) (*walStore, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	meta := &metadb.BoltMetaDB{}
	w, err := wal.Open(dir, wal.WithLogger(log.Named("wal")), wal.WithMetaStore(meta))
	if err != nil {
		meta.Close()
		return nil, fmt.Errorf("opening raft log %s: %w", dir, err)
	}
	return &walStore{WAL: w, meta: meta}, nil
}

// openBolt opens a BoltDB log as servers before the WAL did. Every write
// is fsynced; the freelist is not written on each commit (bbolt rebuilds
// it on open), and the map freelist keeps finding free pages flat as the
// log grows.
func openBolt(path string) (*raftboltdb.BoltStore, error) {
	s, err := raftboltdb.New(raftboltdb.Options{
		Path:        path,
		BoltOptions: &bbolt.Options{Timeout: time.Second, NoFreelistSync: true, FreelistType: bbolt.FreelistMapType},
	})
	if err != nil {
		return nil, fmt.Errorf("opening raft store %s: %w", path, err)
	}
	return s, nil
}

const placeholderNote = `This directory stands where cohort servers before the write-ahead log
kept their Raft log (a BoltDB file). The log is now in ../wal; the old
file, if this server had one, is ../raft.db.migrated. An older server
started on this data directory fails on this directory instead of
starting on an empty log.
`

// migrateBolt copies an old BoltDB log and Raft's stable keys (term and
// vote) into a new WAL. The copy is built beside the final directory and
// renamed into place, so a server that dies part way starts the copy
// again; only then is the BoltDB file renamed away and the placeholder
// made.
func migrateBolt(dir string, log hclog.Logger) error {
	old := filepath.Join(dir, boltFile)
	final := filepath.Join(dir, walDir)
	fi, err := os.Stat(old)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return placeholder(dir)
	case err != nil:
		return err
	case fi.IsDir():
		return nil // the placeholder
	}
	if _, err := os.Stat(final); err == nil {
		// A WAL and a BoltDB log: a move whose last rename did not
		// happen (then the two agree), or a BoltDB log written since,
		// by an older server or restored from a back-up.
		return finishMove(dir, log)
	}
	tmp := final + ".migrating"
	if err := os.RemoveAll(tmp); err != nil {
		return err
	}
	if err := copyBolt(dir, tmp, log); err != nil {
		os.RemoveAll(tmp)
		return fmt.Errorf("moving the raft log from %s to a WAL: %w", old, err)
	}
	if err := os.Rename(tmp, final); err != nil {
		return err
	}
	if err := syncDir(dir); err != nil {
		return err
	}
	return finishMove(dir, log)
}

// finishMove renames the BoltDB log away once the WAL holds all of it,
// and puts the placeholder in its place.
func finishMove(dir string, log hclog.Logger) error {
	old := filepath.Join(dir, boltFile)
	moved := filepath.Join(dir, boltMovedTo)
	if _, err := os.Stat(moved); err == nil {
		return fmt.Errorf("%s holds a BoltDB raft log beside %s, which an earlier move kept: move one of them away (this server's log is in %s)", dir, boltMovedTo, walDir)
	}
	if err := sameLog(dir, log); err != nil {
		return err
	}
	if err := os.Rename(old, moved); err != nil {
		return err
	}
	if err := syncDir(dir); err != nil {
		return err
	}
	log.Info("moved the raft log from BoltDB to a write-ahead log; the old file is kept", "wal", filepath.Join(dir, walDir), "old", moved)
	return placeholder(dir)
}

// sameLog refuses a BoltDB log that differs from the WAL: the only
// legitimate way to find both is a move cut short between its two
// renames, when Raft has not run and the two hold the same last entry,
// term and vote. Anything else was written since (by an older server, or
// from a back-up), and starting on the WAL would forget what it
// acknowledged or voted.
func sameLog(dir string, log hclog.Logger) error {
	boltPath, walPath := filepath.Join(dir, boltFile), filepath.Join(dir, walDir)
	b, err := openBolt(boltPath)
	if err != nil {
		return err
	}
	defer b.Close()
	w, err := openWAL(walPath, log)
	if err != nil {
		return err
	}
	defer w.Close()
	bs, err := logSummary(b)
	if err != nil {
		return fmt.Errorf("%s: %w", boltPath, err)
	}
	ws, err := logSummary(w)
	if err != nil {
		return fmt.Errorf("%s: %w", walPath, err)
	}
	if ws.last == 0 && bs.last > 0 {
		// The move copied no entries when a snapshot covered them all.
		snap, err := newestSnapshot(dir, log)
		if err != nil {
			return err
		}
		if snap >= bs.last {
			bs.last, bs.lastTerm = 0, 0
		}
	}
	if bs != ws {
		return fmt.Errorf("%s differs from the write-ahead log (%s against %s): it was written after the move, by an older server or from a back-up; move it or the WAL away, knowingly", boltPath, bs, ws)
	}
	return nil
}

// summary is what sameLog compares: the last entry and Raft's term and
// vote.
type summary struct {
	last, lastTerm, term, voteTerm uint64
	vote                           string
}

func (s summary) String() string {
	return fmt.Sprintf("last entry %d of term %d, term %d, vote %q in term %d", s.last, s.lastTerm, s.term, s.vote, s.voteTerm)
}

type logAndStable interface {
	raft.LogStore
	raft.StableStore
}

func logSummary(s logAndStable) (summary, error) {
	var sum summary
	var err error
	if sum.last, err = s.LastIndex(); err != nil {
		return sum, err
	}
	if sum.last > 0 {
		var l raft.Log
		if err := s.GetLog(sum.last, &l); err != nil {
			return sum, err
		}
		sum.lastTerm = l.Term
	}
	get := func(k []byte) uint64 {
		v, e := s.GetUint64(k)
		if e != nil && !errors.Is(e, raftboltdb.ErrKeyNotFound) && err == nil {
			err = e
		}
		return v
	}
	sum.term, sum.voteTerm = get(termKey), get(voteTermKey)
	v, e := s.Get(candKey)
	if e != nil && !errors.Is(e, raftboltdb.ErrKeyNotFound) && err == nil {
		err = e
	}
	sum.vote = string(v)
	return sum, err
}

// placeholder makes the directory that stands at the BoltDB file's name.
func placeholder(dir string) error {
	p := filepath.Join(dir, boltFile)
	if err := os.Mkdir(p, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	return os.WriteFile(filepath.Join(p, "README"), []byte(placeholderNote), 0o600)
}

// copyBolt copies the BoltDB log of dir into a new WAL at to. Raft
// leaves gaps in a BoltDB log (it is not a monotonic store to Raft):
// entries older than a restored or installed snapshot stay until they
// are compacted, below a gap. The WAL holds no gaps, so only the run of
// entries that ends at the last one is copied, and only if the newest
// snapshot covers everything before it.
func copyBolt(dir, to string, log hclog.Logger) error {
	src, err := openBolt(filepath.Join(dir, boltFile))
	if err != nil {
		return err
	}
	defer src.Close()
	first, err := src.FirstIndex()
	if err != nil {
		return err
	}
	last, err := src.LastIndex()
	if err != nil {
		return err
	}
	snapshot, err := newestSnapshot(dir, log)
	if err != nil {
		return err
	}
	// A snapshot installed or restored past the log's end: Raft starts
	// after it, and the WAL, which takes only the next index once it
	// holds entries, must start empty. Otherwise find where the run of
	// entries that ends at the last one starts.
	start := last + 1
	for i := last; snapshot < last && i >= first && i > 0; i-- {
		var l raft.Log
		err := src.GetLog(i, &l)
		if errors.Is(err, raft.ErrLogNotFound) {
			break
		}
		if err != nil {
			return fmt.Errorf("reading entry %d: %w", i, err)
		}
		start = i
	}
	if snapshot < last && start > first {
		if snapshot < start-1 {
			return fmt.Errorf("the log has a gap before entry %d that no snapshot covers", start)
		}
		log.Info("moving the raft log: entries below a snapshot's gap are left behind", "from", start, "to", last, "snapshot", snapshot)
	}
	dst, err := openWAL(to, log)
	if err != nil {
		return err
	}
	defer dst.Close()
	var batch []*raft.Log
	for i := start; i <= last; i++ {
		l := new(raft.Log)
		if err := src.GetLog(i, l); err != nil {
			return fmt.Errorf("reading entry %d: %w", i, err)
		}
		if batch = append(batch, l); len(batch) == 1024 || i == last {
			if err := dst.StoreLogs(batch); err != nil {
				return err
			}
			batch = batch[:0]
		}
	}
	// Raft's term and vote, each key only if the old log had it set.
	sum, err := logSummary(src)
	if err != nil {
		return err
	}
	for _, kv := range []struct {
		key []byte
		v   uint64
	}{{termKey, sum.term}, {voteTermKey, sum.voteTerm}} {
		if kv.v == 0 {
			continue
		}
		if err := dst.SetUint64(kv.key, kv.v); err != nil {
			return err
		}
	}
	if sum.vote != "" {
		if err := dst.Set(candKey, []byte(sum.vote)); err != nil {
			return err
		}
	}
	return dst.Close()
}

// newestSnapshot is the index of the newest snapshot in dir, 0 if none.
func newestSnapshot(dir string, log hclog.Logger) (uint64, error) {
	snaps, err := raft.NewFileSnapshotStoreWithLogger(dir, 2, log)
	if err != nil {
		return 0, err
	}
	metas, err := snaps.List()
	if err != nil || len(metas) == 0 {
		return 0, err
	}
	return metas[0].Index, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
