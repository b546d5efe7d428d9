package accel

import (
	"fmt"
	"regexp"
	"sort"
	"strings"

	"github.com/hashicorp/nomad/plugins/device"
	"github.com/hashicorp/nomad/plugins/shared/structs"
)

// Instance is one device the plugin hands out.
type Instance struct {
	// ID is what Nomad schedules by: the GPU's UUID where NVML knows it
	// (as Nomad's NVIDIA plugin does, so jobs and tools that name GPUs by
	// UUID keep working), else the PCI address.
	ID  string
	PCI PCIDevice
	GPU *GPU // nil without NVML or for other vendors
	// Healthy, with the reason when it is not.
	Healthy    bool
	HealthDesc string
}

// kind is the group a device falls in: Nomad's vendor/type/name.
type kind struct{ vendor, typ, name string }

func (k kind) String() string { return k.vendor + "/" + k.typ + "/" + k.name }

// vendorSlugs are the short vendor names Nomad jobs use; other vendors
// get the first word of their name in the PCI ID database, lower case.
var vendorSlugs = map[uint16]string{
	0x10de: "nvidia",
	0x1002: "amd",
	0x1022: "amd",
	0x8086: "intel",
	0x10ee: "xilinx",
	0x1172: "altera",
	0x1d0f: "amazon",
	0x1ae0: "google",
	0x1da3: "habana",
	0x1e52: "tenstorrent",
}

// fpgaVendors make FPGA cards; their processing accelerators (class
// 0x12) are typed "fpga". Other processing accelerators are typed
// "accelerator".
var fpgaVendors = map[uint16]bool{0x10ee: true, 0x1172: true, 0x1204: true}

var nonWord = regexp.MustCompile(`[^a-z0-9]+`)

func vendorSlug(v uint16, names *pciNames) string {
	if s, ok := vendorSlugs[v]; ok {
		return s
	}
	if n := names.vendor(v); n != "" {
		if w := strings.Fields(strings.ToLower(n)); len(w) > 0 {
			if s := strings.Trim(nonWord.ReplaceAllString(w[0], ""), "-"); s != "" {
				return s
			}
		}
	}
	return fmt.Sprintf("0x%04x", v)
}

func deviceType(d PCIDevice, names *pciNames) string {
	if d.Class>>16 == classDisplay {
		return "gpu"
	}
	if fpgaVendors[d.Vendor] || strings.Contains(strings.ToUpper(names.device(d.Vendor, d.Device)), "FPGA") {
		return "fpga"
	}
	return "accelerator"
}

// modelName is the group's name. With NVML it is NVML's name without the
// vendor ("H100 80GB HBM3", as Nomad's NVIDIA plugin names it); otherwise
// the marketing name the PCI ID database gives in brackets ("GH100 [H100
// SXM5 80GB]" gives "H100 SXM5 80GB"), its whole name, or the hex ID.
// Without NVML an NVIDIA GPU's name is therefore the database's, which
// can differ from NVML's: a job that names a model should name the one
// its nodes report (nomad node status -verbose).
func modelName(d PCIDevice, g *GPU, names *pciNames) string {
	if g != nil && g.Name != "" {
		return strings.TrimSpace(strings.TrimPrefix(g.Name, "NVIDIA "))
	}
	n := names.device(d.Vendor, d.Device)
	if i, j := strings.LastIndex(n, "["), strings.LastIndex(n, "]"); i >= 0 && j > i+1 {
		n = n[i+1 : j]
	}
	n = strings.Join(strings.Fields(strings.ReplaceAll(n, "/", " ")), " ")
	if n == "" {
		return fmt.Sprintf("0x%04x", d.Device)
	}
	return n
}

