package accel

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// PCIDevice is what sysfs says of one PCI function.
type PCIDevice struct {
	Address  string // domain:bus:device.function, "0000:00:06.0"
	Class    uint32 // 24-bit class code, 0x030200
	Vendor   uint16
	Device   uint16
	Driver   string // the bound kernel driver, "" when none
	IOMMU    string // its IOMMU group, "" when the host has none
	NUMANode int    // -1 when unknown
	// LinkSpeed and LinkWidth are the link's current state where sysfs
	// has them ("32.0 GT/s PCIe", 16).
	LinkSpeed string
	LinkWidth int
}

// Accelerator classes: display controllers (0x03: VGA, XGA, 3D) and
// processing accelerators (0x12), where FPGA cards and inference chips
// sit.
const (
	classDisplay     = 0x03
	classAccelerator = 0x12
)

// displayOnly are vendors whose display controllers only drive a screen:
// a server's BMC (ASPEED, Matrox), emulated adapters of hypervisors
// (QEMU's bochs, Cirrus, virtio-gpu, VMware, Hyper-V). Class 0x03 alone
// would offer them as GPUs on nearly every server.
var displayOnly = map[uint16]bool{
	0x1a03: true, // ASPEED
	0x102b: true, // Matrox
	0x1234: true, // QEMU bochs-display
	0x1013: true, // Cirrus Logic
	0x1af4: true, // virtio-gpu
	0x15ad: true, // VMware SVGA
	0x1414: true, // Microsoft Hyper-V
}

// isAccelerator says whether the device is one the plugin hands out.
func (d PCIDevice) isAccelerator() bool {
	switch d.Class >> 16 {
	case classDisplay:
		return !displayOnly[d.Vendor]
	case classAccelerator:
		return true
	}
	return false
}

// scanPCI lists every accelerator under root/bus/pci/devices, sorted by
// address. root is "/sys" on a host and a fixture tree in tests. A device
// whose facts cannot be read is skipped with its error in errs: a device
// that vanishes mid-scan must not hide the others.
func scanPCI(root string) (devs []PCIDevice, errs []error) {
	dir := filepath.Join(root, "bus", "pci", "devices")
	ents, err := os.ReadDir(dir)
	if err != nil {
		if os.IsNotExist(err) {
			return nil, nil // no PCI bus at all: no devices
		}
		return nil, []error{fmt.Errorf("listing PCI devices: %w", err)}
	}
	for _, e := range ents {
		d, err := readPCI(filepath.Join(dir, e.Name()), e.Name())
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if d.isAccelerator() {
			devs = append(devs, d)
		}
	}
	sort.Slice(devs, func(a, b int) bool { return devs[a].Address < devs[b].Address })
	return devs, errs
}

func readPCI(dir, addr string) (PCIDevice, error) {
	d := PCIDevice{Address: addr, NUMANode: -1}
	class, err := readHex(dir, "class", 32)
	if err != nil {
		return d, err
	}
	vendor, err := readHex(dir, "vendor", 16)
	if err != nil {
		return d, err
	}
	device, err := readHex(dir, "device", 16)
	if err != nil {
		return d, err
	}
	d.Class, d.Vendor, d.Device = uint32(class), uint16(vendor), uint16(device)
	d.Driver = linkBase(filepath.Join(dir, "driver"))
	d.IOMMU = linkBase(filepath.Join(dir, "iommu_group"))
	if s, err := readString(dir, "numa_node"); err == nil {
		if n, err := strconv.Atoi(s); err == nil {
			d.NUMANode = n
		}
	}
	d.LinkSpeed, _ = readString(dir, "current_link_speed")
	if s, err := readString(dir, "current_link_width"); err == nil {
		d.LinkWidth, _ = strconv.Atoi(s)
	}
	return d, nil
}

// sysfs files are small; reading more than this means the tree is not
// what it claims to be.
const maxAttrFile = 4096

func readString(dir, name string) (string, error) {
	f, err := os.Open(filepath.Join(dir, name))
	if err != nil {
		return "", err
	}
	defer f.Close()
	b := make([]byte, maxAttrFile)
	n, err := f.Read(b)
	if n == 0 && err != nil {
		return "", fmt.Errorf("reading %s: %w", filepath.Join(dir, name), err)
	}
	return strings.TrimSpace(string(b[:n])), nil
}

func readHex(dir, name string, bits int) (uint64, error) {
	s, err := readString(dir, name)
	if err != nil {
		return 0, fmt.Errorf("PCI device %s: %w", filepath.Base(dir), err)
	}
	v, err := strconv.ParseUint(strings.TrimPrefix(s, "0x"), 16, bits)
	if err != nil {
		return 0, fmt.Errorf("PCI device %s: %s is %q, not a hex number", filepath.Base(dir), name, s)
	}
	return v, nil
}

// linkBase is the last element of a symlink's target ("nvidia" for
// driver -> ../../../bus/pci/drivers/nvidia), or "" when there is none.
func linkBase(path string) string {
	t, err := os.Readlink(path)
	if err != nil {
		return ""
	}
	return filepath.Base(t)
}
