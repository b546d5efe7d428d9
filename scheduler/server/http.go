package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strconv"
	"strings"

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/jobspec"
	"github.com/cohort-dev/cohort/scheduler/billing"
	"github.com/cohort-dev/cohort/scheduler/nomad"
	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/cohort-dev/cohort/scheduler/replica"
	"github.com/cohort-dev/cohort/scheduler/state"
	nomadapi "github.com/hashicorp/nomad/api"
)

// Request body limits. A job is the largest thing anyone sends; Nomad
// itself takes jobs of a few MiB at most.
const (
	maxJobBody   = 4 << 20
	maxSmallBody = 16 << 10
)

func view(j *state.Job) api.JobView {
	v := api.JobView{
		ID: j.Spec.ID, Namespace: orDefault(j.Spec.Namespace), Status: string(j.Status), Priority: j.Spec.Priority, Workers: j.Spec.Size(),
		Reason: j.Reason, Attempts: j.Attempts, SubmittedAt: j.SubmittedAt, ReservedAt: j.ReservedAt,
		StartedAt: j.StartedAt, EndedAt: j.EndedAt, Adopted: j.Adopted, Run: j.Run,
	}
	if !j.StartedAt.IsZero() {
		v.Deadline = j.Deadline()
	}
	if j.Decision != nil {
		nodes := map[string]bool{}
		for _, w := range j.Decision.Workers {
			nodes[w.Node] = true
		}
		v.Nodes = len(nodes)
	}
	return v
}

func orDefault(ns string) string {
	if ns == "" {
		return api.DefaultNamespace
	}
	return ns
}

// Handler is the JSON HTTP API. Job endpoints take ?namespace= as Nomad's
// do (default: "default").
//
//	POST   /v1/jobs      {"Job": <Nomad job with cohort meta>} -> SubmitResponse
//	GET    /v1/jobs      -> []JobView in submission order
//	GET    /v1/job/{id}  -> JobView (?workers=1 adds each worker's state)
//	DELETE /v1/job/{id}  stop the job, at any stage
//	GET    /v1/job/{id}/bill[?run=N] -> Bill, per worker and millisecond
//	GET    /v1/leader    -> {"ID", "Address"} of the Raft leader
//	GET    /v1/health    -> 200 when this replica has a leader
//	GET    /v1/queue     -> queued jobs in scheduling order
//	GET    /metrics      -> Prometheus text format
//	POST   /v1/barrier/{job}  a worker's boot report; see barrier.go
//	GET    /v1/barrier-task/cohort-barrier.tar.gz  the barrier task's program
//	GET    /v1/nodes     -> []NodeView: capacity and what is free, as placement sees it
//	GET    /v1/members   -> []MemberView, the Raft group
//	GET    /v1/agent/self -> AgentSelf
//	POST   /v1/members/join, /v1/members/register  (between servers)
//	POST   /v1/network/lease {"Node", "Address"} -> Lease: a node's worker subnet
//	GET    /v1/network/leases[?index=N&wait=D] -> LeaseTable, blocking when index is given
//	DELETE /v1/network/lease/{node}  give a node's subnet up
//
// Writes on a follower are forwarded to the leader; while no leader is
// known they answer 503.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/jobs", s.leaderOnly(s.handleSubmit))
	mux.HandleFunc("GET /v1/jobs", s.handleList)
	mux.HandleFunc("GET /v1/job/{id}", s.handleGet)
	mux.HandleFunc("DELETE /v1/job/{id}", s.leaderOnly(s.handleStop))
	mux.HandleFunc("POST /v1/barrier/{job}", s.leaderOnly(s.handleBarrier))
	mux.HandleFunc("GET "+barrierTaskPath, s.handleBarrierTask)
	mux.HandleFunc("GET /v1/nodes", s.handleNodes)
	mux.HandleFunc("GET /v1/members", s.handleMembers)
	mux.HandleFunc("GET /v1/agent/self", s.handleAgentSelf)
	mux.HandleFunc("POST /v1/members/join", s.leaderOnly(s.handleJoin))
	mux.HandleFunc("POST /v1/members/register", s.leaderOnly(s.handleRegister))
	mux.HandleFunc("DELETE /v1/members/{id}", s.leaderOnly(s.handleRemoveMember))
	mux.HandleFunc("GET /v1/operator/snapshot", s.leaderOnly(s.handleSnapshotSave))
	mux.HandleFunc("PUT /v1/operator/snapshot", s.leaderOnly(s.handleSnapshotRestore))
	mux.HandleFunc("GET /v1/job/{id}/bill", s.handleBill)
	mux.HandleFunc("GET /v1/leader", s.handleLeader)
	mux.HandleFunc("GET /v1/health", s.handleHealth)
	mux.HandleFunc("GET /v1/queue", s.handleQueue)
	mux.Handle("GET /metrics", s.metrics.handler())
	mux.HandleFunc("GET /ui/{$}", s.handleUI)
	mux.HandleFunc("POST /ui/token", s.handleUIToken)
	mux.Handle("GET /ui", http.RedirectHandler("/ui/", http.StatusMovedPermanently))
	mux.HandleFunc("POST /v1/network/lease", s.leaderOnly(s.handleLease))
	mux.HandleFunc("DELETE /v1/network/lease/{node}", s.leaderOnly(s.handleReleaseLease))
	// The leader answers the table: a lease's activity is judged by the
	// clock that stamped its renewals.
	mux.HandleFunc("GET /v1/network/leases", s.leaderOnly(s.handleLeases))
	if !s.verifyIncoming {
		return mux
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		verified := r.TLS != nil && len(r.TLS.VerifiedChains) > 0
		if !verified && !strings.HasPrefix(r.URL.Path, "/v1/barrier/") {
			writeErr(w, http.StatusForbidden, errors.New("permission denied: this server verifies its callers (-verify-incoming): call it with a certificate of the cluster's CA (cohort tls cert create -cli)"))
			return
		}
		mux.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false) // errors quote job specs; keep them readable
	enc.Encode(v)
}

