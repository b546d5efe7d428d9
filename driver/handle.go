package driver

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/cohort-dev/cohort/driver/guest/proto"
	"github.com/cohort-dev/cohort/driver/vm"
	cstructs "github.com/hashicorp/nomad/client/structs"
	"github.com/hashicorp/nomad/plugins/drivers"
)

// taskHandle is one running (or finished) worker VM.
type taskHandle struct {
	d     *Driver
	cfg   *drivers.TaskConfig
	m     *vm.Machine
	lease *lease
	done  chan struct{}
	// assigned closes when the guest has taken its assignment.
	assigned     chan struct{}
	assignedOnce sync.Once

	// sendMu keeps commands whole and in order on the control
	// connection.
	sendMu sync.Mutex

	mu        sync.Mutex
	ctl       *vm.Ctl
	startedAt time.Time
	// startTook is how long StartTask took to start the VM (0 after a
	// recovery), reported at the barrier for the servers' metrics.
	startTook   time.Duration
	completedAt time.Time
	snapshot    bool
	pooled      bool // taken from the warm pool
	result      *drivers.ExitResult
	killedBy    int // signal the driver used to end the VM, if it had to
	cleaned     bool
	started     bool   // the guest reported the program running
	abortReason string // why the start barrier ended the worker
}

func newTaskHandle(d *Driver, cfg *drivers.TaskConfig, m *vm.Machine, ls *lease) *taskHandle {
	return &taskHandle{d: d, cfg: cfg, m: m, lease: ls, done: make(chan struct{}), assigned: make(chan struct{})}
}

