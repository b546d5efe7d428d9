// Package vm starts, restores, snapshots and re-attaches worker VMs. A
// Backend is one VMM (QEMU's microvm machine today); a Machine is one
// running VM, described by plain data so the driver can save it in a Nomad
// task handle and re-attach after a restart.
package vm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Backend is a VMM that can run worker VMs. Firecracker or Cloud
// Hypervisor fit behind it as further implementations; only QEMU is
// packaged on the machines cohort targets today. vmtest.Conformance is the
// suite every backend passes.
//
// Concurrency: a Backend is used from many goroutines at once. Boot and
// Restore may run concurrently with each other and with Snapshot, for
// specs with distinct RunDirs; any number of Restores may read one
// snapshot at once. A new snapshot appears at dst only when it is whole,
// but Snapshot must not replace a dst that Restores may be reading, and
// two Snapshots to the same dst must not overlap: the caller builds each
// snapshot once, under its own lock (the driver holds a per-shape file
// lock and re-checks dst after taking it). A
// Machine's methods (Alive, Kill, Wait, Events, DialCtl, Usage) are safe
// from any goroutine; a guest's control port serves one connection at a
// time, so a caller closes its Ctl before another dials.
type Backend interface {
	// Name identifies the backend in fingerprints and task state.
	Name() string
	// Check says why the backend cannot run VMs on this host, or nil.
	Check() error
	// Version is the VMM's version string.
	Version() string
	// Boot cold-boots a VM from its kernel and initramfs. The VMM runs
	// in a session of its own and outlives its caller; its Machine is
	// recorded in spec.RunDir (RecordFile) before Boot returns.
	Boot(spec *Spec) (*Machine, error)
	// Restore starts a VM from a snapshot that Snapshot made for a spec of
	// the same Shape, with spec's own run directory, shares, tap and
	// outputs. The guest resumes waiting for its assignment.
	Restore(spec *Spec, snapshot string) (*Machine, error)
	// Redirect points a running VM's program output at new files (a
	// pooled VM, started before its task's log fifos existed, gets them
	// at its assignment). The guest must not have opened its output
	// ports yet: it opens them when its program starts.
	Redirect(m *Machine, stdout, stderr string) error
	// Snapshot boots a template VM for spec, waits until its init is
	// ready for an assignment, and saves it to dst; on failure it leaves
	// nothing at dst.
	Snapshot(ctx context.Context, spec *Spec, dst string) error
}

// Shape is what a snapshot depends on: VMs of one shape can be restored
// from one snapshot.
type Shape struct {
	Kernel string
	// KernelDigest names the kernel's contents, where the path alone
	// would not (an install replaces the kernel at the same path).
	KernelDigest string
	Initrd       string
	MemoryMB     int
	VCPUs        int
	Accel        string
}

// layout versions the VMM's device and backend layout (Args): a snapshot
// made under another layout is never restored.
const layout = "6" // 2: 9p mapped-xattr, append-only guest files; 3: templates boot verbose; 4: every guest told the TSC's rate; 5: TCG guests only; 6: TCG guests with highres=off

// Key names the shape in file names. It begins with Build.
func (s Shape) Key() string {
	return fmt.Sprintf("%s-m%d-c%d-%s", s.Build(), s.MemoryMB, s.VCPUs, s.Accel)
}

// Build names what every shape of one guest build shares: its kernel, its
// initrd and how cohort lays a VM out.
func (s Shape) Build() string {
	return shortHash(s.Kernel + "\x00" + s.KernelDigest + "\x00" + s.Initrd + "\x00" + layout)
}

// Spec is one VM to start.
type Spec struct {
	Shape
	// RunDir holds the VM's sockets and logs; its path must be short, as
	// unix socket paths are limited to 107 bytes.
	RunDir string
	// Stdout and Stderr receive the program's output; Nomad's log fifos.
	Stdout, Stderr string
	// Shares maps each 9p mount tag to a host directory.
	Shares map[string]string
	// Tap is the host tap device for the VM's NIC; empty means a NIC with
	// no host side, which is how templates are booted.
	Tap string
	MAC string
	// RAMFile, when set, backs guest memory with a file; ShareRAM writes
	// go to the file (templates), otherwise the mapping is private.
	RAMFile  string
	ShareRAM bool
	// NetNS, when set, is the network namespace (a path such as
	// /run/netns/cohort) in which the VMM opens its tap.
	NetNS string
	// PCI are host PCI devices passed through with VFIO. Such a VM is
	// cold-booted with PCIe and ACPI on (its devices' state cannot be
	// snapshotted), and VFIO pins all of its memory.
	PCI []string
}

// Machine is a running VM, as plain data that survives in a task handle.
type Machine struct {
	Backend string
	PID     int
	// StartTime is the VMM process's start time in clock ticks since boot,
	// so a re-attach never mistakes a reused PID for the VM.
	StartTime uint64
	RunDir    string
}