// buildGroups turns the instances into Nomad's device groups, one per
// kind, sorted. A group's attributes are those every one of its devices
// shares (a model's devices share all but locality; a GPU whose MIG mode
// differs from its siblings' drops mig_mode from the group rather than
// misreport it).
func buildGroups(insts []Instance, names *pciNames, driverVersion string) []*device.DeviceGroup {
	byKind := map[kind][]Instance{}
	for _, in := range insts {
		k := kindOf(in, names)
		byKind[k] = append(byKind[k], in)
	}
	kinds := make([]kind, 0, len(byKind))
	for k := range byKind {
		kinds = append(kinds, k)
	}
	sort.Slice(kinds, func(a, b int) bool { return kinds[a].String() < kinds[b].String() })
	groups := make([]*device.DeviceGroup, 0, len(kinds))
	for _, k := range kinds {
		members := byKind[k]
		g := &device.DeviceGroup{Vendor: k.vendor, Type: k.typ, Name: k.name}
		var common map[string]*structs.Attribute
		for i, in := range members {
			g.Devices = append(g.Devices, &device.Device{
				ID: in.ID, Healthy: in.Healthy, HealthDesc: in.HealthDesc,
				HwLocality: &device.DeviceLocality{PciBusID: in.PCI.Address},
			})
			a := attributes(in, names, driverVersion)
			if i == 0 {
				common = a
				continue
			}
			for name, v := range common {
				if w, ok := a[name]; !ok || w.GoString() != v.GoString() {
					delete(common, name)
				}
			}
		}
		g.Attributes = common
		groups = append(groups, g)
	}
	return groups
}

func kindOf(in Instance, names *pciNames) kind {
	return kind{vendorSlug(in.PCI.Vendor, names), deviceType(in.PCI, names), modelName(in.PCI, in.GPU, names)}
}

// attributes are what jobs constrain on. Units are Nomad's, so that
// "memory >= 40 GiB" compares against "81559 MiB".
func attributes(in Instance, names *pciNames, driverVersion string) map[string]*structs.Attribute {
	d := in.PCI
	a := map[string]*structs.Attribute{
		"pci_vendor_id": structs.NewStringAttribute(fmt.Sprintf("0x%04x", d.Vendor)),
		"pci_device_id": structs.NewStringAttribute(fmt.Sprintf("0x%04x", d.Device)),
		"pci_class":     structs.NewStringAttribute(fmt.Sprintf("0x%06x", d.Class)),
	}
	if n := names.device(d.Vendor, d.Device); n != "" {
		a["pci_name"] = structs.NewStringAttribute(n)
	}
	if n := names.vendor(d.Vendor); n != "" {
		a["vendor_name"] = structs.NewStringAttribute(n)
	}
	if d.LinkSpeed != "" {
		a["pcie_link_speed"] = structs.NewStringAttribute(d.LinkSpeed)
	}
	if d.LinkWidth > 0 {
		a["pcie_link_width"] = structs.NewIntAttribute(int64(d.LinkWidth), "")
	}
	g := in.GPU
	if g == nil {
		a["fingerprint"] = structs.NewStringAttribute("sysfs")
		return a
	}
	a["fingerprint"] = structs.NewStringAttribute("nvml")
	if driverVersion != "" {
		a["driver_version"] = structs.NewStringAttribute(driverVersion)
	}
	if g.MemoryMiB > 0 {
		a["memory"] = structs.NewIntAttribute(int64(g.MemoryMiB), structs.UnitMiB)
	}
	if g.BAR1MiB > 0 {
		a["bar1"] = structs.NewIntAttribute(int64(g.BAR1MiB), structs.UnitMiB)
	}
	if g.PowerLimitW > 0 {
		a["power"] = structs.NewIntAttribute(int64(g.PowerLimitW), structs.UnitW)
	}
	if g.SMClockMHz > 0 {
		a["cores_clock"] = structs.NewIntAttribute(int64(g.SMClockMHz), structs.UnitMHz)
	}
	if g.MemClockMHz > 0 {
		a["memory_clock"] = structs.NewIntAttribute(int64(g.MemClockMHz), structs.UnitMHz)
	}
	if g.PCIeGen > 0 {
		a["pcie_gen"] = structs.NewIntAttribute(int64(g.PCIeGen), "")
	}
	if g.PCIeWidth > 0 {
		a["pcie_width"] = structs.NewIntAttribute(int64(g.PCIeWidth), "")
	}
	a["mig_mode"] = structs.NewBoolAttribute(g.MIG)
	return a
}
