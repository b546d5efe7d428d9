package server

// The start barrier. A worker of a gang boots and then waits before
// running its program: a microvm worker inside its VM (its driver
// reports), any other worker behind cohort's barrier task, a prestart task
// that reports and exits on release. The report is a long poll:
//
//	POST /v1/barrier/{nomad job ID}?namespace=NS
//	     {"Alloc": "<alloc ID>", "Instance": "<this start>", "Wait": "30s"}
//	  -> {"Status": "wait" | "release" | "abort", "Reason": "..."}
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
	"net/http"
	"time"

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/cohort-dev/cohort/scheduler/state"
)

// maxBarrierWait bounds a long poll, under common proxy idle timeouts.
const maxBarrierWait = 55 * time.Second

// Boot records that a worker of a job booted, dealing with a job cohort
// does not know as a gang registered with Nomad directly. It must run on
// the leader.
func (s *Server) Boot(ns, jobID string, req api.BarrierRequest) (api.BarrierResponse, error) {
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
	if !recorded {
		// A big gang's workers report at once: their boots share commits.
		res, err := s.batch.Apply(&state.Command{Op: state.OpBoot, At: s.now(), JobID: key, Alloc: req.Alloc, Instance: req.Instance})
		if err != nil {
			return api.BarrierResponse{}, err
		}
		if res.Err == "" {
			s.log.Debug("worker booted at the barrier", "job", key, "alloc", req.Alloc)
			s.wake()
		}
	}
	return s.verdict(key, req), nil
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
			v = api.BarrierResponse{Status: api.BarrierRelease}
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
	v, err := s.Boot(ns, id, req)
	if err != nil {
		writeErr(w, http.StatusInternalServerError, fmt.Errorf("recording the boot of %s: %w", req.Alloc, err))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), wait)
	defer cancel()
	writeJSON(w, http.StatusOK, s.awaitVerdict(ctx, placement.Key(ns, id), req, v))
}
