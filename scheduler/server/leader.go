package server

// The leader loop. Every tick (and whenever a worker boots) the leader
// makes one pass: it ends gangs at their deadline or when their workers
// end or fail, starts reserved gangs that are whole at the barrier,
// registers reserved gangs with Nomad, requeues or fails gangs that did
// not start, deregisters the Nomad jobs of ended runs, deals with gangs
// registered with Nomad behind cohort's back, and places queued gangs.
//
// One rule orders every change that touches both the state and Nomad: the
// state changes first (committed through Raft), then Nomad. A reserved or
// running gang whose Nomad job is stopped was therefore stopped by someone
// else, and a crash between the two steps leaves work the next pass (or
// the next leader) finishes from the state alone.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/jobspec"
	"github.com/cohort-dev/cohort/scheduler/nomad"
	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/cohort-dev/cohort/scheduler/state"
	nomadapi "github.com/hashicorp/nomad/api"
)

// seenAllocs is a job's allocations as last read from Nomad.
type seenAllocs struct {
	index, version uint64
	at             time.Time
	a              nomad.Allocs
}

// allocRecheck bounds how long the leader trusts a job's allocations
// without asking Nomad, even when the watcher reports no change.
const allocRecheck = 5 * time.Second

// Back-offs after a call to Nomad failed.
const (
	unreachableBackoff = time.Second      // Nomad did not answer
	refusedBackoffBase = time.Second      // Nomad refused a registration: 1 s, 2 s, 4 s, ...
	refusedBackoffMax  = 30 * time.Second //
)

// allocs reads a gang's allocations from Nomad when the watcher saw them
// change (or allocRecheck passed), and from the last read otherwise: a
// pass over many running gangs then costs Nomad nothing.
func (s *Server) allocs(j *state.Job, now time.Time) (nomad.Allocs, error) {
	key, ns, id := j.Key(), j.Spec.Namespace, j.Spec.ID
	idx := s.nomad.AllocIndex(ns, id)
	if c, ok := s.seen[key]; ok && idx != 0 && c.index == idx && c.version == j.NomadVersion && now.Sub(c.at) < allocRecheck {
		return c.a, nil
	}
	a, err := s.nomad.Allocs(ns, id, j.NomadVersion)
	if err != nil {
		return a, err
	}
	if s.seen == nil {
		s.seen = map[string]seenAllocs{}
	}
	s.seen[key] = seenAllocs{index: idx, version: j.NomadVersion, at: now, a: a}
	return a, nil
}

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
		case <-s.kick:
		}
		if !s.r.IsLeader() {
			if leading {
				s.log.Info("no longer leading")
			}
			leading = false
			s.resetLeaderState()
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
		// Cheap when nothing changed; puts this leader's addresses back
		// when a restored state lacks them.
		if err := s.registerSelf(); err != nil {
			s.log.Debug("recording this server's addresses", "error", err)
		}
		if err := s.Pass(); err != nil {
			s.log.Warn("scheduling pass", "error", err)
		}
	}
}

// pruneEvery is how often the leader forgets the runs past retention.
const pruneEvery = time.Minute

// pruneIfDue has every server forget, through one Raft entry, the runs
// that ended more than the retention ago (their Nomad jobs deregistered),
// at most once per pruneEvery. schedMu is held.
func (s *Server) pruneIfDue() error {
	now := s.now()
	if s.retention <= 0 || now.Sub(s.lastPrune) < pruneEvery {
		return nil
	}
	s.lastPrune = now
	before := now.Add(-s.retention)
	due := 0
	s.r.Read(func(st *state.State) { due = st.Prunable(before) })
	if due == 0 {
		return nil
	}
	if _, err := s.apply(&state.Command{Op: state.OpPrune, At: now, Before: before}); err != nil {
		return fmt.Errorf("pruning runs that ended before %s: %w", before.Format(time.RFC3339), err)
	}
	s.log.Info("forgot runs past retention", "runs", due, "ended_before", before.Format(time.RFC3339))
	return nil
}

