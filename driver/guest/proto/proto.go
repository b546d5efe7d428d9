// Package proto is the wire format between the microvm driver and the guest
// init: newline-delimited JSON over virtio-serial ports.
//
// Host to guest, on port "cohort.ctl": one Assignment, then Commands.
// Guest to host, on port "cohort.events": Events, appended to a file by
// QEMU so they survive a restart of the driver.
// The program's stdout and stderr travel on ports "cohort.stdout" and
// "cohort.stderr", which QEMU writes straight into Nomad's log fifos.
package proto

// Port names, as the guest finds them in /sys/class/virtio-ports/*/name.
const (
	PortCtl    = "cohort.ctl"
	PortEvents = "cohort.events"
	PortStdout = "cohort.stdout"
	PortStderr = "cohort.stderr"
)

// 9p mount tags for the task's directories, mounted at /<tag> in the guest.
var MountTags = []string{"alloc", "local", "secrets"}

// ModulesDir is the initramfs directory of kernel modules the init loads,
// in name order, before it reports ready: the drivers of devices passed
// through to the VM.
const ModulesDir = "modules"

// Assignment gives a booted (or restored) VM its identity and its program.
type Assignment struct {
	Hostname string `json:"hostname"`
	// Network; empty Address means no network configuration.
	Interface string   `json:"interface,omitempty"` // default eth0
	MAC       string   `json:"mac,omitempty"`
	Address   string   `json:"address,omitempty"` // CIDR, e.g. 10.200.0.5/16
	Gateway   string   `json:"gateway,omitempty"`
	DNS       []string `json:"dns,omitempty"`
	MTU       int      `json:"mtu,omitempty"`
	// Entropy seeds the guest RNG, so VMs restored from one snapshot never
	// share a random stream.
	Entropy []byte `json:"entropy"`
	// UnixNano is the host's wall clock; a restored VM wakes with the clock
	// of the moment its template was saved.
	UnixNano int64    `json:"unix_nano"`
	Mounts   []string `json:"mounts,omitempty"` // 9p tags to mount at /<tag>
	// MountSub, when set, is the directory inside each share that holds
	// the task's files: the share is mounted at /.9p/<tag> and its
	// MountSub bound to /<tag>. A pooled VM's shares are made before its
	// task exists, and the task's directories mounted into them later.
	MountSub string `json:"mount_sub,omitempty"`
	// Warm asks a VM waiting in a pool to do, ahead of its task, what
	// does not depend on it: seed its RNG, bring up its network, mount
	// its shares. It answers EvWarmed and waits on for its assignment.
	Warm    bool     `json:"warm,omitempty"`
	Program string   `json:"program"` // path inside the guest
	Args    []string `json:"args,omitempty"`
	Env     []string `json:"env,omitempty"`
	Dir     string   `json:"dir,omitempty"`
	// Barrier, when set, holds the program until a CmdRelease arrives.
	Barrier bool `json:"barrier,omitempty"`
}

// Command kinds, host to guest after the assignment.
const (
	CmdSignal  = "signal"
	CmdRelease = "release"
	// CmdClock carries the host's clock (UnixNano), sent when the guest
	// says it took its assignment: the assignment's own time is as old as
	// the VM took to read it. The guest steps its clock when it is off by
	// more than the command's own transit could explain.
	CmdClock = "clock"
)

// Command is a host request to the guest init.
type Command struct {
	Kind   string `json:"kind"`
	Signal int    `json:"signal,omitempty"`
	// Hosts, with CmdRelease, are the gang's workers by name: the init
	// writes them into /etc/hosts before it starts the program.
	Hosts []Host `json:"hosts,omitempty"`
	// UnixNano, with CmdRelease and CmdClock, is the host's clock when it
	// sent the command. The assignment's clock is as old as the time the
	// VM took to read it (seconds, for 16 restores at once on 2 cores);
	// a worker waiting at the barrier, or running, reads a command at
	// once.
	UnixNano int64 `json:"unix_nano,omitempty"`
}

// Host is one name and its address.
type Host struct {
	Name    string `json:"name"`
	Address string `json:"address"`
}

// Event kinds, guest to host.
const (
	EvReady    = "ready"    // init is up and waiting for its assignment
	EvWarmed   = "warmed"   // a warm-up was applied; still waiting
	EvAssigned = "assigned" // identity applied; waiting at the barrier if any
	EvStarted  = "started"  // the program is running
	EvExited   = "exited"   // the program ended; the VM powers off once its TCP connections have delivered what they hold (about 6 s at most)
	EvError    = "error"    // the init could not do its job; Message says why
)

// Event is a guest report. Times are the guest's monotonic clock in ns.
type Event struct {
	Kind     string `json:"kind"`
	ExitCode int    `json:"exit_code,omitempty"`
	Signal   int    `json:"signal,omitempty"`
	Message  string `json:"message,omitempty"`
	PID      int    `json:"pid,omitempty"`
}
