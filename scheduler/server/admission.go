package server

// Admission: a job arrives (cohort's API, the Nomad-compatible endpoint,
// or a gang cohort takes over from Nomad), is normalized into a gang,
// checked against the cluster and Nomad, and accepted into the replicated
// state: placed and reserved in the same commit when it fits now,
// queued otherwise.

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/cohort-dev/cohort/jobspec"
	"github.com/cohort-dev/cohort/scheduler/inventory"
	"github.com/cohort-dev/cohort/scheduler/nomad"
	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/cohort-dev/cohort/scheduler/state"
	"github.com/hashicorp/nomad/api"
)

// Normalize makes a Nomad job a gang as cohort runs it (see
// jobspec.Normalize), with this server group's barrier task for drivers
// that need it. A job that cannot be a gang is refused with ErrRejected.
func (s *Server) Normalize(nj *api.Job) (*api.Job, []string, error) {
	if nj == nil {
		return nil, nil, fmt.Errorf("%w: no job", ErrRejected)
	}
	bt, err := s.barrierTaskFor(placement.Key(normNS(deref(nj.Namespace)), deref(nj.ID)))
	if err != nil {
		return nil, nil, err
	}
	out, notes, err := jobspec.Normalize(nj, bt)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrRejected, err)
	}
	return out, notes, nil
}

// Submitted is the outcome of an admission.
type Submitted struct {
	Job   state.Job
	Notes []string
}

// Submit admits a Nomad job that carries cohort's gang meta. A job that
// cannot be a gang, that cannot fit even on the empty cluster, or that
// Nomad would refuse is rejected with the reason; nothing of it is kept.
func (s *Server) Submit(in *api.Job) (Submitted, error) {
	start := time.Now()
	sub, err := s.admit(in, true)
	if err == nil {
		s.metrics.admission.Observe(seconds(time.Since(start)))
	}
	return sub, err
}

// admit is Submit; placeNow false always queues the gang, for the leader
// loop to place.
func (s *Server) admit(in *api.Job, placeNow bool) (Submitted, error) {
	nj, notes, err := s.Normalize(in)
	if err != nil {
		return Submitted{}, err
	}
	g, err := jobspec.GangFromNomad(nj)
	if err != nil {
		return Submitted{}, fmt.Errorf("%w: %v", ErrRejected, err)
	}
	spec := gangSpec(nj, g)
	capacity, err := s.nomad.Capacity()
	if err != nil {
		return Submitted{}, err
	}
	if ok, why := placement.Feasible(capacity, spec); !ok {
		return Submitted{}, fmt.Errorf("%w: it cannot fit even on the empty cluster: %s", ErrRejected, why)
	}
	// What Nomad would refuse at registration is refused now, with
	// Nomad's own words, instead of failing three attempts later.
	if err := s.nomad.Validate(nj); err != nil {
		var re *nomad.RefusedError
		if errors.As(err, &re) {
			return Submitted{}, fmt.Errorf("%w: %v", ErrRejected, err)
		}
		return Submitted{}, err
	}
	if err := s.signMounts(nj, spec.Key()); err != nil {
		return Submitted{}, err
	}
	raw, err := json.Marshal(nj)
	if err != nil {
		return Submitted{}, err
	}
	// Admission: a gang that can start now is placed and reserved in the
	// same commit that accepts it; any other waits in the queue for the
	// leader loop. Placing is serialised; the commits of concurrent
	// admissions are batched, with what each placed held as in flight
	// meanwhile so no two admissions place on the same room.
	now := s.now()
	key := spec.Key()
	if j, ok := s.job(key); ok && !j.Ended() {
		// The same submission retried, or a changed spec for a run that
		// goes on: either way this run is the one.
		notes = append(notes, fmt.Sprintf("gang %s already has a live run (%s); this submission changes nothing: stop it first to run a changed spec", key, j.Status))
	}
	c := &state.Command{Op: state.OpSubmit, At: now, Job: spec, Nomad: raw}
	// A restore waits until this admission has committed (or failed), and
	// an admission waits for a restore: none places on the old state and
	// commits into the restored one.
	s.restoreMu.RLock()
	s.schedMu.Lock()
	if placeNow {
		if d := s.placeNow(now, spec); d != nil {
			c.Op, c.Decision = state.OpAdmit, d
			s.inflight[key] = inflight{run: placement.Running{Job: spec, Decision: *d, Ends: now.Add(spec.MaxRuntime)}, d: d}
		}
	}
	s.schedMu.Unlock()
	res, err := s.batch.Apply(c)
	if c.Op == state.OpAdmit {
		s.schedMu.Lock()
		if err != nil {
			// A Raft timeout may still commit: the room stays held as
			// in flight until the state shows the gang, or for a while.
			f := s.inflight[key]
			f.until = now.Add(inflightHold)
			s.inflight[key] = f
		} else {
			s.dropInflight(key) // committed: now held in the state
		}
		s.schedMu.Unlock()
	}
	s.restoreMu.RUnlock()
	if err != nil {
		// If the command commits after all, the leader loop registers the
		// reserved gang or places the queued one.
		return Submitted{}, err
	}
	if res.Err != "" {
		return Submitted{}, errors.New(res.Err)
	}
	if c.Op == state.OpAdmit && res.Job.Status == state.Reserved && res.Job.ReservedAt.Equal(now) {
		s.ensureRegistered(key)
		if j, ok := s.job(key); ok {
			return Submitted{Job: j, Notes: notes}, nil
		}
	}
	return Submitted{Job: *res.Job, Notes: notes}, nil
}

