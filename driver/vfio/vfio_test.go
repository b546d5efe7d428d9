package vfio

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// host builds a sysfs and /dev tree: devices maps an address to its
// class, driver ("" for none) and IOMMU group ("" for none).
func host(t *testing.T, devices map[string][3]string, vfioDriver bool) Host {
	t.Helper()
	root := t.TempDir()
	h := Host{Sys: filepath.Join(root, "sys"), Dev: filepath.Join(root, "dev")}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(h.Sys, "kernel", "iommu_groups"), 0o755))
	must(os.MkdirAll(filepath.Join(h.Dev, "vfio"), 0o755))
	if vfioDriver {
		must(os.MkdirAll(filepath.Join(h.Sys, "bus", "pci", "drivers", "vfio-pci"), 0o755))
	}
	for a, d := range devices {
		dir := filepath.Join(h.Sys, "bus", "pci", "devices", a)
		must(os.MkdirAll(dir, 0o755))
		must(os.WriteFile(filepath.Join(dir, "class"), []byte(d[0]+"\n"), 0o644))
		if d[1] != "" {
			must(os.Symlink("../../drivers/"+d[1], filepath.Join(dir, "driver")))
		}
		if g := d[2]; g != "" {
			gd := filepath.Join(h.Sys, "kernel", "iommu_groups", g, "devices")
			must(os.MkdirAll(gd, 0o755))
			must(os.Symlink("../../../../bus/pci/devices/"+a, filepath.Join(gd, a)))
			must(os.Symlink("../../../kernel/iommu_groups/"+g, filepath.Join(dir, "iommu_group")))
			if d[1] == "vfio-pci" {
				os.WriteFile(filepath.Join(h.Dev, "vfio", g), nil, 0o600)
			}
		}
	}
	return h
}

// The machines here, and the H100 node, have no IOMMU: the refusal must
// say so in a sentence and touch nothing.
func TestNoIOMMURefused(t *testing.T) {
	h := host(t, map[string][3]string{"0000:00:06.0": {"0x030200", "nvidia", ""}}, true)
	_, err := Prepare(h, []string{"0000:00:06.0"}, true)
	if err == nil || !strings.Contains(err.Error(), "this host has no IOMMU") || !strings.Contains(err.Error(), "intel_iommu=on") {
		t.Fatalf("Prepare = %v", err)
	}
	if _, err := os.Stat(filepath.Join(h.Sys, "bus/pci/devices/0000:00:06.0/driver_override")); err == nil {
		t.Error("a refused device was touched")
	}
	// So does the running host, when it has none.
	if countEntries("/sys/kernel/iommu_groups") == 0 {
		if _, err := Prepare(Default, []string{"0000:00:06.0"}, false); err == nil || !strings.Contains(err.Error(), "no IOMMU") {
			t.Errorf("Prepare on this host = %v", err)
		}
	}
}

func TestWholeGroupOnVFIO(t *testing.T) {
	h := host(t, map[string][3]string{
		"0000:3b:00.0": {"0x120000", "vfio-pci", "7"},
		"0000:3b:00.1": {"0x058000", "vfio-pci", "7"},
		"0000:3a:00.0": {"0x060400", "pcieport", "7"}, // a bridge stays with the host
		"0000:18:00.0": {"0x030200", "vfio-pci", "40"},
	}, true)
	p, err := Prepare(h, []string{"0000:3b:00.0", "0000:18:00.0"}, false)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(p.Devices, " ") != "0000:18:00.0 0000:3b:00.0 0000:3b:00.1" || strings.Join(p.Groups, " ") != "40 7" {
		t.Errorf("plan = %+v: every endpoint of both groups, no bridge", p)
	}
}

func TestGroupNotOnVFIORefusedWithoutBind(t *testing.T) {
	h := host(t, map[string][3]string{
		"0000:3b:00.0": {"0x120000", "vfio-pci", "7"},
		"0000:3b:00.1": {"0x058000", "xclmgmt", "7"},
		"0000:18:00.0": {"0x030200", "nvidia", "40"},
	}, true)
	_, err := Prepare(h, []string{"0000:3b:00.0", "0000:18:00.0"}, false)
	if err == nil || !strings.Contains(err.Error(), "0000:3b:00.1 (IOMMU group 7) is bound to xclmgmt") ||
		!strings.Contains(err.Error(), "0000:18:00.0 (IOMMU group 40) is bound to nvidia") || !strings.Contains(err.Error(), "vfio_bind") {
		t.Fatalf("Prepare = %v", err)
	}
	if _, err := os.Stat(filepath.Join(h.Sys, "bus/pci/devices/0000:18:00.0/driver_override")); err == nil {
		t.Error("a refused device was touched")
	}
}

