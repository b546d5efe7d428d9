package command

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/internal/devcluster"
	"github.com/cohort-dev/cohort/internal/tlsutil"
	"github.com/cohort-dev/cohort/scheduler/billing"
	"github.com/cohort-dev/cohort/scheduler/replica"
	"github.com/hashicorp/go-hclog"
	"github.com/mitchellh/cli"
)

// DevCommand runs a local cluster until interrupted.
type DevCommand struct{ UI cli.Ui }

const devHelp = `
Usage: cohort dev [options]

  Starts a local cluster on this one machine: -nodes hosts, each in its own
  network namespace with its own Nomad client and Consul agent (and so its
  own microvm driver, worker subnet and firewall), joined by a bridge on
  which a Consul server, a Nomad server and -servers cohort servers (the
  gang scheduler) listen, with cohort's Nomad-compatible endpoint. It waits
  until all are ready, prints their addresses, and on Ctrl-C or SIGTERM
  stops everything it started: jobs, agents, the task processes they ran,
  mounts under the data directory, the namespaces, veths and bridge.

Options:

  -nodes=<n>          Hosts running workers. Default: 1.
  -servers=<n>        cohort servers: 1, or 3 for a replicated scheduler,
                      which speaks mutual TLS: the cluster makes a CA and
                      certificates under <data-dir>/tls (servers, each
                      node's driver, callers) and prints what to export.
                      Default: 1.
  -data-dir=<path>    Where the agents keep state and logs. Default: a new
                      temporary directory, removed on exit.
  -plugin-dir=<path>  Nomad plugin directory. Default: plugins/ beside the
                      cohort binary.
  -log-level=<level>  cohort's own log level. Default: info.
  -kernel=<path>      Guest kernel for the microvm driver. Default: the one
                      "make kernel" built (.tools/kernel/vmlinux).
  -init=<path>        Guest init for the microvm driver. Default:
                      guest/cohort-init beside the cohort binary.
  -ready-timeout=<d>  How long to wait for the cluster to be ready: a
                      cohort leader, and every node's template snapshot
                      built (so workers restore instead of cold-booting).
                      Default: 5m.

  The servers use the usual ports: Nomad 4646-4648, Consul 8500/8600, the
  cohort API 4747 (4757, 4767 for servers 2 and 3) with Raft on the next
  port, the Nomad-compatible endpoint 4749 (loopback only). They listen on
  loopback and on the cluster's bridge, where the nodes reach them.

  Without a kernel, an init or the plugin binary the cluster runs without
  the microvm driver, and says so.

  NOMAD_BIN and CONSUL_BIN select the agent binaries; otherwise those that
  "make tools" built, or the ones on $PATH.
`

func (c *DevCommand) Help() string     { return devHelp }
func (c *DevCommand) Synopsis() string { return "Run a local cluster of N hosts" }

