// Package state is the gang scheduler's replicated state machine: jobs and
// their lifecycle, reservations, deadlines and the billing ledger. Every
// change is a Command applied in log order; Apply is deterministic (times
// travel inside commands), so every replica computes the same state.
package state

import (
	"encoding/json"
	"fmt"
	"sort"
	"time"

	"github.com/cohort-dev/cohort/scheduler/placement"
)

// Status is where a job is in its lifecycle.
type Status string

const (
	Queued   Status = "queued"   // accepted, waiting for room
	Reserved Status = "reserved" // nodes reserved, workers booting
	Running  Status = "running"  // every worker booted; billing runs
	Finished Status = "finished" // ended: exited, stopped or deadline
	Failed   Status = "failed"   // gang timeout or an error
)

// Job is one accepted gang.
type Job struct {
	Spec placement.Job
	// Nomad is the Nomad job (API JSON) registered when the gang is placed.
	Nomad       json.RawMessage `json:",omitempty"`
	Status      Status
	SubmittedAt time.Time
	Decision    *placement.Decision `json:",omitempty"`
	ReservedAt  time.Time           `json:",omitempty"`
	StartedAt   time.Time           `json:",omitempty"`
	EndedAt     time.Time           `json:",omitempty"`
	Reason      string              `json:",omitempty"`
	Attempts    int                 `json:",omitempty"`
}

// Deadline is when a running job must be stopped.
func (j *Job) Deadline() time.Time { return j.StartedAt.Add(j.Spec.MaxRuntime) }

// Op names a command.
type Op string

const (
	OpSubmit  Op = "submit"
	OpReserve Op = "reserve"
	OpStart   Op = "start"
	OpFinish  Op = "finish"
	OpRequeue Op = "requeue"
	OpFail    Op = "fail"
	// OpAdmit submits a job and reserves it in one entry: the leader
	// placed it on arrival, so one commit instead of two makes it so.
	OpAdmit Op = "admit"
)

// Command is one log entry.
type Command struct {
	Op       Op
	At       time.Time
	JobID    string              `json:",omitempty"`
	Job      *placement.Job      `json:",omitempty"`
	Nomad    json.RawMessage     `json:",omitempty"`
	Decision *placement.Decision `json:",omitempty"`
	Reason   string              `json:",omitempty"`
}

// Encode serialises a command for the log.
func (c *Command) Encode() ([]byte, error) { return json.Marshal(c) }

// Result is what Apply returns for a command: the job after it, or why
// the command did not apply.
type Result struct {
	Job *Job
	Err string
}

// State is the whole replicated state. It is not safe for concurrent use;
// the FSM wrapper serialises access.
type State struct {
	Jobs    map[string]*Job
	NextSeq uint64
}

// New returns an empty state.
func New() *State { return &State{Jobs: map[string]*Job{}} }

// Apply applies one command. Submitting a job ID that exists is a no-op that
// returns the existing job, so a client may retry a submission whose answer
// it lost without creating the job twice.
func (s *State) Apply(c *Command) Result {
	switch c.Op {
	case OpAdmit:
		res := s.Apply(&Command{Op: OpSubmit, At: c.At, Job: c.Job, Nomad: c.Nomad})
		if res.Err != "" || res.Job.Status != Queued {
			return res
		}
		return s.Apply(&Command{Op: OpReserve, At: c.At, JobID: c.Job.ID, Decision: c.Decision})
	case OpSubmit:
		if c.Job == nil || c.Job.ID == "" {
			return Result{Err: "submit without a job"}
		}
		if j, ok := s.Jobs[c.Job.ID]; ok {
			return Result{Job: j}
		}
		spec := *c.Job
		spec.Seq = s.NextSeq
		s.NextSeq++
		j := &Job{Spec: spec, Nomad: c.Nomad, Status: Queued, SubmittedAt: c.At}
		s.Jobs[spec.ID] = j
		return Result{Job: j}
	}
	j, ok := s.Jobs[c.JobID]
	if !ok {
		return Result{Err: fmt.Sprintf("no job %q", c.JobID)}
	}
	switch c.Op {
	case OpReserve:
		if j.Status != Queued {
			return Result{Job: j, Err: fmt.Sprintf("job %s is %s, not queued", j.Spec.ID, j.Status)}
		}
		if c.Decision == nil || len(c.Decision.Workers) != j.Spec.Size() {
			return Result{Job: j, Err: fmt.Sprintf("reservation for %s is not whole", j.Spec.ID)}
		}
		d := *c.Decision
		j.Status, j.Decision, j.ReservedAt = Reserved, &d, c.At
		j.Attempts++
	case OpStart:
		if j.Status != Reserved {
			return Result{Job: j, Err: fmt.Sprintf("job %s is %s, not reserved", j.Spec.ID, j.Status)}
		}
		j.Status, j.StartedAt = Running, c.At
	case OpFinish, OpFail:
		if j.Status == Finished || j.Status == Failed {
			return Result{Job: j}
		}
		j.Status, j.EndedAt, j.Reason = Finished, c.At, c.Reason
		if c.Op == OpFail {
			j.Status = Failed
		}
	case OpRequeue:
		if j.Status != Reserved {
			return Result{Job: j, Err: fmt.Sprintf("job %s is %s, not reserved", j.Spec.ID, j.Status)}
		}
		j.Status, j.Decision, j.Reason = Queued, nil, c.Reason
	default:
		return Result{Err: fmt.Sprintf("unknown op %q", c.Op)}
	}
	return Result{Job: j}
}

// ByStatus lists jobs in a status in submission order.
func (s *State) ByStatus(st Status) []*Job {
	var out []*Job
	for _, j := range s.Jobs {
		if j.Status == st {
			out = append(out, j)
		}
	}
	sort.Slice(out, func(a, b int) bool { return out[a].Spec.Seq < out[b].Spec.Seq })
	return out
}

// Holding lists what reserved and running jobs hold, with the latest time
// they can hold it, for placement.
func (s *State) Holding(now time.Time) []placement.Running {
	var out []placement.Running
	for _, st := range []Status{Reserved, Running} {
		for _, j := range s.ByStatus(st) {
			ends := j.Deadline()
			if st == Reserved {
				ends = now.Add(j.Spec.MaxRuntime)
			}
			spec := j.Spec
			out = append(out, placement.Running{Job: &spec, Decision: *j.Decision, Ends: ends})
		}
	}
	return out
}

// Marshal and Unmarshal are the snapshot format.
func (s *State) Marshal() ([]byte, error) { return json.Marshal(s) }

// Unmarshal replaces s with a snapshot's state.
func (s *State) Unmarshal(b []byte) error {
	n := New()
	if err := json.Unmarshal(b, n); err != nil {
		return fmt.Errorf("decoding state snapshot: %w", err)
	}
	*s = *n
	return nil
}