func writeErr(w http.ResponseWriter, code int, err error) {
	writeJSON(w, code, api.ErrorBody{Error: err.Error()})
}

// decodeBody decodes a JSON body of at most limit bytes into v, answering
// 400 (or 413) itself when it cannot.
func decodeBody(w http.ResponseWriter, r *http.Request, limit int64, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, limit))
	if err := dec.Decode(v); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			writeErr(w, http.StatusRequestEntityTooLarge, fmt.Errorf("request body over %d bytes", limit))
			return false
		}
		writeErr(w, http.StatusBadRequest, fmt.Errorf("decoding the request body: %v", err))
		return false
	}
	if _, err := dec.Token(); err != io.EOF {
		writeErr(w, http.StatusBadRequest, errors.New("the request body holds more than one JSON value"))
		return false
	}
	return true
}

// jobRef reads and checks a job's namespace (?namespace=) and ID (the path
// value name).
func jobRef(w http.ResponseWriter, r *http.Request, name string) (ns, id string, ok bool) {
	id = r.PathValue(name)
	ns = r.URL.Query().Get("namespace")
	if err := jobspec.ValidateJobID(id); err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return "", "", false
	}
	if err := jobspec.ValidateNamespace(ns); err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return "", "", false
	}
	return normNS(ns), id, true
}

func (s *Server) notLeader(w http.ResponseWriter) bool {
	if s.r.IsLeader() {
		return false
	}
	s.writeNotLeader(w)
	return true
}

// writeNotLeader answers 503 with where the leader is, as far as this
// server knows. A command refused as not the leader's is answered so
// even while this server still says it leads: it is handing leadership
// over, or has just lost it, and the caller should retry.
func (s *Server) writeNotLeader(w http.ResponseWriter) {
	addr, id := s.r.Leader()
	writeJSON(w, http.StatusServiceUnavailable, api.ErrorBody{Error: "not the leader", LeaderID: id, LeaderAddress: addr})
}

func (s *Server) handleSubmit(w http.ResponseWriter, r *http.Request) {
	var body api.SubmitRequest
	if !decodeBody(w, r, maxJobBody, &body) {
		return
	}
	if body.Job == nil {
		writeErr(w, http.StatusBadRequest, errors.New(`body must be {"Job": <nomad job>}`))
		return
	}
	// The caller's token must be allowed to register the job as cohort
	// will: Nomad plans the normalized job with it.
	nj, _, err := s.Normalize(body.Job)
	if err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	if c := s.callerOf(r); !allowed(w, s.maySubmit(c, nj)) || !allowed(w, s.mayMount(c, nj)) {
		return
	}
	sub, err := s.Submit(body.Job)
	switch {
	case errors.Is(err, ErrRejected):
		writeErr(w, http.StatusBadRequest, err)
	case errors.Is(err, replica.ErrNotLeader):
		s.writeNotLeader(w)
	case err != nil:
		writeErr(w, http.StatusInternalServerError, err)
	default:
		writeJSON(w, http.StatusOK, api.SubmitResponse{JobView: view(&sub.Job), Warnings: sub.Notes})
	}
}

