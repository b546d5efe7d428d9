package server

// Gangs registered with Nomad directly, bypassing cohort (`nomad job run`
// against Nomad itself). cohort finds them two ways: the first boot report
// of a worker it does not know, and the leader's watch of Nomad's job list
// for jobs carrying the gang meta. Whatever way a gang arrives it must not
// run partially, nor twice, so each is dealt with by what its workers can
// do:
//
//   - every group's workers wait at a start barrier (the microvm driver,
//     or cohort's barrier task) and the job is already a normalized gang:
//     cohort adopts it where Nomad placed it; its workers wait like any
//     others, and it is requeued as cohort's own if it is not whole within
//     its gang timeout;
//   - every group waits at a barrier but the job is not normalized (its
//     workers would restart or reschedule on their own, or lack their
//     COHORT_* names): nothing has run yet, so cohort stops the Nomad job
//     and queues the normalized gang as its own;
//   - some group has no barrier (raw_exec, docker, ... without cohort's
//     barrier task): its workers started as Nomad placed them, so cohort
//     stops the job at once and records the run as failed, saying to
//     submit it through cohort, which adds the barrier task;
//   - a job that claims to be a gang but is not a valid one is stopped and
//     recorded as failed with the reason.

import (
	"errors"
	"fmt"
	"strconv"

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/jobspec"
	"github.com/cohort-dev/cohort/scheduler/nomad"
	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/cohort-dev/cohort/scheduler/state"
	nomadapi "github.com/hashicorp/nomad/api"
)

// handled says whether this registration (by its JobModifyIndex) of a job
// was dealt with already.
func (s *Server) handled(key string, index uint64) bool {
	s.loopMu.Lock()
	defer s.loopMu.Unlock()
	return s.direct[key] == index && index != 0
}

func (s *Server) markHandled(key string, index uint64) {
	s.loopMu.Lock()
	s.direct[key] = index
	s.loopMu.Unlock()
}

func (s *Server) unmarkHandled(key string) {
	s.loopMu.Lock()
	delete(s.direct, key)
	s.loopMu.Unlock()
}

// Direct deals with a gang found registered with Nomad that cohort has no
// live run of, and returns the verdict for a worker of it reporting at the
// barrier. It must run on the leader, without schedMu.
func (s *Server) Direct(ns, id string) (api.BarrierResponse, error) {
	key := placement.Key(normNS(ns), id)
	unlock := s.lockJob(key)
	v, takeover, err := s.directLocked(ns, id, key)
	unlock()
	if takeover == nil {
		return v, err
	}
	// Outside the job's lock: admission takes it itself. The gang is
	// queued, not placed now: the pass that places it first stops the
	// direct registration (a queued gang has no Nomad job running), and
	// until the queue holds it the registration stays as it is, its
	// workers waiting at the barrier.
	if _, err := s.admit(takeover.job, false); err != nil {
		if !errors.Is(err, ErrRejected) {
			s.unmarkHandled(key)
			return api.BarrierResponse{}, err
		}
		s.refuse(key, ns, id, fmt.Sprintf("registered with Nomad directly; cohort took it over to run it as a gang, and refused it: %v", errors.Unwrap(err)))
		return v, nil
	}
	s.log.Info("took over a gang registered with nomad directly", "job", key, "changes", takeover.notes)
	return v, nil
}

type takeover struct {
	job   *nomadapi.Job
	notes []string
}

