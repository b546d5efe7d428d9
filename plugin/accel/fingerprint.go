package accel

import (
	"fmt"
	"sort"

	"github.com/hashicorp/nomad/plugins/device"
)

const vendorNVIDIA = 0x10de

// Fingerprinter finds the node's accelerators. Every device's ID is its
// PCI address, whatever describes it: an ID must not change under an
// allocation that holds the device (Nomad stops counting an allocation
// whose device IDs it no longer finds, and the device looks free), and a
// GPU's UUID comes and goes with NVML (a GPU bound to vfio-pci is
// invisible to it). The UUID travels in the task's environment instead.
//
// It remembers every device it has reported: one that disappears is
// reported unhealthy rather than silently dropped, and a GPU that leaves
// the nvidia driver for vfio-pci keeps the description NVML gave it, so
// its group does not change while a task holds it.
type Fingerprinter struct {
	Root   string          // sysfs root, "/sys"
	Ignore map[string]bool // PCI addresses and UUIDs to leave out
	// PCIIDs are the places to look for the PCI ID database.
	PCIIDs []string
	NVML   NVML // nil: NVIDIA GPUs are described from sysfs alone

	names   *pciNames
	loaded  map[uint16]bool // vendors names were loaded for
	idsFile string          // the database found, "" for none

	seen map[string]Instance // PCI address → the device as last seen
}

// Scan lists the node's accelerators now, with the driver version NVML
// reports. Errors reading single devices or NVML come back beside the
// result: they make devices unhealthy or less described, never absent.
func (f *Fingerprinter) Scan() ([]Instance, string, []error) {
	if f.seen == nil {
		f.seen = map[string]Instance{}
	}
	devs, errs := scanPCI(f.Root)
	if err := f.loadNames(devs); err != nil {
		errs = append(errs, err)
	}
	var gpus map[string]GPU
	var driverVersion string
	if f.NVML != nil && hasVendor(devs, vendorNVIDIA) {
		list, err := f.NVML.GPUs()
		if err != nil {
			errs = append(errs, err)
		}
		gpus = map[string]GPU{}
		for _, g := range list {
			if g.PCIBusID != "" {
				gpus[busID(g.PCIBusID)] = g
				if g.UUID != "" && f.Ignore[g.UUID] {
					// Its address is ignored too: on vfio-pci the GPU
					// is out of NVML's sight, and only its address
					// would still say it is not to be offered.
					f.Ignore[busID(g.PCIBusID)] = true
				}
			} else if g.Err != nil {
				errs = append(errs, g.Err)
			}
		}
		if v, err := f.NVML.DriverVersion(); err == nil {
			driverVersion = v
		}
	}
	var out []Instance
	present := map[string]bool{}
	for _, d := range devs {
		in := Instance{PCI: d, ID: d.Address, Healthy: true}
		if d.Vendor == vendorNVIDIA && gpus != nil {
			f.describeNVIDIA(&in, gpus)
		}
		if f.Ignore[d.Address] || (in.GPU != nil && f.Ignore[in.GPU.UUID]) {
			continue
		}
		f.seen[in.ID] = in
		present[in.ID] = true
		out = append(out, in)
	}
	for addr, g := range gpus {
		if !present[addr] && !f.Ignore[addr] && !f.Ignore[g.UUID] {
			errs = append(errs, fmt.Errorf("NVML lists GPU %s at %s, which sysfs (%s) does not show", g.UUID, addr, f.Root))
		}
	}
	for id, in := range f.seen {
		if present[id] {
			continue
		}
		in.Healthy, in.HealthDesc = false, fmt.Sprintf("PCI device %s is gone from the bus", in.PCI.Address)
		out = append(out, in)
	}
	sort.Slice(out, func(a, b int) bool { return out[a].PCI.Address < out[b].PCI.Address })
	return out, driverVersion, errs
}

// describeNVIDIA adds what NVML knows of the GPU at in's address. A GPU
// bound to the nvidia driver that NVML does not list, or lists as lost,
// is unhealthy; one bound to vfio-pci (kept for passthrough) is invisible
// to NVML by design and stays healthy, described as NVML last saw it, or
// by sysfs if it never did (a GPU bound to vfio-pci at boot).
func (f *Fingerprinter) describeNVIDIA(in *Instance, gpus map[string]GPU) {
	g, ok := gpus[in.PCI.Address]
	if !ok {
		if in.PCI.Driver == "nvidia" {
			in.Healthy, in.HealthDesc = false, "bound to the nvidia driver but NVML does not list it"
			return
		}
		if prev, ok := f.seen[in.PCI.Address]; ok && prev.GPU != nil {
			in.GPU = prev.GPU // moved to vfio-pci: as NVML last described it
		}
		return
	}
	in.GPU = &g
	if g.Lost {
		in.Healthy, in.HealthDesc = false, fmt.Sprintf("NVML reports the GPU lost: %v", g.Err)
	}
}

func hasVendor(devs []PCIDevice, v uint16) bool {
	for _, d := range devs {
		if d.Vendor == v {
			return true
		}
	}
	return false
}

// loadNames reads the names of the vendors present, again only when a
// vendor not seen before appears (the database is large; hot-plugged
// cards are rare).
func (f *Fingerprinter) loadNames(devs []PCIDevice) error {
	fresh := false
	for _, d := range devs {
		if !f.loaded[d.Vendor] {
			fresh = true
		}
	}
	if f.names != nil && !fresh {
		return nil
	}
	if f.loaded == nil {
		f.loaded = map[uint16]bool{}
	}
	for _, d := range devs {
		f.loaded[d.Vendor] = true
	}
	names, file, err := loadPCINames(f.PCIIDs, f.loaded)
	f.names, f.idsFile = names, file
	return err
}

// Groups are the instances as Nomad's device groups.
func (f *Fingerprinter) Groups(insts []Instance, driverVersion string) []*device.DeviceGroup {
	return buildGroups(insts, f.names, driverVersion)
}

// Kind is the "vendor/type/name" group an instance is reported in.
func (f *Fingerprinter) Kind(in Instance) (vendor, typ, name string) {
	k := kindOf(in, f.names)
	return k.vendor, k.typ, k.name
}
