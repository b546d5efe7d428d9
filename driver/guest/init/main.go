// Command init is PID 1 of every cohort worker VM. It mounts the kernel
// file systems, reports "ready" and waits for its assignment from the host
// (so a VM can be snapshotted at that point and restored per worker), then
// applies the worker's identity, runs the program with stdout and stderr on
// separate host channels, forwards signals, reports the exit status and
// powers the VM off.
//
// Built static (CGO_ENABLED=0) and packed alone into the initramfs.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cohort-dev/cohort/driver/guest/proto"
	"golang.org/x/sys/unix"
)

// console is the serial console; its tail is what the host shows when the
// VM dies without reporting.
var console = os.Stderr

func main() {
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "cohort init: must run as PID 1 inside a worker VM")
		os.Exit(2)
	}
	g := &guest{}
	if err := g.run(); err != nil {
		fmt.Fprintf(console, "cohort init: %v\n", err)
		g.emit(proto.Event{Kind: proto.EvError, Message: err.Error()})
	}
	powerOff()
}

type guest struct {
	mu     sync.Mutex
	events *os.File
}

func (g *guest) emit(ev proto.Event) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.events == nil {
		return
	}
	b, _ := json.Marshal(ev)
	g.events.Write(append(b, '\n'))
}

func (g *guest) run() error {
	if err := mountBasics(); err != nil {
		return err
	}
	ports, err := findPorts(2 * time.Second)
	if err != nil {
		return err
	}
	if g.events, err = os.OpenFile(ports[proto.PortEvents], os.O_WRONLY, 0); err != nil {
		return fmt.Errorf("opening events port: %w", err)
	}
	ctl, err := os.OpenFile(ports[proto.PortCtl], os.O_RDONLY, 0)
	if err != nil {
		return fmt.Errorf("opening control port: %w", err)
	}
	if err := loadModules("/" + proto.ModulesDir); err != nil {
		return err
	}
	// A template boots with the kernel's messages on its console, so a
	// hang shows where; its restored copies keep only warnings, as
	// "quiet" would have.
	os.WriteFile("/proc/sys/kernel/printk", []byte("4"), 0)
	g.emit(proto.Event{Kind: proto.EvReady})

	// A snapshot may be taken here; everything below runs in the restored
	// copy with its own identity.
	in := bufio.NewReader(ctl)
	var a proto.Assignment
	var p prepared
	warmed := false
	for {
		a = proto.Assignment{}
		// A pool holds its warmed VMs' control connections open until
		// it hands them to a task: one that closes is a pool that died
		// (Nomad kills a plugin, it does not ask it to stop), and
		// nobody will assign this VM.
		if err := readJSON(in, &a, time.Millisecond, warmed); err != nil {
			if err == io.EOF {
				return errors.New("the pool that warmed this vm is gone; powering off")
			}
			return fmt.Errorf("reading assignment: %w", err)
		}
		if a.Warm {
			if err := warm(&a, &p); err != nil {
				return fmt.Errorf("warming up: %w", err)
			}
			warmed = true
			g.emit(proto.Event{Kind: proto.EvWarmed})
			continue
		}
		// A command that reaches a VM still waiting for its assignment
		// (sent by a driver that lost track of it) is not an assignment.
		if a.Program != "" {
			break
		}
	}
	if err := apply(&a, &p); err != nil {
		return err
	}
	g.emit(proto.Event{Kind: proto.EvAssigned})

	cmds := make(chan proto.Command, 16)
	go func() {
		for {
			var c proto.Command
			if err := readJSON(in, &c, 50*time.Millisecond, false); err != nil {
				// A line cut short (a host connection that broke mid-
				// write) runs into the next one: skip what does not
				// parse.
				var se *json.SyntaxError
				var te *json.UnmarshalTypeError
				if errors.As(err, &se) || errors.As(err, &te) {
					fmt.Fprintf(console, "cohort init: skipping a command that does not parse: %v\n", err)
					continue
				}
				close(cmds)
				return
			}
			// Every command that carries the host's clock (the clock
			// command, the release) steps ours forward when it is
			// behind, before anything acts on the command; one without
			// carries 0.
			correctClock(c.UnixNano)
			cmds <- c
		}
	}()
	if a.Barrier {
		released := false
		for c := range cmds {
			if c.Kind == proto.CmdRelease {
				if err := writeHosts(&a, c.Hosts); err != nil {
					// The names still resolve through DNS.
					fmt.Fprintf(console, "cohort init: %v\n", err)
				}
				released = true
				break
			}
		}
		if !released {
			// Never run a gang's worker that was not released.
			return errors.New("the control port failed before the start barrier released this worker")
		}
	}
	return g.runProgram(&a, ports, cmds)
}

