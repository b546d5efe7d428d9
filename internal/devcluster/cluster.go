// Package devcluster runs a local cluster for development and tests: N
// hosts on this one machine, each in its own network namespace with its
// own Nomad client and Consul agent (and so its own microvm driver,
// worker network and firewall), joined by a bridge on which a Consul
// server and a Nomad server listen. cohort's servers, started beside it,
// listen on that bridge too.
//
// Stop leaves nothing behind outside the data directory: jobs are
// stopped, the agents exit, task processes the agents orphaned are killed
// (the process calling Start becomes their child subreaper), mounts under
// the data directory are detached, and the namespaces, veths and bridge
// are removed.
package devcluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cohort-dev/cohort/deploy"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// Config says where the binaries are and where the cluster keeps its state.
type Config struct {
	DataDir   string
	NomadBin  string
	ConsulBin string
	// PluginDir holds cohort's Nomad plugins; each node gets its own
	// plugin directory linking to them.
	PluginDir string
	Ports     Ports
	// Nodes is how many hosts run Nomad clients (default 1).
	Nodes int
	// Outside adds a host on the cluster's network that is not part of
	// the cluster, for tests of the workers' egress.
	Outside bool
	// MicroVM configures the microvm driver plugin; nil leaves it out.
	MicroVM *MicroVM
	// Accel configures the accelerator device plugin; nil leaves it
	// with its defaults (the host's own sysfs).
	Accel  *Accel
	Logger hclog.Logger
	// TLS makes a CA and certificates for cohort's servers, callers and
	// each node's microvm driver, which reaches the servers over HTTPS
	// with its node's certificate. NomadSecure also runs Nomad with TLS
	// and ACLs (bootstrapped: NomadToken is the management token).
	TLS, NomadSecure bool
	// HostVolumes are host volumes every node's Nomad client offers, each
	// an empty directory of the node's.
	HostVolumes []string
}

// MicroVM is what the microvm driver needs from the dev cluster.
type MicroVM struct {
	Kernel string
	Init   string
	// CohortServers are the cohort servers' API addresses the drivers
	// lease their worker subnets from and report gang workers to.
	CohortServers []string
	// NoNetwork leaves the workers without a network; NoEgress without a
	// way out of the cluster.
	NoNetwork, NoEgress bool
	// Pool is how many warm VMs each node's driver keeps per shape.
	Pool int
}

// Accel is the accelerator device plugin's config on every node.
type Accel struct {
	// SysfsRoot is a sysfs tree to fingerprint instead of the host's,
	// for tests on machines without accelerators.
	SysfsRoot string
	// FingerprintPeriod is how often devices are looked for ("5s").
	FingerprintPeriod string
}

// Node is one host of the cluster.
type Node struct {
	Name  string // cohort-dev-n1, ...
	NetNS string // its network namespace
	IP    string // its address on the cluster's network
	Dir   string // its data directory
	// PluginDir is its Nomad plugin directory; StateDir its microvm
	// driver's state directory.
	PluginDir, StateDir string

	consul, nomad *agent
}

// NomadAddr is the node's own Nomad client API.
func (n *Node) NomadAddr() string { return "http://" + n.IP + ":4646" }

// Cluster is a running dev cluster.
type Cluster struct {
	cfg     Config
	log     hclog.Logger
	net     *devNet
	agents  *agents
	consul  *agent
	nomad   *agent
	nodes   []*Node
	outside string // the outside host's namespace, if any
	once    sync.Once
	stopped chan struct{}
	tls     *TLSFiles
	// scripts is where cohort's host scripts were written for this
	// cluster: its hosts are set up with node.sh.
	scripts string
	token   string // Nomad's management token, with NomadSecure
	// serverToken is cohort's servers' own, of deploy.ServerPolicy.
	serverToken string
	http        *http.Client // to Nomad and Consul
}

// NomadAddr is the Nomad HTTP API (and UI) address.
func (c *Cluster) NomadAddr() string {
	scheme := "http"
	if c.cfg.NomadSecure {
		scheme = "https"
	}
	return scheme + "://127.0.0.1:" + strconv.Itoa(c.cfg.Ports.NomadHTTP)
}

// ConsulAddr is the Consul HTTP API (and UI) address.
func (c *Cluster) ConsulAddr() string {
	return "http://127.0.0.1:" + strconv.Itoa(c.cfg.Ports.ConsulHTTP)
}

// ConsulDNS is the Consul server's DNS address.
func (c *Cluster) ConsulDNS() string { return "127.0.0.1:" + strconv.Itoa(c.cfg.Ports.ConsulDNS) }