func (s *Server) resetLeaderState() {
	s.schedMu.Lock()
	s.seen = nil
	// The inventory's memory goes; what it knows gangs hold stays, as it
	// matches heldCur and inflightGone, which go on being kept.
	s.view.Reset()
	s.schedMu.Unlock()
	s.loopMu.Lock()
	s.retry, s.direct = map[string]time.Time{}, map[string]uint64{}
	s.loopMu.Unlock()
}

// resetLeaderStateLocked forgets everything the leader cached of the
// state, admissions in flight included, as a restore must; schedMu is
// held.
func (s *Server) resetLeaderStateLocked() {
	s.seen = nil
	s.inflight = map[string]inflight{}
	s.view.Reset()
	s.heldCur, s.inflightGone = state.HeldCursor{}, map[string]bool{}
	s.loopMu.Lock()
	s.retry, s.direct = map[string]time.Time{}, map[string]uint64{}
	s.loopMu.Unlock()
}

// Pass is one round of the leader loop. Tests call it directly, with the
// server's clock where they want it.
func (s *Server) Pass() error {
	s.schedMu.Lock()
	direct, err := s.pass()
	if perr := s.pruneIfDue(); perr != nil {
		err = errors.Join(err, perr)
	}
	s.schedMu.Unlock()
	// Outside schedMu: taking a gang over admits it, which places.
	for _, gj := range direct {
		if _, derr := s.Direct(gj.Namespace, gj.ID); derr != nil {
			s.log.Warn("a gang registered with nomad directly", "job", gj.Key(), "error", derr)
		}
	}
	return err
}

func (s *Server) pass() ([]nomad.GangJob, error) {
	now := s.now()
	var queued []*placement.Job
	var waiting, reserved, running, unclean []state.Job
	gangs := s.nomad.GangJobs()
	known := map[string]*state.Job{}
	s.r.Read(func(st *state.State) {
		for _, j := range st.ByStatus(state.Queued) {
			waiting = append(waiting, j.Clone())
			if j.RetryAt.After(now) {
				continue // backing off after Nomad refused it
			}
			spec := j.Spec
			queued = append(queued, &spec)
		}
		for _, j := range st.ByStatus(state.Reserved) {
			reserved = append(reserved, j.Clone())
		}
		for _, j := range st.ByStatus(state.Running) {
			running = append(running, j.Clone())
		}
		for _, j := range st.Unclean() {
			unclean = append(unclean, j.Clone())
		}
		for _, gj := range gangs {
			if j, ok := st.Jobs[gj.Key()]; ok {
				c := j.Clone()
				known[gj.Key()] = &c
			}
		}
	})

	// Forget the allocations of gangs no longer watched: one that comes
	// back is read anew.
	watched := map[string]bool{}
	for _, l := range [][]state.Job{reserved, running} {
		for i := range l {
			watched[l[i].Key()] = true
		}
	}
	for key := range s.seen {
		if !watched[key] {
			delete(s.seen, key)
		}
	}

	var errs []error
	// Deadlines first: they are the tightest promise.
	for i := range running {
		if err := s.watchRunning(now, &running[i]); err != nil {
			errs = append(errs, err)
		}
	}
	for i := range reserved {
		if err := s.watchReserved(now, &reserved[i]); err != nil {
			errs = append(errs, err)
		}
	}
	for i := range unclean {
		s.cleanup(now, unclean[i].Key())
	}
	direct := s.reconcile(now, gangs, known)

	if len(queued) > 0 {
		if err := s.place(now, queued); err != nil {
			errs = append(errs, err)
		}
	}
	// A gang that waited in the queue longer than its gang timeout fails,
	// saying what it lacks.
	var free []placement.Node
	for _, j := range waiting {
		if now.Sub(j.QueuedAt) <= j.Spec.GangTimeout {
			continue
		}
		if cur, ok := s.job(j.Key()); !ok || cur.Status != state.Queued {
			continue // placed by this pass
		}
		if free == nil {
			inv, err := s.keptInventory(now, nil)
			if err != nil {
				errs = append(errs, err)
				break
			}
			free = inv.Nodes()
		}
		why := fmt.Sprintf("not placed within its gang timeout of %s: %s", j.Spec.GangTimeout, placement.Shortfall(free, &j.Spec))
		if j.Reason != "" && j.Attempts > 0 {
			why += "; before that: " + j.Reason
		}
		if _, err := s.apply(&state.Command{Op: state.OpFail, At: now, JobID: j.Key(), Reason: why, Run: j.Run}); err != nil {
			errs = append(errs, err)
			continue
		}
		s.log.Warn("gang failed in the queue", "job", j.Key(), "reason", why)
	}
	return direct, errors.Join(errs...)
}

