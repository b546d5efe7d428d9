// Package server is `cohort server`: the Raft replica, the leader's
// scheduling loop that turns queued gangs into Nomad jobs all at once or
// not at all, deadlines, and the HTTP API.
package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cohort-dev/cohort/jobspec"
	"github.com/cohort-dev/cohort/scheduler/billing"
	"github.com/cohort-dev/cohort/scheduler/nomad"
	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/cohort-dev/cohort/scheduler/replica"
	"github.com/cohort-dev/cohort/scheduler/state"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/api"
)

// tick is the leader loop's period; it bounds how late a deadline is
// enforced and how soon a freed reservation is reused.
const tick = 20 * time.Millisecond

// Server is one cohort server.
type Server struct {
	r      *replica.Replica
	nomad  *nomad.Client
	log    hclog.Logger
	now    func() time.Time
	prices billing.Prices
	self   state.Member // set by Advertise
	// lastRegister rate-limits a follower's requests to record itself.
	lastRegister time.Time
	// schedMu serialises placing gangs: the leader loop's passes and
	// admissions that place a gang on arrival. It guards inflight: the
	// admissions placed whose commit has not returned yet.
	schedMu  sync.Mutex
	inflight map[string]placement.Running
	// batch commits admissions and boot reports together.
	batch *replica.Batcher
	// seen caches each watched job's allocations (leader loop only).
	seen map[string]seenAllocs
}

// seenAllocs is a job's allocations as last read from Nomad.
type seenAllocs struct {
	index uint64
	at    time.Time
	a     nomad.Allocs
}

// allocRecheck bounds how long the leader trusts a job's allocations
// without asking Nomad, even when the watcher reports no change.
const allocRecheck = 5 * time.Second

// allocs reads a gang's allocations from Nomad when the watcher saw them
// change (or allocRecheck passed), and from the last read otherwise: a
// pass over many running gangs then costs Nomad nothing.
func (s *Server) allocs(id string, now time.Time) (nomad.Allocs, error) {
	idx := s.nomad.AllocIndex(id)
	if c, ok := s.seen[id]; ok && idx != 0 && c.index == idx && now.Sub(c.at) < allocRecheck {
		return c.a, nil
	}
	a, err := s.nomad.Allocs(id)
	if err != nil {
		return a, err
	}
	if s.seen == nil {
		s.seen = map[string]seenAllocs{}
	}
	s.seen[id] = seenAllocs{index: idx, at: now, a: a}
	return a, nil
}

// New returns a server over a started replica and a Nomad client.
func New(r *replica.Replica, n *nomad.Client, prices billing.Prices, log hclog.Logger) *Server {
	return &Server{r: r, nomad: n, log: log, now: time.Now, prices: prices,
		inflight: map[string]placement.Running{}, batch: replica.NewBatcher(r)}
}

// Close stops the server's commit batcher; call it after Run has returned.
func (s *Server) Close() { s.batch.Close() }

// ErrRejected wraps the reason a job can never run.
var ErrRejected = errors.New("job rejected")

// Submit admits a Nomad job that carries cohort's gang meta. A job that
// cannot fit even on the empty cluster is rejected with the reason.
func (s *Server) Submit(nj *api.Job) (*state.Job, error) {
	g, err := jobspec.GangFromNomad(nj)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrRejected, err)
	}
	if g == nil {
		return nil, fmt.Errorf("%w: job %s carries no %s meta; it is not a cohort gang", ErrRejected, deref(nj.ID), jobspec.MetaGang)
	}
	spec := gangSpec(nj, g)
	capacity, err := s.nomad.Capacity()
	if err != nil {
		return nil, err
	}
	if ok, why := placement.Feasible(capacity, spec); !ok {
		return nil, fmt.Errorf("%w: it cannot fit even on the empty cluster: %s", ErrRejected, why)
	}
	raw, err := json.Marshal(nj)
	if err != nil {
		return nil, err
	}
	// Admission: a gang that can start now is placed and reserved in the
	// same commit that accepts it; any other waits in the queue for the
	// leader loop. Placing is serialised; the commits of concurrent
	// admissions are batched, with what each placed held as in flight
	// meanwhile so no two admissions place on the same room.
	now := s.now()
	c := &state.Command{Op: state.OpSubmit, At: now, Job: spec, Nomad: raw, Barrier: usesBarrier(nj)}
	s.schedMu.Lock()
	if d, ok := s.placeNow(now, spec); ok {
		c.Op, c.Decision = state.OpAdmit, &d
		s.inflight[spec.ID] = placement.Running{Job: spec, Decision: d, Ends: now.Add(spec.MaxRuntime)}
	}
	s.schedMu.Unlock()
	res, err := s.batch.Apply(c)
	if c.Op == state.OpAdmit {
		s.schedMu.Lock()
		delete(s.inflight, spec.ID) // committed (now held in the state) or failed
		s.schedMu.Unlock()
	}
	if err != nil {
		return nil, err
	}
	if res.Err != "" {
		return nil, errors.New(res.Err)
	}
	if c.Op == state.OpAdmit && res.Job.Status == state.Reserved && res.Job.Decision != nil && res.Job.ReservedAt.Equal(now) {
		if err := s.register(*res.Job.Decision); err != nil {
			s.log.Warn("registering admitted gang failed; requeued", "job", spec.ID, "error", err)
			s.apply(&state.Command{Op: state.OpRequeue, At: now, JobID: spec.ID, Reason: err.Error()})
		}
	}
	return res.Job, nil
}