// A group that holds a device not reserved to the task (two GPUs behind
// one switch without ACS) is refused, bind or not: taking it would hand
// another task's GPU to this VM.
func TestSharedGroupRefused(t *testing.T) {
	h := host(t, map[string][3]string{
		"0000:18:00.0": {"0x030200", "vfio-pci", "40"},
		"0000:19:00.0": {"0x030200", "nvidia", "40"},
	}, true)
	for _, bind := range []bool{false, true} {
		_, err := Prepare(h, []string{"0000:18:00.0"}, bind)
		if err == nil || !strings.Contains(err.Error(), "IOMMU group 40 also holds 0000:19:00.0, which is not reserved to this task") {
			t.Errorf("bind=%t: Prepare = %v", bind, err)
		}
	}
	if _, err := os.Stat(filepath.Join(h.Sys, "bus/pci/devices/0000:19:00.0/driver_override")); err == nil {
		t.Error("the other task's GPU was touched")
	}
	// Reserved together, they go together.
	if p, err := Prepare(h, []string{"0000:18:00.0", "0000:19:00.0"}, false); err == nil {
		t.Errorf("a group with a device on nvidia was accepted: %+v", p)
	}
}

func TestBindWritesTheKernelsSequence(t *testing.T) {
	h := host(t, map[string][3]string{"0000:18:00.0": {"0x030200", "nvidia", "40"}}, true)
	os.MkdirAll(filepath.Join(h.Sys, "bus/pci/drivers/nvidia"), 0o755)
	_, err := Prepare(h, []string{"0000:18:00.0"}, true)
	// A fixture has no kernel to act on the writes, so the device is
	// still on nvidia afterwards, which Prepare must notice.
	if err == nil || !strings.Contains(err.Error(), `bound to "nvidia" after probing`) {
		t.Fatalf("Prepare = %v", err)
	}
	for f, want := range map[string]string{
		"bus/pci/drivers/nvidia/unbind": "0000:18:00.0",
		"bus/pci/drivers_probe":         "0000:18:00.0",
	} {
		if b, _ := os.ReadFile(filepath.Join(h.Sys, f)); string(b) != want {
			t.Errorf("%s = %q, want %q", f, b, want)
		}
	}
	// A failed bind gives the device back: its override is cleared and
	// it is probed again.
	if b, _ := os.ReadFile(filepath.Join(h.Sys, "bus/pci/devices/0000:18:00.0/driver_override")); string(b) != "\n" {
		t.Errorf("driver_override after a failed bind = %q, want it cleared", b)
	}
	// Without the vfio-pci driver there is nothing to bind to.
	h = host(t, map[string][3]string{"0000:18:00.0": {"0x030200", "nvidia", "40"}}, false)
	if _, err := Prepare(h, []string{"0000:18:00.0"}, true); err == nil || !strings.Contains(err.Error(), "modprobe vfio-pci") {
		t.Errorf("Prepare = %v", err)
	}
}

func TestUnknownDevicesRefused(t *testing.T) {
	h := host(t, map[string][3]string{"0000:18:00.0": {"0x030200", "vfio-pci", "40"}, "0000:19:00.0": {"0x030200", "vfio-pci", ""}}, true)
	if _, err := Prepare(h, []string{"0000:99:00.0"}, false); err == nil || !strings.Contains(err.Error(), "not on this host") {
		t.Errorf("Prepare = %v", err)
	}
	if _, err := Prepare(h, []string{"0000:19:00.0"}, false); err == nil || !strings.Contains(err.Error(), "has no IOMMU group") {
		t.Errorf("Prepare = %v", err)
	}
	if _, err := ParseDevices("0000:18:00.0,../../etc"); err == nil {
		t.Error("a path was taken for a PCI address")
	}
	if a, err := ParseDevices(" 0000:18:00.0, 0000:2A:00.0 "); err != nil || strings.Join(a, ",") != "0000:18:00.0,0000:2a:00.0" {
		t.Errorf("ParseDevices = %v %v", a, err)
	}
}
