package driver

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/driver/vm"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/plugins/drivers"
)

// fakeVM runs a process standing in for a VMM and records it in dir as
// the backend records a VM.
func fakeVM(t *testing.T, dir string) (*vm.Machine, <-chan struct{}) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() { cmd.Process.Kill() })
	b, err := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/stat")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b)[strings.LastIndexByte(string(b), ')')+1:])
	start, _ := strconv.ParseUint(f[19], 10, 64)
	m := &vm.Machine{Backend: "qemu", PID: cmd.Process.Pid, StartTime: start, RunDir: dir}
	js, _ := json.Marshal(m)
	if err := os.WriteFile(filepath.Join(dir, vm.RecordFile), js, 0o600); err != nil {
		t.Fatal(err)
	}
	if !m.Alive() {
		t.Fatal("the stand-in vm is not alive")
	}
	return m, done
}

// The collector takes only what nobody owns: a VM still starting (its
// task not stored yet, as during a slow boot or a long assignment) and a
// template being built are left running; a VM a dead instance of the
// plugin recorded, its template included, is stopped and its directory
// removed.
func TestCollectSparesStartsInFlight(t *testing.T) {
	d := New(hclog.NewNullLogger())
	defer d.Shutdown()
	root := t.TempDir()
	starting, _ := fakeVM(t, filepath.Join(root, "a1b2c3d4-worker"))
	building, _ := fakeVM(t, filepath.Join(root, "tmpl-111"))
	d.live.Store(starting.RunDir, struct{}{})
	d.live.Store(building.RunDir, struct{}{})
	// Another instance of the plugin starting a VM holds its owner lock.
	elsewhere, _ := fakeVM(t, filepath.Join(root, "c0ffee00-worker"))
	unlock, err := lockOwner(elsewhere.RunDir, true)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	orphan, orphanGone := fakeVM(t, filepath.Join(root, "e5f6a7b8-worker"))
	deadTemplate, templateGone := fakeVM(t, filepath.Join(root, "tmpl-222"))
	os.MkdirAll(filepath.Join(root, "no-record"), 0o700)

	d.collect(root)

	for _, m := range []*vm.Machine{starting, building, elsewhere} {
		if !m.Alive() {
			t.Errorf("%s was stopped while in flight", filepath.Base(m.RunDir))
		}
		if _, err := os.Stat(m.RunDir); err != nil {
			t.Errorf("%s was removed while in flight", filepath.Base(m.RunDir))
		}
	}
	for _, c := range []struct {
		m    *vm.Machine
		gone <-chan struct{}
	}{{orphan, orphanGone}, {deadTemplate, templateGone}} {
		select {
		case <-c.gone:
		case <-time.After(5 * time.Second):
			t.Errorf("%s still runs", filepath.Base(c.m.RunDir))
		}
		if _, err := os.Stat(c.m.RunDir); err == nil {
			t.Errorf("%s left behind", filepath.Base(c.m.RunDir))
		}
	}
	if _, err := os.Stat(filepath.Join(root, "no-record")); err == nil {
		t.Error("a run directory without a record left behind")
	}
}

// A task recovered from a handle saved with its run directory reached
// through a symlink (a state_dir under /var/run, before state_dir was
// resolved at setup) still owns its directory: the collector, which
// lists resolved paths, leaves its VM running.
func TestCollectSparesRecoveredTaskThroughSymlink(t *testing.T) {
	d := New(hclog.NewNullLogger())
	defer d.Shutdown()
	base := t.TempDir()
	root := filepath.Join(base, "run")
	m, _ := fakeVM(t, filepath.Join(root, "a1b2c3d4-worker"))
	if err := os.Symlink(base, filepath.Join(base, "link")); err != nil {
		t.Fatal(err)
	}
	saved := *m
	saved.RunDir = filepath.Join(base, "link", "run", "a1b2c3d4-worker")
	handle := drivers.NewTaskHandle(taskHandleVersion)
	handle.Config = &drivers.TaskConfig{ID: "a1b2c3d4/worker/1", Name: "worker"}
	if err := handle.SetDriverState(&taskState{Machine: saved}); err != nil {
		t.Fatal(err)
	}
	if err := d.RecoverTask(handle); err != nil {
		t.Fatal(err)
	}
	d.collect(root)
	if !m.Alive() {
		t.Error("the recovered task's vm was stopped as an orphan")
	}
	if _, err := os.Stat(m.RunDir); err != nil {
		t.Error("the recovered task's run directory was removed")
	}
}

// TestGuestThatNeverPowersOff: a worker whose program exited but whose
// guest stays up is stopped after the grace period, and the task ends
// with the program's exit status, not as killed.
func TestGuestThatNeverPowersOff(t *testing.T) {
	defer func(g time.Duration) { powerOffGrace = g }(powerOffGrace)
	powerOffGrace = 200 * time.Millisecond
	d := New(hclog.NewNullLogger())
	defer d.Shutdown()
	m, gone := fakeVM(t, filepath.Join(t.TempDir(), "a1b2c3d4-worker"))
	if err := os.WriteFile(m.EventsLog(), []byte(`{"kind":"started","pid":1}`+"\n"+`{"kind":"exited","exit_code":3}`+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	h := newTaskHandle(d, &drivers.TaskConfig{ID: "t", Name: "worker", AllocID: "a1b2c3d4"}, m, nil)
	go h.run()
	select {
	case <-h.done:
	case <-time.After(10 * time.Second):
		t.Fatal("the task did not end while its guest stayed up after the program exited")
	}
	select {
	case <-gone:
	case <-time.After(5 * time.Second):
		t.Fatal("the vm still runs after its task ended")
	}
	if r := h.exitResult(); r == nil || r.ExitCode != 3 || r.Signal != 0 || r.Err != nil {
		t.Fatalf("exit result %+v, want the program's status 3", r)
	}
}