// place reserves queued gangs that fit and registers them with Nomad.
func (s *Server) place(now time.Time, queued []*placement.Job) error {
	// What holds room is read with the inventory: gangs may have ended
	// earlier in this pass, and backfill must not count them twice
	// (gone from the inventory, still releasing room at their deadline).
	var running []placement.Running
	inv, err := s.keptInventory(now, &running)
	if err != nil {
		return err
	}
	// A scheduling pass decides only gangs that fit now: where none does,
	// it would decide nothing, at the cost of building an inventory of
	// every node, every tick while gangs wait. Trying each on the kept
	// inventory costs O(log n) a worker.
	if !anyFits(inv, queued) {
		return nil
	}
	plan := placement.Schedule(now, inv.Nodes(), running, queued)
	for _, d := range plan.Decisions {
		d := d
		if _, err := s.apply(&state.Command{Op: state.OpReserve, At: now, JobID: d.Job, Decision: &d}); err != nil {
			return err
		}
		s.ensureRegistered(d.Job)
	}
	return nil
}

// anyFits says whether any of the gangs fits the inventory now, leaving
// it as it was.
func anyFits(inv *placement.Inventory, gangs []*placement.Job) bool {
	for _, j := range gangs {
		if d, ok := inv.Place(j); ok {
			inv.Release(j, d)
			return true
		}
	}
	return false
}

// ensureRegistered registers a reserved gang's current attempt with Nomad,
// pinned to its reservation, unless it is registered already. Nomad
// refusing the job counts as a failed attempt: the gang is requeued with a
// growing back-off, and fails for good after MaxAttempts with Nomad's
// reason. Nomad out of reach counts nothing: the registration is retried,
// within the gang timeout.
func (s *Server) ensureRegistered(key string) {
	unlock := s.lockJob(key)
	defer unlock()
	j, ok := s.job(key)
	if !ok || j.Status != state.Reserved || j.Adopted || j.NomadIndex != 0 || j.Decision == nil {
		return
	}
	now := s.now()
	if !s.mayCall(key, now) {
		return
	}
	reg, err := s.registerAttempt(&j)
	if err == nil {
		if _, err := s.apply(&state.Command{Op: state.OpRegistered, At: now, JobID: key, Index: reg.Index, Version: reg.Version, Attempt: j.Attempts}); err != nil {
			s.log.Warn("recording a registration", "job", key, "error", err)
		}
		return
	}
	fail := func(why string) {
		s.log.Warn("gang failed", "job", key, "reason", why)
		s.apply(&state.Command{Op: state.OpFail, At: now, JobID: key, Reason: why, Run: j.Run, Attempt: j.Attempts})
	}
	if errors.Is(err, errUncheckedMounts) {
		fail(err.Error())
		return
	}
	var re *nomad.RefusedError
	if !errors.As(err, &re) {
		s.backoff(key, now, unreachableBackoff)
		s.log.Warn("registering a reserved gang: nomad out of reach; retrying", "job", key, "error", err)
		return
	}
	if j.Attempts >= MaxAttempts {
		fail(fmt.Sprintf("nomad refused its registration %d times; the last time: %v", j.Attempts, err))
		return
	}
	wait := min(refusedBackoffBase<<(j.Attempts-1), refusedBackoffMax)
	why := fmt.Sprintf("nomad refused its registration (attempt %d of %d; retrying in %s): %v", j.Attempts, MaxAttempts, wait, err)
	s.log.Warn("registration refused; requeued", "job", key, "error", err, "retry_in", wait)
	s.apply(&state.Command{Op: state.OpRequeue, At: now, JobID: key, Reason: why, RetryAt: now.Add(wait), Run: j.Run, Attempt: j.Attempts})
}

