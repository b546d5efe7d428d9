package command

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cohort-dev/cohort/internal/gcfloor"
	"github.com/cohort-dev/cohort/internal/tlsutil"
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
       cohort server members [-address=<addr>] [-json]

  Runs the gang scheduler: a Raft replica plus, on the leader, the loop that
  places queued gangs on Nomad all at once or not at all, releases their
  start barrier, and stops them at their max runtime.

  A single server (-dev, or -data-dir alone) forms a group of one. For a
  replicated scheduler start three servers, each with -bootstrap-expect=3
  and -join naming the others' HTTP addresses; once they see each other
  they form the group. A server given -join whose peers already form a
  group asks to be added. Writes sent to a follower are forwarded to the
  leader.

Options:

  -data-dir=<path>          Raft log and snapshots. Required unless -dev.
  -dev                      Single replica with its state in a temporary
                            directory, removed on exit.
  -http-addr=<addr>         API address. Default: 127.0.0.1:4747.
  -advertise=<url>          API address other servers and the microvm
                            drivers use. Default: http://<http-addr>.
  -raft-addr=<addr>         Raft address. Default: 127.0.0.1:4748.
  -node-id=<id>             Replica ID. Default: the hostname.
  -bootstrap-expect=<n>     Servers to wait for before forming the group.
                            Default: 1.
  -join=<addr>              Another server's API address; repeatable.
  -nomad-addr=<url>         Nomad API. Default: $NOMAD_ADDR or
                            http://127.0.0.1:4646.
  -nomad-listen=<addr>      Serve the Nomad-compatible endpoint here: point
                            NOMAD_ADDR at it and "nomad job run" of a gang
                            goes through gang admission; every other
                            request is passed to Nomad. Default: off.
  -barrier-task=<path>      The static cohort-barrier program, handed to
                            Nomad clients for gangs on drivers without a
                            start barrier of their own (raw_exec, exec,
                            docker, ...). Default: cohort-barrier beside
                            the cohort binary; without it such gangs are
                            refused.
  -raft-heartbeat-timeout=<d>     Default: 1s.
  -raft-election-timeout=<d>      Default: 1s.
  -raft-leader-lease-timeout=<d>  Default: 500ms.
                            hashicorp/raft's defaults, right for servers on
                            separate machines. -dev uses 300ms, 300ms and
                            150ms: failover in well under a second on one
                            host.
  -worker-range=<cidr>      The range nodes' worker subnets are leased from.
                            Default: 10.213.0.0/16. Fixed by the first lease.
  -worker-prefix=<n>        Each node's subnet is a /n of it. Default: 24.
  -retention=<d>            How long an ended run (its status and bill) is
                            kept once its Nomad job is gone; then every
                            server forgets it (a later run of the same ID
                            goes on counting). Default: 168h. 0 keeps every
                            run.
  -gc-heap-floor-mb=<n>     The heap size, in MiB, the garbage collector
                            paces its cycles to while the live heap is
                            small: fewer collections under load, so a
                            steadier admission latency, for memory. Once
                            twice the live heap passes it, Go's default
                            pacing applies. Without GOMEMLIMIT, a memory
                            limit of four times it backs the floor up
                            while it applies. Ignored when GOGC is set;
                            GOMEMLIMIT, when set, still caps the heap.
                            0 for Go's default pacing. Default: 256.
  -log-level=<level>        Default: info.

  Nomad, reached as Nomad's own CLI reaches it:
  -nomad-token=<token>      cohort's ACL token: it registers, stops and
                            watches gangs with it. Default: $NOMAD_TOKEN.
  -nomad-ca-cert=<path>     CA certificate verifying Nomad's HTTPS.
                            Default: $NOMAD_CACERT.
  -nomad-ca-path=<dir>      Directory of CA certificates, where no
                            -nomad-ca-cert is given. Default: $NOMAD_CAPATH.
  -nomad-client-cert=<path> Client certificate and key for a Nomad that
  -nomad-client-key=<path>  verifies its HTTPS clients. Default:
                            $NOMAD_CLIENT_CERT, $NOMAD_CLIENT_KEY.
  -nomad-tls-server-name=<name>  Name to verify Nomad's certificate
                            against. Default: $NOMAD_TLS_SERVER_NAME.
  -nomad-skip-verify        Trust any certificate Nomad presents: for
                            tests only. Default: $NOMAD_SKIP_VERIFY.

  Callers of cohort carry a Nomad token (X-Nomad-Token) and may do what
  Nomad's ACLs let it do: submitting or stopping a gang needs submit-job on
  its namespace, reading needs read-job, membership and operator calls a
  management token. With Nomad's ACLs off, cohort is open as Nomad is.

  TLS, mutual between servers (see "cohort tls"):
  -ca-file=<path>           The cluster's CA certificate.
  -cert-file=<path>         This server's certificate (naming
  -key-file=<path>          server.cohort) and key. With them the API
                            speaks HTTPS (plain HTTP on the same port
                            serves only the barrier task's program and
                            health) and Raft runs over mutual TLS.
                            A group of servers needs them: joining,
                            registering, forwarding and replication take
                            a server certificate of the CA. The microvm
                            drivers show their node's certificate.
  -verify-incoming          Refuse API callers without a certificate of
                            the CA too. Default: off (callers are
                            authorized by their Nomad token).

  Billing prices, per hour of one unit, billed per millisecond from the
  moment a whole gang runs:
  -price-cpu-mhz-hour=<n>     Default: 0.00001.
  -price-memory-gib-hour=<n>  Default: 0.004.
  -price-device-hour=<n>      Default: 1.
  -currency=<code>            Default: USD.