func (c *DevCommand) Run(args []string) int {
	fs := flagSet("dev")
	nodes := fs.Int("nodes", 1, "")
	servers := fs.Int("servers", 1, "")
	dataDir := fs.String("data-dir", "", "")
	pluginDir := fs.String("plugin-dir", "", "")
	level := fs.String("log-level", "info", "")
	kernel := fs.String("kernel", "", "")
	initBin := fs.String("init", "", "")
	readyTimeout := fs.Duration("ready-timeout", 5*time.Minute, "")
	if ok, code := parse(c.UI, fs, args, 0, devHelp); !ok {
		return code
	}
	if *nodes < 1 || *nodes > 50 {
		c.UI.Error("Error: -nodes must be 1 to 50\n\n" + strings.TrimSpace(devHelp))
		return ExitUsage
	}
	if *servers != 1 && *servers != 3 {
		c.UI.Error("Error: -servers must be 1 or 3\n\n" + strings.TrimSpace(devHelp))
		return ExitUsage
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "cohort.dev", Level: hclog.LevelFromString(*level), Output: os.Stderr})

	cfg := devcluster.Config{Logger: log, PluginDir: *pluginDir, Nodes: *nodes, Ports: devcluster.DefaultPorts()}
	var err error
	if cfg.NomadBin, err = devcluster.FindBinary("nomad"); err != nil {
		c.UI.Error(err.Error())
		return ExitError
	}
	if cfg.ConsulBin, err = devcluster.FindBinary("consul"); err != nil {
		c.UI.Error(err.Error())
		return ExitError
	}
	if cfg.PluginDir == "" {
		exe, err := os.Executable()
		if err != nil {
			c.UI.Error(fmt.Sprintf("locating the cohort binary: %v", err))
			return ExitError
		}
		cfg.PluginDir = filepath.Join(filepath.Dir(exe), "plugins")
	}
	serverIP := devcluster.ServerIPFor(cfg.Ports.NomadHTTP)
	// A group of servers speaks mutual TLS: the cluster makes a CA and
	// certificates, and each node's driver shows its own.
	cfg.TLS = *servers > 1
	scheme := "http"
	if cfg.TLS {
		scheme = "https"
	}
	var serverURLs []string
	for i := 0; i < *servers; i++ {
		serverURLs = append(serverURLs, fmt.Sprintf("%s://%s:%d", scheme, serverIP, 4747+10*i))
	}
	if mv, why := c.microvm(cfg.PluginDir, *kernel, *initBin); mv != nil {
		mv.CohortServers = serverURLs
		cfg.MicroVM = mv
	} else {
		log.Warn("running without the microvm driver", "reason", why)
	}
	if *dataDir == "" {
		tmp, err := os.MkdirTemp("", "cohort-dev-")
		if err != nil {
			c.UI.Error(fmt.Sprintf("creating data directory: %v", err))
			return ExitError
		}
		defer os.RemoveAll(tmp)
		cfg.DataDir = tmp
	} else {
		cfg.DataDir = *dataDir
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cluster, err := devcluster.Start(ctx, cfg)
	if err != nil {
		c.UI.Error(fmt.Sprintf("Error starting dev cluster: %v", err))
		return ExitError
	}
	var agents []*ServerAgent
	stopAll := func() {
		// The scheduler goes first, so it does not requeue gangs that the
		// cluster's shutdown stops.
		for _, a := range agents {
			if err := a.Stop(); err != nil {
				log.Warn("stopping a cohort server", "error", err)
			}
		}
		if err := cluster.Stop(); err != nil {
			c.UI.Error(fmt.Sprintf("Error stopping dev cluster: %v", err))
		}
	}
	for i := 0; i < *servers; i++ {
		sc := ServerConfig{
			DataDir: filepath.Join(cfg.DataDir, fmt.Sprintf("cohort-%d", i+1)),
			// On the cluster network (the nodes) and loopback (the user),
			// nowhere else: workers reach out through NAT to the
			// machine's other addresses.
			HTTPAddr:       fmt.Sprintf("%s:%d", serverIP, 4747+10*i),
			ExtraHTTPAddrs: []string{fmt.Sprintf("127.0.0.1:%d", 4747+10*i)},
			Advertise:      serverURLs[i],
			RaftAddr:       fmt.Sprintf("%s:%d", serverIP, 4748+10*i),
			NodeID:         fmt.Sprintf("dev-%d", i+1),
			NomadAddr:      cluster.NomadAddr(),
			NomadListen:    fmt.Sprintf("127.0.0.1:%d", 4749+10*i),
			Prices:         billing.DefaultPrices, Logger: log.Named(fmt.Sprintf("server-%d", i+1)),
			BarrierTask: DefaultBarrierTask(), RaftTimeouts: replica.LANTimeouts,
			BootstrapExpect: *servers,
		}
		if t := cluster.TLS(); t != nil {
			sc.TLS = t.Server
		}
		if *servers > 1 {
			for j, u := range serverURLs {
				if j != i {
					sc.Join = append(sc.Join, u)
				}
			}
		}
		a, err := StartServer(sc)
		if err != nil {
			stopAll()
			c.UI.Error(fmt.Sprintf("Error starting cohort server %d: %v", i+1, err))
			return ExitError
		}
		agents = append(agents, a)
	}
	// Ready means ready: a cohort leader takes jobs, and every node
	// restores workers from its template instead of cold-booting them.
	if err := waitReady(ctx, log, agents[0], cluster, *readyTimeout); err != nil {
		stopAll()
		c.UI.Error(fmt.Sprintf("Error: the dev cluster did not become ready: %v", err))
		return ExitError
	}
	var hosts []string
	for _, n := range cluster.Nodes() {
		hosts = append(hosts, fmt.Sprintf("  %-16s %-14s netns %s", n.Name, n.IP, n.NetNS))
	}
	c.UI.Output(fmt.Sprintf(`cohort dev cluster is ready.

  cohort API:        %s   (servers: %s)
  Nomad-compatible:  %s   (nomad job run of a gang goes through cohort)
  Nomad API and UI:  %s/ui/
  Consul API and UI: %s/ui/
  Consul DNS:        %s
  Data directory:    %s
  Plugin directory:  %s

  Hosts (%d), on the cluster network %s/24:
%s

  export COHORT_ADDR=%s://127.0.0.1:4747 NOMAD_ADDR=%s CONSUL_HTTP_ADDR=%s%s

Press Ctrl-C to stop.`, scheme+"://127.0.0.1:4747", strings.Join(serverURLs, ", "), scheme+"://127.0.0.1:4749", cluster.NomadAddr(), cluster.ConsulAddr(), cluster.ConsulDNS(),
		cfg.DataDir, cfg.PluginDir, len(hosts), serverIP, strings.Join(hosts, "\n"), scheme, cluster.NomadAddr(), cluster.ConsulAddr(), tlsExports(cluster)))

	<-ctx.Done()
	c.UI.Output("Stopping the dev cluster...")
	stopAll()
	c.UI.Output("Stopped.")
	return ExitOK
}

