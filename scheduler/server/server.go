// Package server is `cohort server`: the Raft replica, the leader's
// scheduling loop that turns queued gangs into Nomad jobs all at once or
// not at all, the start barrier, deadlines, and the HTTP API.
//
// The code is split by concept: admission.go takes jobs in, leader.go is
// the leader loop, direct.go handles gangs registered with Nomad behind
// cohort's back, barrier.go the start barrier, http.go and cluster.go the
// API and the server group, nomadproxy.go the Nomad-compatible endpoint.
// The server reaches Raft and Nomad only through the Replica and Nomad
// interfaces below, so the whole leader loop runs in tests against Raft's
// in-memory transport and a fake Nomad.
package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cohort-dev/cohort/internal/tlsutil"
	"github.com/cohort-dev/cohort/scheduler/billing"
	"github.com/cohort-dev/cohort/scheduler/inventory"
	"github.com/cohort-dev/cohort/scheduler/nomad"
	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/cohort-dev/cohort/scheduler/replica"
	"github.com/cohort-dev/cohort/scheduler/state"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/api"
)

// Replica is what the server needs of its Raft replica; *replica.Replica
// is one.
type Replica interface {
	LocalID() string
	Addr() string
	IsLeader() bool
	Leader() (addr, id string)
	Configured() bool
	Members() ([]replica.Member, error)
	Bootstrap(peers map[string]string) error
	AddVoter(id, addr string, timeout time.Duration) error
	RemoveServer(id string, timeout time.Duration) error
	Restore(state []byte, timeout time.Duration) error
	Apply(c *state.Command, timeout time.Duration) (state.Result, error)
	Barrier(timeout time.Duration) error
	Read(fn func(*state.State))
	Changed() <-chan struct{}
	AppliedIndex() uint64
	// LogCodec is the log encoding every server of the group reads.
	LogCodec() int
}

// Nomad is what the server needs of a Nomad cluster; *nomad.Client is
// one.
type Nomad interface {
	// Watch keeps the inventory and the gang job list current until ctx
	// ends.
	Watch(ctx context.Context, log hclog.Logger)
	Inventory(skip map[string]bool) ([]placement.Node, error)
	// Changed is Inventory's incremental form, for the inventory the
	// leader keeps (see scheduler/inventory).
	Changed(since nomad.Cursor, nodes, jobs []string, skip func(key string) bool) (map[string]placement.Node, nomad.Cursor, bool)
	Capacity() ([]placement.Node, error)
	GangJobs() []nomad.GangJob
	Validate(job *api.Job) error
	Register(job *api.Job) (nomad.Registration, error)
	Job(ns, id string) (*api.Job, error)
	Allocs(ns, id string, version uint64) (nomad.Allocs, error)
	// AllocDevices is the devices Nomad gave one allocation, by kind.
	AllocDevices(ns, id string) (map[string]int, error)
	AllocIndex(ns, id string) uint64
	Stop(ns, id string) error
	// PutBarrierToken and DropBarrierToken keep a job's barrier token in
	// the job's Nomad variable, which its tasks read and read-job does
	// not.
	PutBarrierToken(ns, id, token string) error
	DropBarrierToken(ns, id, token string) error

	// What a caller's token may do, asked of Nomad with that token (see
	// nomad/acl.go): nil, an error wrapping nomad.ErrDenied, or one
	// saying Nomad could not be asked.
	CanSubmit(token string, job *api.Job) error
	// CanMount is the exception: the mounts Nomad checks only at
	// registration, judged on the token's policies (see nomad/mounts.go).
	CanMount(token string, job *api.Job) error
	CanReadJob(token, ns string) error
	CanReadNodes(token string) error
	IsManagement(token string) error
	ACLsEnabled() (bool, error)
}

var (
	_ Replica = (*replica.Replica)(nil)
	_ Nomad   = (*nomad.Client)(nil)
)