// conn returns the control connection, dialing it after a recovery. The
// dial runs outside h.mu (it may take seconds, and status, kill and the
// event loop take h.mu), and never once the plugin is shutting down: the
// guest serves one connection at a time, and one made after detach would
// hold the port against the next instance of the plugin.
func (h *taskHandle) conn() (*vm.Ctl, error) {
	h.mu.Lock()
	c := h.ctl
	h.mu.Unlock()
	if c != nil {
		return c, nil
	}
	if err := h.d.ctx.Err(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(h.d.ctx, 5*time.Second)
	defer cancel()
	c, err := h.m.DialCtl(ctx)
	if err != nil {
		return nil, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.d.ctx.Err() != nil || h.ctl != nil {
		c.Close()
		if h.ctl != nil {
			return h.ctl, nil
		}
		return nil, h.d.ctx.Err()
	}
	h.ctl = c
	return c, nil
}

// send writes v to the guest. Callers are serialised (sendMu): the
// assignment, the release, signals and the clock come from different
// goroutines.
func (h *taskHandle) send(v any) error {
	return h.sendStamped(v, nil)
}

// sendStamped is send, with stamp run just before the write: a command
// that carries the host's clock takes it then, not before a wait for the
// connection or for another sender.
func (h *taskHandle) sendStamped(v any, stamp func()) error {
	h.sendMu.Lock()
	defer h.sendMu.Unlock()
	c, err := h.conn()
	if err != nil {
		return err
	}
	if stamp != nil {
		stamp()
	}
	if err := c.Send(v); err != nil {
		// Drop a broken connection so the next call dials again.
		h.mu.Lock()
		if h.ctl == c {
			h.ctl.Close()
			h.ctl = nil
		}
		h.mu.Unlock()
		return err
	}
	return nil
}

// sendClock sends the host's clock of the moment it is written.
func (h *taskHandle) sendClock() {
	c := &proto.Command{Kind: proto.CmdClock}
	if err := h.sendStamped(c, func() { c.UnixNano = time.Now().UnixNano() }); err != nil {
		h.d.log.Debug("sending the clock to a worker vm", "task", h.cfg.Name, "error", err)
	}
}

// assign hands the guest its assignment and waits until the guest has
// taken it. Until then the assignment only sits in a socket buffer, which
// dies with this process: returning earlier could lose it to a plugin
// restart, leaving a VM that never runs its program.
func (h *taskHandle) assign(a *proto.Assignment, timeout time.Duration) error {
	if err := h.send(a); err != nil {
		return err
	}
	select {
	case <-h.assigned:
		return nil
	case <-h.done:
		if r := h.exitResult(); r != nil && r.Err != nil {
			return fmt.Errorf("worker vm failed before its program started: %w", r.Err)
		}
		return errors.New("worker vm stopped before taking its assignment")
	case <-time.After(timeout):
		return fmt.Errorf("worker vm did not take its assignment within %s; last console lines:\n%s", timeout, h.m.ConsoleTail(15))
	}
}

// powerOffGrace is how long a guest has to power off once its program
// exited: it first lets its TCP connections deliver what they hold, for
// about 6 s at most.
var powerOffGrace = 15 * time.Second

// run follows the VM's events until it powers off, then records the
// result. A VM that ends without reporting its program's exit (a kernel
// panic, a VMM crash) fails the task with its console's last lines.
func (h *taskHandle) run() {
	// The guest's files stay bounded for as long as the VM runs.
	go h.m.Guard(h.d.ctx, vm.Limits{}, func(why string) {
		h.d.log.Warn("worker flooded its event channel; killing it", "task", h.cfg.Name, "alloc", h.cfg.AllocID)
		h.event("Killed: " + why)
		h.killFor(why)
	})
	var exited, failed *proto.Event
	var powerOff *time.Timer
	defer func() {
		if powerOff != nil {
			powerOff.Stop()
		}
	}()
	for ev := range h.m.Events(h.d.ctx) {
		ev := ev
		switch ev.Kind {
		case proto.EvAssigned:
			h.assignedOnce.Do(func() { close(h.assigned) })
			// The assignment's time is as old as the VM took to read
			// it; this one is read at once.
			go h.sendClock()
		case proto.EvStarted:
			h.mu.Lock()
			h.started = true
			h.mu.Unlock()
			h.d.log.Trace("worker program started", "task", h.cfg.Name, "after", time.Since(h.startedAt))
		case proto.EvExited:
			h.assignedOnce.Do(func() { close(h.assigned) })
			exited = &ev
			// The task ends when the VM does, and Nomad (and the bill)
			// counts it running until then: a guest that never powers
			// off after its program ended is stopped here, its exit
			// status kept.
			if powerOff == nil {
				grace := powerOffGrace
				powerOff = time.AfterFunc(grace, func() {
					if h.d.ctx.Err() != nil {
						return // shutting down: the VM stays for recovery
					}
					h.d.log.Warn("worker vm did not power off after its program exited; stopping it",
						"task", h.cfg.Name, "alloc", h.cfg.AllocID, "after", grace)
					h.event(fmt.Sprintf("Stopped: the VM did not power off within %s of its program's exit", grace))
					h.m.Kill()
				})
			}
		case proto.EvError:
			failed = &ev
		}
	}
	if h.d.ctx.Err() != nil {
		h.detach() // the plugin is shutting down; the VM stays for recovery
		return
	}
	h.m.Wait(h.d.ctx)
	if h.d.ctx.Err() != nil {
		h.detach()
		return
	}
	res := &drivers.ExitResult{}
	h.mu.Lock()
	killedBy, aborted := h.killedBy, h.abortReason
	h.mu.Unlock()
	switch {
	case aborted != "":
		res.ExitCode, res.Signal = 128+killedBy, killedBy
		res.Err = errors.New(aborted)
	case exited != nil:
		res.ExitCode, res.Signal = exited.ExitCode, exited.Signal
	case failed != nil:
		res.ExitCode = 1
		res.Err = errors.New(failed.Message)
	case killedBy != 0:
		res.ExitCode, res.Signal = 128+killedBy, killedBy
	default:
		res.ExitCode = 1
		res.Err = fmt.Errorf("worker vm stopped without reporting an exit status; last console lines:\n%s", h.m.ConsoleTail(15))
	}
	h.mu.Lock()
	h.result = res
	h.completedAt = time.Now()
	if h.ctl != nil {
		h.ctl.Close()
		h.ctl = nil
	}
	h.mu.Unlock()
	close(h.done)
}

// detach lets go of the VM's control connection, which takes one client
// at a time: the next instance of the plugin recovers the task and dials
// it.
func (h *taskHandle) detach() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ctl != nil {
		h.ctl.Close()
		h.ctl = nil
	}
}

func (h *taskHandle) running() bool {
	select {
	case <-h.done:
		return false
	default:
		return true
	}
}

func (h *taskHandle) exitResult() *drivers.ExitResult {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.result.Copy()
}

func (h *taskHandle) signal(sig int) error {
	if !h.running() {
		return errors.New("task is not running")
	}
	return h.send(proto.Command{Kind: proto.CmdSignal, Signal: sig})
}

// stop asks the program to end with signal, then ends the VM after timeout.
func (h *taskHandle) stop(timeout time.Duration, signal string) error {
	if !h.running() {
		return nil
	}
	num, err := signalNumber(signal)
	if err != nil {
		return err
	}
	if !h.programStarted() {
		// Waiting at the start barrier: there is no program to signal.
		timeout = 0
	} else if err := h.signal(num); err != nil {
		h.d.log.Warn("could not signal worker program; killing its vm", "task", h.cfg.Name, "error", err)
		timeout = 0
	}
	select {
	case <-h.done:
		return nil
	case <-time.After(timeout):
	}
	h.kill()
	select {
	case <-h.done:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("worker vm (pid %d) did not exit after kill", h.m.PID)
	}
}

func (h *taskHandle) kill() { h.killWith(9) }

func (h *taskHandle) killWith(sig int) {
	h.mu.Lock()
	if h.killedBy == 0 {
		h.killedBy = sig
	}
	h.mu.Unlock()
	h.m.Kill()
}

func (h *taskHandle) programStarted() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.started
}

