package driver

// The driver tested the way Nomad's own drivers are: through the plugin's
// gRPC boundary (go-plugin's in-process connection, as Nomad's
// testutils.DriverHarness sets it up), with a real VM: start, inspect,
// wait, signal, stop, destroy, and recovery of a running task by a new
// instance of the plugin. Nomad's harness package itself is not used: it
// brings Docker's and runc's modules and makes cgroups under
// /sys/fs/cgroup, which nothing here needs.

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/driver/vm/vmtest"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"
	"github.com/hashicorp/nomad/nomad/structs"
	"github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/drivers"
)

// pluginInstance serves d over gRPC and returns the client Nomad's agent
// would hold, configured as a node's agent configures it.
func pluginInstance(t *testing.T, d *Driver, conf *Config) drivers.DriverPlugin {
	t.Helper()
	log := hclog.New(&hclog.LoggerOptions{Name: "plugin", Level: hclog.Warn, Output: testLogWriter{t}})
	client, server := plugin.TestPluginGRPCConn(t, map[string]plugin.Plugin{
		base.PluginTypeDriver: drivers.NewDriverPlugin(d, log),
		base.PluginTypeBase:   &base.PluginBase{Impl: d},
	})
	t.Cleanup(func() {
		client.Close()
		server.Stop()
	})
	raw, err := client.Dispense(base.PluginTypeDriver)
	if err != nil {
		t.Fatal(err)
	}
	dp := raw.(drivers.DriverPlugin)
	var b []byte
	if err := base.MsgPackEncode(&b, conf); err != nil {
		t.Fatal(err)
	}
	if err := dp.SetConfig(&base.Config{PluginConfig: b, AgentConfig: &base.AgentConfig{Driver: &base.ClientDriverConfig{}}}); err != nil {
		t.Fatal(err)
	}
	return dp
}

type testLogWriter struct{ t *testing.T }

func (w testLogWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// harnessTask is a task with the directories Nomad's client makes for it.
func harnessTask(t *testing.T, id string, args ...string) *drivers.TaskConfig {
	t.Helper()
	a := vmtest.Get(t)
	allocID := fmt.Sprintf("%08x-0000-4000-8000-000000000000", time.Now().UnixNano()&0xffffffff)
	cfg := &drivers.TaskConfig{
		ID: allocID + "/worker/" + id, AllocID: allocID, Name: "worker", JobName: "harness",
		AllocDir: t.TempDir(),
		Resources: &drivers.Resources{NomadResources: &structs.AllocatedTaskResources{
			Memory: structs.AllocatedMemoryResources{MemoryMB: 128}}},
	}
	td := cfg.TaskDir()
	for _, dir := range []string{td.LocalDir, td.SecretsDir, td.LogDir} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cfg.StdoutPath = filepath.Join(td.LogDir, "worker.stdout")
	cfg.StderrPath = filepath.Join(td.LogDir, "worker.stderr")
	if err := cfg.EncodeConcreteDriverConfig(&TaskConfig{Program: a.Worker, Args: args, VCPUs: 1}); err != nil {
		t.Fatal(err)
	}
	return cfg
}

func harnessConfig(t *testing.T) *Config {
	a := vmtest.Get(t)
	// Short: the VMs' socket paths live under it.
	state, err := os.MkdirTemp("/run", "cohort-harness-")
	if err != nil {
		t.Skipf("no /run to keep VM sockets in: %v", err)
	}
	t.Cleanup(func() { removeRunDir(state) }) // unmounts first: pooled VMs mount under it
	return &Config{Kernel: a.Kernel, Init: a.Init, StateDir: state, Accelerator: "auto"}
}

func waitExit(t *testing.T, dp drivers.DriverPlugin, id string, within time.Duration) *drivers.ExitResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	ch, err := dp.WaitTask(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case res := <-ch:
		return res
	case <-ctx.Done():
		t.Fatalf("task %s did not exit within %s", id, within)
		return nil
	}
}