func (s *Server) handleList(w http.ResponseWriter, r *http.Request) {
	all := []api.JobView{}
	s.r.Read(func(st *state.State) {
		for _, j := range st.Jobs {
			all = append(all, view(j))
		}
	})
	out, ok := s.readable(w, r, all)
	if !ok {
		return
	}
	sort.Slice(out, func(a, b int) bool { return out[a].SubmittedAt.Before(out[b].SubmittedAt) })
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) handleGet(w http.ResponseWriter, r *http.Request) {
	ns, id, ok := jobRef(w, r, "id")
	if !ok || !allowed(w, s.mayRead(s.callerOf(r), ns)) {
		return
	}
	job, ok := s.job(placement.Key(ns, id))
	if !ok {
		writeErr(w, http.StatusNotFound, fmt.Errorf("no job %s", placement.Key(ns, id)))
		return
	}
	v := view(&job)
	if job.Status == state.Queued {
		if n, ok := s.waiting()[job.Key()]; ok {
			v.Waiting = s.waitText(s.callerOf(r), n)
		}
	}
	if r.URL.Query().Get("workers") != "" {
		var a nomad.Allocs
		if job.NomadIndex != 0 {
			var err error
			if a, err = s.nomad.Allocs(job.Spec.Namespace, job.Spec.ID, job.NomadVersion); err != nil {
				writeErr(w, http.StatusBadGateway, fmt.Errorf("reading the gang's allocations: %w", err))
				return
			}
		}
		v.WorkerStates = workerViews(&job, a)
	}
	writeJSON(w, http.StatusOK, v)
}

func (s *Server) handleBill(w http.ResponseWriter, r *http.Request) {
	ns, id, ok := jobRef(w, r, "id")
	if !ok || !allowed(w, s.mayRead(s.callerOf(r), ns)) {
		return
	}
	run := 0
	if v := r.URL.Query().Get("run"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			writeErr(w, http.StatusBadRequest, fmt.Errorf("run must be a run number from 1, got %.16q", v))
			return
		}
		run = n
	}
	j, ok := s.job(placement.Key(ns, id))
	if ok {
		// Past runs beyond the servers' retention are forgotten.
		j, ok = j.RunOf(run)
	}
	if !ok {
		writeErr(w, http.StatusNotFound, fmt.Errorf("no job %s (run %d)", placement.Key(ns, id), run))
		return
	}
	writeJSON(w, http.StatusOK, billing.For(&j, s.prices, s.now()))
}

func (s *Server) handleStop(w http.ResponseWriter, r *http.Request) {
	ns, id, ok := jobRef(w, r, "id")
	if !ok {
		return
	}
	// Stopping takes what registering takes: Nomad plans the gang's job
	// with the caller's token. A job cohort does not know is refused
	// after the read check, so it tells no one without read-job whether
	// it exists.
	c := s.callerOf(r)
	stored, known := s.job(placement.Key(ns, id))
	if !known {
		if allowed(w, s.mayRead(c, ns)) {
			writeErr(w, http.StatusNotFound, fmt.Errorf("%w: %s", ErrNoJob, placement.Key(ns, id)))
		}
		return
	}
	var nj nomadapi.Job
	if err := json.Unmarshal(stored.Nomad, &nj); err != nil {
		writeErr(w, http.StatusInternalServerError, fmt.Errorf("decoding the stored job: %w", err))
		return
	}
	if !allowed(w, s.maySubmit(c, &nj)) {
		return
	}
	j, err := s.Stop(placement.Key(ns, id))
	switch {
	case errors.Is(err, ErrNoJob):
		writeErr(w, http.StatusNotFound, err)
	case err != nil:
		writeErr(w, http.StatusInternalServerError, err)
	default:
		writeJSON(w, http.StatusOK, view(&j))
	}
}