func (s *Server) directLocked(ns, id, key string) (api.BarrierResponse, *takeover, error) {
	wait := api.BarrierResponse{Status: api.BarrierWait}
	j, known := s.job(key)
	if known {
		switch {
		case !j.Ended():
			return wait, nil, nil // it is cohort's (again) after all
		case !j.Cleaned:
			// A worker of an ended run, reporting before its Nomad job
			// was deregistered.
			return abort("the gang's run has ended: %s", j.Reason), nil, nil
		}
	}
	nj, err := s.nomad.Job(ns, id)
	if errors.Is(err, nomad.ErrNoJob) {
		return abort("nomad has no job %q", id), nil, nil
	}
	if err != nil {
		return api.BarrierResponse{}, nil, err
	}
	idx := deref(nj.JobModifyIndex)
	switch {
	case deref(nj.Stop):
		s.markHandled(key, idx)
		return abort("nomad job %s is stopped", id), nil, nil
	case deref(nj.Status) == "dead":
		s.markHandled(key, idx)
		return abort("nomad job %s has ended", id), nil, nil
	}
	// cohort's own registration of a run that has ended (made late by a
	// leader that had lost its leadership, say): stop it, never run it.
	if run, err := strconv.Atoi(nj.Meta[jobspec.MetaRun]); err == nil && known && run <= j.Run {
		if err := s.nomad.Stop(ns, id); err != nil {
			return api.BarrierResponse{}, nil, err
		}
		s.markHandled(key, idx)
		s.log.Warn("stopped a late registration of an ended run", "job", key, "run", run)
		return abort("the registration of run %d, which has ended", run), nil, nil
	}

	norm, notes, nerr := s.Normalize(nj)
	var g *jobspec.Gang
	if nerr == nil {
		g, nerr = jobspec.GangFromNomad(norm)
	}
	switch {
	case nerr != nil:
		why := fmt.Sprintf("registered with Nomad directly, but it is not a valid gang: %v", unwrapRejected(nerr))
		if err := s.refuse(key, ns, id, why); err != nil {
			return api.BarrierResponse{}, nil, err
		}
		s.markHandled(key, idx)
		return abort("%s", why), nil, nil
	case !s.barrierHeld(nj):
		why := fmt.Sprintf("registered with Nomad directly on %s, whose workers start without waiting for the whole gang; "+
			"cohort stopped it so it does not run partially. Submit it through cohort (cohort run, or nomad job run with "+
			"NOMAD_ADDR at cohort's Nomad-compatible endpoint), which adds the start barrier", unheldDrivers(nj))
		if err := s.refuse(key, ns, id, why); err != nil {
			return api.BarrierResponse{}, nil, err
		}
		s.markHandled(key, idx)
		return abort("%s", why), nil, nil
	case len(notes) > 0:
		s.markHandled(key, idx)
		return abort("cohort took the gang over to run it as a gang (%s); it is queued as cohort's own", notes[0]), &takeover{job: norm, notes: notes}, nil
	}
	// Nomad checked its mounts against whoever registered it: signed, a
	// later attempt of it registers them with cohort's token.
	if err := s.signMounts(norm, key); err != nil {
		return api.BarrierResponse{}, nil, err
	}
	res, err := s.apply(&state.Command{Op: state.OpAdopt, At: s.now(), Job: gangSpec(norm, g), Nomad: mustJSON(norm), Index: idx, Version: deref(nj.Version)})
	if err != nil {
		return api.BarrierResponse{}, nil, err
	}
	s.markHandled(key, idx)
	if err := s.publishBarrierToken(norm, key, res.Job.Run); err != nil {
		// Its barrier tasks wait for the token; the gang timeout sends
		// the gang back to the queue, to be registered as cohort's own.
		s.log.Warn("handing an adopted gang its barrier token", "job", key, "error", err)
	}
	s.log.Info("adopted a gang registered with nomad directly; its workers wait at the barrier", "job", key, "workers", res.Job.Spec.Size())
	return wait, nil, nil
}

// refuse records a direct registration cohort will not run as a failed
// run, so `cohort status` says why, and then stops it in Nomad.
func (s *Server) refuse(key, ns, id, why string) error {
	if _, err := s.apply(&state.Command{Op: state.OpRefuse, At: s.now(), Job: &placement.Job{ID: id, Namespace: normNS(ns)}, Reason: why}); err != nil {
		return err
	}
	s.log.Warn("refused a gang registered with nomad directly", "job", key, "reason", why)
	if err := s.nomad.Stop(ns, id); err != nil {
		// The run is recorded failed and not cleaned: cleanup retries.
		s.log.Warn("stopping a refused direct registration", "job", key, "error", err)
		return nil
	}
	if j, ok := s.job(key); ok {
		s.apply(&state.Command{Op: state.OpCleaned, At: s.now(), JobID: key, Run: j.Run})
	}
	return nil
}

func unwrapRejected(err error) error {
	if u := errors.Unwrap(err); u != nil && errors.Is(err, ErrRejected) {
		return u
	}
	return err
}

// barrierHeld says whether every group's worker waits at a start barrier:
// the microvm driver holds its workers itself; other drivers need
// cohort's barrier task, the genuine one: its program, fetched with this
// server group's checksum.
func (s *Server) barrierHeld(nj *nomadapi.Job) bool {
	for _, tg := range nj.TaskGroups {
		held := false
		for _, t := range tg.Tasks {
			switch {
			case t.Name == jobspec.BarrierTaskName:
				held = held || s.genuineBarrier(t)
			case t.Driver == jobspec.DriverMicroVM:
				held = true
			}
		}
		if !held {
			return false
		}
	}
	return len(nj.TaskGroups) > 0
}

func (s *Server) genuineBarrier(t *nomadapi.Task) bool {
	if s.barrierTask == nil || t.Lifecycle == nil || t.Lifecycle.Hook != nomadapi.TaskLifecycleHookPrestart || t.Lifecycle.Sidecar {
		return false
	}
	if cmd, _ := t.Config["command"].(string); cmd != jobspec.BarrierProgram || len(t.Artifacts) != 1 {
		return false
	}
	return t.Artifacts[0].GetterOptions["checksum"] == s.barrierTask.checksum
}

func unheldDrivers(nj *nomadapi.Job) string {
	seen := map[string]bool{}
	var out string
	for _, tg := range nj.TaskGroups {
		for _, t := range tg.Tasks {
			if t.Name != jobspec.BarrierTaskName && t.Driver != jobspec.DriverMicroVM && !seen[t.Driver] {
				seen[t.Driver] = true
				if out != "" {
					out += ", "
				}
				out += "the " + t.Driver + " driver"
			}
		}
	}
	if out == "" {
		return "a driver without a start barrier"
	}
	return out
}

func abort(format string, args ...any) api.BarrierResponse {
	return api.BarrierResponse{Status: api.BarrierAbort, Reason: fmt.Sprintf(format, args...)}
}

func normNS(ns string) string {
	if ns == api.DefaultNamespace {
		return ""
	}
	return ns
}
