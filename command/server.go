package command

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/cohort-dev/cohort/scheduler/billing"
	"github.com/cohort-dev/cohort/scheduler/nomad"
	"github.com/cohort-dev/cohort/scheduler/replica"
	"github.com/cohort-dev/cohort/scheduler/server"
	"github.com/hashicorp/go-hclog"
	"github.com/mitchellh/cli"
)

// ServerCommand runs a cohort server.
type ServerCommand struct{ UI cli.Ui }

const serverHelp = `
Usage: cohort server [options]

  Runs the gang scheduler: a Raft replica plus, on the leader, the loop that
  places queued gangs on Nomad all at once or not at all and stops them at
  their max runtime. This version runs a single replica (-dev or
  -data-dir); joining several servers is not wired to the CLI yet.

Options:

  -data-dir=<path>     Raft log, snapshots. Required unless -dev.
  -dev                 Single replica with its state in a temporary
                       directory, removed on exit.
  -http-addr=<addr>    API address. Default: 127.0.0.1:4747.
  -raft-addr=<addr>    Raft address. Default: 127.0.0.1:4748.
  -node-id=<id>        Replica ID. Default: the hostname.
  -nomad-addr=<url>    Nomad API. Default: $NOMAD_ADDR or http://127.0.0.1:4646.
  -log-level=<level>   Default: info.

  Billing prices, per hour of one unit, billed per millisecond from the
  moment a whole gang runs:
  -price-cpu-mhz-hour=<n>     Default: 0.00001.
  -price-memory-gib-hour=<n>  Default: 0.004.
  -price-device-hour=<n>      Default: 1.
  -currency=<code>            Default: USD.
`

func (c *ServerCommand) Help() string     { return serverHelp }
func (c *ServerCommand) Synopsis() string { return "Run the gang scheduler" }

func (c *ServerCommand) Run(args []string) int {
	fs := flagSet("server")
	dataDir := fs.String("data-dir", "", "")
	dev := fs.Bool("dev", false, "")
	httpAddr := fs.String("http-addr", "127.0.0.1:4747", "")
	raftAddr := fs.String("raft-addr", "127.0.0.1:4748", "")
	host, _ := os.Hostname()
	nodeID := fs.String("node-id", host, "")
	nomadAddr := fs.String("nomad-addr", os.Getenv("NOMAD_ADDR"), "")
	level := fs.String("log-level", "info", "")
	prices := billing.DefaultPrices
	fs.Float64Var(&prices.CPUMHzHour, "price-cpu-mhz-hour", prices.CPUMHzHour, "")
	fs.Float64Var(&prices.MemoryGiBHour, "price-memory-gib-hour", prices.MemoryGiBHour, "")
	fs.Float64Var(&prices.DeviceHour, "price-device-hour", prices.DeviceHour, "")
	fs.StringVar(&prices.Currency, "currency", prices.Currency, "")
	if ok, code := parse(c.UI, fs, args, 0, serverHelp); !ok {
		return code
	}
	if *dataDir == "" && !*dev {
		c.UI.Error("Error: -data-dir is required (or -dev)\n\n" + serverHelp)
		return ExitUsage
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "cohort.server", Level: hclog.LevelFromString(*level), Output: os.Stderr})
	if *dev {
		tmp, err := os.MkdirTemp("", "cohort-server-")
		if err != nil {
			c.UI.Error(err.Error())
			return ExitError
		}
		defer os.RemoveAll(tmp)
		*dataDir = tmp
	}
	n, err := nomad.New(*nomadAddr)
	if err != nil {
		c.UI.Error(err.Error())
		return ExitError
	}
	r, err := replica.Start(replica.Config{
		ID: *nodeID, Bind: *raftAddr, DataDir: filepath.Join(*dataDir, "raft"),
		Peers: map[string]string{*nodeID: *raftAddr}, Logger: log, Fast: true,
	})
	if err != nil {
		c.UI.Error(fmt.Sprintf("Error starting replica: %v", err))
		return ExitError
	}
	defer r.Shutdown()
	srv := server.New(r, n, prices, log)
	ln, err := net.Listen("tcp", *httpAddr)
	if err != nil {
		c.UI.Error(fmt.Sprintf("Error listening on %s: %v", *httpAddr, err))
		return ExitError
	}
	hs := &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 10 * time.Second}
	go hs.Serve(ln)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go srv.Run(ctx)
	c.UI.Output(fmt.Sprintf("cohort server %s: API on http://%s, raft on %s", *nodeID, ln.Addr(), r.Addr()))
	<-ctx.Done()
	shut, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := hs.Shutdown(shut); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Warn("http shutdown", "error", err)
	}
	return ExitOK
}
