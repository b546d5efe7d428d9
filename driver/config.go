// Package driver is the microvm Nomad task driver: every task is a worker
// VM, a minimal Linux kernel whose PID 1 is cohort's init, which runs the
// task's program. VMs start from per-shape template snapshots when they
// can, sit on a per-node bridge in their own network namespace, and keep
// running across restarts of the plugin and of the Nomad agent.
package driver

import (
	"fmt"
	"net"
	"regexp"
	"strings"

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
	// Network is the workers' network; no network block means none.
	Network NetworkConfig `codec:"network"`
	// CohortServers are the cohort servers' HTTP addresses, for the start
	// barrier of gang workers. Without them the driver refuses gang tasks
	// rather than run a gang partially.
	CohortServers []string `codec:"cohort_servers"`
	// TLS is how the driver reaches cohort servers that speak HTTPS: the
	// cluster's CA, and this node's certificate (naming
	// <nomad node name>.node.cohort), which the servers take as proof
	// that a subnet lease or a boot report comes from this node.
	TLS TLSConfig `codec:"tls"`
	// VFIOBind lets the driver move a task's reserved devices, and every
	// other device of their IOMMU groups, to vfio-pci. Off by default:
	// unbinding takes a device from the host's own driver.
	VFIOBind bool `codec:"vfio_bind"`
	// Passthrough is the guest kernel and modules of VMs given devices.
	Passthrough PassthroughConfig `codec:"passthrough"`
	// Pool keeps restored, warmed-up VMs waiting for tasks.
	Pool PoolConfig `codec:"pool"`
}

// PoolConfig bounds the warm pool (pool.go). Size 0, the default, turns
// it off: each pooled VM holds its memory, an address and some CPU for
// as long as it waits, which an operator opts into and reserves for (the
// client's reserved memory), since Nomad cannot see it.
type PoolConfig struct {
	// Size is how many VMs wait per shape (memory, vCPUs).
	Size int `codec:"size"`
	// MemoryMB caps the guest memory of all waiting VMs together.
	MemoryMB int `codec:"memory_mb"`
}

// PassthroughConfig is what a VM with passed-through devices boots: a
// kernel with its devices' drivers (or with module loading, for drivers
// built out of tree, such as NVIDIA's) and the modules its init loads,
// in the order given, before the program runs. Without it such VMs boot
// the default kernel, which has PCIe but no device drivers.
type PassthroughConfig struct {
	Kernel  string   `codec:"kernel"`
	Modules []string `codec:"modules"`
}

// TLSConfig names the driver's TLS material.
type TLSConfig struct {
	CAFile   string `codec:"ca_file"`
	CertFile string `codec:"cert_file"`
	KeyFile  string `codec:"key_file"`
}

// NetworkConfig is the workers' network (see network.go). Without a
// network block, worker VMs have no network at all.
type NetworkConfig struct {
	// Bridge holds the workers' taps, in the host's network namespace.
	Bridge string `codec:"bridge"`
	// Subnet fixes this node's worker subnet instead of leasing one from
	// the cohort servers (a node on its own).
	Subnet string `codec:"subnet"`
	// Advertise is the host address other nodes route this node's
	// workers through; by default the address this host reaches the
	// first cohort server from.
	Advertise string `codec:"advertise"`
	// MTU of the workers' links; by default the host link's.
	MTU int `codec:"mtu"`
	// ConsulDNS is the node's Consul DNS, which the workers' resolver
	// asks for *.consul names.
	ConsulDNS string `codec:"consul_dns"`
	// Egress lets workers reach the outside world through NAT, to the
	// networks in EgressAllow (all by default).
	Egress      bool     `codec:"egress"`
	EgressAllow []string `codec:"egress_allow"`
	// Deny lists more hosts and networks workers must never reach.
	Deny []string `codec:"deny"`
}

func (n NetworkConfig) enabled() bool { return n.Bridge != "" }

