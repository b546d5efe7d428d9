package driver

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// A run directory with a task's directory bind-mounted in it, removed
// through a path with a symlink in it (as a state_dir under /var/run
// is): the mount is taken away first, and the task's files survive.
func TestRemoveRunDirUnmountsFirst(t *testing.T) {
	base := t.TempDir()
	task := filepath.Join(base, "task-local")
	if err := os.MkdirAll(task, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(task, "result"), []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	real := filepath.Join(base, "state")
	run := filepath.Join(real, "run", "pool-1")
	if err := os.MkdirAll(filepath.Join(shareRoot(run, "local"), shareSub), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := privateShares(run); err != nil {
		t.Skipf("cannot mount here (needs root): %v", err)
	}
	t.Cleanup(func() {
		if mps, _ := mountsUnder(base); len(mps) > 0 {
			for _, mp := range mps {
				unix.Unmount(mp, unix.MNT_DETACH)
			}
		}
	})
	if err := bindTaskDirs(run, map[string]string{"local": task}); err != nil {
		t.Fatal(err)
	}
	if got := readOr(filepath.Join(shareRoot(run, "local"), shareSub, "result")); got != "keep me" {
		t.Fatalf("through the bind: %q", got)
	}
	link := filepath.Join(base, "link")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	if mps, _ := mountsUnder(run); len(mps) != 2 {
		t.Fatalf("mounts under the run dir: %v, want the share tree and the task's", mps)
	}
	if err := removeRunDir(filepath.Join(link, "run", "pool-1")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(run); !os.IsNotExist(err) {
		t.Errorf("run dir still there: %v", err)
	}
	if got := readOr(filepath.Join(task, "result")); got != "keep me" {
		t.Errorf("the task's file after removing the run dir: %q", got)
	}
	if mps, _ := mountsUnder(base); len(mps) != 0 {
		t.Errorf("mounts left: %v", mps)
	}
}

// removeRunDir never removes through a share's mount point it could not
// take away: a non-empty mount point (what a mount it failed to see
// looks like) stops it.
func TestRemoveRunDirRefusesFullMountPoint(t *testing.T) {
	run := filepath.Join(t.TempDir(), "pool-2")
	sub := filepath.Join(shareRoot(run, "alloc"), shareSub)
	if err := os.MkdirAll(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(sub, "data"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := removeRunDir(run); err == nil {
		t.Fatal("removed a run dir whose share mount point holds files")
	}
	if got := readOr(filepath.Join(sub, "data")); got != "x" {
		t.Errorf("file under the mount point: %q", got)
	}
}
