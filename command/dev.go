package command

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/cohort-dev/cohort/internal/devcluster"
	"github.com/hashicorp/go-hclog"
	"github.com/mitchellh/cli"
)

// DevCommand runs a local single-node cluster until interrupted.
type DevCommand struct{ UI cli.Ui }

const devHelp = `
Usage: cohort dev [options]

  Starts a local single-node cluster: a Consul dev agent and a Nomad agent
  (server and client) wired to it, with cohort's plugins loaded. It waits
  until all are healthy, prints their addresses, and on Ctrl-C or SIGTERM
  stops everything it started: jobs, agents, the task processes they ran
  and any mounts under the data directory.

Options:

  -data-dir=<path>    Where the agents keep state and logs. Default: a new
                      temporary directory, removed on exit.
  -plugin-dir=<path>  Nomad plugin directory. Default: plugins/ beside the
                      cohort binary.
  -log-level=<level>  cohort's own log level. Default: info.

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
	c.UI.Output(fmt.Sprintf(`cohort dev cluster is ready.

  Nomad API and UI:  %s/ui/
  Consul API and UI: %s/ui/
  Consul DNS:        %s
  Data directory:    %s
  Plugin directory:  %s

  export NOMAD_ADDR=%s CONSUL_HTTP_ADDR=%s

Press Ctrl-C to stop.`, cluster.NomadAddr(), cluster.ConsulAddr(), cluster.ConsulDNS(), cfg.DataDir, cfg.PluginDir,
		cluster.NomadAddr(), cluster.ConsulAddr()))

	<-ctx.Done()
	c.UI.Output("Stopping the dev cluster...")
	if err := cluster.Stop(); err != nil {
		c.UI.Error(fmt.Sprintf("Error stopping dev cluster: %v", err))
		return ExitError
	}
	c.UI.Output("Stopped.")
	return ExitOK
}
