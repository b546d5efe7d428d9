package vm_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/driver/guest/initramfs"
	"github.com/cohort-dev/cohort/driver/guest/proto"
	"github.com/cohort-dev/cohort/driver/vm"
	"github.com/cohort-dev/cohort/driver/vm/vmtest"
)

// TestConformance runs the suite every backend passes against vm.QEMU.
func TestConformance(t *testing.T) { vmtest.Conformance(t, &vm.QEMU{}) }

// TestKernelPanicReportsConsole: an init that dies panics the kernel; the
// VM ends without an exit event and the error carries the console's tail.
func TestKernelPanicReportsConsole(t *testing.T) {
	a := vmtest.Get(t)
	accel, _ := vm.DetectAccel()
	spec := vmtest.Spec(t, a, accel)
	spec.Initrd = vmtest.PanickingInitrd(t, a)
	m, err := (&vm.QEMU{}).Boot(spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Kill() })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, err = vm.WaitEvent(ctx, m, m.Events(ctx), proto.EvReady)
	if err == nil || !strings.Contains(err.Error(), "Kernel panic") {
		t.Fatalf("error = %v, want one quoting the kernel panic", err)
	}
}

// TestPCIeGuestSeesDevice: a VM booted as a passthrough VM is (PCIe and
// ACPI on, its own command line) finds the devices on its PCIe bus. An
// emulated test device stands in for a host GPU, which needs an IOMMU
// this machine lacks; the guest kernel's part is the same.
func TestPCIeGuestSeesDevice(t *testing.T) {
	a := vmtest.Get(t)
	accel, _ := vm.DetectAccel()
	q := &vm.QEMU{PCIeDevices: []string{"pci-testdev"}}
	spec := vmtest.Spec(t, a, accel)
	m, err := q.Boot(spec)
	if err != nil {
		t.Fatal(err)
	}
	ev := vmtest.Run(t, m, vmtest.Assignment("w0", "pci"))
	out := vmtest.ReadFile(t, spec.Stdout)
	if ev.ExitCode != 0 || !strings.Contains(out, "0x1b36:0x0005") {
		t.Errorf("exit %d; the guest's PCI devices:\n%s\nconsole:\n%s", ev.ExitCode, out, vmtest.ReadFile(t, filepath.Join(spec.RunDir, "console.log")))
	}
	t.Logf("guest PCI devices:\n%s", out)
}

// TestModuleLoadFailureReported: the init loads the kernel modules packed
// for a passthrough VM before it reports ready, and a module that does not
// load fails the VM with its name. cohort's own kernel has no module
// support, so any module fails there; a user's passthrough kernel loads
// them.
func TestModuleLoadFailureReported(t *testing.T) {
	a := vmtest.Get(t)
	accel, _ := vm.DetectAccel()
	b, err := os.ReadFile(a.Init)
	if err != nil {
		t.Fatal(err)
	}
	img, err := initramfs.Build(b, initramfs.Module{Name: "00-fake.ko", Data: []byte("not a module")})
	if err != nil {
		t.Fatal(err)
	}
	spec := vmtest.Spec(t, a, accel)
	spec.Initrd = filepath.Join(t.TempDir(), "initrd.gz")
	if err := os.WriteFile(spec.Initrd, img, 0o644); err != nil {
		t.Fatal(err)
	}
	m, err := (&vm.QEMU{}).Boot(spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Kill() })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, err = vm.WaitEvent(ctx, m, m.Events(ctx), proto.EvReady)
	if err == nil || !strings.Contains(err.Error(), "loading kernel module 00-fake.ko") {
		t.Fatalf("boot with a bad module: %v", err)
	}
}
