package vm_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/driver/vm"
	"github.com/cohort-dev/cohort/driver/vm/vmtest"
)

// A guest, root in its VM, tries to plant a block device, a character
// device and a setuid-root file on its share: on the host there is none
// of them, only plain files of the VMM's, without a setuid bit.
func TestGuestCannotPlantFiles(t *testing.T) {
	a := vmtest.Get(t)
	accel, _ := vm.DetectAccel()
	spec := vmtest.Spec(t, a, accel)
	m, err := (&vm.QEMU{}).Boot(spec)
	if err != nil {
		t.Fatal(err)
	}
	ev := vmtest.Run(t, m, vmtest.Assignment("escape", "escape", "/local"))
	out := vmtest.ReadFile(t, spec.Stdout)
	t.Logf("the guest (exit %d) says:\n%s", ev.ExitCode, out)
	for _, name := range []string{"blk", "chr", "suid"} {
		st, err := os.Lstat(filepath.Join(spec.Shares["local"], name))
		if err != nil {
			continue // not there at all: fine
		}
		mode := st.Mode()
		if mode&(os.ModeDevice|os.ModeCharDevice|os.ModeSetuid|os.ModeSetgid) != 0 || !mode.IsRegular() {
			t.Errorf("the guest left %s on the host as %v", name, mode)
		}
		if sys, ok := st.Sys().(*syscall.Stat_t); ok && int(sys.Uid) != os.Geteuid() {
			t.Errorf("%s is owned by uid %d on the host, not the VMM's %d", name, sys.Uid, os.Geteuid())
		}
	}
	// The guest itself believes it succeeded: its view lives in xattrs.
	if !strings.Contains(out, "setuid file done") {
		t.Errorf("the guest's own view of its files was lost:\n%s", out)
	}
}

// A guest writing to its console for ever leaves a bounded file.
func TestConsoleBounded(t *testing.T) {
	accel, _ := vm.DetectAccel()
	m, ctx, _, ctl := vmtest.Booted(t, &vm.QEMU{}, vmtest.Spec(t, vmtest.Get(t), accel))
	if err := ctl.Send(vmtest.Assignment("flood", "flood", "/dev/console")); err != nil {
		t.Fatal(err)
	}
	lim := vm.Limits{ConsoleLimit: 256 << 10, ConsoleKeep: 64 << 10, Every: 50 * time.Millisecond}
	gctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go m.Guard(gctx, lim, func(string) {})
	deadline := time.Now().Add(20 * time.Second)
	biggest := int64(0)
	grew := false
	for time.Now().Before(deadline) {
		st, err := os.Stat(m.ConsoleLog())
		if err == nil {
			biggest = max(biggest, st.Size())
			grew = grew || st.Size() > lim.ConsoleKeep
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("console: at most %d bytes seen while the guest flooded it for 20 s", biggest)
	if !grew {
		t.Fatal("the console never grew: the flood did not reach it")
	}
	// The guard runs every 50 ms: the file may pass the limit by what the
	// guest writes in between, never by much more.
	if biggest > 4*lim.ConsoleLimit {
		t.Errorf("the console reached %d bytes with a limit of %d", biggest, lim.ConsoleLimit)
	}
}

// cohort's init holds the event port, so a guest program cannot even open
// it (virtio ports take one opener); and were the file to grow anyway, the
// guard reports the flood.
func TestEventsFloodReported(t *testing.T) {
	a := vmtest.Get(t)
	accel, _ := vm.DetectAccel()
	spec := vmtest.Spec(t, a, accel)
	m, err := (&vm.QEMU{}).Boot(spec)
	if err != nil {
		t.Fatal(err)
	}
	ev := vmtest.Run(t, m, vmtest.Assignment("flood", "flood", "events"))
	stderr := vmtest.ReadFile(t, spec.Stderr)
	t.Logf("the guest's attempt (exit %d): %s", ev.ExitCode, strings.TrimSpace(stderr))
	if ev.ExitCode == 0 || !strings.Contains(stderr, "busy") {
		t.Errorf("a guest program opened cohort's event port: exit %d, %q", ev.ExitCode, stderr)
	}

	// The guard, on a file that grows past its bound as a flood would.
	run := t.TempDir()
	g := &vm.Machine{RunDir: run, PID: os.Getpid()}
	f, _ := os.Create(g.EventsLog())
	defer f.Close()
	flooded := make(chan string, 1)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go g.Guard(ctx, vm.Limits{EventsLimit: 64 << 10, Every: 10 * time.Millisecond}, func(why string) { flooded <- why })
	f.Write(make([]byte, 65<<10))
	select {
	case why := <-flooded:
		t.Logf("reported: %s", why)
	case <-time.After(5 * time.Second):
		t.Fatal("a flooded event file was not reported")
	}
}
