package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/cohort-dev/cohort/scheduler/billing"
	"github.com/cohort-dev/cohort/scheduler/nomad"
	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/cohort-dev/cohort/scheduler/replica"
	"github.com/cohort-dev/cohort/scheduler/state"
	"github.com/hashicorp/nomad/api"
)

// JobView is a job as the API shows it.
type JobView struct {
	ID          string
	Status      state.Status
	Priority    int
	Workers     int
	Nodes       int       `json:",omitempty"`
	Reason      string    `json:",omitempty"`
	Attempts    int       `json:",omitempty"`
	SubmittedAt time.Time `json:",omitempty"`
	ReservedAt  time.Time `json:",omitempty"`
	StartedAt   time.Time `json:",omitempty"`
	Deadline    time.Time `json:",omitempty"`
	EndedAt     time.Time `json:",omitempty"`
	Adopted     bool      `json:",omitempty"`
	Run         int       `json:",omitempty"`
	// WorkerStates is filled by GET /v1/job/{id}?workers=1.
	WorkerStates []WorkerView `json:",omitempty"`
}

func view(j *state.Job) JobView {
	v := JobView{
		ID: j.Spec.ID, Status: j.Status, Priority: j.Spec.Priority, Workers: j.Spec.Size(),
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

// Handler is the JSON HTTP API:
//
//	POST   /v1/jobs      {"Job": <Nomad job with cohort meta>} -> JobView
//	GET    /v1/jobs      -> []JobView in submission order
//	GET    /v1/job/{id}  -> JobView
//	DELETE /v1/job/{id}  stop the job
//	GET    /v1/job/{id}/bill[?run=N] -> billing.Bill, per worker and millisecond
//	GET    /v1/leader    -> {"ID", "Address"} of the Raft leader
//	GET    /v1/health    -> 200 when this replica has a leader
//	GET    /v1/queue     -> queued jobs in scheduling order
//	GET    /metrics      -> Prometheus text format
//	POST   /v1/barrier/{job}  a worker's boot report; see barrier.go
//	GET    /v1/nodes     -> []NodeView: capacity and what is free, as placement sees it
//	GET    /v1/members   -> []MemberView, the Raft group
//	GET    /v1/agent/self -> AgentSelf
//	POST   /v1/members/join, /v1/members/register  (between servers)
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
	mux.HandleFunc("GET /v1/nodes", s.handleNodes)
	mux.HandleFunc("GET /v1/members", s.handleMembers)
	mux.HandleFunc("GET /v1/agent/self", s.handleAgentSelf)
	mux.HandleFunc("POST /v1/members/join", s.leaderOnly(s.handleJoin))
	mux.HandleFunc("POST /v1/members/register", s.leaderOnly(s.handleRegister))
	mux.HandleFunc("GET /v1/job/{id}/bill", s.handleBill)
	mux.HandleFunc("GET /v1/leader", s.handleLeader)
	mux.HandleFunc("GET /v1/health", s.handleHealth)
	mux.HandleFunc("GET /v1/queue", s.handleQueue)
	mux.HandleFunc("GET /metrics", s.handleMetrics)
	return mux
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

func writeErr(w http.ResponseWriter, code int, err error) {
	writeJSON(w, code, map[string]string{"error": err.Error()})
}

func (s *Server) notLeader(w http.ResponseWriter) bool {
	if s.r.IsLeader() {
		return false
	}
	addr, id := s.r.Leader()
	writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": "not the leader", "leader_id": id, "leader_address": addr})
	return true
}

func (s *Server) handleSubmit(w http.ResponseWriter, r *http.Request) {
	var body struct{ Job *api.Job }
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil || body.Job == nil || body.Job.ID == nil {
		writeErr(w, http.StatusBadRequest, errors.New(`body must be {"Job": <nomad job>} with an ID`))
		return
	}
	j, err := s.Submit(body.Job)
	switch {
	case errors.Is(err, ErrRejected):
		writeErr(w, http.StatusBadRequest, err)
	case errors.Is(err, replica.ErrNotLeader):
		s.notLeader(w)
	case err != nil:
		writeErr(w, http.StatusInternalServerError, err)
	default:
		writeJSON(w, http.StatusOK, view(j))
	}
}

func (s *Server) handleList(w http.ResponseWriter, r *http.Request) {
	var out []JobView
	s.r.Read(func(st *state.State) {
		for _, j := range st.Jobs {
			out = append(out, view(j))
		}
	})
	sort.Slice(out, func(a, b int) bool { return out[a].SubmittedAt.Before(out[b].SubmittedAt) })
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) handleGet(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	var v *JobView
	var job state.Job
	s.r.Read(func(st *state.State) {
		if j, ok := st.Jobs[id]; ok {
			jv := view(j)
			v = &jv
			job = *j
		}
	})
	if v == nil {
		writeErr(w, http.StatusNotFound, errors.New("no job "+id))
		return
	}
	if r.URL.Query().Get("workers") != "" {
		var a nomad.Allocs
		if job.Status != state.Queued {
			var err error
			if a, err = s.nomad.Allocs(id); err != nil {
				writeErr(w, http.StatusBadGateway, fmt.Errorf("reading the gang's allocations: %w", err))
				return
			}
		}
		v.WorkerStates = workerViews(&job, a)
	}
	writeJSON(w, http.StatusOK, v)
}

func (s *Server) handleBill(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	var b *billing.Bill
	now := s.now()
	run := 0
	if v := r.URL.Query().Get("run"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			writeErr(w, http.StatusBadRequest, fmt.Errorf("run must be a run number from 1, got %q", v))
			return
		}
		run = n
	}
	s.r.Read(func(st *state.State) {
		j, ok := st.Jobs[id]
		if !ok {
			return
		}
		if run != 0 && run != j.Run {
			if run > len(j.Previous) {
				return
			}
			j = &j.Previous[run-1]
		}
		bill := billing.For(j, s.prices, now)
		b = &bill
	})
	if b == nil {
		writeErr(w, http.StatusNotFound, fmt.Errorf("no job %s (run %d)", id, run))
		return
	}
	writeJSON(w, http.StatusOK, b)
}

func (s *Server) handleStop(w http.ResponseWriter, r *http.Request) {
	if err := s.Stop(r.PathValue("id")); err != nil {
		writeErr(w, http.StatusNotFound, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"stopped": r.PathValue("id")})
}

func (s *Server) handleQueue(w http.ResponseWriter, r *http.Request) {
	var specs []*placement.Job
	views := map[string]JobView{}
	s.r.Read(func(st *state.State) {
		for _, j := range st.ByStatus(state.Queued) {
			spec := j.Spec
			specs = append(specs, &spec)
			views[j.Spec.ID] = view(j)
		}
	})
	placement.Order(specs)
	out := make([]JobView, 0, len(specs))
	for _, j := range specs {
		out = append(out, views[j.ID])
	}
	writeJSON(w, http.StatusOK, out)
}

// handleMetrics writes the scheduler's gauges in Prometheus's text format.
func (s *Server) handleMetrics(w http.ResponseWriter, r *http.Request) {
	counts := map[state.Status]int{}
	workers := map[state.Status]int{}
	s.r.Read(func(st *state.State) {
		for _, j := range st.Jobs {
			counts[j.Status]++
			workers[j.Status] += j.Spec.Size()
		}
	})
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	fmt.Fprintln(w, "# HELP cohort_jobs Cluster jobs by status.")
	fmt.Fprintln(w, "# TYPE cohort_jobs gauge")
	for _, st := range []state.Status{state.Queued, state.Reserved, state.Running, state.Finished, state.Failed} {
		fmt.Fprintf(w, "cohort_jobs{status=%q} %d\n", st, counts[st])
	}
	fmt.Fprintln(w, "# HELP cohort_workers Workers of cluster jobs by job status.")
	fmt.Fprintln(w, "# TYPE cohort_workers gauge")
	for _, st := range []state.Status{state.Queued, state.Reserved, state.Running, state.Finished, state.Failed} {
		fmt.Fprintf(w, "cohort_workers{status=%q} %d\n", st, workers[st])
	}
	leader := 0
	if s.r.IsLeader() {
		leader = 1
	}
	fmt.Fprintln(w, "# HELP cohort_leader 1 when this replica leads.")
	fmt.Fprintln(w, "# TYPE cohort_leader gauge")
	fmt.Fprintf(w, "cohort_leader %d\n", leader)
	fmt.Fprintln(w, "# HELP cohort_raft_applied_index Last Raft index applied here.")
	fmt.Fprintln(w, "# TYPE cohort_raft_applied_index gauge")
	fmt.Fprintf(w, "cohort_raft_applied_index %d\n", s.r.AppliedIndex())
}

// NodeView is one Nomad node as the scheduler sees it.
type NodeView struct {
	ID, Datacenter, Pool string
	// Capacity is what jobs can use at all; Free what is left after every
	// allocation and every cohort reservation.
	Capacity, Free Resources
}

// Resources is CPU (MHz), memory (MiB) and devices by kind.
type Resources struct {
	CPU      int
	MemoryMB int
	Devices  map[string]int `json:",omitempty"`
}

func (s *Server) handleNodes(w http.ResponseWriter, r *http.Request) {
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
	out := make([]NodeView, 0, len(capacity))
	for _, c := range capacity {
		f := byID[c.ID]
		out = append(out, NodeView{ID: c.ID, Datacenter: c.Datacenter, Pool: c.Pool,
			Capacity: Resources{CPU: c.CPU, MemoryMB: c.MemoryMB, Devices: c.Devices},
			Free:     Resources{CPU: f.CPU, MemoryMB: f.MemoryMB, Devices: f.Devices}})
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) handleLeader(w http.ResponseWriter, r *http.Request) {
	addr, id := s.r.Leader()
	writeJSON(w, http.StatusOK, map[string]string{"ID": id, "Address": addr})
}

func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) {
	if _, id := s.r.Leader(); id == "" {
		writeErr(w, http.StatusServiceUnavailable, errors.New("no leader"))
		return
	}
	writeJSON(w, http.StatusOK, map[string]bool{"ok": true})
}

// WorkerView is one worker of a gang: where it is in
// queued -> reserved -> booted -> running -> exited (code).
type WorkerView struct {
	Name     string // group[index]
	Node     string `json:",omitempty"`
	Alloc    string `json:",omitempty"`
	State    string
	ExitCode *int `json:",omitempty"`
}

// workerViews merges what the state knows of a gang's workers with what
// Nomad reports of their allocations.
func workerViews(j *state.Job, a nomad.Allocs) []WorkerView {
	byName := map[string]*WorkerView{}
	var order []string
	add := func(name string) *WorkerView {
		if w, ok := byName[name]; ok {
			return w
		}
		w := &WorkerView{Name: name, State: string(state.Queued)}
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
			name := strings.TrimPrefix(al.Name, j.Spec.ID+".")
			w := add(name)
			w.Node, w.Alloc = al.Node, al.Alloc
			_, booted := j.Booted[al.Alloc]
			switch {
			case al.ExitCode != nil:
				w.State, w.ExitCode = "exited", al.ExitCode
			case al.Status == "failed" || al.Status == "lost":
				w.State = al.Status
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
	out := make([]WorkerView, 0, len(order))
	for _, n := range order {
		out = append(out, *byName[n])
	}
	return out
}
