package server

// The start barrier. A worker of a gang boots and then waits before
// running its program: a microvm worker inside its VM (its driver
// reports), any other worker behind cohort's barrier task, a prestart task
// that reports and exits on release. The report is a long poll:
//
//	POST /v1/barrier/{nomad job ID}?namespace=NS
//	     {"Alloc": "<alloc ID>", "Instance": "<this start>", "Wait": "30s", "Address": "<worker IP>"}
//	  -> {"Status": "wait" | "release" | "abort", "Reason": "...",
//	      "Peers": [{"Group": "g", "Rank": 0, "Address": "<IP>"}, ...]}
//
// A release lists the addresses of the gang's workers (those whose
// reports gave one that placeBoot kept), by group and rank as Nomad lists
// their allocations: the microvm driver writes them into its worker's
// hosts file under the workers' names, so a gang's own names resolve
// without a DNS query per peer through the node's forwarder and Consul,
// and do not depend on Consul at all once the gang runs.
//
// The first call records the boot in Raft (forwarded to the leader like
// any write); calls are idempotent, so a reporter simply repeats one until
// the answer is not "wait", trying the next server when one fails. The
// leader records the gang running (billing starts) once every live worker
// of the gang has booted, and that commit is the release: every waiting
// call answers "release" as soon as it is applied. An allocation that
// reports again as another instance (its task was restarted) is aborted:
// a worker never rejoins a gang that may have moved on without it.
//
// HTTP to the servers was chosen over Consul KV or Nomad variables: the
// leader is the one that decides, the answer comes in one round trip
// after the decision's commit, and nothing needs cleaning up afterwards.

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"sort"
	"sync"
	"time"

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/scheduler/nomad"
	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/cohort-dev/cohort/scheduler/state"
)

// maxBarrierWait bounds a long poll, under common proxy idle timeouts.
const maxBarrierWait = 55 * time.Second

// Boot records that a worker of a job booted, dealing with a job cohort
// does not know as a gang registered with Nomad directly. It must run on
// the leader.
func (s *Server) Boot(ns, jobID string, req api.BarrierRequest) (api.BarrierResponse, error) {
	return s.BootOn(ns, jobID, req, "")
}

// BootOn is Boot for a report from node ("" when the reporter's node is
// not known: a barrier task, or a server without TLS). A boot is
// recorded only for an allocation Nomad says is a live worker of the
// gang's current registration, on that node.
func (s *Server) BootOn(ns, jobID string, req api.BarrierRequest, node string) (api.BarrierResponse, error) {
	key := placement.Key(ns, jobID)
	var known, recorded bool
	s.r.Read(func(st *state.State) {
		j, ok := st.Jobs[key]
		known = ok && !j.Ended()
		if known {
			_, recorded = j.Booted[req.Alloc]
		}
	})
	if !known {
		v, err := s.Direct(ns, jobID)
		if err != nil || v.Status == api.BarrierAbort {
			return v, err
		}
	}
	var reserved bool
	s.r.Read(func(st *state.State) {
		j, ok := st.Jobs[key]
		reserved = ok && j.Status == state.Reserved
	})
	if !recorded && reserved {
		// Only a gang waiting for its workers takes boots; any other
		// answer (sent back to the queue, started without this worker,
		// ended) is the verdict's.
		w, v, err := s.checkAlloc(ns, jobID, req.Alloc, node)
		if err != nil || v.Status == api.BarrierAbort {
			return v, err
		}
		// A big gang's workers report at once: their boots share commits.
		at := s.now()
		res, err := s.batch.Apply(&state.Command{Op: state.OpBoot, At: at, JobID: key, Alloc: req.Alloc, Instance: req.Instance,
			Boot: s.placeBoot(jobID, w, req.Address, node)})
		if err != nil {
			return api.BarrierResponse{}, err
		}
		if res.Err == "" {
			// Counted once, by the report whose boot was recorded, and
			// bounded: a report is a node's word, not a measurement the
			// server can check.
			mine := false
			if res.Job != nil {
				b, ok := res.Job.Booted[req.Alloc]
				mine = ok && b.At.Equal(at) && b.Instance == req.Instance
			}
			if mine && (req.Started == "restore" || req.Started == "cold") && req.StartMillis > 0 && req.StartMillis < 600_000 {
				s.metrics.vmStart.WithLabelValues(req.Started).Observe(float64(req.StartMillis) / 1000)
			}
			s.log.Debug("worker booted at the barrier", "job", key, "alloc", req.Alloc)
			s.wake()
		}
	}
	return s.verdict(key, req), nil
}