// placeNow places a new gang at once when nothing queued goes before it
// and it fits beside what runs and what is being admitted. The caller
// holds schedMu.
//
// It places on the leader's inventory kept by deltas (see
// scheduler/inventory), so its cost follows what changed since the last
// admission and the gangs that hold room, not the number of nodes.
func (s *Server) placeNow(now time.Time, spec *placement.Job) *placement.Decision {
	if _, ok := s.inflight[spec.Key()]; ok || !s.r.IsLeader() {
		return nil // a concurrent retry
	}
	var ahead bool
	s.r.Read(func(st *state.State) {
		if j, ok := st.Jobs[spec.Key()]; ok && !j.Ended() {
			ahead = true // a retry: the job is known already
			return
		}
		for _, j := range st.ByStatus(state.Queued) {
			if j.Spec.Priority >= spec.Priority {
				ahead = true
				return
			}
		}
	})
	if ahead {
		return nil
	}
	inv, err := s.keptInventory(now, nil)
	if err != nil {
		s.log.Warn("reading the inventory for an admission failed; the gang is queued", "job", spec.Key(), "error", err)
		return nil
	}
	d, ok := inv.Place(spec)
	if !ok {
		return nil
	}
	// Held as in flight from now on; the View knows it by this pointer.
	s.view.Placed(spec.Key(), spec, &d)
	return &d
}

// keptInventory is the leader's free inventory, brought up to date with
// what changed since it was last read: in Nomad (see
// scheduler/inventory), in the state's log of changed holdings, and among
// the admissions in flight. The caller holds schedMu, and records with
// s.view.Placed what it places into the inventory. With running, it also
// returns what holds room as the scheduling pass needs it (with each
// holding's latest end, as of now), from the same read of the state as
// the inventory, so the two always agree.
func (s *Server) keptInventory(now time.Time, running *[]placement.Running) (*placement.Inventory, error) {
	var complete bool
	var held []inventory.Held
	inState := map[string]bool{}
	s.r.Read(func(st *state.State) {
		if running != nil {
			*running = st.Holding(now)
		}
		touched := map[string]bool{}
		var all bool
		if s.heldCur, all = st.HeldSince(s.heldCur, func(key string) { touched[key] = true }); all {
			complete = true
			st.EachHeld(func(key string, _ *placement.Job, _ *placement.Decision) { touched[key] = true })
		}
		for key := range s.inflight {
			touched[key] = true
		}
		for key := range s.inflightGone {
			touched[key] = true
		}
		for key := range touched {
			h := inventory.Held{Key: key}
			if js, d, ok := st.Holds(key); ok {
				inState[key] = true
				h.Decision = d
				if !s.view.Knows(key, d) {
					c := *js
					h.Job = &c
				}
			}
			held = append(held, h)
		}
	})
	// An admission in flight holds room where the state does not hold
	// its gang yet.
	inflightNow := map[string]inflight{}
	s.eachInflight(func(key string) bool { return inState[key] }, func(key string, f inflight) {
		inflightNow[key] = f
		if running != nil {
			*running = append(*running, f.run)
		}
	})
	s.inflightGone = map[string]bool{}
	for i := range held {
		if f, ok := inflightNow[held[i].Key]; ok && held[i].Decision == nil {
			held[i].Job, held[i].Decision = f.run.Job, f.d
		}
	}
	inv, err := s.view.Sync(held, complete)
	if err != nil {
		s.heldCur = state.HeldCursor{} // read every holding next time
		return nil, err
	}
	return inv, nil
}

