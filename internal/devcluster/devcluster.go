// Package devcluster runs a local single-node cluster for development and
// tests: a Consul dev agent and a Nomad agent (server and client) wired to
// it, with a plugin directory holding cohort's plugins.
//
// Stop leaves nothing behind outside the data directory: jobs are stopped,
// the agents exit, task processes the agents orphaned are killed (the
// process calling Start becomes their child subreaper) and mounts under the
// data directory are detached.
package devcluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// Ports are the TCP ports the agents listen on, all on 127.0.0.1.
type Ports struct {
	ConsulHTTP, ConsulDNS, ConsulServer, ConsulSerfLAN, ConsulSerfWAN, ConsulGRPC int
	NomadHTTP, NomadRPC, NomadSerf                                                int
}

// DefaultPorts are the agents' usual ports, so that the nomad and consul
// CLIs work without setting an address.
func DefaultPorts() Ports {
	return Ports{
		ConsulHTTP: 8500, ConsulDNS: 8600, ConsulServer: 8300, ConsulSerfLAN: 8301,
		ConsulSerfWAN: 8302, ConsulGRPC: 8502,
		NomadHTTP: 4646, NomadRPC: 4647, NomadSerf: 4648,
	}
}

// FreePorts picks unused ports, for tests that run beside a dev cluster.
func FreePorts() (Ports, error) {
	ps := make([]int, 9)
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for i := range ps {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return Ports{}, fmt.Errorf("finding a free port: %w", err)
		}
		ls = append(ls, l)
		ps[i] = l.Addr().(*net.TCPAddr).Port
	}
	return Ports{ps[0], ps[1], ps[2], ps[3], ps[4], ps[5], ps[6], ps[7], ps[8]}, nil
}

// Config says where the binaries are and where the cluster keeps its state.
type Config struct {
	DataDir   string
	NomadBin  string
	ConsulBin string
	PluginDir string
	Ports     Ports
	// MicroVM configures the microvm driver plugin; nil leaves it out.
	MicroVM *MicroVM
	Logger  hclog.Logger
}

// MicroVM is what the microvm driver needs from the dev cluster. Its state
// directory and network namespace are named after the Nomad HTTP port, so
// clusters side by side never share them; Stop removes both.
type MicroVM struct {
	Kernel string
	Init   string
	Subnet string // default 10.213.0.0/16
	// CohortServers are the cohort servers' API addresses the driver
	// reports gang workers to at the start barrier.
	CohortServers []string
}

// MicroVMStateDir is the microvm driver's state directory.
func (c *Cluster) MicroVMStateDir() string {
	return fmt.Sprintf("/run/cohort-%d", c.cfg.Ports.NomadHTTP)
}

// MicroVMNetNS is the network namespace the worker VMs live in.
func (c *Cluster) MicroVMNetNS() string { return fmt.Sprintf("cohort-%d", c.cfg.Ports.NomadHTTP) }

func (c *Cluster) pluginConfig() string {
	mv := c.cfg.MicroVM
	if mv == nil {
		return ""
	}
	subnet := mv.Subnet
	if subnet == "" {
		subnet = "10.213.0.0/16"
	}
	return fmt.Sprintf(`
plugin "nomad-driver-microvm" {
  config {
    kernel    = %q
    init      = %q
    state_dir = %q
    cohort_servers = %s
    network {
      subnet = %q
      netns  = %q
      bridge = "cohort0"
    }
  }
}
`, mv.Kernel, mv.Init, c.MicroVMStateDir(), hclList(mv.CohortServers), subnet, c.MicroVMNetNS())
}

func hclList(ss []string) string {
	q := make([]string, len(ss))
	for i, s := range ss {
		q[i] = strconv.Quote(s)
	}
	return "[" + strings.Join(q, ", ") + "]"
}

// Cluster is a running dev cluster.
type Cluster struct {
	cfg     Config
	log     hclog.Logger
	consul  *exec.Cmd
	nomad   *exec.Cmd
	mu      sync.Mutex
	exited  map[*exec.Cmd]chan struct{}
	once    sync.Once
	stopped chan struct{}
}

// NomadAddr is the Nomad HTTP API (and UI) address.
func (c *Cluster) NomadAddr() string {
	return "http://127.0.0.1:" + strconv.Itoa(c.cfg.Ports.NomadHTTP)
}

// ConsulAddr is the Consul HTTP API (and UI) address.
func (c *Cluster) ConsulAddr() string {
	return "http://127.0.0.1:" + strconv.Itoa(c.cfg.Ports.ConsulHTTP)
}

// ConsulDNS is the Consul DNS address.
func (c *Cluster) ConsulDNS() string { return "127.0.0.1:" + strconv.Itoa(c.cfg.Ports.ConsulDNS) }