// placeNow places a new gang at once when nothing queued goes before it
// and it fits beside what runs and what is being admitted. The caller
// holds schedMu.
func (s *Server) placeNow(now time.Time, spec *placement.Job) (placement.Decision, bool) {
	if _, ok := s.inflight[spec.ID]; ok || !s.r.IsLeader() {
		return placement.Decision{}, false // a concurrent retry
	}
	var ahead bool
	var holding []placement.Running
	s.r.Read(func(st *state.State) {
		if j, ok := st.Jobs[spec.ID]; ok && !j.Ended() {
			ahead = true // a retry: the job is known already
			return
		}
		for _, j := range st.ByStatus(state.Queued) {
			if j.Spec.Priority >= spec.Priority {
				ahead = true
				return
			}
		}
		holding = st.Holding(now)
	})
	if ahead {
		return placement.Decision{}, false
	}
	free, err := s.free(s.withInflight(holding))
	if err != nil {
		return placement.Decision{}, false
	}
	return placement.NewInventory(free).Place(spec)
}

// withInflight adds the admissions placed but not yet committed to what
// the state's gangs hold. The caller holds schedMu.
func (s *Server) withInflight(holding []placement.Running) []placement.Running {
	for _, r := range s.inflight {
		holding = append(holding, r)
	}
	return holding
}

// gangSpec turns a Nomad job and its gang options into what placement
// needs.
func gangSpec(nj *api.Job, g *jobspec.Gang) *placement.Job {
	spec := &placement.Job{
		ID:          deref(nj.ID),
		Priority:    deref(nj.Priority),
		Datacenters: nj.Datacenters,
		Pool:        deref(nj.NodePool),
		MaxRuntime:  g.MaxRuntime,
		GangTimeout: g.GangTimeout,
	}
	if spec.Priority == 0 {
		spec.Priority = jobspec.DefaultPriority
	}
	for i, tg := range nj.TaskGroups {
		pg := placement.Group{Name: g.Groups[i].Name, Count: g.Groups[i].Count, Devices: map[string]int{}}
		for _, c := range tg.Constraints {
			if c.Operand == api.ConstraintDistinctHosts {
				pg.DistinctHosts = true
			}
		}
		for _, t := range tg.Tasks {
			if t.Resources == nil {
				continue
			}
			pg.CPU += deref(t.Resources.CPU)
			pg.MemoryMB += deref(t.Resources.MemoryMB)
			for _, d := range t.Resources.Devices {
				pg.Devices[d.Name] += int(deref(d.Count))
			}
		}
		spec.Groups = append(spec.Groups, pg)
	}
	return spec
}

// usesBarrier says whether a gang's workers wait at the start barrier:
// the microvm driver, the one that implements it, holds every worker of
// a gang there.
func usesBarrier(nj *api.Job) bool {
	n := 0
	for _, tg := range nj.TaskGroups {
		for _, t := range tg.Tasks {
			if t.Driver != jobspec.DriverMicroVM {
				return false
			}
			n++
		}
	}
	return n > 0
}

// MaxAttempts is how many times a gang is placed before a failure to start
// fails it for good.
const MaxAttempts = 3