// registerAttempt pins the gang's stored job to its reservation and
// registers it. The stored job is normalized again first, so the barrier
// task reports to the servers of today and fetches its program from this
// leader.
func (s *Server) registerAttempt(j *state.Job) (nomad.Registration, error) {
	var nj nomadapi.Job
	if err := json.Unmarshal(j.Nomad, &nj); err != nil {
		return nomad.Registration{}, &nomad.RefusedError{Status: 400, Err: fmt.Errorf("decoding the stored nomad job: %w", err)}
	}
	if !s.signedMounts(&nj, j.Key()) {
		return nomad.Registration{}, errUncheckedMounts
	}
	norm, _, err := s.Normalize(&nj)
	if err != nil {
		return nomad.Registration{}, &nomad.RefusedError{Status: 400, Err: err}
	}
	pinned, err := nomad.Pin(norm, j.Decision)
	if err != nil {
		return nomad.Registration{}, &nomad.RefusedError{Status: 400, Err: err}
	}
	if pinned.Meta == nil {
		pinned.Meta = map[string]string{}
	}
	pinned.Meta[jobspec.MetaRun] = strconv.Itoa(j.Run)
	if err := s.publishBarrierToken(pinned, j.Key(), j.Run); err != nil {
		return nomad.Registration{}, err
	}
	return s.nomad.Register(pinned)
}

// mayCall says whether Nomad may be asked about a job now, after an
// earlier call failed.
func (s *Server) mayCall(key string, now time.Time) bool {
	s.loopMu.Lock()
	defer s.loopMu.Unlock()
	return !s.retry[key].After(now)
}

func (s *Server) backoff(key string, now time.Time, d time.Duration) {
	s.loopMu.Lock()
	s.retry[key] = now.Add(d)
	s.loopMu.Unlock()
}

// watchRunning ends a running gang: at its deadline, when every worker
// has exited, when a worker failed or was lost (the others are stopped),
// or when its Nomad job was stopped behind cohort's back.
func (s *Server) watchRunning(now time.Time, j *state.Job) error {
	key := j.Key()
	if !now.Before(j.Deadline()) {
		late := now.Sub(j.Deadline())
		s.metrics.lateness.Observe(seconds(late))
		s.log.Info("max runtime reached; stopping", "job", key, "late", late)
		return s.end(now, key, j.Run, state.OpFinish, fmt.Sprintf("max_runtime reached (stopped %d ms after the deadline)", late.Milliseconds()), nil)
	}
	a, err := s.allocs(j, now)
	if err != nil {
		return err
	}
	ends := workerEnds(j, a)
	switch {
	case a.Missing || a.Stopped:
		s.log.Info("gang stopped through nomad", "job", key)
		return s.end(now, key, j.Run, state.OpFinish, "stopped through Nomad", ends)
	case a.Failed+a.Lost > 0 && a.Running+a.Pending > 0:
		why := fmt.Sprintf("%s while the gang ran; cohort stopped the other workers", describeFailed(j, a))
		s.log.Warn("worker lost; stopping its gang", "job", key, "reason", why)
		return s.end(now, key, j.Run, state.OpFail, why, ends)
	case a.Running+a.Pending == 0 && a.Complete+a.Failed+a.Lost > 0:
		// Billing ends when the last worker did, not when this pass
		// noticed.
		at := now
		if last := latest(ends); !last.IsZero() && last.Before(now) && !last.Before(j.StartedAt) {
			at = last
		}
		if a.Failed+a.Lost > 0 {
			return s.end(at, key, j.Run, state.OpFail, api.ReasonExited+"; "+describeFailed(j, a), ends)
		}
		return s.end(at, key, j.Run, state.OpFinish, api.ReasonExited, ends)
	}
	return nil
}

