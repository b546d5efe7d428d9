package driver

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/drivers"
)

func TestCheckStatic(t *testing.T) {
	dir := t.TempDir()
	script := filepath.Join(dir, "run.sh")
	os.WriteFile(script, []byte("#!/bin/sh\necho hi\n"), 0o755)
	noexec := filepath.Join(dir, "data")
	os.WriteFile(noexec, []byte("x"), 0o644)
	cases := map[string]string{
		"/nonexistent": "does not exist",
		dir:            "is a directory",
		script:         "not an ELF executable",
		noexec:         "not executable",
		"/bin/true":    "dynamically linked",
	}
	for path, want := range cases {
		err := checkStatic(path, path)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("checkStatic(%s) = %v, want %q", path, err, want)
		}
	}
}

func TestStageProgram(t *testing.T) {
	task := t.TempDir()
	local := filepath.Join(task, "local")
	os.MkdirAll(local, 0o755)
	if _, err := stageProgram("../escape", task, local); err == nil {
		t.Error("a relative path out of the task dir was accepted")
	}
	if _, err := stageProgram("local/missing", task, local); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Errorf("missing artifact: %v", err)
	}
}

func TestSignalNumber(t *testing.T) {
	for in, want := range map[string]int{"": 15, "SIGINT": 2, "hup": 1, "SIGKILL": 9, "USR1": 10} {
		got, err := signalNumber(in)
		if err != nil || got != want {
			t.Errorf("signalNumber(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	if _, err := signalNumber("SIGNOPE"); err == nil {
		t.Error("unknown signal accepted")
	}
}

func TestConfigValidate(t *testing.T) {
	ok := Config{Kernel: "k", Init: "i", Accelerator: "auto", StateDir: "/run/cohort", Network: NetworkConfig{Subnet: "10.213.0.0/16"}}
	if err := ok.validate(); err != nil {
		t.Fatal(err)
	}
	bad := map[string]func(c *Config){
		"no init":     func(c *Config) { c.Init = "" },
		"accelerator": func(c *Config) { c.Accelerator = "hvf" },
		"long state":  func(c *Config) { c.StateDir = "/" + strings.Repeat("x", 70) },
		"subnet":      func(c *Config) { c.Network.Subnet = "10.0.0.0/33" },
		"tiny subnet": func(c *Config) { c.Network.Subnet = "10.0.0.0/30" },
		"ipv6 subnet": func(c *Config) { c.Network.Subnet = "fd00::/64" },
	}
	for name, mutate := range bad {
		c := ok
		mutate(&c)
		if err := c.validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestLeases(t *testing.T) {
	_, subnet, _ := net.ParseCIDR("10.213.0.0/16")
	n := &network{cfg: NetworkConfig{Subnet: "10.213.0.0/16"}, subnet: subnet, used: map[uint32]bool{}}
	l := n.leaseFor(258)
	if l.IP != "10.213.1.2" || l.Address != "10.213.1.2/16" || l.MAC != "02:cb:0a:d5:01:02" || l.Tap != "ct00000102" {
		t.Errorf("lease = %+v", l)
	}
	if idx, ok := tapIndex(l.Tap); !ok || idx != 258 {
		t.Errorf("tapIndex(%s) = %d, %v", l.Tap, idx, ok)
	}
	if _, ok := tapIndex("eth0"); ok {
		t.Error("a foreign link was taken for a tap")
	}
}

func TestGuestEnv(t *testing.T) {
	cfg := &drivers.TaskConfig{Env: map[string]string{
		"NOMAD_TASK_DIR": "/var/nomad/alloc/x/worker/local",
		"COHORT_RANK":    "3",
	}}
	env := strings.Join(guestEnv(cfg, &lease{IP: "10.213.0.9"}), "\n")
	for _, want := range []string{"NOMAD_TASK_DIR=/local", "COHORT_RANK=3", "COHORT_IP=10.213.0.9", "PATH="} {
		if !strings.Contains(env, want) {
			t.Errorf("env lacks %q:\n%s", want, env)
		}
	}
	if strings.Contains(env, "/var/nomad") {
		t.Errorf("host path leaked into the guest env:\n%s", env)
	}
}

func TestFingerprintUnhealthy(t *testing.T) {
	d := New(hclog.NewNullLogger())
	defer d.Shutdown()
	if fp := d.fingerprint(); fp.Health != drivers.HealthStateUndetected {
		t.Errorf("unconfigured driver health = %s", fp.Health)
	}
	dir := t.TempDir()
	initBin := filepath.Join(dir, "init")
	os.WriteFile(initBin, []byte("init"), 0o755)
	kernel := filepath.Join(dir, "vmlinux")
	os.WriteFile(kernel, []byte("\x00Linux version 6.1.0-test (cohort) #1\x00"), 0o644)
	cases := map[string]*Config{
		"kernel": {Kernel: filepath.Join(dir, "no-vmlinux"), Init: initBin, StateDir: dir, Accelerator: "auto"},
		"qemu":   {Kernel: kernel, Init: initBin, StateDir: dir, Accelerator: "auto", QEMU: "/nonexistent/qemu"},
	}
	for want, cfg := range cases {
		var b []byte
		if err := base.MsgPackEncode(&b, cfg); err != nil {
			t.Fatal(err)
		}
		if err := d.SetConfig(&base.Config{PluginConfig: b}); err != nil {
			t.Fatal(err)
		}
		fp := d.fingerprint()
		if fp.Health != drivers.HealthStateUnhealthy || !strings.Contains(fp.HealthDescription, want) {
			t.Errorf("%s missing: health %s %q", want, fp.Health, fp.HealthDescription)
		}
	}
}

func TestGangTask(t *testing.T) {
	cases := []struct {
		env     map[string]string
		gang    bool
		timeout time.Duration
	}{
		{map[string]string{}, false, 0},
		{map[string]string{"NOMAD_META_cohort_gang": "0"}, false, 0},
		{map[string]string{"NOMAD_META_cohort.gang": "1"}, true, 30 * time.Second},
		{map[string]string{"NOMAD_META_cohort_gang": "1"}, true, 30 * time.Second},
		{map[string]string{"NOMAD_META_COHORT_GANG": "1", "NOMAD_META_COHORT_GANG_TIMEOUT": "45s"}, true, 45 * time.Second},
		{map[string]string{"NOMAD_META_cohort_gang": "1", "NOMAD_META_cohort_gang_timeout": "junk"}, true, 30 * time.Second},
	}
	for _, c := range cases {
		gang, timeout := gangTask(c.env)
		if gang != c.gang || timeout != c.timeout {
			t.Errorf("gangTask(%v) = %v, %s; want %v, %s", c.env, gang, timeout, c.gang, c.timeout)
		}
	}
}