// inflight is an admission placed whose commit has not returned, or
// returned an error but may still commit (until is then set). d is the
// decision as placed: the inventory tells holdings apart by it.
type inflight struct {
	run   placement.Running
	d     *placement.Decision
	until time.Time
}

// inflightHold is how long the room of an admission whose commit failed
// stays held: longer than Raft takes to commit or drop a command.
const inflightHold = 15 * time.Second

// dropInflight forgets an admission in flight; the inventory hears of it
// at the next admission. The caller holds schedMu.
func (s *Server) dropInflight(key string) {
	delete(s.inflight, key)
	s.inflightGone[key] = true
}

// eachInflight calls fn for each admission in flight that holds room
// beside the state's gangs (inState says which gangs the state holds),
// and forgets those that committed after all or never will. The caller
// holds schedMu.
func (s *Server) eachInflight(inState func(key string) bool, fn func(key string, f inflight)) {
	now := s.now()
	for key, f := range s.inflight {
		switch {
		case inState(key):
			if !f.until.IsZero() {
				s.dropInflight(key) // it committed after all
			}
		case !f.until.IsZero() && now.After(f.until):
			s.dropInflight(key) // it never committed
		default:
			fn(key, f)
		}
	}
}

// free is what placement may use now: what Nomad reports free with
// cohort's own gangs left out, minus what those gangs hold.
func (s *Server) free(holding []placement.Running) ([]placement.Node, error) {
	skip := map[string]bool{}
	for _, h := range holding {
		skip[h.Job.Key()] = true
	}
	nodes, err := s.nomad.Inventory(skip)
	if err != nil {
		return nil, err
	}
	return placement.Subtract(nodes, holding), nil
}

// gangSpec turns a normalized Nomad job and its gang options into what
// placement needs.
func gangSpec(nj *api.Job, g *jobspec.Gang) *placement.Job {
	spec := &placement.Job{
		ID:          deref(nj.ID),
		Namespace:   deref(nj.Namespace),
		Priority:    deref(nj.Priority),
		Datacenters: nj.Datacenters,
		Pool:        deref(nj.NodePool),
		MaxRuntime:  g.MaxRuntime,
		GangTimeout: g.GangTimeout,
	}
	if spec.Namespace == "default" {
		spec.Namespace = ""
	}
	if spec.Priority == 0 {
		spec.Priority = jobspec.DefaultPriority
	}
	for i, tg := range nj.TaskGroups {
		pg := placement.Group{Name: g.Groups[i].Name, Count: g.Groups[i].Count}
		for _, c := range tg.Constraints {
			switch {
			case c.Operand == api.ConstraintDistinctHosts:
				pg.DistinctHosts = c.RTarget == "" || c.RTarget == "true"
			case c.Operand == api.ConstraintDistinctProperty && c.LTarget == jobspec.NodeIDAttr:
				n, err := strconv.Atoi(c.RTarget)
				if c.RTarget == "" {
					n, err = 1, nil
				}
				if err == nil && n > 0 && (pg.MaxPerNode == 0 || n < pg.MaxPerNode) {
					pg.MaxPerNode = n
				}
			}
		}
		pg.CPU, pg.MemoryMB, pg.Devices = jobspec.GroupResources(tg)
		pg.DeviceConstraints = deviceConstraints(tg)
		pg.Drivers = jobspec.TaskDrivers(tg)
		spec.Groups = append(spec.Groups, pg)
	}
	return spec
}