// ServerIP is the servers' address on the cluster's network: cohort's
// servers listen there too.
func (c *Cluster) ServerIP() string { return c.net.ServerIP() }

// Nodes are the cluster's hosts.
func (c *Cluster) Nodes() []*Node { return c.nodes }

// Outside is the outside host's namespace and address.
func (c *Cluster) Outside() (netns, ip string) { return c.outside, c.net.OutsideIP() }

// MicroVMStateDir is the first node's microvm state directory.
func (c *Cluster) MicroVMStateDir() string { return c.nodes[0].StateDir }

// MicroVMNetNS is the first node's network namespace, where its workers'
// bridge and taps are.
func (c *Cluster) MicroVMNetNS() string { return c.nodes[0].NetNS }

// InNetNS is a command that runs inside a network namespace.
func InNetNS(netns, name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", netns, name}, args...)...)
}

// Start brings the network up, then Consul, then Nomad, and returns once
// Consul has a leader and every node is ready with Consul and its drivers
// fingerprinted.
func Start(ctx context.Context, cfg Config) (*Cluster, error) {
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.Ports == (Ports{}) {
		cfg.Ports = DefaultPorts()
	}
	if cfg.Nodes < 1 {
		cfg.Nodes = 1
	}
	if cfg.Nodes > 50 {
		return nil, fmt.Errorf("%d nodes: a dev cluster has at most 50", cfg.Nodes)
	}
	for _, dir := range []string{cfg.DataDir, cfg.PluginDir} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("creating %s: %w", dir, err)
		}
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return nil, fmt.Errorf("becoming child subreaper: %w", err)
	}
	if cfg.NomadSecure {
		cfg.TLS = true
	}
	c := &Cluster{cfg: cfg, log: cfg.Logger, net: newDevNet(cfg.Ports.NomadHTTP), stopped: make(chan struct{}),
		agents: &agents{dir: cfg.DataDir, log: cfg.Logger}, http: &http.Client{Timeout: 5 * time.Second}}
	// Refused before anything is made: a cluster already on this
	// network must lose nothing to this one's clean-up.
	if err := c.net.lock(); err != nil {
		return nil, err
	}
	fail := func(err error) (*Cluster, error) {
		c.Stop()
		return nil, err
	}
	if err := c.net.up(); err != nil {
		return fail(err)
	}
	for i := 0; i < cfg.Nodes; i++ {
		n, err := c.addNode(i)
		if err != nil {
			return fail(err)
		}
		c.nodes = append(c.nodes, n)
	}
	if cfg.TLS {
		if err := c.makeTLS(); err != nil {
			return fail(fmt.Errorf("making the cluster's certificates: %w", err))
		}
	}
	scripts, err := deploy.WriteTo(filepath.Join(cfg.DataDir, "deploy"))
	if err != nil {
		return fail(err)
	}
	c.scripts = scripts
	for _, n := range c.nodes {
		if err := c.configureNode(n); err != nil {
			return fail(err)
		}
	}
	if cfg.Outside {
		ns, err := c.net.addHost("out", c.net.OutsideIP())
		if err != nil {
			return fail(err)
		}
		c.outside = ns
	}
	if err := c.startConsul(ctx); err != nil {
		return fail(err)
	}
	if err := c.startNomad(ctx); err != nil {
		return fail(err)
	}
	go c.reap()
	return c, nil
}

// addNode creates a node's host and directories.
func (c *Cluster) addNode(i int) (*Node, error) {
	name := fmt.Sprintf("n%d", i+1)
	n := &Node{
		Name:     "cohort-dev-" + name,
		IP:       c.net.hostIP(i),
		Dir:      filepath.Join(c.cfg.DataDir, name),
		StateDir: fmt.Sprintf("/run/cohort-%d-%s", c.cfg.Ports.NomadHTTP, name),
	}
	n.PluginDir = filepath.Join(n.Dir, "plugins")
	if err := os.MkdirAll(n.PluginDir, 0o755); err != nil {
		return nil, err
	}
	// Each node's plugin directory links to the shared plugins.
	ents, _ := os.ReadDir(c.cfg.PluginDir)
	for _, e := range ents {
		src, _ := filepath.Abs(filepath.Join(c.cfg.PluginDir, e.Name()))
		if err := os.Symlink(src, filepath.Join(n.PluginDir, e.Name())); err != nil && !os.IsExist(err) {
			return nil, err
		}
	}
	ns, err := c.net.addHost(name, n.IP)
	if err != nil {
		return nil, err
	}
	n.NetNS = ns
	return n, nil
}