func (s *Server) handleQueue(w http.ResponseWriter, r *http.Request) {
	var specs []*placement.Job
	views := map[string]api.JobView{}
	s.r.Read(func(st *state.State) {
		specs = queuedInOrder(st)
		for _, j := range st.ByStatus(state.Queued) {
			views[j.Key()] = view(j)
		}
	})
	notes := s.waiting()
	c := s.callerOf(r)
	all := make([]api.JobView, 0, len(specs))
	for _, j := range specs {
		v := views[j.Key()]
		if n, ok := notes[j.Key()]; ok {
			v.Waiting = s.waitText(c, n)
		}
		all = append(all, v)
	}
	out, ok := s.readable(w, r, all)
	if !ok {
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) handleNodes(w http.ResponseWriter, r *http.Request) {
	if !allowed(w, s.mayReadNodes(s.callerOf(r))) {
		return
	}
	var holding []placement.Running
	s.r.Read(func(st *state.State) { holding = st.Holding(s.now()) })
	capacity, err := s.nomad.Capacity()
	if err != nil {
		writeErr(w, http.StatusBadGateway, err)
		return
	}
	free, err := s.free(holding)
	if err != nil {
		writeErr(w, http.StatusBadGateway, err)
		return
	}
	byID := map[string]placement.Node{}
	for _, n := range free {
		byID[n.ID] = n
	}
	out := make([]api.NodeView, 0, len(capacity))
	for _, c := range capacity {
		f := byID[c.ID]
		out = append(out, api.NodeView{ID: c.ID, Datacenter: c.Datacenter, Pool: c.Pool,
			Capacity: api.Resources{CPU: c.CPU, MemoryMB: c.MemoryMB, Devices: c.Devices},
			Free:     api.Resources{CPU: f.CPU, MemoryMB: f.MemoryMB, Devices: f.Devices}})
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) handleLeader(w http.ResponseWriter, r *http.Request) {
	addr, id := s.r.Leader()
	writeJSON(w, http.StatusOK, api.Leader{ID: id, Address: addr})
}

func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) {
	if _, id := s.r.Leader(); id == "" {
		writeErr(w, http.StatusServiceUnavailable, errors.New("no leader"))
		return
	}
	writeJSON(w, http.StatusOK, map[string]bool{"ok": true})
}

// readable keeps the jobs of the namespaces the caller may read, as
// Nomad's job list does; it answers the error itself when Nomad cannot
// be asked.
func (s *Server) readable(w http.ResponseWriter, r *http.Request, all []api.JobView) ([]api.JobView, bool) {
	c := s.callerOf(r)
	may := map[string]bool{}
	out := all[:0:0]
	for _, v := range all {
		ok, asked := may[v.Namespace]
		if !asked {
			err := s.mayRead(c, v.Namespace)
			if err != nil && !errors.Is(err, nomad.ErrDenied) {
				refuse(w, err)
				return nil, false
			}
			ok = err == nil
			may[v.Namespace] = ok
		}
		if ok {
			out = append(out, v)
		}
	}
	return out, true
}

// workerViews merges what the state knows of a gang's workers with what
// Nomad reports of their allocations.
func workerViews(j *state.Job, a nomad.Allocs) []api.WorkerView {
	byName := map[string]*api.WorkerView{}
	var order []string
	add := func(name string) *api.WorkerView {
		if w, ok := byName[name]; ok {
			return w
		}
		w := &api.WorkerView{Name: name, State: string(state.Queued)}
		byName[name] = w
		order = append(order, name)
		return w
	}
	for _, g := range j.Spec.Groups {
		for i := 0; i < g.Count; i++ {
			add(fmt.Sprintf("%s[%d]", g.Name, i))
		}
	}
	if j.Decision != nil && (j.Status == state.Reserved || j.Status == state.Running) {
		for _, d := range j.Decision.Workers {
			w := add(fmt.Sprintf("%s[%d]", d.Group, d.Index))
			w.Node, w.State = d.Node, string(state.Reserved)
		}
	}
	if j.Status != state.Queued {
		for _, al := range a.Workers {
			w := add(nomad.WorkerName(j.Spec.ID, al))
			w.Node, w.Alloc = al.Node, al.Alloc
			_, booted := j.Booted[al.Alloc]
			switch {
			case al.ExitCode != nil && !al.FinishedAt.IsZero():
				w.State, w.ExitCode = "exited", al.ExitCode
			case al.Status == "failed" || al.Status == "lost":
				w.State = al.Status
			case j.Ended() && (al.Status == "running" || al.Status == "pending"):
				w.State = "stopping" // the gang ended; cohort stops it
			case j.Status == state.Running && al.Status == "running":
				w.State = string(state.Running)
			case booted:
				w.State = "booted"
			case al.Status == "complete":
				w.State = "complete"
			default:
				w.State = string(state.Reserved)
			}
		}
	}
	out := make([]api.WorkerView, 0, len(order))
	for _, n := range order {
		out = append(out, *byName[n])
	}
	return out
}

// splitKey splits a job key into namespace and ID.
func splitKey(key string) (ns, id string) {
	if i := strings.IndexByte(key, '/'); i >= 0 {
		return key[:i], key[i+1:]
	}
	return "", key
}

// PlainHandler is what a server with TLS answers over plain HTTP on its
// API port: the barrier task's program (public, pinned by checksum in
// every job) and health; every other call is refused, so no token or
// job travels in the clear.
func (s *Server) PlainHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+barrierTaskPath, s.handleBarrierTask)
	mux.HandleFunc("GET /v1/health", s.handleHealth)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeErr(w, http.StatusBadRequest, errors.New("this cohort server speaks HTTPS: call it at https://, trusting the cluster's CA"))
	})
	return mux
}