// Start launches Consul, then Nomad, and returns once Consul has a leader
// and the Nomad node is ready with Consul and its drivers fingerprinted.
func Start(ctx context.Context, cfg Config) (*Cluster, error) {
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.Ports == (Ports{}) {
		cfg.Ports = DefaultPorts()
	}
	for _, dir := range []string{cfg.DataDir, cfg.PluginDir} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("creating %s: %w", dir, err)
		}
	}
	// Task processes outlive the Nomad agent by design (so an agent restart
	// does not kill them); becoming their subreaper lets Stop find them.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return nil, fmt.Errorf("becoming child subreaper: %w", err)
	}
	c := &Cluster{cfg: cfg, log: cfg.Logger, exited: map[*exec.Cmd]chan struct{}{}, stopped: make(chan struct{})}

	if err := c.startConsul(); err != nil {
		c.Stop()
		return nil, err
	}
	if err := c.waitFor(ctx, "consul leader", c.consul, func() (bool, error) {
		var leader string
		err := getJSON(c.ConsulAddr()+"/v1/status/leader", &leader)
		return leader != "", err
	}); err != nil {
		c.Stop()
		return nil, err
	}
	if err := c.startNomad(); err != nil {
		c.Stop()
		return nil, err
	}
	if err := c.waitFor(ctx, "nomad node ready", c.nomad, c.nomadReady); err != nil {
		c.Stop()
		return nil, err
	}
	go c.reap()
	return c, nil
}

// reap collects the task processes (executors, log collectors, VMs) that
// were reparented to us when an agent or plugin exited. Until reaped they
// are zombies, which a restarted agent mistakes for live processes and
// waits on forever. Only zombies outside our own process group are
// reaped: the rest are this program's own children, whose exit status
// belongs to whoever started them; the agents are skipped for the same
// reason.
func (c *Cluster) reap() {
	own := syscall.Getpgrp()
	for {
		select {
		case <-c.stopped:
			return
		case <-time.After(200 * time.Millisecond):
		}
		for _, z := range zombies(os.Getpid()) {
			if z.pgid == own || c.isAgent(z.pid) {
				continue
			}
			var ws syscall.WaitStatus
			syscall.Wait4(z.pid, &ws, syscall.WNOHANG, nil)
		}
	}
}

func (c *Cluster) isAgent(pid int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for cmd := range c.exited {
		if cmd.Process != nil && cmd.Process.Pid == pid {
			return true
		}
	}
	return false
}

func (c *Cluster) startConsul() error {
	p := c.cfg.Ports
	cfg := map[string]any{
		"datacenter":           "dc1",
		"node_name":            "cohort-dev",
		"bind_addr":            "127.0.0.1",
		"client_addr":          "127.0.0.1",
		"advertise_addr":       "127.0.0.1",
		"log_level":            "INFO",
		"disable_update_check": true,
		"ports": map[string]int{
			"http": p.ConsulHTTP, "dns": p.ConsulDNS, "server": p.ConsulServer,
			"serf_lan": p.ConsulSerfLAN, "serf_wan": p.ConsulSerfWAN, "grpc": p.ConsulGRPC,
		},
		"ui_config": map[string]bool{"enabled": true},
	}
	path := filepath.Join(c.cfg.DataDir, "consul.json")
	if err := writeJSON(path, cfg); err != nil {
		return err
	}
	cmd, err := c.spawn("consul", c.cfg.ConsulBin, "agent", "-dev", "-config-file", path)
	c.consul = cmd
	return err
}

func (c *Cluster) startNomad() error {
	p := c.cfg.Ports
	dataDir := filepath.Join(c.cfg.DataDir, "nomad")
	conf := fmt.Sprintf(`
name       = "cohort-dev"
datacenter = "dc1"
data_dir   = %q
plugin_dir = %q
bind_addr  = "127.0.0.1"
log_level  = "INFO"
disable_update_check = true

ports {
  http = %d
  rpc  = %d
  serf = %d
}

advertise {
  http = "127.0.0.1"
  rpc  = "127.0.0.1"
  serf = "127.0.0.1"
}

server {
  enabled          = true
  bootstrap_expect = 1
}

client {
  enabled           = true
  network_interface = "lo"
  gc_max_allocs     = 200
}

consul {
  address = "127.0.0.1:%d"
}

plugin "raw_exec" {
  config {
    enabled = true
  }
}
%s
`, dataDir, c.cfg.PluginDir, p.NomadHTTP, p.NomadRPC, p.NomadSerf, p.ConsulHTTP, c.pluginConfig())
	path := filepath.Join(c.cfg.DataDir, "nomad.hcl")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		return fmt.Errorf("writing nomad config: %w", err)
	}
	cmd, err := c.spawn("nomad", c.cfg.NomadBin, "agent", "-config", path)
	c.nomad = cmd
	return err
}

