package vm

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// A VMM that has exited is not alive in either state the kernel shows
// before /proc forgets it: a zombie, and a process its parent is reaping.
// Treating the second as alive once made Kill then Wait then Alive report a
// VM still running.
func TestRunningStates(t *testing.T) {
	for state, want := range map[string]bool{
		"R": true, "S": true, "D": true, "T": true, "t": true, "I": true,
		"Z": false, "X": false, "x": false,
	} {
		if got := running(state); got != want {
			t.Errorf("running(%q) = %v, want %v", state, got, want)
		}
	}
}

// Alive follows a real process from running to a zombie nobody reaps.
func TestAliveThroughExit(t *testing.T) {
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	st, _, err := procStat(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	m := &Machine{PID: cmd.Process.Pid, StartTime: st}
	if !m.Alive() {
		t.Fatal("a running process is not alive")
	}
	if err := m.Kill(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := m.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	// Not reaped yet: the process is a zombie.
	if _, state, err := procStat(m.PID); err != nil || state != "Z" {
		t.Fatalf("state = %q (%v), want a zombie", state, err)
	}
	if m.Alive() {
		t.Error("a zombie is alive")
	}
	var ws unix.WaitStatus
	if _, err := unix.Wait4(m.PID, &ws, 0, nil); err != nil {
		t.Fatal(err)
	}
	if m.Alive() {
		t.Error("a reaped process is alive")
	}
}

// A shape's build follows the kernel's contents, not only its path (an
// install replaces the kernel in place), and a template's key begins
// with it.
func TestShapeBuild(t *testing.T) {
	a := Shape{Kernel: "/opt/cohort/vmlinux", KernelDigest: "aaaa", Initrd: "/s/initrd-1.gz", MemoryMB: 128, VCPUs: 1, Accel: "tcg"}
	b := a
	b.KernelDigest = "bbbb"
	if a.Build() == b.Build() {
		t.Error("a kernel replaced at the same path kept the build")
	}
	c := a
	c.MemoryMB = 256
	if a.Build() != c.Build() || !strings.HasPrefix(c.Key(), c.Build()+"-") || a.Key() == c.Key() {
		t.Errorf("shapes of one build: %s %s", a.Key(), c.Key())
	}
}