// barrierTaskFor is the barrier task the leader adds to gangs on drivers
// without their own start barrier: its program from this server, its
// reports to every server of the group. With TLS, it carries the CA and
// reads the job's barrier token from a Nomad variable the leader writes
// before registering the run (publishBarrierToken), and its program
// comes over plain HTTP from the same port: Nomad's artifact fetcher
// trusts only the system's CAs, and the checksum pins the program anyway.
func (s *Server) barrierTaskFor(key string) (*jobspec.BarrierTask, error) {
	if s.barrierTask == nil || s.self.HTTPAddr == "" {
		return nil, nil
	}
	servers := map[string]bool{s.self.HTTPAddr: true}
	s.r.Read(func(st *state.State) {
		for _, m := range st.Members {
			if m.HTTPAddr != "" {
				servers[m.HTTPAddr] = true
			}
		}
	})
	bt := &jobspec.BarrierTask{Source: s.self.HTTPAddr + barrierTaskPath, Checksum: s.barrierTask.checksum}
	for a := range servers {
		bt.Servers = append(bt.Servers, a)
	}
	if s.tls != nil {
		bt.Source = "http://" + strings.TrimPrefix(bt.Source, "https://")
		bt.CAPEM = string(s.tls.CAPEM)
		bt.TokenInVariable = true
		sec, err := s.secret()
		switch {
		case err == nil:
			bt.Token = barrierToken(sec, key, s.runOf(key))
		case s.r.IsLeader():
			// The leader admits: a gang without a token could never pass
			// its barrier.
			return nil, fmt.Errorf("making the job's barrier token: %w", err)
		}
		// A follower normalizes only to have Nomad plan the job: the
		// token does not matter there.
	}
	return bt, nil
}

// publishBarrierToken sets the barrier token of a gang's run in the job's
// Nomad variable (jobspec.BarrierTokenPath), where its barrier tasks'
// templates read it with their workload identities; a token that may
// only read the job, and so once read the token from the barrier task's
// environment, may not read it there.
func (s *Server) publishBarrierToken(job *api.Job, key string, run int) error {
	held := false
	for _, tg := range job.TaskGroups {
		held = held || hasBarrierTask(tg)
	}
	if !held {
		return nil
	}
	token, err := s.variableToken(deref(job.ID), key, run)
	if token == "" || err != nil {
		return err
	}
	if err := s.nomad.PutBarrierToken(deref(job.Namespace), deref(job.ID), token); err != nil {
		return fmt.Errorf("handing the barrier tasks their token: %w", err)
	}
	return nil
}

// variableToken is the barrier token of a run whose barrier tasks read it
// from the job's Nomad variable; "" where they do not: without TLS, or
// for a job whose ID cannot name a variable (it carries the token in its
// environment instead).
func (s *Server) variableToken(jobID, key string, run int) (string, error) {
	if s.tls == nil {
		return "", nil
	}
	if _, ok := jobspec.BarrierTokenPath(jobID); !ok {
		return "", nil
	}
	sec, err := s.secret()
	if err != nil {
		return "", fmt.Errorf("making the job's barrier token: %w", err)
	}
	return barrierToken(sec, key, run), nil
}

func hasBarrierTask(tg *api.TaskGroup) bool {
	for _, t := range tg.Tasks {
		if t.Name == jobspec.BarrierTaskName {
			return true
		}
	}
	return false
}

// deviceConstraints are a group's device constraints, by request name.
func deviceConstraints(tg *api.TaskGroup) map[string][]placement.DeviceConstraint {
	var out map[string][]placement.DeviceConstraint
	for _, t := range tg.Tasks {
		if t.Resources == nil {
			continue
		}
		for _, d := range t.Resources.Devices {
			for _, c := range d.Constraints {
				if c == nil {
					continue
				}
				if out == nil {
					out = map[string][]placement.DeviceConstraint{}
				}
				op := c.Operand
				if op == "" {
					op = "="
				}
				out[d.Name] = append(out[d.Name], placement.DeviceConstraint{Attribute: c.LTarget, Operator: op, Value: c.RTarget})
			}
		}
	}
	return out
}
