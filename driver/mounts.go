package driver

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/cohort-dev/cohort/internal/mountinfo"
	"golang.org/x/sys/unix"
)

// A pooled VM's 9p shares are directories it was started with, made
// before its task existed; the task's own directories are bind-mounted
// into them (at shareSub) when it is taken. The mounts live in the run
// directory, so whatever removes a run directory unmounts first: a
// recursive removal that crossed into a task's directory would delete
// the task's files.

// shareSub is the directory in each pooled share that the task's
// directory is mounted on; the guest binds it to /<tag>.
const shareSub = "task"

// shareRoot is where a pooled VM's shares are, in its run directory.
func shareRoot(runDir, tag string) string { return filepath.Join(runDir, "9p", tag) }

// bindTaskDirs mounts each task directory on its share's shareSub. On
// failure it undoes the mounts it made.
func bindTaskDirs(runDir string, dirs map[string]string) error {
	var done []string
	for tag, src := range dirs {
		dst := filepath.Join(shareRoot(runDir, tag), shareSub)
		if err := unix.Mount(src, dst, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			for _, d := range done {
				unix.Unmount(d, unix.MNT_DETACH)
			}
			return fmt.Errorf("mounting task directory %s on %s: %w", src, dst, err)
		}
		done = append(done, dst)
	}
	return nil
}

// mountsUnder lists the mount points at or below dir, deepest first.
func mountsUnder(dir string) ([]string, error) { return mountinfo.Under(dir) }

// privateShares makes a pooled VM's share tree a mount of its own that
// propagates nothing: the task directories mounted under it later appear
// in no other mount namespace (with the usual shared /, they would,
// holding the task's files there).
func privateShares(runDir string) error {
	root := filepath.Join(runDir, "9p")
	if err := unix.Mount(root, root, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("mounting %s: %w", root, err)
	}
	if err := unix.Mount("", root, "", unix.MS_PRIVATE|unix.MS_REC, ""); err != nil {
		unix.Unmount(root, unix.MNT_DETACH)
		return fmt.Errorf("making %s private: %w", root, err)
	}
	return nil
}

// removeRunDir unmounts everything below dir, then removes it. It
// refuses to remove a directory a mount is still under. Mount points are
// matched by resolved path, as the kernel lists them, so a state_dir
// reached through a symlink is unmounted all the same; and, not to trust
// that match alone, each share's mount point must be an empty directory
// that rmdir removes before anything is removed recursively.
func removeRunDir(dir string) error {
	if r, err := filepath.EvalSymlinks(dir); err == nil {
		dir = r
	} else if os.IsNotExist(err) {
		return nil
	} else {
		return fmt.Errorf("resolving %s: %w", dir, err)
	}
	if dir, _ = filepath.Abs(dir); dir == "/" {
		return fmt.Errorf("refusing to remove /")
	}
	if err := mountinfo.UnmountUnder(dir); err != nil {
		return err
	}
	if left, err := mountsUnder(dir); err != nil || len(left) > 0 {
		return fmt.Errorf("not removing %s: %d mounts are still under it (%v)", dir, len(left), err)
	}
	tags, err := os.ReadDir(filepath.Join(dir, "9p"))
	if err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("not removing %s: %w", dir, err)
	}
	for _, tag := range tags {
		sub := filepath.Join(dir, "9p", tag.Name(), shareSub)
		if err := os.Remove(sub); err != nil && !os.IsNotExist(err) {
			return fmt.Errorf("not removing %s: %w", dir, err)
		}
	}
	return os.RemoveAll(dir)
}

// removeRunDir removes a run directory, logging what it must leave.
func (d *Driver) removeRunDir(dir string) {
	if err := removeRunDir(dir); err != nil {
		d.log.Warn("leaving a run directory behind", "dir", dir, "error", err)
	}
}
