package vm

import (
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/driver/guest/initramfs"
	"github.com/cohort-dev/cohort/driver/guest/proto"
	"github.com/cohort-dev/cohort/driver/vm/vmtest"
)

// testVM prepares a spec with its own run dir, output files and task
// directories holding the test worker in local/.
func testVM(t *testing.T, a vmtest.Assets, accel string) *Spec {
	t.Helper()
	run, err := os.MkdirTemp("/tmp", "vmt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(run) })
	task := t.TempDir()
	spec := &Spec{
		Shape:  Shape{Kernel: a.Kernel, Initrd: a.Initrd, MemoryMB: 128, VCPUs: 1, Accel: accel},
		RunDir: filepath.Join(run, "r"),
		Stdout: filepath.Join(task, "stdout"),
		Stderr: filepath.Join(task, "stderr"),
		Shares: map[string]string{},
	}
	for _, tag := range proto.MountTags {
		d := filepath.Join(task, tag)
		os.MkdirAll(d, 0o755)
		spec.Shares[tag] = d
	}
	b, err := os.ReadFile(a.Worker)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(spec.Shares["local"], "worker"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	return spec
}

func assignment(hostname string, args ...string) *proto.Assignment {
	seed := make([]byte, 32)
	rand.Read(seed)
	return &proto.Assignment{
		Hostname: hostname,
		Entropy:  seed,
		UnixNano: time.Now().UnixNano(),
		Mounts:   proto.MountTags,
		Program:  "/local/worker",
		Args:     args,
		Env:      []string{"PATH=/local"},
	}
}

// run assigns the program, waits for it to exit and returns the exit event.
func run(t *testing.T, m *Machine, a *proto.Assignment) proto.Event {
	t.Helper()
	t.Cleanup(func() { m.Kill() })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	events := m.Events(ctx)
	ctl, err := m.DialCtl(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close()
	if err := ctl.Send(a); err != nil {
		t.Fatal(err)
	}
	ev, err := WaitEvent(ctx, m, events, proto.EvExited)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Wait(ctx); err != nil {
		t.Fatalf("vm did not power off after the program exited: %v", err)
	}
	return ev
}

func readFile(t *testing.T, p string) string {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// booted cold-boots a VM and connects to its control port; all of it is
// torn down when the test ends.
func booted(t *testing.T) (*Machine, context.Context, <-chan proto.Event, *Ctl) {
	t.Helper()
	a := vmtest.Get(t)
	accel, _ := DetectAccel()
	m, err := (&QEMU{}).Boot(testVM(t, a, accel))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Kill() })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	events := m.Events(ctx)
	ctl, err := m.DialCtl(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ctl.Close() })
	return m, ctx, events, ctl
}

func TestColdBootRunsProgram(t *testing.T) {
	a := vmtest.Get(t)
	accel, _ := DetectAccel()
	q := &QEMU{}
	spec := testVM(t, a, accel)
	m, err := q.Boot(spec)
	if err != nil {
		t.Fatal(err)
	}
	ev := run(t, m, assignment("w0", "exit", "3"))
	if ev.ExitCode != 3 {
		t.Errorf("exit code = %d, want 3", ev.ExitCode)
	}
	if got := readFile(t, spec.Stdout); got != "hello from the worker on stdout\n" {
		t.Errorf("stdout = %q", got)
	}
	if got := readFile(t, spec.Stderr); got != "hello from the worker on stderr\n" {
		t.Errorf("stderr = %q", got)
	}
	if m.Alive() {
		t.Error("vm process still alive after power-off")
	}
}

func TestSignalReachesProgram(t *testing.T) {
	testSignal(t, false)
}

// TestSignalAfterReconnect: a new control connection, as after a restart
// of the driver plugin, still reaches the guest.
func TestSignalAfterReconnect(t *testing.T) {
	testSignal(t, true)
}

func testSignal(t *testing.T, reconnect bool) {
	m, ctx, events, ctl := booted(t)
	ctl.Send(assignment("w0", "sleep"))
	if _, err := WaitEvent(ctx, m, events, proto.EvStarted); err != nil {
		t.Fatal(err)
	}
	if reconnect {
		ctl.Close()
		time.Sleep(300 * time.Millisecond)
		var err error
		if ctl, err = m.DialCtl(ctx); err != nil {
			t.Fatal(err)
		}
		defer ctl.Close()
	}
	ctl.Send(proto.Command{Kind: proto.CmdSignal, Signal: int(syscall.SIGTERM)})
	ev, err := WaitEvent(ctx, m, events, proto.EvExited)
	if err != nil {
		t.Fatal(err)
	}
	if ev.Signal != int(syscall.SIGTERM) || ev.ExitCode != 128+15 {
		t.Errorf("exit event = %+v, want signal 15", ev)
	}
}

func TestMissingProgramIsReported(t *testing.T) {
	m, ctx, events, ctl := booted(t)
	as := assignment("w0")
	as.Program = "/local/nope"
	ctl.Send(as)
	_, err := WaitEvent(ctx, m, events, proto.EvExited)
	if err == nil || !strings.Contains(err.Error(), "/local/nope") {
		t.Errorf("error = %v, want one naming the missing program", err)
	}
}

// TestSnapshotRestoreDiverges restores two workers from one template: both
// run, and they share neither hostname nor random stream.
func TestSnapshotRestoreDiverges(t *testing.T) {
	a := vmtest.Get(t)
	accel, _ := DetectAccel()
	q := &QEMU{}
	tmpl := testVM(t, a, accel)
	snap := filepath.Join(t.TempDir(), "snap")
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	if err := q.Snapshot(ctx, tmpl, snap); err != nil {
		t.Fatal(err)
	}
	var outs []string
	for i, host := range []string{"w0", "w1"} {
		spec := testVM(t, a, accel)
		m, err := q.Restore(spec, snap)
		if err != nil {
			t.Fatal(err)
		}
		ev := run(t, m, assignment(host, "rand"))
		if ev.ExitCode != 0 {
			t.Fatalf("worker %d exit = %+v; stderr %s", i, ev, readFile(t, spec.Stderr))
		}
		outs = append(outs, strings.TrimSpace(readFile(t, spec.Stdout)))
	}
	f0, f1 := strings.Fields(outs[0]), strings.Fields(outs[1])
	if len(f0) < 2 || len(f1) < 2 {
		t.Fatalf("outputs = %q", outs)
	}
	if f0[0] != "w0" || f1[0] != "w1" {
		t.Errorf("hostnames = %s, %s", f0[0], f1[0])
	}
	if f0[1] == f1[1] {
		t.Errorf("two restored workers drew the same random bytes %s", f0[1])
	}
}

// TestKernelPanicReportsConsole: an init that dies panics the kernel; the
// VM ends without an exit event and the error carries the console's tail.
func TestKernelPanicReportsConsole(t *testing.T) {
	a := vmtest.Get(t)
	accel, _ := DetectAccel()
	spec := testVM(t, a, accel)
	// An initramfs whose /init is the test worker run with no arguments:
	// it prints its usage and exits, and PID 1 exiting is a kernel panic.
	worker, err := os.ReadFile(a.Worker)
	if err != nil {
		t.Fatal(err)
	}
	img, err := initramfs.Build(worker)
	if err != nil {
		t.Fatal(err)
	}
	spec.Initrd = filepath.Join(t.TempDir(), "bad-initrd.gz")
	os.WriteFile(spec.Initrd, img, 0o644)
	m, err := (&QEMU{}).Boot(spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Kill() })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, err = WaitEvent(ctx, m, m.Events(ctx), proto.EvReady)
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
	accel, _ := DetectAccel()
	q := &QEMU{PCIeDevices: []string{"pci-testdev"}}
	spec := testVM(t, a, accel)
	m, err := q.Boot(spec)
	if err != nil {
		t.Fatal(err)
	}
	ev := run(t, m, assignment("w0", "pci"))
	out := readFile(t, spec.Stdout)
	if ev.ExitCode != 0 || !strings.Contains(out, "0x1b36:0x0005") {
		t.Errorf("exit %d; the guest's PCI devices:\n%s\nconsole:\n%s", ev.ExitCode, out, readFile(t, filepath.Join(spec.RunDir, "console.log")))
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
	accel, _ := DetectAccel()
	b, err := os.ReadFile(a.Init)
	if err != nil {
		t.Fatal(err)
	}
	img, err := initramfs.Build(b, initramfs.Module{Name: "00-fake.ko", Data: []byte("not a module")})
	if err != nil {
		t.Fatal(err)
	}
	spec := testVM(t, a, accel)
	spec.Initrd = filepath.Join(t.TempDir(), "initrd.gz")
	if err := os.WriteFile(spec.Initrd, img, 0o644); err != nil {
		t.Fatal(err)
	}
	m, err := (&QEMU{}).Boot(spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Kill() })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, err = WaitEvent(ctx, m, m.Events(ctx), proto.EvReady)
	if err == nil || !strings.Contains(err.Error(), "loading kernel module 00-fake.ko") {
		t.Fatalf("boot with a bad module: %v", err)
	}
}
