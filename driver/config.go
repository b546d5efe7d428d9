// Package driver is the microvm Nomad task driver: every task is a worker
// VM, a minimal Linux kernel whose PID 1 is cohort's init, which runs the
// task's program. VMs start from per-shape template snapshots when they
// can, sit on a per-node bridge in their own network namespace, and keep
// running across restarts of the plugin and of the Nomad agent.
package driver

import (
	"fmt"
	"net"

	"github.com/hashicorp/nomad/plugins/shared/hclspec"
)

// PluginName is the driver's name in jobs (driver = "microvm"). The agent
// configures it by the binary's name: plugin "nomad-driver-microvm" {...}.
const PluginName = "microvm"

// Config is the plugin configuration from the Nomad agent.
type Config struct {
	// Kernel is the guest kernel (an uncompressed vmlinux, PVH entry).
	Kernel string `codec:"kernel"`
	// Init is the static guest init binary; the driver packs it into the
	// initramfs.
	Init string `codec:"init"`
	// Accelerator is "auto", "kvm" or "tcg".
	Accelerator string `codec:"accelerator"`
	// Snapshot enables warm start from per-shape template snapshots.
	Snapshot bool `codec:"snapshot"`
	// StateDir holds run directories (sockets, logs), the initramfs and
	// snapshots. Keep it short: socket paths are limited to 107 bytes.
	StateDir string `codec:"state_dir"`
	// QEMU is the qemu-system-x86_64 binary.
	QEMU string `codec:"qemu"`
	// Network is the workers' network; Subnet "" disables it.
	Network NetworkConfig `codec:"network"`
	// CohortServers are the cohort servers' HTTP addresses, for the start
	// barrier of gang workers. Without them the driver refuses gang tasks
	// rather than run a gang partially.
	CohortServers []string `codec:"cohort_servers"`
}

// NetworkConfig places every worker VM of the node on one bridge inside a
// dedicated network namespace: workers reach each other by IP, and nothing
// a worker does reaches the host's own (loopback or other) services.
type NetworkConfig struct {
	Subnet string `codec:"subnet"`
	Bridge string `codec:"bridge"`
	NetNS  string `codec:"netns"`
}

// TaskConfig is the driver-specific part of a task.
type TaskConfig struct {
	Program     string   `codec:"program"`
	Args        []string `codec:"args"`
	Accelerator string   `codec:"accelerator"`
	// Snapshot is a pointer so an unset value falls back to the plugin's.
	Snapshot *bool `codec:"snapshot"`
	VCPUs    int   `codec:"vcpus"`
}

var configSpec = hclspec.NewObject(map[string]*hclspec.Spec{
	// Not required by the schema: an agent that carries the plugin without
	// configuring it still starts, and the driver reports itself undetected.
	"kernel": hclspec.NewAttr("kernel", "string", false),
	"init":   hclspec.NewAttr("init", "string", false),
	"accelerator": hclspec.NewDefault(hclspec.NewAttr("accelerator", "string", false),
		hclspec.NewLiteral(`"auto"`)),
	"snapshot": hclspec.NewDefault(hclspec.NewAttr("snapshot", "bool", false),
		hclspec.NewLiteral(`true`)),
	"state_dir": hclspec.NewDefault(hclspec.NewAttr("state_dir", "string", false),
		hclspec.NewLiteral(`"/run/cohort"`)),
	"qemu": hclspec.NewDefault(hclspec.NewAttr("qemu", "string", false),
		hclspec.NewLiteral(`"qemu-system-x86_64"`)),
	"cohort_servers": hclspec.NewAttr("cohort_servers", "list(string)", false),
	"network": hclspec.NewBlock("network", false, hclspec.NewObject(map[string]*hclspec.Spec{
		"subnet": hclspec.NewDefault(hclspec.NewAttr("subnet", "string", false),
			hclspec.NewLiteral(`"10.213.0.0/16"`)),
		"bridge": hclspec.NewDefault(hclspec.NewAttr("bridge", "string", false),
			hclspec.NewLiteral(`"cohort0"`)),
		"netns": hclspec.NewDefault(hclspec.NewAttr("netns", "string", false),
			hclspec.NewLiteral(`"cohort"`)),
	})),
})

var taskConfigSpec = hclspec.NewObject(map[string]*hclspec.Spec{
	"program":     hclspec.NewAttr("program", "string", true),
	"args":        hclspec.NewAttr("args", "list(string)", false),
	"accelerator": hclspec.NewAttr("accelerator", "string", false),
	"snapshot":    hclspec.NewAttr("snapshot", "bool", false),
	"vcpus": hclspec.NewDefault(hclspec.NewAttr("vcpus", "number", false),
		hclspec.NewLiteral(`1`)),
})

// MinMemoryMB is the least memory a worker VM boots with: the kernel, the
// init and a small static program.
const MinMemoryMB = 64

func validAccel(s string) error {
	switch s {
	case "", "auto", "kvm", "tcg":
		return nil
	}
	return fmt.Errorf("accelerator must be \"auto\", \"kvm\" or \"tcg\", got %q", s)
}

// configured says whether the agent configured the driver at all.
func (c *Config) configured() bool { return c.Kernel != "" || c.Init != "" }

func (c *Config) validate() error {
	if c.Kernel == "" || c.Init == "" {
		return fmt.Errorf("kernel and init are both required")
	}
	if err := validAccel(c.Accelerator); err != nil {
		return err
	}
	if len(c.StateDir) > 60 {
		return fmt.Errorf("state_dir %q is too long for unix socket paths (at most 60 bytes)", c.StateDir)
	}
	if c.Network.Subnet != "" {
		_, n, err := net.ParseCIDR(c.Network.Subnet)
		if err != nil || n.IP.To4() == nil {
			return fmt.Errorf("network.subnet %q is not an IPv4 CIDR", c.Network.Subnet)
		}
		if ones, _ := n.Mask.Size(); ones > 29 {
			return fmt.Errorf("network.subnet %q is too small", c.Network.Subnet)
		}
	}
	return nil
}
