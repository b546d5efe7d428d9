package command

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/internal/devcluster"
	"github.com/cohort-dev/cohort/scheduler/billing"
	"github.com/cohort-dev/cohort/scheduler/replica"
	"github.com/hashicorp/go-hclog"
	"github.com/mitchellh/cli"
)

// DevCommand runs a local single-node cluster until interrupted.
type DevCommand struct{ UI cli.Ui }

const devHelp = `
Usage: cohort dev [options]

  Starts a local single-node cluster: a Consul dev agent, a Nomad agent
  (server and client) wired to it with cohort's plugins loaded, and a
  single cohort server (the gang scheduler) with its Nomad-compatible
  endpoint. It waits until all are healthy, prints their addresses, and on
  Ctrl-C or SIGTERM stops everything it started: jobs, agents, the task
  processes they ran and any mounts under the data directory.

Options:

  -data-dir=<path>    Where the agents keep state and logs. Default: a new
                      temporary directory, removed on exit.
  -plugin-dir=<path>  Nomad plugin directory. Default: plugins/ beside the
                      cohort binary.
  -log-level=<level>  cohort's own log level. Default: info.
  -kernel=<path>      Guest kernel for the microvm driver. Default: the one
                      "make kernel" built (.tools/kernel/vmlinux).
  -init=<path>        Guest init for the microvm driver. Default:
                      guest/cohort-init beside the cohort binary.
  -server-addr=<addr> The cohort server's API. Default: 127.0.0.1:4747
                      (Raft on the next port).
  -nomad-listen=<addr> Its Nomad-compatible endpoint. Default:
                      127.0.0.1:4749.
  -ready-timeout=<d>  How long to wait for the cluster to be ready: a
                      cohort leader, and the node's template snapshot
                      built (so workers restore instead of cold-booting).
                      Default: 5m.

  Without a kernel, an init or the plugin binary the cluster runs without
  the microvm driver, and says so.

  NOMAD_BIN and CONSUL_BIN select the agent binaries; otherwise those that
  "make tools" built, or the ones on $PATH.
`

func (c *DevCommand) Help() string     { return devHelp }
func (c *DevCommand) Synopsis() string { return "Run a local single-node cluster" }

func (c *DevCommand) Run(args []string) int {
	fs := flagSet("dev")
	dataDir := fs.String("data-dir", "", "")
	pluginDir := fs.String("plugin-dir", "", "")
	level := fs.String("log-level", "info", "")
	kernel := fs.String("kernel", "", "")
	initBin := fs.String("init", "", "")
	serverAddr := fs.String("server-addr", "127.0.0.1:4747", "")
	nomadListen := fs.String("nomad-listen", "127.0.0.1:4749", "")
	readyTimeout := fs.Duration("ready-timeout", 5*time.Minute, "")
	if ok, code := parse(c.UI, fs, args, 0, devHelp); !ok {
		return code
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "cohort.dev", Level: hclog.LevelFromString(*level), Output: os.Stderr})

	cfg := devcluster.Config{Logger: log, PluginDir: *pluginDir}
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
	host, port, err := net.SplitHostPort(*serverAddr)
	if err != nil {
		c.UI.Error(fmt.Sprintf("Error: -server-addr %q: %v", *serverAddr, err))
		return ExitUsage
	}
	p, err := strconv.Atoi(port)
	if err != nil {
		c.UI.Error(fmt.Sprintf("Error: -server-addr %q: bad port", *serverAddr))
		return ExitUsage
	}
	raftAddr := net.JoinHostPort(host, strconv.Itoa(p+1))
	if mv, why := c.microvm(cfg.PluginDir, *kernel, *initBin); mv != nil {
		mv.CohortServers = []string{"http://" + *serverAddr}
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
	srv, err := StartServer(ServerConfig{
		DataDir: filepath.Join(cfg.DataDir, "cohort"), HTTPAddr: *serverAddr, RaftAddr: raftAddr, NodeID: "dev",
		NomadAddr: cluster.NomadAddr(), NomadListen: *nomadListen, BootstrapExpect: 1,
		Prices: billing.DefaultPrices, Logger: log.Named("server"),
		BarrierTask: DefaultBarrierTask(), RaftTimeouts: replica.LANTimeouts,
	})
	if err != nil {
		cluster.Stop()
		c.UI.Error(fmt.Sprintf("Error starting the cohort server: %v", err))
		return ExitError
	}
	// Ready means ready: a cohort leader takes jobs, and the node restores
	// workers from its template instead of cold-booting them.
	if err := waitReady(ctx, log, srv, cluster, cfg.MicroVM != nil, *readyTimeout); err != nil {
		srv.Stop()
		cluster.Stop()
		c.UI.Error(fmt.Sprintf("Error: the dev cluster did not become ready: %v", err))
		return ExitError
	}
	c.UI.Output(fmt.Sprintf(`cohort dev cluster is ready.

  cohort API:        http://%s
  Nomad-compatible:  http://%s   (nomad job run of a gang goes through cohort)
  Nomad API and UI:  %s/ui/
  Consul API and UI: %s/ui/
  Consul DNS:        %s
  Data directory:    %s
  Plugin directory:  %s

  export COHORT_ADDR=http://%s NOMAD_ADDR=%s CONSUL_HTTP_ADDR=%s

Press Ctrl-C to stop.`, srv.HTTPAddr, srv.NomadAddr, cluster.NomadAddr(), cluster.ConsulAddr(), cluster.ConsulDNS(), cfg.DataDir, cfg.PluginDir,
		srv.HTTPAddr, cluster.NomadAddr(), cluster.ConsulAddr()))

	<-ctx.Done()
	// The scheduler goes first, so it does not requeue gangs that the
	// cluster's shutdown stops.
	if err := srv.Stop(); err != nil {
		log.Warn("stopping the cohort server", "error", err)
	}
	c.UI.Output("Stopping the dev cluster...")
	if err := cluster.Stop(); err != nil {
		c.UI.Error(fmt.Sprintf("Error stopping dev cluster: %v", err))
		return ExitError
	}
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

// waitReady waits until the cohort server has a leader and, with the
// microvm driver, the node's template snapshot is built, saying what it
// waits for.
func waitReady(ctx context.Context, log hclog.Logger, srv *ServerAgent, cluster *devcluster.Cluster, microvm bool, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	client := api.NewClient(api.Config{Address: srv.HTTPAddr, Timeout: 2 * time.Second})
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
	var snap string
	err := wait("the node's template snapshot (workers restore from it)", func() (bool, string) {
		v, err := cluster.NodeAttribute("driver.microvm.snapshot")
		if err != nil {
			return false, err.Error()
		}
		snap = v
		return v != "" && v != "building", "driver.microvm.snapshot = " + v
	})
	if err != nil {
		return err
	}
	if snap != "ready" {
		// Workers still run, cold-booted; say why the snapshot is not there.
		log.Warn("no template snapshot: workers will cold-boot", "driver.microvm.snapshot", snap)
	}
	return nil
}