// watchReserved registers a reserved gang, starts it once every worker
// has booted at the barrier, and stops it and sends it back to the queue
// whole when a worker fails or the gang timeout passes.
func (s *Server) watchReserved(now time.Time, j *state.Job) error {
	key := j.Key()
	if !j.Adopted && j.NomadIndex == 0 {
		s.ensureRegistered(key)
		cur, ok := s.job(key)
		if !ok || cur.Status != state.Reserved {
			return nil
		}
		*j = cur
	}
	var a nomad.Allocs
	if j.Adopted || j.NomadIndex != 0 {
		var err error
		if a, err = s.allocs(j, now); err != nil {
			return err
		}
		if a.Missing || a.Stopped {
			s.log.Info("gang stopped through nomad before it started", "job", key)
			return s.end(now, key, j.Run, state.OpFinish, "stopped through Nomad before the gang started", nil)
		}
	}
	var released []string
	for alloc := range j.Booted {
		if a.Live[alloc] {
			released = append(released, alloc)
		}
	}
	sort.Strings(released)
	ready := len(released)
	switch {
	case ready >= j.Spec.Size():
		start := &state.Command{Op: state.OpStart, At: now, JobID: key, Run: j.Run, Attempt: j.Attempts, Allocs: released}
		if j.Decision == nil {
			d, err := s.adoptedDecision(j, a)
			if err != nil {
				return err
			}
			start.Decision = d
		}
		if _, err := s.apply(start); err != nil {
			return err
		}
		s.metrics.gangStart.Observe(seconds(now.Sub(j.SubmittedAt)))
		for _, alloc := range released {
			s.metrics.barrierWait.Observe(seconds(now.Sub(j.Booted[alloc].At)))
		}
		s.log.Info("gang running", "job", key, "workers", ready, "after", now.Sub(j.ReservedAt))
	case a.Failed+a.Lost > 0 || now.Sub(j.ReservedAt) > j.Spec.GangTimeout:
		why := fmt.Sprintf("only %d of %d workers booted after %s", ready, j.Spec.Size(), now.Sub(j.ReservedAt).Round(time.Millisecond))
		if a.Failed+a.Lost > 0 {
			why = fmt.Sprintf("%s before the gang started", describeFailed(j, a))
		}
		if j.NomadIndex == 0 && !j.Adopted {
			why = fmt.Sprintf("not registered with Nomad within the gang timeout of %s", j.Spec.GangTimeout)
		}
		if j.Attempts >= MaxAttempts {
			// Something placement cannot see keeps the gang from starting
			// where it fits (a constraint only Nomad checks, a node that
			// cannot boot it): stop trying.
			why = fmt.Sprintf("did not start in %d attempts; the last: %s", j.Attempts, why)
			s.log.Warn("gang failed", "job", key, "reason", why)
			return s.end(now, key, j.Run, state.OpFail, why, nil)
		}
		s.log.Warn("gang did not start; requeued", "job", key, "adopted", j.Adopted, "reason", why)
		return s.requeue(now, j, why)
	}
	return nil
}