// spawn starts an agent with its output in <data dir>/<name>.log.
func (c *Cluster) spawn(name, bin string, args ...string) (*exec.Cmd, error) {
	if bin == "" {
		return nil, fmt.Errorf("no %s binary configured", name)
	}
	logf, err := os.OpenFile(filepath.Join(c.cfg.DataDir, name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("opening %s log: %w", name, err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group, so a Ctrl-C at the terminal reaches only us and
	// we stop the agents in order.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	done := make(chan struct{})
	c.mu.Lock()
	c.exited[cmd] = done
	c.mu.Unlock()
	go func() {
		cmd.Wait()
		logf.Close()
		close(done)
	}()
	c.log.Info("started agent", "name", name, "pid", cmd.Process.Pid, "log", logf.Name())
	return cmd, nil
}

func (c *Cluster) waitFor(ctx context.Context, what string, cmd *exec.Cmd, ready func() (bool, error)) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	var lastErr error
	for {
		ok, err := ready()
		if ok {
			return nil
		}
		lastErr = err
		select {
		case <-c.exitedCh(cmd):
			return fmt.Errorf("waiting for %s: agent exited (%v); see %s", what, cmd.ProcessState, c.logPath(cmd))
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w (last error: %v); see %s", what, ctx.Err(), lastErr, c.logPath(cmd))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (c *Cluster) logPath(cmd *exec.Cmd) string {
	if cmd == c.nomad {
		return filepath.Join(c.cfg.DataDir, "nomad.log")
	}
	return filepath.Join(c.cfg.DataDir, "consul.log")
}

func (c *Cluster) nomadReady() (bool, error) {
	var nodes []struct {
		ID     string
		Status string
	}
	if err := getJSON(c.NomadAddr()+"/v1/nodes", &nodes); err != nil {
		return false, err
	}
	if len(nodes) == 0 || nodes[0].Status != "ready" {
		return false, errors.New("no ready node yet")
	}
	var node struct {
		Attributes map[string]string
		Drivers    map[string]struct {
			Healthy           bool
			HealthDescription string
		}
	}
	if err := getJSON(c.NomadAddr()+"/v1/node/"+nodes[0].ID, &node); err != nil {
		return false, err
	}
	if node.Attributes["consul.version"] == "" {
		return false, errors.New("node has not fingerprinted consul yet")
	}
	if !node.Drivers["raw_exec"].Healthy {
		return false, errors.New("raw_exec driver not healthy yet")
	}
	if c.cfg.MicroVM != nil && !node.Drivers["microvm"].Healthy {
		return false, fmt.Errorf("microvm driver not healthy yet: %s", node.Drivers["microvm"].HealthDescription)
	}
	return true, nil
}

// NodeAttribute reads one attribute of the cluster's (first) node.
func (c *Cluster) NodeAttribute(name string) (string, error) {
	var nodes []struct{ ID string }
	if err := getJSON(c.NomadAddr()+"/v1/nodes", &nodes); err != nil {
		return "", err
	}
	if len(nodes) == 0 {
		return "", errors.New("no node")
	}
	var node struct{ Attributes map[string]string }
	if err := getJSON(c.NomadAddr()+"/v1/node/"+nodes[0].ID, &node); err != nil {
		return "", err
	}
	return node.Attributes[name], nil
}

// RestartNomad stops the Nomad agent as an operator would (SIGINT: the
// client leaves its tasks running) and starts it again on the same data
// directory, then waits until the node is ready.
func (c *Cluster) RestartNomad(ctx context.Context) error {
	if err := c.stopAgent(c.nomad); err != nil {
		return err
	}
	if err := c.startNomad(); err != nil {
		return err
	}
	return c.waitFor(ctx, "nomad node ready after restart", c.nomad, c.nomadReady)
}

// Stop stops every job, then Nomad, then Consul; kills task processes left
// orphaned; and detaches mounts under the data directory. It is safe to
// call more than once.
func (c *Cluster) Stop() error {
	var errs []error
	c.once.Do(func() {
		close(c.stopped)
		if c.nomad != nil {
			c.stopJobs()
		}
		for _, cmd := range []*exec.Cmd{c.nomad, c.consul} {
			if cmd != nil {
				if err := c.stopAgent(cmd); err != nil {
					errs = append(errs, err)
				}
			}
		}
		killOrphans(c.log)
		if err := unmountUnder(c.cfg.DataDir); err != nil {
			errs = append(errs, err)
		}
		if c.cfg.MicroVM != nil {
			if out, err := exec.Command("ip", "netns", "del", c.MicroVMNetNS()).CombinedOutput(); err != nil && !strings.Contains(string(out), "No such file") {
				errs = append(errs, fmt.Errorf("removing network namespace: %v: %s", err, out))
			}
			os.RemoveAll(c.MicroVMStateDir())
		}
	})
	return errors.Join(errs...)
}

// stopJobs deregisters every job and waits briefly for its allocations to
// stop, so tasks get their normal kill signal and grace period.
func (c *Cluster) stopJobs() {
	var jobs []struct{ ID, Namespace string }
	if err := getJSON(c.NomadAddr()+"/v1/jobs?namespace=*", &jobs); err != nil {
		return
	}
	for _, j := range jobs {
		req, _ := http.NewRequest(http.MethodDelete, c.NomadAddr()+"/v1/job/"+j.ID+"?purge=true&namespace="+j.Namespace, nil)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		var allocs []struct{ ClientStatus string }
		if err := getJSON(c.NomadAddr()+"/v1/allocations?namespace=*", &allocs); err != nil {
			return
		}
		running := 0
		for _, a := range allocs {
			if a.ClientStatus == "running" || a.ClientStatus == "pending" {
				running++
			}
		}
		if running == 0 {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (c *Cluster) exitedCh(cmd *exec.Cmd) chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.exited[cmd]
}

// stopAgent stops an agent as an operator would (SIGINT), and kills it
// if it has not exited after 15 s. A Nomad client restarted over live
// tasks sometimes never finishes its shutdown; that is Nomad's, not a
// leak of ours (Stop still kills every task process and checks nothing is
// left), so it is logged with a goroutine dump in the agent's log, not
// returned as an error.
func (c *Cluster) stopAgent(cmd *exec.Cmd) error {
	done := c.exitedCh(cmd)
	cmd.Process.Signal(os.Interrupt)
	select {
	case <-done:
		return nil
	case <-time.After(15 * time.Second):
	}
	cmd.Process.Signal(syscall.SIGQUIT) // Go agents dump their goroutines
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		cmd.Process.Kill()
		<-done
	}
	c.log.Warn("agent did not stop within 15s of SIGINT and was killed; its goroutines are in its log", "agent", filepath.Base(cmd.Path), "log", c.logPath(cmd))
	return nil
}

// killOrphans kills every remaining descendant of this process: as the
// child subreaper, orphaned task executors were reparented to us.
func killOrphans(log hclog.Logger) {
	for attempt := 0; attempt < 50; attempt++ {
		kids := children(os.Getpid())
		if len(kids) == 0 {
			return
		}
		sig := syscall.SIGTERM
		if attempt > 20 {
			sig = syscall.SIGKILL
		}
		for _, pid := range kids {
			log.Debug("stopping orphaned process", "pid", pid, "signal", sig)
			syscall.Kill(pid, sig)
		}
		// Reap the ones that were reparented to us.
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
}

type proc struct{ pid, pgid int }

// children lists the live direct children of pid.
func children(pid int) []int {
	var out []int
	for _, p := range childrenIn(pid, false) {
		out = append(out, p.pid)
	}
	return out
}

// zombies lists the direct children of pid that have exited unreaped.
func zombies(pid int) []proc { return childrenIn(pid, true) }

func childrenIn(pid int, zombie bool) []proc {
	ents, _ := os.ReadDir("/proc")
	var out []proc
	for _, e := range ents {
		child, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// The command name may hold spaces and parens; fields follow the last ')'.
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) < 3 || (f[0] == "Z") != zombie {
			continue
		}
		if ppid, _ := strconv.Atoi(f[1]); ppid == pid {
			pgid, _ := strconv.Atoi(f[2])
			out = append(out, proc{pid: child, pgid: pgid})
		}
	}
	return out
}

// unmountUnder detaches every mount at or below dir, deepest first.
func unmountUnder(dir string) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return fmt.Errorf("reading mounts: %w", err)
	}
	var targets []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := unescapeMount(f[4])
		if mp == abs || strings.HasPrefix(mp, abs+"/") {
			targets = append(targets, mp)
		}
	}
	var errs []error
	for i := len(targets) - 1; i >= 0; i-- {
		if err := unix.Unmount(targets[i], unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("unmounting %s: %w", targets[i], err))
		}
	}
	return errors.Join(errs...)
}

// unescapeMount undoes the octal escapes /proc/self/mountinfo uses for
// spaces, tabs, newlines and backslashes.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

var httpClient = &http.Client{Timeout: 5 * time.Second}

func getJSON(url string, out any) error {
	resp, err := httpClient.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("GET %s: %s: %s", url, resp.Status, strings.TrimSpace(string(b)))
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}