func (c *Cluster) startConsul(ctx context.Context) error {
	path := filepath.Join(c.cfg.DataDir, "consul-server.json")
	if err := writeJSON(path, c.consulServerConfig()); err != nil {
		return err
	}
	a, err := c.agents.spawn("consul-server", "", c.cfg.ConsulBin, "agent", "-dev", "-config-file", path)
	if err != nil {
		return err
	}
	c.consul = a
	if err := a.waitFor(ctx, "consul leader", func() (bool, error) {
		var leader string
		err := c.getJSON(c.ConsulAddr()+"/v1/status/leader", &leader)
		return leader != "", err
	}); err != nil {
		return err
	}
	for _, n := range c.nodes {
		if n.consul, err = c.agents.spawn("consul-"+strings.TrimPrefix(n.Name, "cohort-dev-"), n.NetNS, c.cfg.ConsulBin, "agent", "-config-dir", filepath.Join(n.Dir, "consul.d")); err != nil {
			return err
		}
	}
	return c.consul.waitFor(ctx, "every node's consul agent", func() (bool, error) {
		var members []struct {
			Name   string
			Status int
		}
		if err := c.getJSON(c.ConsulAddr()+"/v1/agent/members", &members); err != nil {
			return false, err
		}
		alive := 0
		for _, m := range members {
			if m.Status == 1 {
				alive++
			}
		}
		return alive == len(c.nodes)+1, fmt.Errorf("%d of %d consul members alive", alive, len(c.nodes)+1)
	})
}

func (c *Cluster) startNomad(ctx context.Context) error {
	path := filepath.Join(c.cfg.DataDir, "nomad-server.hcl")
	if err := os.WriteFile(path, []byte(c.nomadServerConfig()), 0o644); err != nil {
		return fmt.Errorf("writing nomad config: %w", err)
	}
	a, err := c.agents.spawn("nomad-server", "", c.cfg.NomadBin, "agent", "-config", path)
	if err != nil {
		return err
	}
	c.nomad = a
	if c.cfg.NomadSecure {
		if err := a.waitFor(ctx, "nomad's ACL bootstrap", c.bootstrapACL); err != nil {
			return err
		}
		if err := c.makeServerToken(); err != nil {
			return err
		}
	}
	for _, n := range c.nodes {
		if err := c.startNomadClient(n); err != nil {
			return err
		}
	}
	return c.nomad.waitFor(ctx, "every nomad node ready", c.nomadReady)
}

func (c *Cluster) startNomadClient(n *Node) error {
	a, err := c.agents.spawn("nomad-"+strings.TrimPrefix(n.Name, "cohort-dev-"), n.NetNS, c.cfg.NomadBin, "agent", "-config", filepath.Join(n.Dir, "nomad.d"))
	n.nomad = a
	return err
}

// nomadNode is what readiness needs of a Nomad node.
type nomadNode struct {
	ID, Name, Status string
	Attributes       map[string]string
	Drivers          map[string]struct {
		Healthy           bool
		HealthDescription string
	}
}