// microvm finds what the microvm driver needs, or says what is missing.
func (c *DevCommand) microvm(pluginDir, kernel, initBin string) (*devcluster.MicroVM, string) {
	if _, err := os.Stat(filepath.Join(pluginDir, "nomad-driver-microvm")); err != nil {
		return nil, "no nomad-driver-microvm in " + pluginDir + " (run make build)"
	}
	if kernel == "" {
		kernel = devcluster.FindUp(filepath.Join(".tools", "kernel", "vmlinux"))
	}
	if kernel == "" {
		return nil, "no guest kernel (run make kernel, or pass -kernel)"
	}
	if initBin == "" {
		initBin = filepath.Join(pluginDir, "..", "guest", "cohort-init")
	}
	if _, err := os.Stat(initBin); err != nil {
		return nil, "no guest init at " + initBin + " (run make build, or pass -init)"
	}
	return &devcluster.MicroVM{Kernel: kernel, Init: initBin}, ""
}

// waitReady waits until a cohort server has a leader and, with the
// microvm driver, every node's template snapshot is built, saying what it
// waits for.
func waitReady(ctx context.Context, log hclog.Logger, srv *ServerAgent, cluster *devcluster.Cluster, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	microvm := cluster.MicroVM()
	cc := api.Config{Address: srv.Scheme + "://" + srv.HTTPAddr, Timeout: 2 * time.Second}
	if t := cluster.TLS(); t != nil {
		b, err := tlsutil.Load(t.CLI)
		if err != nil {
			return err
		}
		cc.TLS = b.ClientConfig()
	}
	client := api.NewClient(cc)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	wait := func(what string, ok func() (bool, string)) error {
		log.Info("waiting for " + what)
		last := ""
		for {
			done, why := ok()
			if done {
				return nil
			}
			last = why
			select {
			case <-ctx.Done():
				return fmt.Errorf("%s: not after %s (%s)", what, timeout, last)
			case <-tick.C:
			}
		}
	}
	if err := wait("a cohort leader", func() (bool, string) {
		if err := client.Health(); err != nil {
			return false, err.Error()
		}
		return true, ""
	}); err != nil {
		return err
	}
	if !microvm {
		return nil
	}
	var snaps []string
	err := wait("every node's worker network and template snapshot (workers restore from it)", func() (bool, string) {
		var err error
		if snaps, err = cluster.NodeAttributes("driver.microvm.snapshot"); err != nil {
			return false, err.Error()
		}
		nets, err := cluster.NodeAttributes("driver.microvm.network")
		if err != nil {
			return false, err.Error()
		}
		for i, v := range snaps {
			if v == "" || v == "building" {
				return false, fmt.Sprintf("node %d: driver.microvm.snapshot = %q", i+1, v)
			}
			if strings.HasPrefix(nets[i], "waiting") {
				return false, fmt.Sprintf("node %d: driver.microvm.network = %q", i+1, nets[i])
			}
		}
		return true, ""
	})
	if err != nil {
		return err
	}
	for i, v := range snaps {
		if v != "ready" {
			// Workers still run, cold-booted; say why the snapshot is not there.
			log.Warn("no template snapshot: workers will cold-boot", "node", i+1, "driver.microvm.snapshot", v)
		}
	}
	return nil
}

// tlsExports is what a user exports to call a cluster whose servers speak
// TLS.
func tlsExports(c *devcluster.Cluster) string {
	t := c.TLS()
	if t == nil {
		return ""
	}
	return fmt.Sprintf(" \\\n         COHORT_CACERT=%s NOMAD_CACERT=%s", t.CA, t.CA)
}
