package devcluster

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// lockDir holds the dev networks' locks.
var lockDir = "/run/lock"

// lockNet takes a lock on one thing a dev network holds on the host: its
// port tag (which names its bridge and namespaces) or its /24. Up takes
// down what a network of the same tag left behind before it builds its
// own; without the locks, a second network started beside a live one
// would take the live one's down, or give its bridge the same subnet.
// The locks are flocks, which the kernel drops when their process ends,
// so a cluster that crashed never blocks the next.
func lockNet(name, what string) (*os.File, error) {
	dir := lockDir
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		dir = os.TempDir()
	}
	path := filepath.Join(dir, "cohort-dev-"+name+".lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("locking the dev network's %s: %w", what, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		owner, _ := os.ReadFile(path)
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			pid := strings.TrimSpace(string(owner))
			if pid == "" {
				pid = "unknown"
			}
			return nil, fmt.Errorf("a dev cluster with the same %s already runs on this host (pid %s): stop it first", what, pid)
		}
		return nil, fmt.Errorf("locking %s: %w", path, err)
	}
	// Written in place (never truncated first), so a reader never sees
	// it empty; a shorter pid than the last leaves spaces, trimmed.
	f.WriteAt([]byte(fmt.Sprintf("%-10d\n", os.Getpid())), 0)
	return f, nil
}