// requeue sends a reserved gang back to the queue, then stops the Nomad
// job of the failed attempt.
func (s *Server) requeue(now time.Time, j *state.Job, why string) error {
	key := j.Key()
	unlock := s.lockJob(key)
	defer unlock()
	res, err := s.apply(&state.Command{Op: state.OpRequeue, At: now, JobID: key, Reason: why, Run: j.Run, Attempt: j.Attempts})
	if err != nil {
		return err
	}
	if err := s.nomad.Stop(res.Job.Spec.Namespace, res.Job.Spec.ID); err != nil {
		// reconcile stops a queued gang's leftover Nomad job later.
		s.log.Warn("stopping the nomad job of a requeued gang", "job", key, "error", err)
	}
	return nil
}

// end ends a gang's run (finished or failed) and deregisters its Nomad
// job. run guards the command: it ends that run only.
func (s *Server) end(at time.Time, key string, run int, op state.Op, why string, ends map[string]time.Time) error {
	unlock := s.lockJob(key)
	defer unlock()
	if _, err := s.apply(&state.Command{Op: op, At: at, JobID: key, Run: run, Reason: why, Ends: ends}); err != nil {
		return err
	}
	s.cleanupLocked(s.now(), key)
	return nil
}

// Stop ends a job at a user's request, whatever its stage: queued,
// reserved (registering, booting) or running.
func (s *Server) Stop(key string) (state.Job, error) {
	unlock := s.lockJob(key)
	defer unlock()
	j, ok := s.job(key)
	if !ok {
		return state.Job{}, fmt.Errorf("%w %q", ErrNoJob, key)
	}
	now := s.now()
	if !j.Ended() {
		res, err := s.apply(&state.Command{Op: state.OpFinish, At: now, JobID: key, Reason: "stopped by request"})
		if err != nil {
			return state.Job{}, err
		}
		j = res.Job.Clone()
	}
	s.cleanupLocked(now, key)
	if cur, ok := s.job(key); ok {
		j = cur
	}
	return j, nil
}

// cleanup deregisters the Nomad job of an ended run.
func (s *Server) cleanup(now time.Time, key string) {
	unlock := s.lockJob(key)
	defer unlock()
	s.cleanupLocked(now, key)
}

func (s *Server) cleanupLocked(now time.Time, key string) {
	j, ok := s.job(key)
	if !ok || !j.Ended() || j.Cleaned || !s.mayCall(key, now) {
		return
	}
	if err := s.nomad.Stop(j.Spec.Namespace, j.Spec.ID); err != nil {
		s.backoff(key, now, unreachableBackoff)
		s.log.Warn("deregistering the nomad job of an ended gang; retrying", "job", key, "error", err)
		return
	}
	if _, err := s.apply(&state.Command{Op: state.OpCleaned, At: now, JobID: key, Run: j.Run}); err != nil {
		s.log.Warn("recording a deregistration", "job", key, "error", err)
		return
	}
	s.dropBarrierToken(j)
}

// dropBarrierToken takes an ended run's barrier token out of its job's
// Nomad variable. A token left behind opens nothing (it names an ended
// run); this only tidies.
func (s *Server) dropBarrierToken(j state.Job) {
	token, err := s.variableToken(j.Spec.ID, j.Key(), j.Run)
	if token == "" && err == nil {
		return
	}
	if err == nil {
		err = s.nomad.DropBarrierToken(j.Spec.Namespace, j.Spec.ID, token)
	}
	if err != nil {
		s.log.Warn("deleting the barrier token of an ended gang", "job", j.Key(), "error", err)
	}
}

// reconcile compares the gang jobs registered with Nomad with the state:
// a gang cohort does not know, or whose last run ended and was cleaned
// up, was registered behind cohort's back, and is returned to be dealt
// with (see direct.go) once the pass has let go of schedMu; a queued gang
// must have no Nomad job running (an earlier attempt's, whose stop failed,
// or a gang cohort took over). The watcher's list may lag; each case is
// checked again, under the job's lock, against the state and Nomad of now.
func (s *Server) reconcile(now time.Time, gangs []nomad.GangJob, known map[string]*state.Job) []nomad.GangJob {
	var direct []nomad.GangJob
	for _, gj := range gangs {
		if gj.Stop {
			continue
		}
		key := gj.Key()
		j := known[key]
		switch {
		case j == nil || (j.Ended() && j.Cleaned):
			if !s.handled(key, gj.JobModifyIndex) {
				direct = append(direct, gj)
			}
		case j.Status == state.Queued && s.mayCall(key, now):
			s.stopLeftover(now, key, gj)
		}
	}
	return direct
}