`

func (c *ServerCommand) Help() string     { return serverHelp }
func (c *ServerCommand) Synopsis() string { return "Run the gang scheduler" }

// stringList is a repeatable flag.
type stringList []string

func (l *stringList) String() string { return strings.Join(*l, ",") }
func (l *stringList) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*l = append(*l, s)
		}
	}
	return nil
}

// ServerConfig is what one cohort server runs with.
type ServerConfig struct {
	DataDir, HTTPAddr, Advertise, RaftAddr, NodeID string
	NomadAddr, NomadListen                         string
	BootstrapExpect                                int
	Join                                           []string
	Prices                                         billing.Prices
	// BarrierTask is the cohort-barrier program; "" means none.
	BarrierTask string
	// RaftTimeouts are Raft's; zero means replica.DefaultTimeouts.
	RaftTimeouts replica.Timeouts
	// WorkerRange and WorkerPrefix are the nodes' worker subnets.
	WorkerRange  string
	WorkerPrefix int
	// Retention is how long ended runs are kept; 0 keeps them all.
	Retention time.Duration
	// ExtraHTTPAddrs are more addresses the API listens on (cohort dev:
	// loopback, beside the cluster network).
	ExtraHTTPAddrs []string
	Logger         hclog.Logger
	// Nomad is how the server reaches Nomad besides NomadAddr: its
	// token and TLS.
	Nomad nomad.Config
	// TLS is the cluster's CA and this server's certificate; none runs a
	// single server without TLS. VerifyIncoming refuses API callers
	// without a certificate of the CA too.
	TLS            tlsutil.Files
	VerifyIncoming bool
}

// DefaultRetention keeps a week of ended runs: long enough to read last
// week's bills, short enough that the state, its snapshots and every
// restore stay the size of what runs, not of all history.
const DefaultRetention = 7 * 24 * time.Hour

// DefaultGCHeapFloorMB is the garbage collector's heap floor, in MiB. A
// server's live heap is tens of MiB even at 20,000 nodes, and with Go's
// default pacing a busy leader collected several times a second, each
// cycle slowing the admissions of its moment (bench-scheduler's admit p99
// at 20,000 nodes: 3.9-7.4 ms with Go's default, 1.6-2.0 ms with this floor).
// 256 MiB is little beside the memory a scheduler's host has; a heap that
// outgrows it is collected as Go's default would.
const DefaultGCHeapFloorMB = 256

// maxGCHeapFloorMB (1 TiB) keeps the floor's GOGC and memory limit far
// from overflowing.
const maxGCHeapFloorMB = 1 << 20

// DefaultBarrierTask is cohort-barrier beside the running binary, if it
// is there.
func DefaultBarrierTask() string {
	exe, err := os.Executable()
	if err != nil {
		return ""
	}
	p := filepath.Join(filepath.Dir(exe), "cohort-barrier")
	if _, err := os.Stat(p); err != nil {
		return ""
	}
	return p
}

// ServerAgent is a running cohort server: replica, leader loop and HTTP.
type ServerAgent struct {
	Server    *server.Server
	HTTPAddr  string // where the API listens
	Scheme    string // "https" with TLS, else "http"
	NomadAddr string // where the Nomad-compatible endpoint listens, if on
	r         *replica.Replica
	servers   []*http.Server
	cancel    context.CancelFunc
	done      chan struct{}
	log       hclog.Logger
}

// StartServer starts a cohort server; Stop ends it.
func StartServer(cfg ServerConfig) (*ServerAgent, error) {
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	nc := cfg.Nomad
	nc.Address = cfg.NomadAddr
	n, err := nomad.New(nc)
	if err != nil {
		return nil, err
	}
	nomadTLS, err := nc.TLS()
	if err != nil {
		return nil, err
	}
	if nc.SkipVerify {
		cfg.Logger.Warn("nomad's certificate is not verified (-nomad-skip-verify): anyone on the path can read cohort's nomad token")
	}
	group := cfg.BootstrapExpect > 1 || len(cfg.Join) > 0
	var bundle *tlsutil.Bundle
	var apiTLS *tls.Config
	rc := replica.Config{
		ID: cfg.NodeID, Bind: cfg.RaftAddr, DataDir: filepath.Join(cfg.DataDir, "raft"),
		Logger: cfg.Logger, Timeouts: cfg.RaftTimeouts,
	}
	switch {
	case cfg.TLS.Enabled():
		if bundle, err = tlsutil.Load(cfg.TLS); err != nil {
			return nil, err
		}
		if cfg.Advertise != "" && !strings.HasPrefix(cfg.Advertise, "https://") && strings.Contains(cfg.Advertise, "://") {
			return nil, fmt.Errorf("-advertise %s: a server with TLS is reached at https://", cfg.Advertise)
		}
		// Callers' certificates are verified when given; -verify-incoming
		// is enforced per request, so barrier tasks (which have only
		// their job's token) still reach the barrier.
		if apiTLS, err = bundle.ServerConfig(false); err != nil {
			return nil, err
		}
		if rc.TLSServer, rc.TLSClient, err = bundle.RaftConfigs(); err != nil {
			return nil, err
		}
	case group:
		return nil, errors.New("a group of servers needs TLS (-ca-file, -cert-file, -key-file): servers must tell each other from anyone else who can reach their ports; \"cohort tls\" makes a CA and certificates")
	case cfg.VerifyIncoming:
		return nil, errors.New("-verify-incoming needs -ca-file, -cert-file and -key-file")
	default:
		// Nothing listens for Raft: a single server without TLS could not
		// tell a peer from anyone else.
		rc.Local = true
	}
	if !group {
		rc.Peers = map[string]string{cfg.NodeID: cfg.RaftAddr}
	}
	r, err := replica.Start(rc)
	if err != nil {
		return nil, fmt.Errorf("starting replica: %w", err)
	}
	a := &ServerAgent{r: r, done: make(chan struct{}), log: cfg.Logger}
	fail := func(err error) (*ServerAgent, error) {
		if a.Server != nil {
			a.Server.Close()
		}
		for _, hs := range a.servers {
			hs.Close()
		}
		r.Shutdown()
		return nil, err
	}
	srv, err := server.New(r, n, server.Config{Prices: cfg.Prices, Logger: cfg.Logger, BarrierTaskPath: cfg.BarrierTask,
		WorkerRange: cfg.WorkerRange, WorkerPrefix: cfg.WorkerPrefix, TLS: bundle, VerifyIncoming: cfg.VerifyIncoming,
		Retention: cfg.Retention})
	if err != nil {
		return fail(err)
	}
	a.Server = srv
	ln, err := net.Listen("tcp", cfg.HTTPAddr)
	if err != nil {
		return fail(fmt.Errorf("listening on %s: %w", cfg.HTTPAddr, err))
	}
	a.HTTPAddr = ln.Addr().String()
	a.Scheme = "http"
	if apiTLS != nil {
		a.Scheme = "https"
	}
	adv := cfg.Advertise
	if adv == "" {
		adv = a.Scheme + "://" + a.HTTPAddr
	}
	srv.Advertise(adv)
	serveAPI := func(l net.Listener) {
		if apiTLS == nil {
			a.serve(l, srv.Handler())
			return
		}
		tl, pl := tlsutil.Split(l, apiTLS)
		a.serve(tl, srv.Handler())
		a.serve(pl, srv.PlainHandler())
	}
	serveAPI(ln)
	for _, extra := range cfg.ExtraHTTPAddrs {
		l, err := net.Listen("tcp", extra)
		if err != nil {
			return fail(fmt.Errorf("listening on %s: %w", extra, err))
		}
		serveAPI(l)
	}
	if cfg.NomadListen != "" {
		nomadURL := cfg.NomadAddr
		if nomadURL == "" {
			nomadURL = "http://127.0.0.1:4646"
		}
		p, err := srv.NewNomadProxy(nomadURL, nomadTLS)
		if err != nil {
			return fail(err)
		}
		pl, err := net.Listen("tcp", cfg.NomadListen)
		if err != nil {
			return fail(fmt.Errorf("listening on %s: %w", cfg.NomadListen, err))
		}
		a.NomadAddr = pl.Addr().String()
		if apiTLS != nil {
			// Tokens travel through it: HTTPS with the API's certificate.
			pl = tls.NewListener(pl, apiTLS)
		}
		a.serve(pl, p)
	}
	if bundle == nil {
		cfg.Logger.Warn("running without TLS: a single server, whose node calls (subnet leases, microvm boot reports) are not authenticated; give -ca-file, -cert-file and -key-file to authenticate them and to form a group")
	}
	srv.ACLsOn() // says at start-up whether Nomad's ACLs are on
	ctx, cancel := context.WithCancel(context.Background())
	a.cancel = cancel
	go func() {
		defer close(a.done)
		srv.Run(ctx)
	}()
	if len(cfg.Join) > 0 || cfg.BootstrapExpect > 1 {
		go func() {
			if err := srv.Join(ctx, cfg.BootstrapExpect, cfg.Join); err != nil && ctx.Err() == nil {
				cfg.Logger.Error("joining the server group", "error", err)
			}
		}()
	}
	return a, nil
}

func (a *ServerAgent) serve(ln net.Listener, h http.Handler) {
	hs := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	a.servers = append(a.servers, hs)
	go hs.Serve(ln)
}

// Stop shuts the server down; its data stays.
func (a *ServerAgent) Stop() error {
	a.cancel()
	<-a.done
	// A leader that stops hands over first: its followers would otherwise
	// wait out their heartbeat timeout before electing another.
	if err := a.r.TransferLeadership(5 * time.Second); err != nil {
		a.log.Warn("stopping without handing over leadership; the others elect a leader when they notice", "error", err)
	}
	shut, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, hs := range a.servers {
		if err := hs.Shutdown(shut); err != nil && !errors.Is(err, http.ErrServerClosed) {
			hs.Close()
		}
	}
	a.Server.Close()
	return a.r.Shutdown()
}

func (c *ServerCommand) Run(args []string) int {
	if len(args) > 0 && args[0] == "members" {
		return c.members(args[1:])
	}
	fs := flagSet("server")
	var cfg ServerConfig
	fs.StringVar(&cfg.DataDir, "data-dir", "", "")
	dev := fs.Bool("dev", false, "")
	fs.StringVar(&cfg.HTTPAddr, "http-addr", "127.0.0.1:4747", "")
	fs.StringVar(&cfg.Advertise, "advertise", "", "")
	fs.StringVar(&cfg.RaftAddr, "raft-addr", "127.0.0.1:4748", "")
	host, _ := os.Hostname()
	fs.StringVar(&cfg.NodeID, "node-id", host, "")
	fs.IntVar(&cfg.BootstrapExpect, "bootstrap-expect", 1, "")
	fs.Var((*stringList)(&cfg.Join), "join", "")
	fs.StringVar(&cfg.NomadAddr, "nomad-addr", os.Getenv("NOMAD_ADDR"), "")
	fs.StringVar(&cfg.NomadListen, "nomad-listen", "", "")
	level := fs.String("log-level", "info", "")
	cfg.Prices = billing.DefaultPrices
	fs.Float64Var(&cfg.Prices.CPUMHzHour, "price-cpu-mhz-hour", cfg.Prices.CPUMHzHour, "")
	fs.Float64Var(&cfg.Prices.MemoryGiBHour, "price-memory-gib-hour", cfg.Prices.MemoryGiBHour, "")
	fs.Float64Var(&cfg.Prices.DeviceHour, "price-device-hour", cfg.Prices.DeviceHour, "")
	fs.StringVar(&cfg.Prices.Currency, "currency", cfg.Prices.Currency, "")
	fs.StringVar(&cfg.BarrierTask, "barrier-task", DefaultBarrierTask(), "")
	fs.StringVar(&cfg.WorkerRange, "worker-range", "10.213.0.0/16", "")
	fs.IntVar(&cfg.WorkerPrefix, "worker-prefix", 24, "")
	fs.DurationVar(&cfg.Retention, "retention", DefaultRetention, "")
	gcFloor := fs.Int("gc-heap-floor-mb", DefaultGCHeapFloorMB, "")
	rt := replica.DefaultTimeouts
	fs.DurationVar(&rt.Heartbeat, "raft-heartbeat-timeout", 0, "")
	fs.DurationVar(&rt.Election, "raft-election-timeout", 0, "")
	fs.DurationVar(&rt.LeaderLease, "raft-leader-lease-timeout", 0, "")
	fs.StringVar(&cfg.Nomad.Token, "nomad-token", os.Getenv("NOMAD_TOKEN"), "")
	fs.StringVar(&cfg.Nomad.CACert, "nomad-ca-cert", os.Getenv("NOMAD_CACERT"), "")
	fs.StringVar(&cfg.Nomad.ClientCert, "nomad-client-cert", os.Getenv("NOMAD_CLIENT_CERT"), "")
	fs.StringVar(&cfg.Nomad.ClientKey, "nomad-client-key", os.Getenv("NOMAD_CLIENT_KEY"), "")
	fs.StringVar(&cfg.Nomad.TLSServerName, "nomad-tls-server-name", os.Getenv("NOMAD_TLS_SERVER_NAME"), "")
	fs.StringVar(&cfg.Nomad.CAPath, "nomad-ca-path", os.Getenv("NOMAD_CAPATH"), "")
	skip, _ := strconv.ParseBool(os.Getenv("NOMAD_SKIP_VERIFY"))
	fs.BoolVar(&cfg.Nomad.SkipVerify, "nomad-skip-verify", skip, "")
	fs.StringVar(&cfg.TLS.CAFile, "ca-file", "", "")
	fs.StringVar(&cfg.TLS.CertFile, "cert-file", "", "")
	fs.StringVar(&cfg.TLS.KeyFile, "key-file", "", "")
	fs.BoolVar(&cfg.VerifyIncoming, "verify-incoming", false, "")
	if ok, code := parse(c.UI, fs, args, 0, serverHelp); !ok {
		return code
	}
	// Unset timeouts take the profile's: production, or one host for -dev.
	profile := replica.DefaultTimeouts
	if *dev {
		profile = replica.LANTimeouts
	}
	for _, t := range []struct{ set, def *time.Duration }{{&rt.Heartbeat, &profile.Heartbeat}, {&rt.Election, &profile.Election}, {&rt.LeaderLease, &profile.LeaderLease}} {
		if *t.set == 0 {
			*t.set = *t.def
		}
	}
	rt.Commit = profile.Commit
	if err := rt.Validate(); err != nil {
		c.UI.Error("Error: " + err.Error() + "\n\n" + serverHelp)
		return ExitUsage
	}
	cfg.RaftTimeouts = rt
	if cfg.DataDir == "" && !*dev {
		c.UI.Error("Error: -data-dir is required (or -dev)\n\n" + serverHelp)
		return ExitUsage
	}
	if *dev && (cfg.BootstrapExpect > 1 || len(cfg.Join) > 0) {
		c.UI.Error("Error: -dev runs a single server; it takes no -bootstrap-expect or -join\n\n" + serverHelp)
		return ExitUsage
	}
	if cfg.BootstrapExpect < 1 {
		c.UI.Error("Error: -bootstrap-expect must be at least 1\n\n" + serverHelp)
		return ExitUsage
	}
	if cfg.Retention < 0 {
		c.UI.Error("Error: -retention must not be negative (0 keeps every run)\n\n" + serverHelp)
		return ExitUsage
	}
	if *gcFloor < 0 || *gcFloor > maxGCHeapFloorMB {
		c.UI.Error(fmt.Sprintf("Error: -gc-heap-floor-mb must be from 0 (Go's default pacing) to %d\n\n", maxGCHeapFloorMB) + serverHelp)
		return ExitUsage
	}
	cfg.Logger = hclog.New(&hclog.LoggerOptions{Name: "cohort.server", Level: hclog.LevelFromString(*level), Output: os.Stderr})
	keepGCFloor(*gcFloor, cfg.Logger)
	if *dev {
		tmp, err := os.MkdirTemp("", "cohort-server-")
		if err != nil {
			c.UI.Error(err.Error())
			return ExitError
		}
		defer os.RemoveAll(tmp)
		cfg.DataDir = tmp
	}
	a, err := StartServer(cfg)
	if err != nil {
		c.UI.Error(fmt.Sprintf("Error starting server: %v", err))
		return ExitError
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	raftAt := "raft on " + a.r.Addr()
	if !cfg.TLS.Enabled() {
		raftAt = "raft local only (no TLS: a single server)"
	}
	msg := fmt.Sprintf("cohort server %s: API on %s://%s, %s", cfg.NodeID, a.Scheme, a.HTTPAddr, raftAt)
	if a.NomadAddr != "" {
		msg += fmt.Sprintf(", Nomad-compatible endpoint on %s://%s", a.Scheme, a.NomadAddr)
	}
	c.UI.Output(msg)
	<-ctx.Done()
	if err := a.Stop(); err != nil {
		cfg.Logger.Warn("shutting down", "error", err)
	}
	return ExitOK
}

// keepGCFloor applies -gc-heap-floor-mb to this process for its life.
func keepGCFloor(mb int, log hclog.Logger) {
	switch _, ok := gcfloor.Keep(uint64(mb) << 20); {
	case ok:
		log.Debug("garbage collector heap floor", "mib", mb)
	case mb > 0:
		log.Info("GOGC is set: it paces the garbage collector, and -gc-heap-floor-mb is ignored", "GOGC", os.Getenv("GOGC"))
	}
}

// members lists the server group.
func (c *ServerCommand) members(args []string) int {
	m := Meta{UI: c.UI}
	fs := m.FlagSet("server members", true)
	if ok, code := parse(c.UI, fs, args, 0, serverHelp); !ok {
		return code
	}
	ms, err := m.Client().Members()
	if err != nil {
		c.UI.Error(fmt.Sprintf("Error listing members: %v", err))
		return ExitError
	}
	if m.json {
		printJSON(c.UI, ms)
		return ExitOK
	}
	c.UI.Output(fmt.Sprintf("%-20s %-22s %-30s %-6s %s", "ID", "Raft", "API", "Voter", "Leader"))
	for _, m := range ms {
		api := m.HTTPAddr
		if api == "" {
			api = "-"
		}
		c.UI.Output(fmt.Sprintf("%-20s %-22s %-30s %-6t %t", m.ID, m.RaftAddr, api, m.Voter, m.Leader))
	}
	return ExitOK
}