func (g *guest) runProgram(a *proto.Assignment, ports map[string]string, cmds <-chan proto.Command) error {
	stdout, err := os.OpenFile(ports[proto.PortStdout], os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("opening stdout port: %w", err)
	}
	stderr, err := os.OpenFile(ports[proto.PortStderr], os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("opening stderr port: %w", err)
	}
	cmd := exec.Command(a.Program, a.Args...)
	cmd.Env = a.Env
	cmd.Dir = a.Dir
	if cmd.Dir == "" {
		cmd.Dir = "/"
	}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	// Its own process group, so a forwarded signal reaches the program and
	// whatever it started.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(stderr, "cohort: cannot start %s: %v\n", a.Program, err)
		g.emit(proto.Event{Kind: proto.EvError, Message: fmt.Sprintf("starting %s: %v", a.Program, err)})
		return nil
	}
	pid := cmd.Process.Pid
	g.emit(proto.Event{Kind: proto.EvStarted, PID: pid})

	go func() {
		for c := range cmds {
			if c.Kind == proto.CmdSignal && c.Signal > 0 {
				unix.Kill(-pid, unix.Signal(c.Signal))
			}
		}
	}()

	// As PID 1 we reap every orphan; only the program's own status counts.
	var ws unix.WaitStatus
	for {
		wpid, err := unix.Wait4(-1, &ws, 0, nil)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("waiting for the program: %w", err)
		}
		if wpid == pid {
			break
		}
	}
	unix.Kill(-1, unix.SIGKILL) // nothing outlives the program
	ev := proto.Event{Kind: proto.EvExited}
	switch {
	case ws.Exited():
		ev.ExitCode = ws.ExitStatus()
	case ws.Signaled():
		ev.Signal = int(ws.Signal())
		ev.ExitCode = 128 + ev.Signal
	}
	stdout.Sync()
	stderr.Sync()
	g.emit(ev)
	// What the program sent before it exited still reaches its peers.
	reapAll(time.Second)
	drainTCP(5 * time.Second)
	return nil
}

// readJSON reads one JSON line. A virtio port reads as EOF while no host
// client is connected (a restored VM's driver connects after the restore),
// so EOF means "not yet", not "never" — unless eofEnds, when it returns
// io.EOF. The wait backs off to maxWait: the assignment is awaited eagerly
// (it is on the start path), commands lazily.
func readJSON(r *bufio.Reader, v any, maxWait time.Duration, eofEnds bool) error {
	var line []byte
	wait := 100 * time.Microsecond
	for {
		part, err := r.ReadBytes('\n')
		line = append(line, part...)
		if err == nil {
			if len(strings.TrimSpace(string(line))) == 0 {
				line = line[:0]
				continue
			}
			return json.Unmarshal(line, v)
		}
		if err != io.EOF {
			return err
		}
		if eofEnds {
			return io.EOF // a partial line included: its writer is gone
		}
		time.Sleep(wait)
		if wait *= 2; wait > maxWait {
			wait = maxWait
		}
	}
}

func mountBasics() error {
	for _, m := range []struct{ src, dst, fs string }{
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
		{"devtmpfs", "/dev", "devtmpfs"},
		{"tmpfs", "/tmp", "tmpfs"},
		{"tmpfs", "/run", "tmpfs"},
	} {
		os.MkdirAll(m.dst, 0o755)
		if err := unix.Mount(m.src, m.dst, m.fs, 0, ""); err != nil && err != unix.EBUSY {
			return fmt.Errorf("mounting %s: %w", m.dst, err)
		}
	}
	return nil
}

// findPorts maps virtio-serial port names to their device nodes.
func findPorts(timeout time.Duration) (map[string]string, error) {
	deadline := time.Now().Add(timeout)
	want := []string{proto.PortCtl, proto.PortEvents, proto.PortStdout, proto.PortStderr}
	for {
		ports := map[string]string{}
		dirs, _ := filepath.Glob("/sys/class/virtio-ports/vport*")
		for _, d := range dirs {
			name, err := os.ReadFile(filepath.Join(d, "name"))
			if err == nil {
				ports[strings.TrimSpace(string(name))] = "/dev/" + filepath.Base(d)
			}
		}
		missing := ""
		for _, w := range want {
			if _, err := os.Stat(ports[w]); ports[w] == "" || err != nil {
				missing = w
			}
		}
		if missing == "" {
			return ports, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("virtio port %q not found", missing)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func powerOff() {
	unix.Sync()
	// Without ACPI a power-off only halts; with reboot=t and QEMU's
	// -no-reboot a reset ends the VM instead.
	unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
	for {
		time.Sleep(time.Hour)
	}
}

// loadModules loads every kernel module in dir, in name order: the
// drivers a VM with passed-through devices needs, packed by the driver
// from its passthrough config. A module that fails to load fails the VM:
// the program would otherwise run without its device.
func loadModules(dir string) error {
	ents, err := os.ReadDir(dir)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("listing kernel modules: %w", err)
	}
	for _, e := range ents {
		f, err := os.Open(dir + "/" + e.Name())
		if err != nil {
			return fmt.Errorf("opening kernel module %s: %w", e.Name(), err)
		}
		err = unix.FinitModule(int(f.Fd()), "", 0)
		f.Close()
		if err != nil && err != unix.EEXIST {
			return fmt.Errorf("loading kernel module %s: %w", e.Name(), err)
		}
	}
	return nil
}
