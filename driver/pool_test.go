package driver

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

// The warm pool through the plugin's gRPC boundary, with real VMs: a
// first task of a shape makes the pool want it; the next is taken from
// the pool, runs with the task's directories mounted into its shares
// (what it writes lands in the task's own directory) and its output in
// the task's log files; destroying it unmounts and removes its run
// directory but not the task's files; VMs still waiting when their
// plugin dies power themselves off.
func TestPluginPooledStart(t *testing.T) {
	conf := harnessConfig(t)
	conf.Snapshot = true
	conf.Pool = PoolConfig{Size: 1, MemoryMB: 512}
	d := New(hclog.NewNullLogger())
	defer d.Shutdown()
	dp := pluginInstance(t, d, conf)
	events, err := dp.TaskEvents(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var messages []string
	go func() {
		for ev := range events {
			mu.Lock()
			messages = append(messages, ev.TaskID+": "+ev.Message)
			mu.Unlock()
		}
	}()

	first := harnessTask(t, "first", "exit", "0")
	if _, _, err := dp.StartTask(first); err != nil {
		t.Fatalf("StartTask: %v", err)
	}
	waitExit(t, dp, first.ID, 2*time.Minute)
	if err := dp.DestroyTask(first.ID, true); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(3 * time.Minute)
	for !strings.HasPrefix(d.pool.status(), "1 ready") {
		if time.Now().After(deadline) {
			t.Fatalf("the pool did not fill: %s; templates %s", d.pool.status(), d.templates.status())
		}
		time.Sleep(100 * time.Millisecond)
	}

	task := harnessTask(t, "pooled", "write", "/local/out.txt", "written in a pooled vm")
	handle, _, err := dp.StartTask(task)
	if err != nil {
		t.Fatalf("StartTask: %v", err)
	}
	if res := waitExit(t, dp, task.ID, time.Minute); res.ExitCode != 0 || res.Err != nil {
		t.Fatalf("exit result %+v; stderr %q", res, readOr(task.StderrPath))
	}
	local := task.TaskDir().LocalDir
	if got := readOr(filepath.Join(local, "out.txt")); got != "written in a pooled vm" {
		t.Errorf("the task's local dir holds %q, want what the worker wrote", got)
	}
	if got := readOr(task.StdoutPath); !strings.Contains(got, "wrote /local/out.txt") {
		t.Errorf("stdout = %q", got)
	}
	if !strings.Contains(d.pool.status(), "1 hits") {
		t.Errorf("pool status %q, want a hit", d.pool.status())
	}
	var ts taskState
	if err := handle.GetDriverState(&ts); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(filepath.Base(ts.Machine.RunDir), "pool-") {
		t.Errorf("the task ran in %s, not a pooled vm", ts.Machine.RunDir)
	}
	mu.Lock()
	sawPool := false
	for _, m := range messages {
		sawPool = sawPool || strings.HasPrefix(m, task.ID+": Worker VM taken from the pool")
	}
	if !sawPool {
		t.Errorf("no task event says the VM came from the pool: %q", messages)
	}
	mu.Unlock()
	if err := dp.DestroyTask(task.ID, false); err != nil {
		t.Fatalf("DestroyTask: %v", err)
	}
	if _, err := os.Stat(ts.Machine.RunDir); err == nil {
		t.Error("DestroyTask left the run directory")
	}
	if got := readOr(filepath.Join(local, "out.txt")); got != "written in a pooled vm" {
		t.Errorf("after DestroyTask the task's file holds %q: removing the run directory reached into the task's", got)
	}
	if mps, _ := mountsUnder(ts.Machine.RunDir); len(mps) != 0 {
		t.Errorf("mounts left under the task's run dir: %v", mps)
	}

	// The pool refills. Nomad kills a plugin rather than stopping it:
	// the waiting VMs' control connections close with its process, and
	// each VM powers itself off; the pool then gives back what it held.
	deadline = time.Now().Add(2 * time.Minute)
	for !strings.HasPrefix(d.pool.status(), "1 ready") {
		if time.Now().After(deadline) {
			t.Fatalf("the pool did not refill: %s", d.pool.status())
		}
		time.Sleep(100 * time.Millisecond)
	}
	d.pool.mu.Lock()
	var waiting []*pooled
	for _, q := range d.pool.ready {
		waiting = append(waiting, q...)
	}
	d.pool.mu.Unlock()
	for _, v := range waiting {
		v.ctl.Close()
	}
	deadline = time.Now().Add(30 * time.Second)
	for _, v := range waiting {
		for v.m.Alive() && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if v.m.Alive() {
			t.Errorf("pooled vm %d lives on without its pool", v.m.PID)
		}
	}
	d.pool.reap()
	d.pool.mu.Lock()
	for _, q := range d.pool.ready {
		for _, v := range q {
			for _, w := range waiting {
				if v == w {
					t.Errorf("a dead vm (pid %d) is still counted as waiting", v.m.PID)
				}
			}
		}
	}
	d.pool.mu.Unlock()
	for _, v := range waiting {
		if _, err := os.Stat(v.m.RunDir); err == nil {
			t.Errorf("a dead pooled vm's run directory is left: %s", v.m.RunDir)
		}
	}
}

func readOr(p string) string {
	b, _ := os.ReadFile(p)
	return string(b)
}