// Start, inspect, wait and read the exit code; a program that exits at
// once; then destroy, which leaves no VM and no run directory.
func TestPluginStartWaitDestroy(t *testing.T) {
	conf := harnessConfig(t)
	d := New(hclog.NewNullLogger())
	defer d.Shutdown()
	dp := pluginInstance(t, d, conf)
	task := harnessTask(t, "exit", "exit", "3")
	handle, _, err := dp.StartTask(task)
	if err != nil {
		t.Fatalf("StartTask: %v", err)
	}
	res := waitExit(t, dp, task.ID, time.Minute)
	if res.ExitCode != 3 || res.Err != nil {
		t.Errorf("exit result %+v, want exit code 3", res)
	}
	st, err := dp.InspectTask(task.ID)
	if err != nil || st.State != drivers.TaskStateExited || st.ExitResult.ExitCode != 3 {
		t.Errorf("InspectTask = %+v, %v", st, err)
	}
	out, _ := os.ReadFile(task.StdoutPath)
	if !strings.Contains(string(out), "hello from the worker on stdout") {
		t.Errorf("stdout: %q", out)
	}
	var ts taskState
	if err := handle.GetDriverState(&ts); err != nil {
		t.Fatal(err)
	}
	if err := dp.DestroyTask(task.ID, false); err != nil {
		t.Fatalf("DestroyTask: %v", err)
	}
	if ts.Machine.Alive() {
		t.Error("the VM outlived DestroyTask")
	}
	if _, err := os.Stat(ts.Machine.RunDir); err == nil {
		t.Error("DestroyTask left the run directory")
	}
	if _, err := dp.InspectTask(task.ID); err == nil {
		t.Error("a destroyed task is still known")
	}
}

// A running task outlives its plugin: a new instance recovers it from its
// handle, signals it, sees it exit, and destroys it; StopTask ends another.
func TestPluginRecoverSignalStop(t *testing.T) {
	conf := harnessConfig(t)
	d1 := New(hclog.NewNullLogger())
	dp1 := pluginInstance(t, d1, conf)
	sleeper := harnessTask(t, "sleep", "sleep")
	handle, _, err := dp1.StartTask(sleeper)
	if err != nil {
		t.Fatalf("StartTask: %v", err)
	}
	stopped := harnessTask(t, "stop", "sleep")
	handle2, _, err := dp1.StartTask(stopped)
	if err != nil {
		t.Fatalf("StartTask: %v", err)
	}
	// The plugin goes away (an agent restart); its VMs run on.
	d1.Shutdown()

	d2 := New(hclog.NewNullLogger())
	defer d2.Shutdown()
	dp2 := pluginInstance(t, d2, conf)
	for _, h := range []*drivers.TaskHandle{handle, handle2} {
		if err := dp2.RecoverTask(h); err != nil {
			t.Fatalf("RecoverTask: %v", err)
		}
	}
	if st, err := dp2.InspectTask(sleeper.ID); err != nil || st.State != drivers.TaskStateRunning {
		t.Fatalf("recovered task: %+v, %v", st, err)
	}
	if err := dp2.SignalTask(sleeper.ID, "SIGTERM"); err != nil {
		t.Fatalf("SignalTask: %v", err)
	}
	if res := waitExit(t, dp2, sleeper.ID, time.Minute); res.Signal != 15 && res.ExitCode == 0 {
		t.Errorf("after SIGTERM: %+v", res)
	}
	if err := dp2.StopTask(stopped.ID, 5*time.Second, "SIGINT"); err != nil {
		t.Fatalf("StopTask: %v", err)
	}
	waitExit(t, dp2, stopped.ID, time.Minute)
	for _, id := range []string{sleeper.ID, stopped.ID} {
		if err := dp2.DestroyTask(id, true); err != nil {
			t.Errorf("DestroyTask %s: %v", id, err)
		}
	}
	runs, _ := filepath.Glob(filepath.Join(conf.StateDir, "run", "*"))
	if len(runs) != 0 {
		t.Errorf("run directories left: %v", runs)
	}
}