// stopLeftover stops the Nomad job of a gang that is still queued.
func (s *Server) stopLeftover(now time.Time, key string, gj nomad.GangJob) {
	unlock := s.lockJob(key)
	defer unlock()
	if j, ok := s.job(key); !ok || j.Status != state.Queued {
		return
	}
	if err := s.nomad.Stop(gj.Namespace, gj.ID); err != nil {
		s.backoff(key, now, unreachableBackoff)
		return
	}
	s.log.Info("stopped the leftover nomad job of a queued gang", "job", key)
}

// workerEnds is, by worker name, when each finished allocation of the
// gang's current run finished.
func workerEnds(j *state.Job, a nomad.Allocs) map[string]time.Time {
	ends := map[string]time.Time{}
	for _, w := range a.Workers {
		if w.FinishedAt.IsZero() {
			continue
		}
		name := nomad.WorkerName(j.Spec.ID, w)
		if prev, ok := ends[name]; !ok || w.FinishedAt.After(prev) {
			ends[name] = w.FinishedAt
		}
	}
	if len(ends) == 0 {
		return nil
	}
	return ends
}

func latest(ends map[string]time.Time) time.Time {
	var t time.Time
	for _, e := range ends {
		if e.After(t) {
			t = e
		}
	}
	return t
}

// describeFailed names the failed or lost workers, with exit codes.
func describeFailed(j *state.Job, a nomad.Allocs) string {
	var names []string
	for _, w := range a.Workers {
		if w.Status != "failed" && w.Status != "lost" {
			continue
		}
		n := nomad.WorkerName(j.Spec.ID, w)
		switch {
		case w.Status == "lost":
			n += " (lost with its node)"
		case w.ExitCode != nil:
			n += fmt.Sprintf(" (exit %d)", *w.ExitCode)
		}
		names = append(names, n)
	}
	sort.Strings(names)
	if len(names) == 0 {
		return "a worker failed"
	}
	verb := "failed"
	if len(names) > 1 {
		verb = fmt.Sprintf("failed (%d of %d)", len(names), j.Spec.Size())
	}
	return "worker " + strings.Join(names, ", ") + " " + verb
}

// adoptedDecision records where Nomad placed an adopted gang's live
// workers, as if cohort had placed them, with the devices Nomad gave
// each: the running gang's decision stands for its allocations in the
// inventory, so a device it leaves out would look free to the next gang.
// The decision is made once, so a worker whose devices the event-fed copy
// does not know yet (a new leader's first moments, a lagging stream) is
// read from Nomad.
func (s *Server) adoptedDecision(j *state.Job, a nomad.Allocs) (*placement.Decision, error) {
	wants := map[string]bool{}
	for _, g := range j.Spec.Groups {
		wants[g.Name] = len(g.Devices) > 0
	}
	d := &placement.Decision{Job: j.Key()}
	for _, w := range a.Workers {
		if !a.Live[w.Alloc] {
			continue
		}
		group, idx, ok := nomad.ParseWorkerName(nomad.WorkerName(j.Spec.ID, w))
		if !ok {
			continue
		}
		devs := w.Devices
		if devs == nil && wants[group] {
			var err error
			if devs, err = s.nomad.AllocDevices(j.Spec.Namespace, w.Alloc); err != nil {
				return nil, fmt.Errorf("reading the devices of worker %s[%d]: %w", group, idx, err)
			}
		}
		d.Workers = append(d.Workers, placement.Worker{Group: group, Index: idx, Node: w.Node, Devices: devs})
	}
	return d, nil
}