// Run is the leader loop: while this replica leads, it schedules, starts,
// enforces deadlines and finishes gangs. It returns when ctx ends.
func (s *Server) Run(ctx context.Context) {
	go s.nomad.Watch(ctx, s.log.Named("nomad"))
	t := time.NewTicker(tick)
	defer t.Stop()
	leading := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if !s.r.IsLeader() {
			leading, s.seen = false, nil
			if time.Since(s.lastRegister) > time.Second {
				s.lastRegister = time.Now()
				if err := s.registerSelf(); err != nil {
					s.log.Debug("recording this server's addresses with the leader", "error", err)
				}
			}
			continue
		}
		if !leading {
			// Act only on everything committed before this term: the
			// deadlines and reservations of the previous leader.
			if err := s.r.Barrier(5 * time.Second); err != nil {
				continue
			}
			leading = true
			s.log.Info("leading: scheduling and enforcing deadlines")
			if err := s.registerSelf(); err != nil {
				s.log.Warn("recording this server's addresses", "error", err)
			}
		}
		s.schedMu.Lock()
		err := s.pass()
		s.schedMu.Unlock()
		if err != nil {
			s.log.Warn("scheduling pass", "error", err)
		}
	}
}

func (s *Server) apply(c *state.Command) error {
	res, err := s.r.Apply(c, 5*time.Second)
	if err != nil {
		return err
	}
	if res.Err != "" {
		return errors.New(res.Err)
	}
	return nil
}

// pass is one round of the leader loop.
func (s *Server) pass() error {
	now := s.now()
	var queued []*placement.Job
	var waiting []state.Job // queued, for their gang timeout
	var reserved, running []state.Job
	var holding []placement.Running
	s.r.Read(func(st *state.State) {
		for _, j := range st.ByStatus(state.Queued) {
			spec := j.Spec
			queued = append(queued, &spec)
			waiting = append(waiting, *j)
		}
		for _, j := range st.ByStatus(state.Reserved) {
			reserved = append(reserved, *j)
		}
		for _, j := range st.ByStatus(state.Running) {
			running = append(running, *j)
		}
		holding = st.Holding(now)
	})

	// Forget the allocations of gangs no longer watched: one that comes
	// back is registered anew.
	watched := make(map[string]bool, len(reserved)+len(running))
	for _, l := range [][]state.Job{reserved, running} {
		for i := range l {
			watched[l[i].Spec.ID] = true
		}
	}
	for id := range s.seen {
		if !watched[id] {
			delete(s.seen, id)
		}
	}

	// Deadlines first: they are the tightest promise.
	for _, j := range running {
		if err := s.watchRunning(now, &j); err != nil {
			return err
		}
	}
	for _, j := range reserved {
		if err := s.watchReserved(now, &j); err != nil {
			return err
		}
	}

	if len(queued) == 0 {
		return nil
	}
	holding = s.withInflight(holding)
	free, err := s.free(holding)
	if err != nil {
		return err
	}
	plan := placement.Schedule(now, free, holding, queued)
	placed := map[string]bool{}
	for _, d := range plan.Decisions {
		d := d
		placed[d.Job] = true
		if err := s.apply(&state.Command{Op: state.OpReserve, At: now, JobID: d.Job, Decision: &d}); err != nil {
			return err
		}
		if err := s.register(d); err != nil {
			s.log.Warn("registering reserved gang failed; requeued", "job", d.Job, "error", err)
			s.apply(&state.Command{Op: state.OpRequeue, At: now, JobID: d.Job, Reason: err.Error()})
		}
	}
	// A gang that waited in the queue longer than its gang timeout fails,
	// saying what it lacks.
	for _, j := range waiting {
		if placed[j.Spec.ID] || now.Sub(j.QueuedAt) <= j.Spec.GangTimeout {
			continue
		}
		why := fmt.Sprintf("not placed within its gang timeout of %s: %s", j.Spec.GangTimeout, placement.Shortfall(free, &j.Spec))
		if err := s.apply(&state.Command{Op: state.OpFail, At: now, JobID: j.Spec.ID, Reason: why}); err != nil {
			return err
		}
		s.log.Warn("gang failed in the queue", "job", j.Spec.ID, "reason", why)
	}
	return nil
}

// watchRunning stops a running gang at its deadline and finishes it when
// its workers have all ended.
func (s *Server) watchRunning(now time.Time, j *state.Job) error {
	id := j.Spec.ID
	if !now.Before(j.Deadline()) {
		if err := s.nomad.Stop(id); err != nil {
			return err
		}
		late := now.Sub(j.Deadline())
		s.log.Info("max runtime reached; stopped", "job", id, "late", late)
		return s.apply(&state.Command{Op: state.OpFinish, At: now, JobID: id, Reason: fmt.Sprintf("max_runtime reached (stopped %d ms after the deadline)", late.Milliseconds())})
	}
	a, err := s.allocs(id, now)
	if err != nil {
		return err
	}
	if a.Running+a.Pending == 0 && a.Complete+a.Failed+a.Lost > 0 {
		reason := "every worker exited"
		if a.Failed+a.Lost > 0 {
			reason = fmt.Sprintf("%d of %d workers failed", a.Failed+a.Lost, j.Spec.Size())
		}
		return s.apply(&state.Command{Op: state.OpFinish, At: now, JobID: id, Reason: reason})
	}
	return nil
}