// tick is the leader loop's period; it bounds how late a deadline is
// enforced and how soon a freed reservation is reused.
const tick = 20 * time.Millisecond

// MaxAttempts is how many times a gang is placed before a failure to start
// fails it for good.
const MaxAttempts = 3

// Config is what a server runs with besides its replica and Nomad.
type Config struct {
	Prices billing.Prices
	Logger hclog.Logger
	// BarrierTaskPath is the static cohort-barrier program the server
	// hands Nomad clients as an artifact, for gangs on drivers without a
	// start barrier of their own; "" means none (such gangs are refused).
	BarrierTaskPath string
	// Now is the clock; nil means time.Now. Tests move it by hand.
	Now func() time.Time
	// WorkerRange and WorkerPrefix: the nodes' worker subnets are /prefix
	// subnets of the range (state.DefaultWorkerRange and Prefix when
	// empty), fixed by the first lease granted.
	WorkerRange  string
	WorkerPrefix int
	// TLS is the cluster's CA and this server's certificate; nil runs
	// without TLS, a single server (see auth.go). VerifyIncoming refuses
	// API callers without a certificate of the CA, but for barrier
	// tasks' reports, which their job's token authenticates.
	TLS            *tlsutil.Bundle
	VerifyIncoming bool
	// Retention is how long an ended run (its status and bill) is kept
	// once its Nomad job is deregistered; 0 keeps every run.
	Retention time.Duration
}

// Server is one cohort server.
type Server struct {
	r       Replica
	metrics *metrics
	// waitMu guards waitCache, the last explanation of the queue;
	// waitCompute lets one request at a time compute a new one.
	waitMu, waitCompute sync.Mutex
	waitCache           waitCache
	nomad               Nomad
	log                 hclog.Logger
	now                 func() time.Time
	prices              billing.Prices
	self                state.Member // set by Advertise
	// barrierTask is the archive served to Nomad clients, if any.
	barrierTask *barrierArchive
	// workerRange and workerPrefix are the nodes' worker subnets.
	workerRange  string
	workerPrefix int
	// lastRegister rate-limits a follower's requests to record itself.
	lastRegister time.Time
	// codecAsked (Unix ns) rate-limits asking again when only the
	// recorded log codec differs, as it does under a leader of the
	// version before.
	codecAsked atomic.Int64
	// schedMu serialises placing gangs: the leader loop's passes and
	// admissions that place a gang on arrival. It guards inflight: the
	// admissions placed whose commit has not returned yet.
	schedMu  sync.Mutex
	inflight map[string]inflight
	// view is the free inventory admissions place on, kept by deltas;
	// heldCur is its place in the state's log of changed holdings, and
	// inflightGone the admissions in flight forgotten since it last read
	// them (all under schedMu).
	view         *inventory.View
	heldCur      state.HeldCursor
	inflightGone map[string]bool
	// restoreMu keeps a restore of the state apart from admissions: they
	// hold it shared from placement to commit, a restore exclusively.
	restoreMu sync.RWMutex
	// jobLocks holds a mutex per job key. Whatever registers a job with
	// Nomad, stops it, or deals with a job registered behind cohort's
	// back holds it, so a stop can never be overtaken by a registration
	// of the same job: a registration checks the state under the lock
	// after a stop committed, or the stop deregisters what it
	// registered.
	jobLocks sync.Map
	// batch commits admissions and boot reports together.
	batch *replica.Batcher
	// kick wakes the leader loop early (a worker booted).
	kick chan struct{}
	// tls is the cluster's CA and this server's certificate, if any;
	// peers calls other servers with them.
	tls            *tlsutil.Bundle
	verifyIncoming bool
	peerHTTP       *http.Client
	// acl caches Nomad's verdicts on callers' tokens.
	acl aclCache
	// bootAllocs caches, per job, Nomad's allocations for checking boot
	// reports.
	bootAllocs allocCache
	// peers caches each released gang's worker addresses.
	peers peerCache

	// Leader loop only, reset when leadership is lost:
	// seen caches each watched job's allocations;
	seen map[string]seenAllocs
	// retry holds when Nomad may next be asked about a job whose last
	// call did not reach it;
	retry map[string]time.Time
	// direct remembers the Nomad registrations (by JobModifyIndex)
	// already dealt with as gangs registered behind cohort's back.
	direct map[string]uint64
	loopMu sync.Mutex // guards retry and direct against barrier calls
	// retention and lastPrune: see pruneIfDue (lastPrune under schedMu).
	retention time.Duration
	lastPrune time.Time
}