// bridgeName is what an interface name (and the firewall's table named
// after it) may be made of.
var bridgeName = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)

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
	"vfio_bind":      hclspec.NewAttr("vfio_bind", "bool", false),
	"passthrough": hclspec.NewBlock("passthrough", false, hclspec.NewObject(map[string]*hclspec.Spec{
		"kernel":  hclspec.NewAttr("kernel", "string", false),
		"modules": hclspec.NewAttr("modules", "list(string)", false),
	})),
	"pool": hclspec.NewBlock("pool", false, hclspec.NewObject(map[string]*hclspec.Spec{
		"size": hclspec.NewAttr("size", "number", false),
		"memory_mb": hclspec.NewDefault(hclspec.NewAttr("memory_mb", "number", false),
			hclspec.NewLiteral(`1024`)),
	})),
	"tls": hclspec.NewBlock("tls", false, hclspec.NewObject(map[string]*hclspec.Spec{
		"ca_file":   hclspec.NewAttr("ca_file", "string", true),
		"cert_file": hclspec.NewAttr("cert_file", "string", true),
		"key_file":  hclspec.NewAttr("key_file", "string", true),
	})),
	"network": hclspec.NewBlock("network", false, hclspec.NewObject(map[string]*hclspec.Spec{
		"bridge": hclspec.NewDefault(hclspec.NewAttr("bridge", "string", false),
			hclspec.NewLiteral(`"cohort0"`)),
		"subnet":    hclspec.NewAttr("subnet", "string", false),
		"advertise": hclspec.NewAttr("advertise", "string", false),
		"mtu":       hclspec.NewAttr("mtu", "number", false),
		"consul_dns": hclspec.NewDefault(hclspec.NewAttr("consul_dns", "string", false),
			hclspec.NewLiteral(`"127.0.0.1:8600"`)),
		"egress": hclspec.NewDefault(hclspec.NewAttr("egress", "bool", false),
			hclspec.NewLiteral(`true`)),
		"egress_allow": hclspec.NewAttr("egress_allow", "list(string)", false),
		"deny":         hclspec.NewAttr("deny", "list(string)", false),
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
	if pt := c.Passthrough; len(pt.Modules) > 0 {
		if pt.Kernel == "" {
			return fmt.Errorf("passthrough.modules needs passthrough.kernel: cohort's guest kernel is built without module loading")
		}
		for _, m := range pt.Modules {
			if !strings.HasSuffix(m, ".ko") {
				return fmt.Errorf("passthrough.modules: %q is not an uncompressed kernel module (.ko); decompress .ko.xz, .ko.zst or .ko.gz first", m)
			}
		}
	}
	if c.Pool.Size < 0 || c.Pool.Size > 64 {
		return fmt.Errorf("pool.size %d: want 0 (no pool) to 64", c.Pool.Size)
	}
	if c.Pool.Size > 0 && !c.Snapshot {
		return fmt.Errorf("pool needs snapshot = true: pooled VMs are restored from the templates")
	}
	if c.Pool.Size > 0 && c.Pool.MemoryMB < MinMemoryMB {
		return fmt.Errorf("pool.memory_mb %d: a pool needs at least %d MiB", c.Pool.MemoryMB, MinMemoryMB)
	}
	return c.Network.validate()
}

func (n NetworkConfig) validate() error {
	if !n.enabled() {
		return nil
	}
	if len(n.Bridge) > 15 || !bridgeName.MatchString(n.Bridge) {
		return fmt.Errorf("network.bridge %q is not a valid interface name (at most 15 bytes)", n.Bridge)
	}
	if n.Subnet != "" {
		_, sn, err := net.ParseCIDR(n.Subnet)
		if err != nil || sn.IP.To4() == nil {
			return fmt.Errorf("network.subnet %q is not an IPv4 CIDR", n.Subnet)
		}
		if ones, _ := sn.Mask.Size(); ones > 29 {
			return fmt.Errorf("network.subnet %q is too small", n.Subnet)
		}
	}
	if n.Advertise != "" && net.ParseIP(n.Advertise).To4() == nil {
		return fmt.Errorf("network.advertise %q is not an IPv4 address", n.Advertise)
	}
	if n.MTU != 0 && (n.MTU < 576 || n.MTU > 65535) {
		return fmt.Errorf("network.mtu %d: want 576 to 65535", n.MTU)
	}
	if _, _, err := net.SplitHostPort(n.ConsulDNS); n.ConsulDNS != "" && err != nil {
		return fmt.Errorf("network.consul_dns %q: want host:port", n.ConsulDNS)
	}
	for _, list := range [][]string{n.EgressAllow, n.Deny} {
		for _, c := range list {
			_, ipn, err := net.ParseCIDR(c)
			if (err != nil || ipn.IP.To4() == nil) && net.ParseIP(c).To4() == nil {
				return fmt.Errorf("network: %q is not an IPv4 address or CIDR", c)
			}
		}
	}
	return nil
}
