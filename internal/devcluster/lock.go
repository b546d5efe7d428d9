package devcluster

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// lockDir holds the dev networks' locks.
var lockDir = "/run/lock"

// lockTag takes the lock of a dev network tag (its Nomad HTTP port): one
// cluster per tag on a host. Start takes down what a cluster of the same
// tag left behind (its bridge, namespaces and veths) before it builds its
// own; without the lock, a second cluster started beside a live one would
// take the live one's network down. The lock is an flock, which the
// kernel drops when its process ends, so a cluster that crashed never
// blocks the next.
func lockTag(tag int) (*os.File, error) {
	dir := lockDir
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		dir = os.TempDir()
	}
	path := filepath.Join(dir, fmt.Sprintf("cohort-dev-%d.lock", tag))
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("locking the dev network of port %d: %w", tag, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		owner, _ := os.ReadFile(path)
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("a dev cluster on port %d already runs on this host (pid %s): stop it first", tag, strings.TrimSpace(string(owner)))
		}
		return nil, fmt.Errorf("locking %s: %w", path, err)
	}
	if err := f.Truncate(0); err == nil {
		f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return f, nil
}
