package replica

import (
	"context"
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
	"github.com/hashicorp/raft-wal/migrate"
	"go.etcd.io/bbolt"
)

// The replica's log lives in a write-ahead log (raft-wal: append-only
// segment files, one write and one fsync per append), in DataDir/wal.
// Servers before it kept the log in BoltDB (DataDir/raft.db), whose
// commit is a copy-on-write B+tree update with two fsyncs: a log append
// measured 1.8 ms there against 0.7 ms in the WAL on this project's CI
// machine, and each Raft entry pays one on the leader and then one on a
// follower before it commits. A data directory of the old layout is
// moved to the WAL the first time a new server opens it; the BoltDB file
// is kept, renamed, until the operator removes it.
const (
	walDir      = "wal"
	boltFile    = "raft.db"
	boltMovedTo = "raft.db.migrated"
)

// Raft's own keys in its stable store (unexported in hashicorp/raft).
// The two stores encode integers differently, so a migration copies
// each by its kind instead of byte for byte.
var (
	termKeys = [][]byte{[]byte("CurrentTerm"), []byte("LastVoteTerm")}
	candKey  = []byte("LastVoteCand")
)

// openLog opens the replica's log and stable store in dir, moving an
// old BoltDB log into the WAL first.
func openLog(dir string, bolt bool, log hclog.Logger) (raft.LogStore, raft.StableStore, []func() error, error) {
	if bolt {
		s, err := openBolt(filepath.Join(dir, boltFile))
		if err != nil {
			return nil, nil, nil, err
		}
		return s, s, []func() error{s.Close}, nil
	}
	if err := migrateBolt(dir, log); err != nil {
		return nil, nil, nil, err
	}
	w, err := openWAL(filepath.Join(dir, walDir), log)
	if err != nil {
		return nil, nil, nil, err
	}
	return w, w, []func() error{w.Close}, nil
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

// migrateBolt copies an old BoltDB log and Raft's stable keys (term and
// vote) into a new WAL. The copy is built beside the final directory and
// renamed into place, so a server that dies part way starts the copy
// again; only then is the BoltDB file renamed away.
func migrateBolt(dir string, log hclog.Logger) error {
	old := filepath.Join(dir, boltFile)
	final := filepath.Join(dir, walDir)
	if _, err := os.Stat(old); errors.Is(err, os.ErrNotExist) {
		return nil
	} else if err != nil {
		return err
	}
	if _, err := os.Stat(final); err == nil {
		// Moved already; the rename of the old file did not happen.
		return os.Rename(old, filepath.Join(dir, boltMovedTo))
	}
	tmp := final + ".migrating"
	if err := os.RemoveAll(tmp); err != nil {
		return err
	}
	if err := copyBolt(old, tmp, log); err != nil {
		os.RemoveAll(tmp)
		return fmt.Errorf("moving the raft log from %s to a WAL: %w", old, err)
	}
	if err := os.Rename(tmp, final); err != nil {
		return err
	}
	if err := syncDir(dir); err != nil {
		return err
	}
	if err := os.Rename(old, filepath.Join(dir, boltMovedTo)); err != nil {
		return err
	}
	log.Info("moved the raft log from BoltDB to a write-ahead log; the old file is kept", "wal", final, "old", filepath.Join(dir, boltMovedTo))
	return syncDir(dir)
}

func copyBolt(from, to string, log hclog.Logger) error {
	src, err := openBolt(from)
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := openWAL(to, log)
	if err != nil {
		return err
	}
	defer dst.Close()
	if last, err := src.LastIndex(); err != nil {
		return err
	} else if last > 0 {
		if err := migrate.CopyLogs(context.Background(), dst, src, 4<<20, nil); err != nil {
			return err
		}
	}
	for _, k := range termKeys {
		v, err := src.GetUint64(k)
		if err != nil && !isNotFound(err) {
			return err
		}
		if err == nil {
			if err := dst.SetUint64(k, v); err != nil {
				return err
			}
		}
	}
	v, err := src.Get(candKey)
	if err != nil && !isNotFound(err) {
		return err
	}
	if err == nil && len(v) > 0 {
		if err := dst.Set(candKey, v); err != nil {
			return err
		}
	}
	return dst.Close()
}

func isNotFound(err error) bool {
	return errors.Is(err, raftboltdb.ErrKeyNotFound)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
