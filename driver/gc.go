package driver

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/cohort-dev/cohort/driver/vm"
)

// orphanGrace is how long after start-up the driver waits for Nomad to
// recover its tasks before it treats unclaimed VMs as orphans.
const orphanGrace = 90 * time.Second

// writeMachine records a VM in its run directory, so that a VM whose task
// Nomad never learned of (the plugin died inside StartTask) can still be
// found and stopped.
func writeMachine(m *vm.Machine) error {
	b, _ := json.Marshal(m)
	if err := os.WriteFile(filepath.Join(m.RunDir, "machine.json"), b, 0o600); err != nil {
		return fmt.Errorf("recording vm: %w", err)
	}
	return nil
}

// collectOrphans waits out the recovery grace period, then stops every VM
// and removes every run directory and tap that no task owns.
func (d *Driver) collectOrphans(runRoot string) {
	select {
	case <-d.ctx.Done():
		return
	case <-time.After(orphanGrace):
	}
	owned := map[string]bool{}
	taps := map[string]bool{}
	d.tasks.Range(func(_, v any) bool {
		h := v.(*taskHandle)
		owned[h.m.RunDir] = true
		if h.lease != nil {
			taps[h.lease.Tap] = true
		}
		return true
	})
	dirs, _ := filepath.Glob(filepath.Join(runRoot, "*"))
	for _, dir := range dirs {
		if owned[dir] {
			continue
		}
		var m vm.Machine
		if b, err := os.ReadFile(filepath.Join(dir, "machine.json")); err == nil && json.Unmarshal(b, &m) == nil && m.Alive() {
			d.log.Warn("stopping orphaned worker vm", "pid", m.PID, "dir", dir)
			m.Kill()
		}
		os.RemoveAll(dir)
	}
	if d.net == nil {
		return
	}
	all, err := d.net.Taps()
	if err != nil {
		d.log.Warn("listing taps", "error", err)
		return
	}
	for _, t := range all {
		if !taps[t] {
			if idx, ok := tapIndex(t); ok {
				d.log.Warn("removing orphaned tap", "tap", t)
				d.net.release(d.net.leaseFor(idx))
			}
		}
	}
}
