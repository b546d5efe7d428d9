package vmtest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/driver/guest/initramfs"
	"github.com/cohort-dev/cohort/driver/guest/proto"
	"github.com/cohort-dev/cohort/driver/vm"
)

// Conformance is what every vm.Backend must do, tested with real VMs of
// the guest kernel and init: boot and run a program with its exit code and
// output, take a signal over a new control connection, report a missing
// program, die on Kill, snapshot a template and restore many copies of it
// at once that diverge, and leave nothing behind a failed snapshot.
// A backend's package runs it from a test:
//
//	func TestConformance(t *testing.T) { vmtest.Conformance(t, &vm.QEMU{}) }
func Conformance(t *testing.T, b vm.Backend) {
	a := Get(t)
	if err := b.Check(); err != nil {
		t.Fatalf("%s cannot run VMs here: %v", b.Name(), err)
	}
	accel, _ := vm.DetectAccel()

	t.Run("BootRunsProgram", func(t *testing.T) {
		spec := Spec(t, a, accel)
		m, err := b.Boot(spec)
		if err != nil {
			t.Fatal(err)
		}
		rec, err := vm.ReadRecord(spec.RunDir)
		if err != nil || rec.PID != m.PID || rec.StartTime != m.StartTime || rec.Backend != b.Name() {
			t.Errorf("recorded machine = %+v, %v; want %+v", rec, err, m)
		}
		ev := Run(t, m, Assignment("w0", "exit", "3"))
		if ev.ExitCode != 3 {
			t.Errorf("exit code = %d, want 3", ev.ExitCode)
		}
		if got := ReadFile(t, spec.Stdout); got != "hello from the worker on stdout\n" {
			t.Errorf("stdout = %q", got)
		}
		if got := ReadFile(t, spec.Stderr); got != "hello from the worker on stderr\n" {
			t.Errorf("stderr = %q", got)
		}
		if m.Alive() {
			t.Error("vm process still alive after power-off")
		}
	})

	// A program that looks up its own hostname finds it in the hosts
	// file written at assignment, without a barrier or a network
	// (127.0.1.1, as Debian gives it).
	t.Run("OwnHostnameResolves", func(t *testing.T) {
		spec := Spec(t, a, accel)
		m, err := b.Boot(spec)
		if err != nil {
			t.Fatal(err)
		}
		Run(t, m, Assignment("w0", "released", "w0"))
		if out := ReadFile(t, spec.Stdout); !strings.Contains(out, "resolved w0 [127.0.1.1] <nil>") {
			t.Errorf("the program did not find its own hostname:\n%s", out)
		}
	})

	for _, reconnect := range []bool{false, true} {
		// A new control connection, as after a restart of the driver
		// plugin, still reaches the guest.
		t.Run(fmt.Sprintf("Signal/reconnect=%v", reconnect), func(t *testing.T) {
			m, ctx, events, ctl := Booted(t, b, Spec(t, a, accel))
			ctl.Send(Assignment("w0", "sleep"))
			if _, err := vm.WaitEvent(ctx, m, events, proto.EvStarted); err != nil {
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
			ev, err := vm.WaitEvent(ctx, m, events, proto.EvExited)
			if err != nil {
				t.Fatal(err)
			}
			if ev.Signal != int(syscall.SIGTERM) || ev.ExitCode != 128+15 {
				t.Errorf("exit event = %+v, want signal 15", ev)
			}
		})
	}

	// A worker's clock is the host's, and keeps time: a guest clock
	// counted in timer ticks (jiffies) falls behind whenever its vCPU
	// misses some, which on a loaded host is seconds a minute.
	t.Run("ClockKeepsTime", func(t *testing.T) {
		spec := Spec(t, a, accel)
		m, err := b.Boot(spec)
		if err != nil {
			t.Fatal(err)
		}
		Run(t, m, Assignment("w0", "clock", "2"))
		exited := time.Now()
		out := ReadFile(t, spec.Stdout)
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if len(lines) != 4 || !strings.HasPrefix(lines[0], "clocksource ") {
			t.Fatalf("stdout = %q", out)
		}
		if src := strings.Fields(lines[0])[1]; strings.Contains(src, "jiffies") {
			t.Errorf("the guest keeps time with %s: %s", src, lines[0])
		}
		var last time.Time
		for _, l := range lines[1:] {
			var ns int64
			if _, err := fmt.Sscanf(l, "clock %d", &ns); err != nil {
				t.Fatalf("line %q: %v", l, err)
			}
			at := time.Unix(0, ns)
			if !last.IsZero() {
				if d := at.Sub(last); d < 900*time.Millisecond || d > 3*time.Second {
					t.Errorf("a second of the guest's sleep lasted %s on its clock", d)
				}
			}
			last = at
		}
		if lag := exited.Sub(last); lag < 0 || lag > 5*time.Second {
			t.Errorf("the guest's clock read %s when it printed last; the host saw it exit at %s", last.Format(time.StampMicro), exited.Format(time.StampMicro))
		}
	})

	// A worker held at the barrier starts on release with the host's
	// clock of that moment (its assignment's is as old as the VM took to
	// read it) and the gang's names in its hosts file.
	t.Run("ReleaseSetsClockAndHosts", func(t *testing.T) {
		spec := Spec(t, a, accel)
		m, ctx, events, ctl := Booted(t, b, spec)
		as := Assignment("w0", "released", "w1.peers.service.consul")
		as.Barrier = true
		as.UnixNano = time.Now().Add(-time.Hour).UnixNano()
		ctl.Send(as)
		if _, err := vm.WaitEvent(ctx, m, events, proto.EvAssigned); err != nil {
			t.Fatal(err)
		}
		ctl.Send(proto.Command{Kind: proto.CmdRelease, UnixNano: time.Now().UnixNano(),
			Hosts: []proto.Host{{Name: "w1.peers.service.consul", Address: "10.213.7.9"}}})
		if _, err := vm.WaitEvent(ctx, m, events, proto.EvExited); err != nil {
			t.Fatal(err)
		}
		out := ReadFile(t, spec.Stdout)
		var ns int64
		if _, err := fmt.Sscanf(out, "clock %d", &ns); err != nil {
			t.Fatalf("stdout %q: %v", out, err)
		}
		if lag := time.Since(time.Unix(0, ns)); lag < 0 || lag > 30*time.Second {
			t.Errorf("the released program's clock is %s behind the host's", lag)
		}
		if !strings.Contains(out, "resolved w1.peers.service.consul [10.213.7.9] <nil>") {
			t.Errorf("the released program did not find its peer in the hosts file:\n%s", out)
		}
	})

	// A program started from a stale assignment (a VM slow to read it)
	// gets the host's clock as soon as the host's CmdClock arrives, and
	// keeps it.
	t.Run("ClockCorrected", func(t *testing.T) {
		spec := Spec(t, a, accel)
		m, ctx, events, ctl := Booted(t, b, spec)
		as := Assignment("w0", "clock", "2")
		as.UnixNano = time.Now().Add(-time.Hour).UnixNano()
		ctl.Send(as)
		if _, err := vm.WaitEvent(ctx, m, events, proto.EvAssigned); err != nil {
			t.Fatal(err)
		}
		ctl.Send(proto.Command{Kind: proto.CmdClock, UnixNano: time.Now().UnixNano()})
		// An old time (a command delayed in transit) never moves the
		// clock back.
		ctl.Send(proto.Command{Kind: proto.CmdClock, UnixNano: time.Now().Add(-time.Minute).UnixNano()})
		if _, err := vm.WaitEvent(ctx, m, events, proto.EvExited); err != nil {
			t.Fatal(err)
		}
		out := strings.TrimSpace(ReadFile(t, spec.Stdout))
		lines := strings.Split(out, "\n")
		var ns int64
		if _, err := fmt.Sscanf(lines[len(lines)-1], "clock %d", &ns); err != nil {
			t.Fatalf("stdout %q: %v", out, err)
		}
		if lag := time.Since(time.Unix(0, ns)); lag < 0 || lag > 30*time.Second {
			t.Errorf("the program's clock is %s behind the host's after the correction:\n%s", lag, out)
		}
	})

	t.Run("MissingProgramReported", func(t *testing.T) {
		m, ctx, events, ctl := Booted(t, b, Spec(t, a, accel))
		as := Assignment("w0")
		as.Program = "/local/nope"
		ctl.Send(as)
		_, err := vm.WaitEvent(ctx, m, events, proto.EvExited)
		if err == nil || !strings.Contains(err.Error(), "/local/nope") {
			t.Errorf("error = %v, want one naming the missing program", err)
		}
	})

	t.Run("KillEnds", func(t *testing.T) {
		m, ctx, events, ctl := Booted(t, b, Spec(t, a, accel))
		ctl.Send(Assignment("w0", "sleep"))
		if _, err := vm.WaitEvent(ctx, m, events, proto.EvStarted); err != nil {
			t.Fatal(err)
		}
		if err := m.Kill(); err != nil {
			t.Fatal(err)
		}
		if err := m.Wait(ctx); err != nil {
			t.Fatalf("wait after kill: %v", err)
		}
		if m.Alive() {
			t.Error("vm alive after Kill and Wait")
		}
	})

	t.Run("SnapshotRestoresDiverge", func(t *testing.T) {
		snap := filepath.Join(t.TempDir(), "snap")
		ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
		defer cancel()
		// The template's shares are empty, as the driver's are: each
		// restored copy runs the worker from its own share, so a
		// backend that kept the template's shares fails here.
		tmpl := Spec(t, a, accel)
		if err := os.Remove(filepath.Join(tmpl.Shares["local"], "worker")); err != nil {
			t.Fatal(err)
		}
		if err := b.Snapshot(ctx, tmpl, snap); err != nil {
			t.Fatal(err)
		}
		// Restores of one snapshot run at once (the Backend's
		// concurrency contract); each gets its own identity and random
		// stream.
		const n = 4
		outs := make([]string, n)
		errs := make([]error, n)
		var wg sync.WaitGroup
		for i := range n {
			spec := Spec(t, a, accel)
			wg.Add(1)
			go func() {
				defer wg.Done()
				m, err := b.Restore(spec, snap)
				if err != nil {
					errs[i] = err
					return
				}
				defer m.Kill()
				ev, err := runErr(m, Assignment(fmt.Sprintf("w%d", i), "rand"))
				if err == nil && ev.ExitCode != 0 {
					err = fmt.Errorf("exit code %d; stderr %q", ev.ExitCode, readOr(spec.Stderr))
				}
				if err != nil {
					errs[i] = err
					return
				}
				outs[i] = strings.TrimSpace(readOr(spec.Stdout))
			}()
		}
		wg.Wait()
		seen := map[string]int{}
		for i := range n {
			if errs[i] != nil {
				t.Errorf("restore %d: %v", i, errs[i])
				continue
			}
			f := strings.Fields(outs[i])
			if len(f) < 2 || f[0] != fmt.Sprintf("w%d", i) {
				t.Errorf("restore %d printed %q, want its own hostname and random bytes", i, outs[i])
				continue
			}
			if j, ok := seen[f[1]]; ok {
				t.Errorf("restores %d and %d drew the same random bytes %s", j, i, f[1])
			}
			seen[f[1]] = i
		}
	})

	t.Run("WarmThenRedirect", func(t *testing.T) {
		// A pooled VM: warmed before its task exists (shares mounted,
		// network up), then given its task's files and log paths.
		spec := Spec(t, a, accel)
		worker := filepath.Join(spec.Shares["local"], "worker")
		m, ctx, events, ctl := Booted(t, b, spec)
		warm := Assignment("")
		warm.Program, warm.Warm = "", true
		if err := ctl.Send(warm); err != nil {
			t.Fatal(err)
		}
		if _, err := vm.WaitEvent(ctx, m, events, proto.EvWarmed); err != nil {
			t.Fatal(err)
		}
		// The task's files arrive after the guest mounted its shares.
		sub := filepath.Join(spec.Shares["local"], "task")
		if err := os.Mkdir(sub, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(worker, filepath.Join(sub, "worker")); err != nil {
			t.Fatal(err)
		}
		for _, tag := range proto.MountTags {
			os.MkdirAll(filepath.Join(spec.Shares[tag], "task"), 0o755)
		}
		out, errf := filepath.Join(t.TempDir(), "out"), filepath.Join(t.TempDir(), "err")
		if err := b.Redirect(m, out, errf); err != nil {
			t.Fatal(err)
		}
		as := Assignment("w0", "exit", "4")
		as.MountSub = "task"
		if err := ctl.Send(as); err != nil {
			t.Fatal(err)
		}
		ev, err := vm.WaitEvent(ctx, m, events, proto.EvExited)
		if err != nil {
			t.Fatal(err)
		}
		if ev.ExitCode != 4 {
			t.Errorf("exit code = %d, want 4", ev.ExitCode)
		}
		m.Wait(ctx)
		if got := readOr(out); got != "hello from the worker on stdout\n" {
			t.Errorf("redirected stdout = %q", got)
		}
		if got := readOr(errf); got != "hello from the worker on stderr\n" {
			t.Errorf("redirected stderr = %q", got)
		}
		if got := readOr(spec.Stdout); got != "" {
			t.Errorf("the first stdout got %q after the redirect", got)
		}
	})

	t.Run("FailedSnapshotLeavesNothing", func(t *testing.T) {
		// A template whose init dies (the worker as /init prints its
		// usage and exits: a kernel panic) never becomes a snapshot.
		spec := Spec(t, a, accel)
		spec.Initrd = PanickingInitrd(t, a)
		dir := t.TempDir()
		snap := filepath.Join(dir, "snap")
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		if err := b.Snapshot(ctx, spec, snap); err == nil {
			t.Fatal("a template whose init panics was saved")
		}
		left, _ := os.ReadDir(dir)
		for _, e := range left {
			t.Errorf("a failed snapshot left %s", e.Name())
		}
	})
}

// PanickingInitrd is an initramfs whose /init is the test worker run with
// no arguments: it prints its usage and exits, and PID 1 exiting is a
// kernel panic.
func PanickingInitrd(t testing.TB, a Assets) string {
	t.Helper()
	worker, err := os.ReadFile(a.Worker)
	if err != nil {
		t.Fatal(err)
	}
	img, err := initramfs.Build(worker)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "bad-initrd.gz")
	if err := os.WriteFile(p, img, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// Booted boots spec's VM and connects to its control port; all of it is
// torn down when the test ends.
func Booted(t *testing.T, b vm.Backend, spec *vm.Spec) (*vm.Machine, context.Context, <-chan proto.Event, *vm.Ctl) {
	t.Helper()
	m, err := b.Boot(spec)
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

// Run hands m its assignment, waits for the program to exit and for the
// VM to power off, and returns the exit event.
func Run(t *testing.T, m *vm.Machine, as *proto.Assignment) proto.Event {
	t.Helper()
	t.Cleanup(func() { m.Kill() })
	ev, err := runErr(m, as)
	if err != nil {
		t.Fatal(err)
	}
	return ev
}

func runErr(m *vm.Machine, as *proto.Assignment) (proto.Event, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	events := m.Events(ctx)
	ctl, err := m.DialCtl(ctx)
	if err != nil {
		return proto.Event{}, err
	}
	defer ctl.Close()
	if err := ctl.Send(as); err != nil {
		return proto.Event{}, err
	}
	ev, err := vm.WaitEvent(ctx, m, events, proto.EvExited)
	if err != nil {
		return ev, err
	}
	if err := m.Wait(ctx); err != nil {
		return ev, errors.New("vm did not power off after the program exited: " + err.Error())
	}
	return ev, nil
}

// ReadFile is a file's contents, failing the test if it cannot be read.
func ReadFile(t testing.TB, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func readOr(p string) string {
	b, _ := os.ReadFile(p)
	return string(b)
}
