// Package vfio prepares a host's PCI devices for passthrough into a worker
// VM: it checks that the host has an IOMMU, that each device's IOMMU group
// is bound to vfio-pci as a whole (binding it when allowed), and lists
// every device of those groups, which a VM must take together.
//
// All checks run before anything is bound, so a refused task leaves the
// host as it found it.
package vfio

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// DevicesEnv is the variable in which the accelerator device plugin hands
// a task the PCI addresses of its reserved devices, comma-separated. The
// driver reads it only from the device plugin's part of the environment,
// never from the job's own env.
const DevicesEnv = "COHORT_PCI_DEVICES"

// Host is where a host's sysfs and device nodes are: "/sys" and "/dev",
// or fixture trees in tests.
type Host struct{ Sys, Dev string }

// Default is the running host.
var Default = Host{Sys: "/sys", Dev: "/dev"}

// Plan is what a VM is given: the groups it takes and every endpoint
// device in them, sorted.
type Plan struct {
	Groups  []string
	Devices []string
}

// ErrNoIOMMU says the host cannot isolate devices.
var ErrNoIOMMU = errors.New("this host has no IOMMU")

// pciAddr is domain:bus:device.function; domains past 0xffff (Intel VMD)
// have more digits.
var pciAddr = regexp.MustCompile(`^[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$`)

// ParseDevices splits DevicesEnv's value.
func ParseDevices(s string) ([]string, error) {
	var out []string
	for _, a := range strings.Split(s, ",") {
		a = strings.ToLower(strings.TrimSpace(a))
		if a == "" {
			continue
		}
		if !pciAddr.MatchString(a) {
			return nil, fmt.Errorf("%q is not a PCI address such as 0000:00:06.0", a)
		}
		out = append(out, a)
	}
	return out, nil
}

// Prepare checks, and with bind binds, what passing addrs through needs.
func Prepare(h Host, addrs []string, bind bool) (*Plan, error) {
	groupsDir := filepath.Join(h.Sys, "kernel", "iommu_groups")
	if n := countEntries(groupsDir); n == 0 {
		return nil, fmt.Errorf("%w (%s is empty): a device cannot be passed through to a worker VM without one; enable VT-d or AMD-Vi in the firmware and boot the host with intel_iommu=on or amd_iommu=on", ErrNoIOMMU, groupsDir)
	}
	groups := map[string]bool{}
	slots := map[string]bool{} // domain:bus:device of each reserved device
	for _, a := range addrs {
		slots[slot(a)] = true
		dev := filepath.Join(h.Sys, "bus", "pci", "devices", a)
		if _, err := os.Stat(dev); err != nil {
			return nil, fmt.Errorf("PCI device %s is not on this host", a)
		}
		g := linkBase(filepath.Join(dev, "iommu_group"))
		if g == "" {
			return nil, fmt.Errorf("PCI device %s has no IOMMU group", a)
		}
		groups[g] = true
	}
	p := &Plan{}
	var rebind []string
	var problems []string
	for g := range groups {
		p.Groups = append(p.Groups, g)
		members, err := os.ReadDir(filepath.Join(groupsDir, g, "devices"))
		if err != nil {
			return nil, fmt.Errorf("listing IOMMU group %s: %w", g, err)
		}
		needsBind := false
		for _, m := range members {
			a := m.Name()
			dir := filepath.Join(h.Sys, "bus", "pci", "devices", a)
			if isBridge(dir) {
				// Bridges stay with the host; a group holding one is
				// still viable when its endpoints are all on vfio-pci.
				continue
			}
			if !slots[slot(a)] {
				// Another device shares the group (a PCIe switch without
				// ACS): it may be another task's, or the host's. Taking
				// it would hand it to this VM; unbinding it would pull
				// it from whoever uses it.
				problems = append(problems, fmt.Sprintf("IOMMU group %s also holds %s, which is not reserved to this task (the devices are not isolated from each other: reserve them together or enable ACS)", g, a))
				continue
			}
			p.Devices = append(p.Devices, a)
			switch drv := linkBase(filepath.Join(dir, "driver")); drv {
			case "vfio-pci":
			default:
				if !bind {
					if drv == "" {
						drv = "no driver"
					}
					problems = append(problems, fmt.Sprintf("%s (IOMMU group %s) is bound to %s, not vfio-pci", a, g, drv))
					continue
				}
				rebind = append(rebind, a)
				needsBind = true
			}
		}
		if _, err := os.Stat(filepath.Join(h.Dev, "vfio", g)); err != nil && !needsBind {
			problems = append(problems, fmt.Sprintf("IOMMU group %s has no %s", g, filepath.Join(h.Dev, "vfio", g)))
		}
	}
	sort.Strings(p.Groups)
	sort.Strings(p.Devices)
	if len(problems) > 0 {
		sort.Strings(problems)
		return nil, fmt.Errorf("devices are not ready for passthrough: %s; bind every device of the group to vfio-pci, or set vfio_bind = true in the microvm plugin config to let the driver do it", strings.Join(problems, "; "))
	}
	if len(rebind) > 0 {
		if _, err := os.Stat(filepath.Join(h.Sys, "bus", "pci", "drivers", "vfio-pci")); err != nil {
			return nil, errors.New("the vfio-pci driver is not loaded on this host (modprobe vfio-pci)")
		}
		sort.Strings(rebind)
		var done []string
		fail := func(err error) (*Plan, error) {
			// Give every device touched back to the driver it had, so
			// a refused task leaves the host as it found it.
			for _, a := range done {
				unbindVFIO(h, a)
			}
			return nil, err
		}
		for _, a := range rebind {
			done = append(done, a)
			if err := bindVFIO(h, a); err != nil {
				return fail(err)
			}
		}
		for _, g := range p.Groups {
			if _, err := os.Stat(filepath.Join(h.Dev, "vfio", g)); err != nil {
				return fail(fmt.Errorf("IOMMU group %s has no %s after binding it to vfio-pci", g, filepath.Join(h.Dev, "vfio", g)))
			}
		}
	}
	return p, nil
}

