package driver

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cohort-dev/cohort/driver/vfio"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/nomad/structs"
	"github.com/hashicorp/nomad/plugins/drivers"
)

func passthroughTask(t *testing.T, env, deviceEnv map[string]string) *drivers.TaskConfig {
	t.Helper()
	cfg := &drivers.TaskConfig{
		ID: "a1b2c3d4/worker/0", AllocID: "a1b2c3d4-0000-0000-0000-000000000000", Name: "worker", JobID: "gpu",
		Env: env, DeviceEnv: deviceEnv,
		Resources: &drivers.Resources{NomadResources: &structs.AllocatedTaskResources{Memory: structs.AllocatedMemoryResources{MemoryMB: 256}}},
	}
	if err := cfg.EncodeConcreteDriverConfig(&TaskConfig{Program: "/bin/true", VCPUs: 1}); err != nil {
		t.Fatal(err)
	}
	return cfg
}

// On a host without an IOMMU (every machine here) a task given a device
// fails at once with a sentence saying why, and nothing of it is made:
// no run directory, no VM, no task.
func TestPassthroughRefusedWithoutIOMMU(t *testing.T) {
	if ents, _ := os.ReadDir("/sys/kernel/iommu_groups"); len(ents) > 0 {
		t.Skip("this host has an IOMMU; the refusal is covered on fixtures in driver/vfio")
	}
	d := New(hclog.NewNullLogger())
	defer d.Shutdown()
	state := t.TempDir()
	d.config = &Config{Kernel: "/nonexistent/vmlinux", Init: "/nonexistent/init", StateDir: state}
	d.accel = "tcg"
	_, _, err := d.StartTask(passthroughTask(t, nil, map[string]string{vfio.DevicesEnv: "0000:00:06.0"}))
	if err == nil || !strings.Contains(err.Error(), "passing 0000:00:06.0 through to the worker VM: this host has no IOMMU") {
		t.Fatalf("StartTask = %v", err)
	}
	if ents, _ := os.ReadDir(state); len(ents) != 0 {
		t.Errorf("a refused task left %d entries in the state dir", len(ents))
	}
	n := 0
	d.tasks.Range(func(_, _ any) bool { n++; return true })
	if n != 0 {
		t.Errorf("%d tasks after a refusal", n)
	}
	// A malformed reservation is refused before any host path is read.
	_, _, err = d.StartTask(passthroughTask(t, nil, map[string]string{vfio.DevicesEnv: "../../etc"}))
	if err == nil || !strings.Contains(err.Error(), "not a PCI address") {
		t.Errorf("StartTask = %v", err)
	}
}

// A task config that did not pass through the HCL spec's default (vcpus
// 0) gets one vCPU instead of a refusal; the start goes on to the next
// check (here the program, a script).
func TestZeroVCPUsDefaulted(t *testing.T) {
	d := New(hclog.NewNullLogger())
	defer d.Shutdown()
	d.config = &Config{Kernel: "/nonexistent/vmlinux", Init: "/nonexistent/init", StateDir: t.TempDir()}
	d.accel = "tcg"
	script := filepath.Join(t.TempDir(), "run.sh")
	os.WriteFile(script, []byte("#!/bin/sh\n"), 0o755)
	cfg := passthroughTask(t, nil, nil)
	if err := cfg.EncodeConcreteDriverConfig(&TaskConfig{Program: script}); err != nil {
		t.Fatal(err)
	}
	cfg.AllocDir = t.TempDir()
	_, _, err := d.StartTask(cfg)
	if err == nil || strings.Contains(err.Error(), "vcpus") || !strings.Contains(err.Error(), "not an ELF executable") {
		t.Fatalf("StartTask with vcpus 0 = %v, want it past the vcpus check", err)
	}
}

// prepare refuses a bad task with a sentence saying why, before anything
// of the host is touched: the state directory stays empty.
func TestPrepareRefusals(t *testing.T) {
	d := New(hclog.NewNullLogger())
	defer d.Shutdown()
	state := t.TempDir()
	d.config = &Config{Kernel: "/nonexistent/vmlinux", Init: "/nonexistent/init", StateDir: state}
	d.accel = "tcg"
	for want, mutate := range map[string]func(*drivers.TaskConfig, *TaskConfig){
		"too small for a worker VM": func(c *drivers.TaskConfig, _ *TaskConfig) {
			c.Resources.NomadResources.Memory.MemoryMB = 16
		},
		"vcpus = 65": func(_ *drivers.TaskConfig, tc *TaskConfig) { tc.VCPUs = 65 },
		"no cohort_servers configured": func(c *drivers.TaskConfig, _ *TaskConfig) {
			c.Env = map[string]string{"NOMAD_META_cohort_gang": "1"}
		},
		"not a PCI address": func(c *drivers.TaskConfig, _ *TaskConfig) {
			c.DeviceEnv = map[string]string{vfio.DevicesEnv: "../../etc"}
		},
		"does not exist on this node": func(_ *drivers.TaskConfig, tc *TaskConfig) { tc.Program = "/nonexistent/prog" },
	} {
		cfg := passthroughTask(t, nil, nil)
		tc := TaskConfig{Program: "/bin/true", VCPUs: 1}
		mutate(cfg, &tc)
		if err := cfg.EncodeConcreteDriverConfig(&tc); err != nil {
			t.Fatal(err)
		}
		if _, err := d.prepare(cfg); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("prepare = %v, want %q", err, want)
		}
		if ents, _ := os.ReadDir(state); len(ents) != 0 {
			t.Errorf("refusing %q left %d entries in the state dir", want, len(ents))
		}
	}
}
