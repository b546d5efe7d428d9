// Package jobspec is the cohort cluster-job language: an HCL file that
// describes a gang of workers, its conversion to a Nomad job, and the gang
// options read back from a Nomad job.
//
// The package is pure: it parses bytes and builds values, and does no I/O
// beyond what its callers hand it.
package jobspec

import "time"

// Drivers a worker group may run under. microvm is the default; raw_exec and
// exec exist so the whole path can be exercised where VMs cannot run.
const (
	DriverMicroVM = "microvm"
	DriverRawExec = "raw_exec"
	DriverExec    = "exec"
)

// Limits enforced by the parser. MinMicroVMMemoryMB is what the guest kernel
// and init need to boot with room for a small program; process drivers only
// need Nomad's own minimum.
const (
	MinMicroVMMemoryMB = 64
	MinProcessMemoryMB = 10
	MaxPriority        = 100
	DefaultPriority    = 50
	DefaultGangTimeout = 30 * time.Second
	DefaultCPU         = 100
	DefaultMemoryMB    = 128
)

// Job is one cluster job: a gang of worker groups that start together or not
// at all and run until they finish or MaxRuntime passes.
type Job struct {
	Name        string
	Priority    int
	Datacenters []string
	NodePool    string
	// MaxRuntime bounds the job from the moment its gang starts running.
	MaxRuntime time.Duration
	// GangTimeout bounds the wait for every worker to be placed and booted;
	// past it the gang is stopped and requeued.
	GangTimeout time.Duration
	Groups      []*Group
}

// Group is a set of identical workers.
type Group struct {
	Name  string
	Count int
	// Address is the name under which the group's workers are found: worker
	// i answers as w<i>.<address>.service.consul.
	Address       string
	Driver        string
	DistinctHosts bool
	// MaxPerNode, when set, spreads the group: at most this many of its
	// workers on any one node (distinct_hosts is 1).
	MaxPerNode int
	Resources  Resources
	Program    Program
	Config     map[string]string
	Ports      []Port
}

// Resources is what one worker of a group needs.
type Resources struct {
	CPU      int // MHz
	MemoryMB int
	Devices  []Device
}

// Device is a request for Count devices matching Name, which is
// "<type>", "<vendor>/<type>" or "<vendor>/<type>/<model>" as in Nomad.
type Device struct {
	Name  string
	Count int
	// Constraints narrow the devices that match, on their attributes.
	Constraints []DeviceConstraint
}

// DeviceConstraint is a constraint on a device's attribute, as Nomad's
// device constraints are written: Attribute "${device.attr.memory}" (a
// bare "memory" means the same), Operator ">=", Value "40 GiB".
type DeviceConstraint struct {
	Attribute string
	Operator  string
	Value     string
}

// Program is what each worker runs. Exactly one of Path or Artifact is set
// by the user; for an artifact, Path is where it lands inside the task.
type Program struct {
	Path     string
	Artifact string
	Args     []string
	Env      map[string]string
}

// Port is a named port each worker listens on.
type Port struct {
	Label string
	To    int
}