// slot is a PCI address without its function: the functions of one card.
func slot(addr string) string {
	if i := strings.LastIndexByte(addr, '.'); i > 0 {
		return addr[:i]
	}
	return addr
}

// unbindVFIO undoes bindVFIO as far as it got: the override cleared, the
// device off vfio-pci, and probed again so its own driver takes it.
func unbindVFIO(h Host, a string) {
	dir := filepath.Join(h.Sys, "bus", "pci", "devices", a)
	os.WriteFile(filepath.Join(dir, "driver_override"), []byte("\n"), 0o200)
	if linkBase(filepath.Join(dir, "driver")) == "vfio-pci" {
		os.WriteFile(filepath.Join(dir, "driver", "unbind"), []byte(a), 0o200)
	}
	os.WriteFile(filepath.Join(h.Sys, "bus", "pci", "drivers_probe"), []byte(a), 0o200)
}

// bindVFIO moves one device to vfio-pci the way the kernel documents:
// override its driver, unbind it from the current one, and probe again.
func bindVFIO(h Host, a string) error {
	dir := filepath.Join(h.Sys, "bus", "pci", "devices", a)
	if err := os.WriteFile(filepath.Join(dir, "driver_override"), []byte("vfio-pci"), 0o200); err != nil {
		return fmt.Errorf("binding %s to vfio-pci: %w", a, err)
	}
	if linkBase(filepath.Join(dir, "driver")) != "" {
		if err := os.WriteFile(filepath.Join(dir, "driver", "unbind"), []byte(a), 0o200); err != nil {
			return fmt.Errorf("unbinding %s from its driver: %w", a, err)
		}
	}
	if err := os.WriteFile(filepath.Join(h.Sys, "bus", "pci", "drivers_probe"), []byte(a), 0o200); err != nil {
		return fmt.Errorf("probing %s for vfio-pci: %w", a, err)
	}
	if drv := linkBase(filepath.Join(dir, "driver")); drv != "vfio-pci" {
		return fmt.Errorf("binding %s to vfio-pci: it is bound to %q after probing", a, drv)
	}
	return nil
}

// isBridge says whether a device is a PCI bridge (class 0x06).
func isBridge(dir string) bool {
	b, err := os.ReadFile(filepath.Join(dir, "class"))
	if err != nil {
		return false
	}
	c, err := strconv.ParseUint(strings.TrimPrefix(strings.TrimSpace(string(b)), "0x"), 16, 32)
	return err == nil && c>>16 == 0x06
}

func countEntries(dir string) int {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), ".") {
			n++
		}
	}
	return n
}

func linkBase(path string) string {
	t, err := os.Readlink(path)
	if err != nil {
		return ""
	}
	return filepath.Base(t)
}