// watchReserved starts a reserved gang once it is whole: every worker
// booted at the barrier (microvm workers) or running (other drivers). A
// failure or the gang timeout stops it and sends it back to the queue
// whole.
func (s *Server) watchReserved(now time.Time, j *state.Job) error {
	id := j.Spec.ID
	a, err := s.allocs(id, now)
	if err != nil {
		return err
	}
	ready := a.Running
	if j.Barrier {
		ready = 0
		for alloc := range j.Booted {
			if a.Live[alloc] {
				ready++
			}
		}
	}
	switch {
	case ready >= j.Spec.Size():
		start := &state.Command{Op: state.OpStart, At: now, JobID: id}
		if j.Decision == nil {
			start.Decision = adoptedDecision(j, a)
		}
		if err := s.apply(start); err != nil {
			return err
		}
		s.log.Info("gang running", "job", id, "workers", ready, "barrier", j.Barrier, "after", now.Sub(j.ReservedAt))
	case a.Failed+a.Lost > 0 || now.Sub(j.ReservedAt) > j.Spec.GangTimeout:
		what := "running"
		if j.Barrier {
			what = "booted"
		}
		why := fmt.Sprintf("only %d of %d workers %s after %s", ready, j.Spec.Size(), what, now.Sub(j.ReservedAt).Round(time.Millisecond))
		if a.Failed+a.Lost > 0 {
			why = fmt.Sprintf("%d of %d workers failed before the gang started", a.Failed+a.Lost, j.Spec.Size())
		}
		if err := s.nomad.Stop(id); err != nil {
			return err
		}
		if j.Attempts >= MaxAttempts {
			// Something placement cannot see keeps the gang from starting
			// where it fits (a constraint only Nomad checks, a node that
			// cannot boot it): stop trying.
			why = fmt.Sprintf("did not start in %d attempts; the last: %s", j.Attempts, why)
			s.log.Warn("gang failed", "job", id, "reason", why)
			return s.apply(&state.Command{Op: state.OpFail, At: now, JobID: id, Reason: why})
		}
		if err := s.apply(&state.Command{Op: state.OpRequeue, At: now, JobID: id, Reason: why}); err != nil {
			return err
		}
		s.log.Warn("gang did not start; stopped and requeued", "job", id, "adopted", j.Adopted, "reason", why)
	}
	return nil
}

func (s *Server) register(d placement.Decision) error {
	var raw json.RawMessage
	s.r.Read(func(st *state.State) { raw = st.Jobs[d.Job].Nomad })
	var nj api.Job
	if err := json.Unmarshal(raw, &nj); err != nil {
		return fmt.Errorf("decoding stored nomad job: %w", err)
	}
	return s.nomad.Register(&nj, &d)
}

// adoptedDecision records where Nomad placed an adopted gang's live
// workers, as if cohort had placed them.
func adoptedDecision(j *state.Job, a nomad.Allocs) *placement.Decision {
	d := &placement.Decision{Job: j.Spec.ID}
	for _, w := range a.Workers {
		if !a.Live[w.Alloc] {
			continue
		}
		// Nomad names allocations "<job>.<group>[<index>]".
		name := strings.TrimPrefix(w.Name, j.Spec.ID+".")
		group, idx, ok := strings.Cut(strings.TrimSuffix(name, "]"), "[")
		if !ok {
			continue
		}
		i, _ := strconv.Atoi(idx)
		d.Workers = append(d.Workers, placement.Worker{Group: group, Index: i, Node: w.Node})
	}
	return d
}

// free is what placement may use now: what Nomad reports free with
// cohort's own gangs left out, minus what those gangs hold.
func (s *Server) free(holding []placement.Running) ([]placement.Node, error) {
	skip := map[string]bool{}
	for _, h := range holding {
		skip[h.Job.ID] = true
	}
	nodes, err := s.nomad.Inventory(skip)
	if err != nil {
		return nil, err
	}
	return placement.Subtract(nodes, holding), nil
}

// Stop ends a job at a user's request.
func (s *Server) Stop(id string) error {
	var exists bool
	s.r.Read(func(st *state.State) { _, exists = st.Jobs[id] })
	if !exists {
		return fmt.Errorf("no job %q", id)
	}
	if err := s.nomad.Stop(id); err != nil {
		return err
	}
	return s.apply(&state.Command{Op: state.OpFinish, At: s.now(), JobID: id, Reason: "stopped by request"})
}

func deref[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}