func (c *Cluster) nomadNodes() ([]nomadNode, error) {
	var stubs []struct{ ID, Name, Status string }
	if err := c.getJSON(c.NomadAddr()+"/v1/nodes", &stubs); err != nil {
		return nil, err
	}
	var out []nomadNode
	for _, s := range stubs {
		var n nomadNode
		if err := c.getJSON(c.NomadAddr()+"/v1/node/"+s.ID, &n); err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, nil
}

func (c *Cluster) nomadReady() (bool, error) {
	nodes, err := c.nomadNodes()
	if err != nil {
		return false, err
	}
	ready := 0
	for _, n := range nodes {
		switch {
		case n.Status != "ready":
			err = fmt.Errorf("node %s is %s", n.Name, n.Status)
		case n.Attributes["consul.version"] == "":
			err = fmt.Errorf("node %s has not fingerprinted consul yet", n.Name)
		case !n.Drivers["raw_exec"].Healthy:
			err = fmt.Errorf("node %s: raw_exec not healthy yet", n.Name)
		case c.cfg.MicroVM != nil && !n.Drivers["microvm"].Healthy:
			err = fmt.Errorf("node %s: microvm driver not healthy yet: %s", n.Name, n.Drivers["microvm"].HealthDescription)
		default:
			ready++
		}
	}
	if ready < len(c.nodes) && err == nil {
		err = fmt.Errorf("%d of %d nodes registered", len(nodes), len(c.nodes))
	}
	return ready == len(c.nodes), err
}

// NodeAttribute reads one attribute of the first node.
func (c *Cluster) NodeAttribute(name string) (string, error) {
	vs, err := c.NodeAttributes(name)
	if err != nil || len(vs) == 0 {
		return "", err
	}
	return vs[0], nil
}

// NodeAttributes reads one attribute of every node, in node order.
func (c *Cluster) NodeAttributes(name string) ([]string, error) {
	nodes, err := c.nomadNodes()
	if err != nil {
		return nil, err
	}
	byName := map[string]string{}
	for _, n := range nodes {
		byName[n.Name] = n.Attributes[name]
	}
	out := make([]string, len(c.nodes))
	for i, n := range c.nodes {
		out[i] = byName[n.Name]
	}
	return out, nil
}

// RestartNomad restarts the first node's Nomad client.
func (c *Cluster) RestartNomad(ctx context.Context) error { return c.RestartNode(ctx, 0) }

// RestartNode stops a node's Nomad client as an operator would (SIGINT:
// the client leaves its tasks running) and starts it again on the same
// data directory, then waits until it has registered with the server
// again (the server reaches a client only through the client's own
// connection: until then, logs and signals have no path to the node) and
// every node is ready.
func (c *Cluster) RestartNode(ctx context.Context, i int) error {
	n := c.nodes[i]
	n.nomad.stop(c.log)
	var from int64
	if st, err := os.Stat(n.nomad.log); err == nil {
		from = st.Size()
	}
	if err := c.startNomadClient(n); err != nil {
		return err
	}
	if err := n.nomad.waitFor(ctx, "the restarted client's registration", func() (bool, error) {
		b, err := os.ReadFile(n.nomad.log)
		if err != nil || int64(len(b)) < from {
			return false, err
		}
		return strings.Contains(string(b[from:]), "node registration complete"), errors.New("not registered yet")
	}); err != nil {
		return err
	}
	return n.nomad.waitFor(ctx, "nomad node ready after restart", c.nomadReady)
}

// DataDir is where the cluster keeps its state.
func (c *Cluster) DataDir() string { return c.cfg.DataDir }

// Stop stops everything Start started.
func (c *Cluster) Stop() error {
	var errs []error
	c.once.Do(func() {
		close(c.stopped)
		if c.nomad != nil {
			c.stopJobs()
		}
		// Clients before servers, Nomad before Consul.
		for _, n := range c.nodes {
			if n.nomad != nil {
				n.nomad.stop(c.log)
			}
		}
		if c.nomad != nil {
			c.nomad.stop(c.log)
		}
		for _, n := range c.nodes {
			if n.consul != nil {
				n.consul.stop(c.log)
			}
		}
		if c.consul != nil {
			c.consul.stop(c.log)
		}
		killOrphans(c.log)
		if err := UnmountUnder(c.cfg.DataDir); err != nil {
			errs = append(errs, err)
		}
		if err := c.net.down(); err != nil {
			errs = append(errs, err)
		}
		for _, n := range c.nodes {
			os.RemoveAll(n.StateDir)
		}
	})
	return errors.Join(errs...)
}

// stopJobs deregisters every job and waits briefly for its allocations to
// stop, so tasks get their normal kill signal and grace period.
func (c *Cluster) stopJobs() {
	var jobs []struct{ ID, Namespace string }
	if err := c.getJSON(c.NomadAddr()+"/v1/jobs?namespace=*", &jobs); err != nil {
		return
	}
	for _, j := range jobs {
		if resp, err := c.NomadDo(http.MethodDelete, "/v1/job/"+j.ID+"?purge=true&namespace="+j.Namespace, nil); err == nil {
			resp.Body.Close()
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		var allocs []struct{ ClientStatus string }
		if err := c.getJSON(c.NomadAddr()+"/v1/allocations?namespace=*", &allocs); err != nil {
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

// Logs lists the agents' log files.
func (c *Cluster) Logs() []string {
	c.agents.mu.Lock()
	defer c.agents.mu.Unlock()
	var out []string
	for _, a := range c.agents.all {
		out = append(out, a.log)
	}
	return out
}

// getJSON reads a Nomad or Consul API, as the cluster's operator.
func (c *Cluster) getJSON(url string, out any) error {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	if c.token != "" {
		req.Header.Set("X-Nomad-Token", c.token)
	}
	resp, err := c.http.Do(req)
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
