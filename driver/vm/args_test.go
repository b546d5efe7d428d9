package vm

import (
	"strconv"
	"strings"
	"testing"
)

func argAfter(args []string, flag string) []string {
	var out []string
	for i := 0; i+1 < len(args); i++ {
		if args[i] == flag {
			out = append(out, args[i+1])
		}
	}
	return out
}

// A VM with passed-through devices gets microvm's PCIe host bridge, ACPI
// to describe it, one vfio-pci device per host device, no file-backed RAM
// and a command line that leaves ACPI and PCI on. Other VMs keep the
// machine they are snapshotted with.
func TestPassthroughCommandLine(t *testing.T) {
	q := &QEMU{}
	plain := &Spec{Shape: Shape{Kernel: "k", Initrd: "i", MemoryMB: 256, VCPUs: 1, Accel: "kvm"}, RunDir: "/r", Stdout: "/o", Stderr: "/e", Shares: map[string]string{}}
	a := q.Args(plain, "")
	if m := argAfter(a, "-M")[0]; !strings.Contains(m, "acpi=off") || strings.Contains(m, "pcie") {
		t.Errorf("plain machine = %s", m)
	}
	if c := argAfter(a, "-append")[0]; !strings.Contains(c, "acpi=off") || !strings.Contains(c, "pci=off") {
		t.Errorf("plain cmdline = %s", c)
	}
	// A TCG guest learns the TSC's rate: one that calibrates it fails and
	// keeps time in jiffies (see tsc.go). A KVM guest has kvm-clock.
	if strings.Contains(argAfter(a, "-append")[0], "tsc_early_khz") {
		t.Errorf("plain KVM cmdline = %s, want no tsc_early_khz", argAfter(a, "-append")[0])
	}
	if strings.Contains(argAfter(a, "-append")[0], "highres=off") {
		t.Errorf("plain KVM cmdline = %s, want high-resolution timers", argAfter(a, "-append")[0])
	}
	tcg := *plain
	tcg.Accel = "tcg"
	if c := argAfter(q.Args(&tcg, ""), "-append")[0]; !strings.Contains(c, "highres=off") {
		t.Errorf("plain TCG cmdline = %s, want highres=off", c)
	}
	if khz := hostTSCkHz(); khz > 0 && !strings.Contains(argAfter(q.Args(&tcg, ""), "-append")[0], "tsc_early_khz="+strconv.Itoa(khz)) {
		t.Errorf("plain TCG cmdline = %s, want tsc_early_khz=%d", argAfter(q.Args(&tcg, ""), "-append")[0], khz)
	}
	for _, d := range argAfter(a, "-device") {
		if strings.HasPrefix(d, "vfio-pci") {
			t.Errorf("plain VM has %s", d)
		}
	}

	pt := *plain
	pt.PCI = []string{"0000:18:00.0", "0000:3b:00.1"}
	a = q.Args(&pt, "")
	if m := argAfter(a, "-M")[0]; !strings.HasPrefix(m, "microvm,acpi=on,pcie=on,") {
		t.Errorf("passthrough machine = %s", m)
	}
	c := argAfter(a, "-append")[0]
	if strings.Contains(c, "acpi=off") || strings.Contains(c, "pci=off") {
		t.Errorf("passthrough cmdline = %s", c)
	}
	// The guest learns the TSC's rate rather than calibrate it, which
	// hangs a hardware-reduced ACPI guest when it fails.
	if khz := hostTSCkHz(); khz > 0 && !strings.Contains(c, "tsc_early_khz="+strconv.Itoa(khz)) {
		t.Errorf("passthrough cmdline = %s, want tsc_early_khz=%d", c, khz)
	}
	var vfio []string
	for _, d := range argAfter(a, "-device") {
		if strings.HasPrefix(d, "vfio-pci") {
			vfio = append(vfio, d)
		}
	}
	if strings.Join(vfio, " ") != "vfio-pci,host=0000:18:00.0,id=pt0 vfio-pci,host=0000:3b:00.1,id=pt1" {
		t.Errorf("vfio devices = %v", vfio)
	}
	if len(argAfter(a, "-object")) != 0 {
		t.Error("a passthrough VM's RAM is file-backed")
	}
}

// The measured TSC rate is a CPU's (the guest kernel trusts it blindly).
func TestHostTSCRate(t *testing.T) {
	khz := hostTSCkHz()
	if khz == 0 {
		t.Skip("this host's TSC is not constant or not amd64: no rate is passed")
	}
	t.Logf("host TSC: %d kHz", khz)
	if khz < 100_000 || khz > 10_000_000 {
		t.Errorf("host TSC rate %d kHz is not a CPU's", khz)
	}
}