// Paths inside a machine's run directory.
func (m *Machine) CtlSocket() string { return filepath.Join(m.RunDir, "ctl.sock") }
func (m *Machine) QMPSocket() string { return filepath.Join(m.RunDir, "qmp.sock") }
func (m *Machine) EventsLog() string { return filepath.Join(m.RunDir, "events.log") }
func (m *Machine) ConsoleLog() string {
	return filepath.Join(m.RunDir, "console.log")
}

// RecordFile holds a VM's Machine in its run directory from the moment
// its VMM starts, so that whoever finds the directory later (a plugin
// started again after one died while a VM started, or a template built by
// an instance Nomad stopped) can stop the VM.
const RecordFile = "machine.json"

func (m *Machine) record() error {
	b, err := json.Marshal(m)
	if err == nil {
		err = os.WriteFile(filepath.Join(m.RunDir, RecordFile), b, 0o600)
	}
	if err != nil {
		return fmt.Errorf("recording the vm: %w", err)
	}
	return nil
}

// ReadRecord reads the Machine recorded in a run directory.
func ReadRecord(runDir string) (*Machine, error) {
	b, err := os.ReadFile(filepath.Join(runDir, RecordFile))
	if err != nil {
		return nil, err
	}
	var m Machine
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(runDir, RecordFile), err)
	}
	return &m, nil
}

// ErrGone means the VMM process no longer exists.
var ErrGone = errors.New("vm process is gone")

// Alive reports whether the VMM process still runs. A zombie does not, and
// neither does a process being reaped: its parent's wait has marked it dead
// ("X") while /proc still lists it, a window that follows every exit of a
// VMM this program started, since a goroutine reaps it at once.
func (m *Machine) Alive() bool {
	st, state, err := procStat(m.PID)
	return err == nil && st == m.StartTime && running(state)
}

// running reads the state field of /proc/<pid>/stat.
func running(state string) bool {
	switch state {
	case "Z", "X", "x":
		return false
	}
	return true
}

// Wait blocks until the VMM process exits or ctx ends. It works for a
// process this program did not start, as after a re-attach.
func (m *Machine) Wait(ctx context.Context) error {
	fd, err := unix.PidfdOpen(m.PID, 0)
	if err != nil {
		if err == unix.ESRCH {
			return nil
		}
		return m.pollWait(ctx)
	}
	defer unix.Close(fd)
	if !m.Alive() {
		return nil
	}
	for {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, 100)
		if err != nil && err != unix.EINTR {
			return m.pollWait(ctx)
		}
		if n > 0 || !m.Alive() {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
}

func (m *Machine) pollWait(ctx context.Context) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for m.Alive() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
	return nil
}

// Kill ends the VMM at once.
func (m *Machine) Kill() error {
	if !m.Alive() {
		return nil
	}
	if err := unix.Kill(m.PID, unix.SIGKILL); err != nil && err != unix.ESRCH {
		return fmt.Errorf("killing vm process %d: %w", m.PID, err)
	}
	return nil
}

// ConsoleTail returns the last n lines the guest printed on its console,
// and what the VMM itself printed, for task events when a VM dies without
// reporting.
func (m *Machine) ConsoleTail(n int) string {
	out := tail(m.ConsoleLog(), n)
	if vmm := tail(filepath.Join(m.RunDir, "qemu.log"), n); vmm != "" {
		out += "\nvmm: " + vmm
	}
	return out
}

func tail(path string, n int) string {
	b := readTail(path, tailBytes)
	if len(b) == 0 {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// procStat returns a process's start time and state from /proc/pid/stat.
func procStat(pid int) (uint64, string, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, "", ErrGone
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, "", fmt.Errorf("parsing /proc/%d/stat", pid)
	}
	f := strings.Fields(s[i+1:])
	// Fields after the name: state is 3rd overall, starttime 22nd.
	if len(f) < 20 {
		return 0, "", fmt.Errorf("parsing /proc/%d/stat", pid)
	}
	st, err := strconv.ParseUint(f[19], 10, 64)
	return st, f[0], err
}

// Usage is the host resources a VM's VMM process uses.
type Usage struct {
	UserNs, SystemNs uint64
	RSSBytes         uint64
}

// Usage reads the VMM process's CPU time and resident memory.
func (m *Machine) Usage() (Usage, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(m.PID) + "/stat")
	if err != nil {
		return Usage{}, ErrGone
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 22 {
		return Usage{}, fmt.Errorf("parsing stat of %d", m.PID)
	}
	utime, _ := strconv.ParseUint(f[11], 10, 64)
	stime, _ := strconv.ParseUint(f[12], 10, 64)
	rss, _ := strconv.ParseUint(f[21], 10, 64)
	const tick = uint64(time.Second) / 100 // USER_HZ is 100 on Linux
	return Usage{UserNs: utime * tick, SystemNs: stime * tick, RSSBytes: rss * uint64(os.Getpagesize())}, nil
}
