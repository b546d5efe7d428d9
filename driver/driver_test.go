package driver

import (
	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/driver/guest/proto"
	"github.com/cohort-dev/cohort/jobspec"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
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
	ok := Config{Kernel: "k", Init: "i", Accelerator: "auto", StateDir: "/run/cohort", Network: NetworkConfig{Bridge: "cohort0", Subnet: "10.213.0.0/16",
		Advertise: "192.168.1.5", ConsulDNS: "127.0.0.1:8600", Egress: true, EgressAllow: []string{"0.0.0.0/0"}, Deny: []string{"192.168.1.0/24", "10.0.0.9"}}}
	if err := ok.validate(); err != nil {
		t.Fatal(err)
	}
	pooled := ok
	pooled.Snapshot, pooled.Pool = true, PoolConfig{Size: 4, MemoryMB: 1024}
	if err := pooled.validate(); err != nil {
		t.Fatal(err)
	}
	bad := map[string]func(c *Config){
		"no init":     func(c *Config) { c.Init = "" },
		"accelerator": func(c *Config) { c.Accelerator = "hvf" },
		"long state":  func(c *Config) { c.StateDir = "/" + strings.Repeat("x", 70) },
		"subnet":      func(c *Config) { c.Network.Subnet = "10.0.0.0/33" },
		"tiny subnet": func(c *Config) { c.Network.Subnet = "10.0.0.0/30" },
		"ipv6 subnet": func(c *Config) { c.Network.Subnet = "fd00::/64" },
		"bridge name": func(c *Config) { c.Network.Bridge = "a-bridge-name-too-long" },
		"advertise":   func(c *Config) { c.Network.Advertise = "host.example" },
		"mtu":         func(c *Config) { c.Network.MTU = 100 },
		"consul dns":  func(c *Config) { c.Network.ConsulDNS = "nope" },
		"egress":      func(c *Config) { c.Network.EgressAllow = []string{"everywhere"} },
		"deny":        func(c *Config) { c.Network.Deny = []string{"fd00::/8"} },
		"modules without a kernel": func(c *Config) {
			c.Passthrough = PassthroughConfig{Modules: []string{"/m/nvidia.ko"}}
		},
		"compressed module": func(c *Config) {
			c.Passthrough = PassthroughConfig{Kernel: "/k", Modules: []string{"/m/nvidia.ko.zst"}}
		},
		"pool without snapshots": func(c *Config) { c.Snapshot, c.Pool = false, PoolConfig{Size: 2, MemoryMB: 512} },
		"pool too large":         func(c *Config) { c.Snapshot, c.Pool = true, PoolConfig{Size: 65, MemoryMB: 512} },
		"pool without memory":    func(c *Config) { c.Snapshot, c.Pool = true, PoolConfig{Size: 2, MemoryMB: 10} },
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
	n := &network{cfg: NetworkConfig{Subnet: "10.213.0.0/16"}, subnet: subnet, gw: net.ParseIP("10.213.0.1"), used: map[uint32]*lease{}}
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
	if _, err := exec.LookPath("qemu-system-x86_64"); err == nil && checkStatic("/bin/true", "/bin/true") != nil {
		// Every guest would panic with "No working init found".
		cases["dynamically linked"] = &Config{Kernel: kernel, Init: "/bin/true", StateDir: dir, Accelerator: "auto"}
	}
	for want, cfg := range cases {
		var b []byte
		if err := base.MsgPackEncode(&b, cfg); err != nil {
			t.Fatal(err)
		}
		conf := &base.Config{PluginConfig: b, AgentConfig: &base.AgentConfig{Driver: &base.ClientDriverConfig{}}}
		d := New(hclog.NewNullLogger())
		defer d.Shutdown()
		if err := d.SetConfig(conf); err != nil {
			t.Fatal(err)
		}
		fp := d.fingerprint()
		if fp.Health != drivers.HealthStateUnhealthy || !strings.Contains(fp.HealthDescription, want) {
			t.Errorf("%s missing: health %s %q", want, fp.Health, fp.HealthDescription)
		}
		// A configured instance is not configured again.
		if err := d.SetConfig(conf); err == nil || !strings.Contains(err.Error(), "already configured") {
			t.Errorf("%s: a second SetConfig: %v", want, err)
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

// The firewall keeps workers to the worker range, DNS on their gateway and
// (with egress) the outside world; never a cluster host or a control port.
func TestRuleset(t *testing.T) {
	_, subnet, _ := net.ParseCIDR("10.213.3.0/24")
	_, rng, _ := net.ParseCIDR("10.213.0.0/16")
	n := &network{cfg: NetworkConfig{Bridge: "cohort0", Egress: true, EgressAllow: []string{"0.0.0.0/0", "203.0.113.0/24"}, Deny: []string{"192.168.9.0/24", "192.168.9.7"}},
		servers: []string{"http://192.168.1.1:4747"}, serverIPs: resolveServers([]string{"http://192.168.1.1:4747", "http://127.0.0.1:4747"}), subnet: subnet, rng: rng, gw: net.ParseIP("10.213.3.1"), address: "192.168.1.13",
		peers: []api.Lease{{Address: "192.168.1.11"}, {Address: "192.168.1.12"}}}
	rs := n.ruleset()
	for _, want := range []string{
		"table inet cohort_cohort0 {}\ndelete table inet cohort_cohort0\n",
		"elements = { 169.254.0.0/16, 192.168.1.1/32, 192.168.1.11/32, 192.168.1.12/32, 192.168.1.13/32, 192.168.9.0/24 }",
		`iifname != "cohort0" ip saddr 10.213.0.0/16 drop`,
		`iifname != "cohort0" ip daddr 10.213.3.1 drop`,
		`iifname "cohort0" ip saddr != 10.213.3.0/24 drop`,
		"elements = { 0.0.0.0/0 }",
		`iifname "cohort0" ip daddr 10.213.3.1 udp dport 53 accept`,
		`iifname "cohort0" drop`,
		`oifname "cohort0" ip saddr 10.213.0.0/16 accept`,
		`iifname "cohort0" ip daddr 10.213.0.0/16 accept`,
		`iifname "cohort0" ip daddr @hosts drop`,
		`tcp dport { 22, 4646-4648, 4747-4749, 8300-8302, 8500-8503, 8600 } drop`,
		`iifname "cohort0" ip daddr @egress accept`,
		`ip saddr 10.213.3.0/24 ip daddr != 10.213.0.0/16 oifname != "cohort0" masquerade`,
	} {
		if !strings.Contains(rs, want) {
			t.Errorf("ruleset lacks %q:\n%s", want, rs)
		}
	}
	// The hosts are dropped before egress is accepted.
	if strings.Index(rs, "@hosts drop") > strings.Index(rs, "@egress accept") {
		t.Error("egress is accepted before the cluster's hosts are dropped")
	}
	n.cfg.Egress = false
	rs = n.ruleset()
	if strings.Contains(rs, "masquerade") || strings.Contains(rs, "@egress accept") {
		t.Errorf("egress off still lets workers out:\n%s", rs)
	}
}

// A release's peers are named as the worker's own COHORT_PEERS names them;
// peers of unknown groups or ranks, or with bad addresses, are left out.
func TestGangHosts(t *testing.T) {
	env := jobspec.PeersEnv([]jobspec.GangGroup{{Name: "map", Count: 2, Address: "mr-map"}, {Name: "reduce", Count: 1, Address: "mr-red"}})
	got := gangHosts(env, []api.BarrierPeer{
		{Group: "map", Rank: 0, Address: "10.213.1.2"},
		{Group: "map", Rank: 1, Address: "10.213.2.2"},
		{Group: "reduce", Rank: 0, Address: "10.213.1.3"},
		{Group: "reduce", Rank: 1, Address: "10.213.1.4"},
		{Group: "other", Rank: 0, Address: "10.213.1.5"},
		{Group: "map", Rank: -1, Address: "10.213.1.6"},
		{Group: "map", Rank: 0, Address: "not-an-ip"},
	})
	want := []proto.Host{
		{Name: "w0.mr-map.service.consul", Address: "10.213.1.2"},
		{Name: "w1.mr-map.service.consul", Address: "10.213.2.2"},
		{Name: "w0.mr-red.service.consul", Address: "10.213.1.3"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("gangHosts = %+v, want %+v", got, want)
	}
	if h := gangHosts("not json", []api.BarrierPeer{{Group: "map", Address: "10.213.1.2"}}); h != nil {
		t.Errorf("hosts from a bad COHORT_PEERS: %+v", h)
	}
}

// A worker's hostname is one DNS label that starts with a letter: the
// hosts file only takes such names, and glibc reads an all-digit name as
// an IPv4 address.
func TestHostname(t *testing.T) {
	long := strings.Repeat("x", 80)
	for _, tc := range []struct {
		group, rank, alloc string
		want               string
	}{
		{"sort", "3", "", "sort-3"},
		{"My_Group.A", "0", "", "my-group-a-0"},
		{"7zip", "1", "", "w7zip-1"},
		{"--", "2", "", "w-2"},
		{long, "12", "", strings.Repeat("x", 60) + "-12"},
		{"", "", "12345678-aaaa-bbbb", "alloc-12345678"},
	} {
		cfg := &drivers.TaskConfig{AllocID: tc.alloc, Env: map[string]string{}}
		if tc.rank != "" {
			cfg.Env[jobspec.EnvGroup], cfg.Env[jobspec.EnvRank] = tc.group, tc.rank
		}
		got := hostname(cfg)
		if got != tc.want {
			t.Errorf("hostname(group %q, rank %q) = %q, want %q", tc.group, tc.rank, got, tc.want)
		}
		if len(got) > 63 || got[0] < 'a' || got[0] > 'z' {
			t.Errorf("hostname %q is not one label starting with a letter", got)
		}
	}
}