// New returns a server over a started replica and a Nomad client.
func New(r Replica, n Nomad, cfg Config) (*Server, error) {
	log := cfg.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	now := cfg.Now
	if now == nil {
		now = time.Now
	}
	s := &Server{r: r, nomad: n, log: log, now: now, prices: cfg.Prices,
		inflight: map[string]inflight{}, view: inventory.New(n), inflightGone: map[string]bool{}, batch: replica.NewBatcher(r), kick: make(chan struct{}, 1),
		retry: map[string]time.Time{}, direct: map[string]uint64{},
		workerRange: cfg.WorkerRange, workerPrefix: cfg.WorkerPrefix, tls: cfg.TLS, verifyIncoming: cfg.VerifyIncoming && cfg.TLS != nil,
		retention: cfg.Retention}
	s.metrics = newMetrics(s)
	if cfg.TLS != nil {
		if !cfg.TLS.IsServer() {
			s.batch.Close()
			return nil, fmt.Errorf("the server's certificate must name %s", tlsutil.ServerName)
		}
		s.peerHTTP = cfg.TLS.HTTPClient(0)
	}
	if s.workerRange != "" {
		_, rng, err := net.ParseCIDR(s.workerRange)
		ones, bits := 0, 32
		if err == nil {
			ones, bits = rng.Mask.Size()
		}
		if err != nil || rng.IP.To4() == nil || s.workerPrefix < ones || s.workerPrefix > bits-2 {
			s.batch.Close()
			return nil, fmt.Errorf("worker range %q with /%d subnets: want an IPv4 CIDR whose prefix is at most the subnets' (and subnets of at least 4 addresses)", s.workerRange, s.workerPrefix)
		}
	}
	if cfg.BarrierTaskPath != "" {
		a, err := loadBarrierArchive(cfg.BarrierTaskPath)
		if err != nil {
			s.batch.Close()
			return nil, err
		}
		s.barrierTask = a
	}
	return s, nil
}

// Close stops the server's commit batcher; call it after Run has returned.
func (s *Server) Close() { s.batch.Close() }

// ErrRejected wraps the reason a job can never run.
var ErrRejected = errors.New("job rejected")

// ErrNoJob is a request about a job cohort does not know.
var ErrNoJob = errors.New("no such job")

// lockJob takes the job's lock; call the returned function to release it.
func (s *Server) lockJob(key string) func() {
	m, _ := s.jobLocks.LoadOrStore(key, &sync.Mutex{})
	mu := m.(*sync.Mutex)
	mu.Lock()
	return mu.Unlock
}

// job reads a copy of a job, safe to use without the state's lock.
func (s *Server) job(key string) (state.Job, bool) {
	var j state.Job
	var ok bool
	s.r.Read(func(st *state.State) {
		var p *state.Job
		if p, ok = st.Jobs[key]; ok {
			j = p.Clone()
		}
	})
	return j, ok
}

func (s *Server) apply(c *state.Command) (state.Result, error) {
	res, err := s.r.Apply(c, 5*time.Second)
	if err != nil {
		return res, err
	}
	if res.Err != "" {
		return res, errors.New(res.Err)
	}
	return res, nil
}

// wake asks the leader loop for a pass now.
func (s *Server) wake() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("encoding %T: %v", v, err))
	}
	return b
}

func deref[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}