// cleanup releases what the VM held on the host: its tap, its address and
// its run directory.
func (h *taskHandle) cleanup() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.cleaned {
		return
	}
	h.cleaned = true
	if h.lease != nil && h.d.net != nil {
		h.d.net.release(h.lease)
	}
	h.d.removeRunDir(h.m.RunDir)
}

func (h *taskHandle) status() *drivers.TaskStatus {
	h.mu.Lock()
	defer h.mu.Unlock()
	st := &drivers.TaskStatus{
		ID:          h.cfg.ID,
		Name:        h.cfg.Name,
		State:       drivers.TaskStateRunning,
		StartedAt:   h.startedAt,
		CompletedAt: h.completedAt,
		DriverAttributes: map[string]string{
			"pid":      fmt.Sprint(h.m.PID),
			"snapshot": fmt.Sprint(h.snapshot),
		},
	}
	if h.result != nil {
		st.State = drivers.TaskStateExited
		st.ExitResult = h.result.Copy()
	}
	if h.lease != nil {
		st.NetworkOverride = &drivers.DriverNetwork{IP: h.lease.IP, AutoAdvertise: true}
	}
	return st
}

// stats samples the VMM process: its CPU time and resident memory are what
// the worker costs the node.
func (h *taskHandle) stats(ctx context.Context, interval time.Duration) <-chan *cstructs.TaskResourceUsage {
	ch := make(chan *cstructs.TaskResourceUsage)
	go func() {
		defer close(ch)
		var prev vm.Usage
		var prevAt time.Time
		t := time.NewTimer(0)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-h.done:
				return
			case <-t.C:
				t.Reset(interval)
			}
			u, err := h.m.Usage()
			if err != nil {
				return
			}
			now := time.Now()
			pct := 0.0
			if !prevAt.IsZero() {
				busy := float64((u.UserNs + u.SystemNs) - (prev.UserNs + prev.SystemNs))
				pct = 100 * busy / float64(now.Sub(prevAt))
			}
			prev, prevAt = u, now
			usage := &cstructs.TaskResourceUsage{
				Timestamp: now.UnixNano(),
				ResourceUsage: &cstructs.ResourceUsage{
					MemoryStats: &cstructs.MemoryStats{RSS: u.RSSBytes, Measured: []string{"RSS"}},
					CpuStats: &cstructs.CpuStats{
						UserMode:   float64(u.UserNs) / 1e6,
						SystemMode: float64(u.SystemNs) / 1e6,
						Percent:    pct,
						Measured:   []string{"System Mode", "User Mode", "Percent"},
					},
				},
			}
			select {
			case ch <- usage:
			case <-ctx.Done():
				return
			}
		}
	}()
	return ch
}
