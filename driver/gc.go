package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/cohort-dev/cohort/driver/vm"
	"golang.org/x/sys/unix"
)

// orphanGrace is how long after start-up the driver waits for Nomad to
// recover its tasks before it treats unclaimed VMs as orphans.
const orphanGrace = 90 * time.Second

// collectOrphans waits out the recovery grace period, then collects.
func (d *Driver) collectOrphans(runRoot string) {
	select {
	case <-d.ctx.Done():
		return
	case <-time.After(orphanGrace):
	}
	d.collect(runRoot)
}

// ownerFile, in a run directory, is locked by whoever is starting a VM
// there or building a template in it: the collector of any instance of
// the plugin leaves a directory alone while it is locked.
const ownerFile = ".owner"

// claimRunDir makes dir the caller's until release: marked live in this
// instance, created, and its owner file locked (which also keeps other
// instances' collectors off it). A collector holding the lock for its
// check makes the claim wait a moment, and then sees the dir live.
func claimRunDir(live *sync.Map, dir string) (release func(), err error) {
	live.Store(dir, struct{}{})
	unlock, err := lockOwner(dir, true)
	if err != nil {
		live.Delete(dir)
		return nil, fmt.Errorf("claiming run directory %s: %w", dir, err)
	}
	return func() {
		unlock()
		live.Delete(dir)
	}, nil
}

// lockOwner locks dir's owner file, waiting for it or not.
func lockOwner(dir string, wait bool) (unlock func(), err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	return lockFile(context.Background(), filepath.Join(dir, ownerFile), wait)
}

// lockFile takes an exclusive lock on path, created if need be. Without
// wait it fails at once when another holds the lock; with wait it waits
// until ctx ends (in the kernel when ctx never ends). The lock goes with
// the process (Go opens files close-on-exec, so no VMM inherits it): a
// holder that dies frees it.
func lockFile(ctx context.Context, path string, wait bool) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	how := unix.LOCK_EX | unix.LOCK_NB
	if wait && ctx.Done() == nil {
		how = unix.LOCK_EX
	}
	for {
		err := unix.Flock(int(f.Fd()), how)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !wait || !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, err
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// collect stops every VM and removes every run directory that no task,
// start in flight or template build owns (a VM recorded by an instance of
// the plugin that died, a template an instance Nomad stopped left
// running), and every tap no lease holds.
func (d *Driver) collect(runRoot string) {
	dirs, _ := filepath.Glob(filepath.Join(runRoot, "*"))
	for _, dir := range dirs {
		// Ownership is read only with the owner lock held: a start
		// holds it from before its VM exists until its task is stored.
		unlock, err := lockOwner(dir, false)
		if err != nil {
			continue // a start or a build, here or in another instance
		}
		if d.owns(dir) {
			unlock()
			continue
		}
		if m, err := vm.ReadRecord(dir); err == nil && m.Alive() {
			d.log.Warn("stopping orphaned vm", "pid", m.PID, "dir", dir)
			m.Kill()
		}
		d.removeRunDir(dir)
		unlock()
	}
	if d.net != nil {
		d.net.releaseOrphans()
	}
}

// owns says whether a task or a start in flight of this instance holds
// dir.
func (d *Driver) owns(dir string) bool {
	if _, ok := d.live.Load(dir); ok {
		return true
	}
	owned := false
	d.tasks.Range(func(_, v any) bool {
		owned = v.(*taskHandle).m.RunDir == dir
		return !owned
	})
	return owned
}
