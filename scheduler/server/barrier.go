package server

// The start barrier. A microvm worker of a gang boots, takes its identity
// and then waits before running its program. Its node's driver reports it
// to a cohort server over HTTP and long-polls for the verdict:
//
//	POST /v1/barrier/{nomad job ID}
//	     {"Alloc": "<alloc ID>", "Wait": "30s"}
//	  -> {"Status": "wait" | "release" | "abort", "Reason": "..."}
//
// The first call records the boot in Raft (forwarded to the leader like
// any write); calls are idempotent, so the driver simply repeats one
// until the answer is not "wait", trying the next server when one fails.
// The leader records the gang running (billing starts) once every live
// worker of the gang has booted, and that commit is the release: every
// waiting call answers "release" as soon as it is applied.
//
// A gang registered with Nomad directly, bypassing cohort, is found
// through these reports: the first boot of an unknown job adopts it from
// Nomad. Its workers wait like any others, so it never runs partially; if
// it is not whole within its gang timeout, the leader stops it and requeues
// it as cohort's own gang.
//
// HTTP to the servers was chosen over Consul KV or Nomad variables: the
// leader is the one that decides, the answer comes in one round trip
// after the decision's commit, and nothing needs cleaning up afterwards.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/cohort-dev/cohort/jobspec"
	"github.com/cohort-dev/cohort/scheduler/nomad"
	"github.com/cohort-dev/cohort/scheduler/state"
)

// Barrier verdicts.
const (
	BarrierWait    = "wait"
	BarrierRelease = "release"
	BarrierAbort   = "abort"
)

// BarrierRequest is a worker's boot report.
type BarrierRequest struct {
	Alloc string
	// Wait is how long the server may hold the call for a verdict.
	Wait string `json:",omitempty"`
}

// BarrierResponse is the verdict for one worker.
type BarrierResponse struct {
	Status string
	Reason string `json:",omitempty"`
}

// maxBarrierWait bounds a long poll, under common proxy idle timeouts.
const maxBarrierWait = 55 * time.Second

// Boot records that a worker of job booted, adopting the job from Nomad
// when cohort has not seen it. It must run on the leader.
func (s *Server) Boot(jobID, alloc string) (BarrierResponse, error) {
	var known, recorded bool
	s.r.Read(func(st *state.State) {
		j, ok := st.Jobs[jobID]
		// A job whose run ended and that reports again was registered
		// with Nomad again: a new run to adopt.
		known = ok && !j.Ended()
		if known {
			_, recorded = j.Booted[alloc]
		}
	})
	if !known {
		if resp, err := s.adopt(jobID); err != nil || resp.Status == BarrierAbort {
			return resp, err
		}
	}
	if !recorded {
		// A big gang's workers report at once: their boots share commits.
		res, err := s.batch.Apply(&state.Command{Op: state.OpBoot, At: s.now(), JobID: jobID, Alloc: alloc})
		if err != nil {
			return BarrierResponse{}, err
		}
		if res.Err == "" {
			s.log.Debug("worker booted at the barrier", "job", jobID, "alloc", alloc)
		}
	}
	return s.verdict(jobID, alloc), nil
}

// adopt enters a gang found on Nomad into the state as reserved, without
// a reservation: Nomad has placed (some of) it already.
func (s *Server) adopt(jobID string) (BarrierResponse, error) {
	nj, err := s.nomad.Job(jobID)
	if errors.Is(err, nomad.ErrNoJob) {
		return BarrierResponse{Status: BarrierAbort, Reason: fmt.Sprintf("nomad has no job %q", jobID)}, nil
	}
	if err != nil {
		return BarrierResponse{}, err
	}
	if nj.Stop != nil && *nj.Stop {
		return BarrierResponse{Status: BarrierAbort, Reason: fmt.Sprintf("nomad job %s is stopped", jobID)}, nil
	}
	g, err := jobspec.GangFromNomad(nj)
	if err != nil || g == nil {
		why := fmt.Sprintf("job %s carries no %s meta", jobID, jobspec.MetaGang)
		if err != nil {
			why = err.Error()
		}
		return BarrierResponse{Status: BarrierAbort, Reason: "not a valid cohort gang: " + why}, nil
	}
	raw, err := json.Marshal(nj)
	if err != nil {
		return BarrierResponse{}, err
	}
	res, err := s.r.Apply(&state.Command{Op: state.OpAdopt, At: s.now(), Job: gangSpec(nj, g), Nomad: raw, Barrier: usesBarrier(nj)}, 5*time.Second)
	if err != nil {
		return BarrierResponse{}, err
	}
	if res.Err != "" {
		return BarrierResponse{}, errors.New(res.Err)
	}
	s.log.Info("adopted a gang registered with nomad directly; its workers wait at the barrier", "job", jobID, "workers", res.Job.Spec.Size())
	return BarrierResponse{Status: BarrierWait}, nil
}

// verdict is what a worker waiting at the barrier is told now.
func (s *Server) verdict(jobID, alloc string) BarrierResponse {
	var v BarrierResponse
	s.r.Read(func(st *state.State) {
		j, ok := st.Jobs[jobID]
		switch {
		case !ok:
			v = BarrierResponse{Status: BarrierWait} // a follower not yet caught up
		case j.Status == state.Reserved:
			v = BarrierResponse{Status: BarrierWait}
		case j.Status == state.Running:
			if _, ok := j.Booted[alloc]; ok {
				v = BarrierResponse{Status: BarrierRelease}
			} else {
				v = BarrierResponse{Status: BarrierAbort, Reason: "the gang started without this worker"}
			}
		default:
			v = BarrierResponse{Status: BarrierAbort, Reason: fmt.Sprintf("the gang is %s: %s", j.Status, j.Reason)}
		}
	})
	return v
}

// awaitVerdict holds a call until the verdict is not "wait" or ctx ends.
func (s *Server) awaitVerdict(ctx context.Context, jobID, alloc string, first BarrierResponse) BarrierResponse {
	v := first
	for v.Status == BarrierWait {
		changed := s.r.Changed()
		if v = s.verdict(jobID, alloc); v.Status != BarrierWait {
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

func (s *Server) handleBarrier(w http.ResponseWriter, r *http.Request) {
	var req BarrierRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil || req.Alloc == "" {
		writeErr(w, http.StatusBadRequest, errors.New(`body must be {"Alloc": "<allocation ID>", "Wait": "<duration>"}`))
		return
	}
	wait := time.Duration(0)
	if req.Wait != "" {
		d, err := time.ParseDuration(req.Wait)
		if err != nil || d < 0 {
			writeErr(w, http.StatusBadRequest, fmt.Errorf("bad Wait %q", req.Wait))
			return
		}
		wait = min(d, maxBarrierWait)
	}
	jobID := r.PathValue("job")
	v, err := s.Boot(jobID, req.Alloc)
	if err != nil {
		writeErr(w, http.StatusInternalServerError, fmt.Errorf("recording the boot of %s: %w", req.Alloc, err))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), wait)
	defer cancel()
	writeJSON(w, http.StatusOK, s.awaitVerdict(ctx, jobID, req.Alloc, v))
}