// placeBoot is where a booting worker is: its group and rank as Nomad
// lists its allocation (a group split across nodes is one task group per
// worker, "group[rank]"), and the address its node reported when that
// address is one the node may give its workers: inside that node's
// worker subnet when the report carries the node's certificate, inside
// the cluster's worker range otherwise. An address that is not, or any
// address while no worker range is leased, is left out: the worker's
// name then resolves through DNS alone.
func (s *Server) placeBoot(jobID string, w nomad.Worker, address, node string) *state.Boot {
	group, rank, ok := nomad.ParseWorkerName(nomad.WorkerName(jobID, w))
	if !ok {
		return nil
	}
	b := &state.Boot{Group: group, Rank: rank}
	if address == "" {
		return b
	}
	ip := net.ParseIP(address)
	within := ""
	s.r.Read(func(st *state.State) {
		if st.Leases == nil {
			return
		}
		within = st.Leases.Range
		if l, ok := st.Leases.ByNode[node]; ok && node != "" && l.Subnet != "" {
			within = l.Subnet
		}
	})
	if within == "" {
		s.log.Warn("a boot report gave an address, but no worker range is leased to check it against; the worker's name resolves through DNS only",
			"alloc", w.Alloc, "node", node, "address", address)
		return b
	}
	_, n, err := net.ParseCIDR(within)
	if err != nil || !n.Contains(ip) {
		s.log.Warn("a boot report gave an address outside its node's worker subnet; the worker's name resolves through DNS only",
			"alloc", w.Alloc, "node", node, "address", address, "subnet", within)
		return b
	}
	b.Address = ip.String()
	return b
}

// peerCache keeps each running gang's peer list, built once per run:
// every worker of a gang of n asks for it, and n lists of n would cost
// O(n²) under the state's read lock.
type peerCache struct {
	mu   sync.Mutex
	runs map[string]cachedPeers
}

type cachedPeers struct {
	run     int
	started time.Time
	peers   []api.BarrierPeer
}

func (c *peerCache) of(j *state.Job) []api.BarrierPeer {
	key := j.Key()
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.runs[key]; ok && e.run == j.Run && e.started.Equal(j.StartedAt) {
		return e.peers
	}
	if c.runs == nil || len(c.runs) > 1024 {
		c.runs = map[string]cachedPeers{}
	}
	ps := peersOf(j)
	c.runs[key] = cachedPeers{run: j.Run, started: j.StartedAt, peers: ps}
	return ps
}

// peersOf lists the booted workers of a gang whose addresses are known.
func peersOf(j *state.Job) []api.BarrierPeer {
	var ps []api.BarrierPeer
	for _, b := range j.Booted {
		if b.Address != "" {
			ps = append(ps, api.BarrierPeer{Group: b.Group, Rank: b.Rank, Address: b.Address})
		}
	}
	sort.Slice(ps, func(a, b int) bool {
		if ps[a].Group != ps[b].Group {
			return ps[a].Group < ps[b].Group
		}
		return ps[a].Rank < ps[b].Rank
	})
	return ps
}

// verdict is what a worker waiting at the barrier is told now.
func (s *Server) verdict(key string, req api.BarrierRequest) api.BarrierResponse {
	v := api.BarrierResponse{Status: api.BarrierWait}
	s.r.Read(func(st *state.State) {
		j, ok := st.Jobs[key]
		if !ok {
			return // a follower not yet caught up
		}
		b, booted := j.Booted[req.Alloc]
		restarted := booted && b.Instance != req.Instance
		switch {
		case restarted && (j.Status == state.Reserved || j.Status == state.Running):
			v = abort("allocation %s already booted in this attempt of the gang and was restarted; a restarted worker never rejoins its gang", req.Alloc)
		case j.Status == state.Reserved:
		case j.Status == state.Running && booted:
			v = api.BarrierResponse{Status: api.BarrierRelease, Peers: s.peers.of(j)}
		case j.Status == state.Running:
			v = abort("the gang started without this worker")
		case j.Status == state.Queued:
			v = abort("the gang was sent back to the queue: %s", j.Reason)
		default:
			v = abort("the gang is %s: %s", j.Status, j.Reason)
		}
	})
	return v
}

// awaitVerdict holds a call until the verdict is not "wait" or ctx ends.
func (s *Server) awaitVerdict(ctx context.Context, key string, req api.BarrierRequest, first api.BarrierResponse) api.BarrierResponse {
	v := first
	for v.Status == api.BarrierWait {
		changed := s.r.Changed()
		if v = s.verdict(key, req); v.Status != api.BarrierWait {
			break
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return v
		}
	}
	return v
}

// ParseBarrier checks a boot report: a Nomad allocation ID (a UUID), a
// bounded instance name and wait.
func ParseBarrier(req api.BarrierRequest) (time.Duration, error) {
	if !isUUID(req.Alloc) {
		return 0, fmt.Errorf(`Alloc must be a Nomad allocation ID (a UUID); got %.64q`, req.Alloc)
	}
	if len(req.Instance) > 64 {
		return 0, fmt.Errorf("Instance is %d bytes long; at most 64 are allowed", len(req.Instance))
	}
	if req.Address != "" && (len(req.Address) > 45 || net.ParseIP(req.Address) == nil) {
		return 0, fmt.Errorf("Address must be an IP address; got %.48q", req.Address)
	}
	if req.Wait == "" {
		return 0, nil
	}
	d, err := time.ParseDuration(req.Wait)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("Wait must be a duration such as \"30s\"; got %.32q", req.Wait)
	}
	return min(d, maxBarrierWait), nil
}

func isUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i, c := range s {
		switch {
		case i == 8 || i == 13 || i == 18 || i == 23:
			if c != '-' {
				return false
			}
		case '0' <= c && c <= '9', 'a' <= c && c <= 'f', 'A' <= c && c <= 'F':
		default:
			return false
		}
	}
	return true
}

func (s *Server) handleBarrier(w http.ResponseWriter, r *http.Request) {
	ns, id, ok := jobRef(w, r, "job")
	if !ok {
		return
	}
	var req api.BarrierRequest
	if !decodeBody(w, r, maxSmallBody, &req) {
		return
	}
	wait, err := ParseBarrier(req)
	if err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	// A node's driver reports with the node's certificate (the leader is
	// told which node a forwarding server verified); a barrier task with
	// its job's token.
	c := s.callerOf(r)
	node := c.node
	if s.tls != nil && node == "" && !s.validBarrierToken(placement.Key(ns, id), req.Token) {
		refuse(w, fmt.Errorf("%w: a boot report needs the node's certificate from the cluster's CA or the job's barrier token", nomad.ErrDenied))
		return
	}
	v, err := s.BootOn(ns, id, req, node)
	if err != nil {
		writeErr(w, http.StatusInternalServerError, fmt.Errorf("recording the boot of %s: %w", req.Alloc, err))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), wait)
	defer cancel()
	writeJSON(w, http.StatusOK, s.awaitVerdict(ctx, placement.Key(ns, id), req, v))
}

// allocCache keeps each job's allocations as Nomad last listed them, so
// the reports of a gang's workers, which come at once, cost one listing.
type allocCache struct {
	mu   sync.Mutex
	jobs map[string]*jobAllocs
}

type jobAllocs struct {
	mu      sync.Mutex // held while listing
	version uint64
	at      time.Time
	byID    map[string]nomad.Worker
	live    map[string]bool
}

// allocFresh is how old a listing may be and still count for an
// allocation it holds: allocations do not change job or node.
const allocFresh = 10 * time.Second

// checkAlloc says whether alloc is a live worker of the job's current
// Nomad registration on node (any node when ""): an abort verdict when
// it is not, an error when Nomad cannot tell now.
func (s *Server) checkAlloc(ns, id, alloc, node string) (nomad.Worker, api.BarrierResponse, error) {
	key := placement.Key(ns, id)
	// The leader records a registration just after Nomad takes it: a
	// quick worker may report first.
	var version uint64
	deadline := time.Now().Add(3 * time.Second)
	for {
		changed := s.r.Changed()
		var registered, ended bool
		s.r.Read(func(st *state.State) {
			if j, ok := st.Jobs[key]; ok {
				registered, version, ended = j.NomadIndex != 0, j.NomadVersion, j.Ended()
			}
		})
		if ended {
			return nomad.Worker{}, api.BarrierResponse{Status: api.BarrierAbort, Reason: "the gang has ended"}, nil
		}
		if registered {
			break
		}
		if time.Now().After(deadline) {
			return nomad.Worker{}, api.BarrierResponse{}, fmt.Errorf("gang %s is not registered with nomad yet", key)
		}
		select {
		case <-changed:
		case <-time.After(50 * time.Millisecond):
		}
	}
	c := &s.bootAllocs
	c.mu.Lock()
	if c.jobs == nil {
		c.jobs = map[string]*jobAllocs{}
	}
	ja := c.jobs[key]
	if ja == nil {
		if len(c.jobs) > 1024 {
			c.jobs = map[string]*jobAllocs{}
		}
		ja = &jobAllocs{}
		c.jobs[key] = ja
	}
	c.mu.Unlock()

	ja.mu.Lock()
	defer ja.mu.Unlock()
	w, ok := ja.byID[alloc]
	if !ok || ja.version != version || time.Since(ja.at) > allocFresh {
		a, err := s.nomad.Allocs(ns, id, version)
		if err != nil {
			return nomad.Worker{}, api.BarrierResponse{}, fmt.Errorf("asking nomad about allocation %s: %w", alloc, err)
		}
		ja.version, ja.at, ja.live = version, time.Now(), a.Live
		ja.byID = make(map[string]nomad.Worker, len(a.Workers))
		for _, w := range a.Workers {
			ja.byID[w.Alloc] = w
		}
		w, ok = ja.byID[alloc]
	}
	switch {
	case !ok:
		return w, abort("allocation %s is not a worker of version %d of gang %s", alloc, version, key), nil
	case !ja.live[alloc]:
		return w, abort("allocation %s is %s", alloc, w.Status), nil
	case node != "" && w.NodeName != node:
		return w, abort("allocation %s runs on node %s, not on %s, which reported it", alloc, w.NodeName, node), nil
	}
	return w, api.BarrierResponse{Status: api.BarrierWait}, nil
}
