// Package state is the gang scheduler's replicated state machine: jobs and
// their lifecycle, reservations, deadlines and the billing ledger. Every
// change is a Command applied in log order; Apply is deterministic (times
// travel inside commands), so every replica computes the same state.
package state

import (
	"encoding/json"
	"fmt"
	"maps"
	"sort"
	"sync/atomic"
	"time"

	"github.com/cohort-dev/cohort/jobspec"
	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/hashicorp/nomad/api"
)

// Status is where a job is in its lifecycle.
type Status string

const (
	Queued   Status = "queued"   // accepted, waiting for room
	Reserved Status = "reserved" // nodes reserved, workers booting
	Running  Status = "running"  // every worker booted and released; billing runs
	Finished Status = "finished" // ended: exited, stopped or deadline
	Failed   Status = "failed"   // did not start, or a worker failed while it ran
)

// Job is one accepted gang. Jobs are keyed by placement.Key(namespace, ID).
type Job struct {
	Spec placement.Job
	// Nomad is the normalized Nomad job (API JSON) registered when the
	// gang is placed.
	Nomad       json.RawMessage `json:",omitempty"`
	Status      Status
	SubmittedAt time.Time
	// QueuedAt is when the job last entered the queue: at submit or at
	// its latest requeue. A gang queued longer than its gang timeout
	// fails.
	QueuedAt time.Time `json:",omitempty"`
	// RetryAt keeps a requeued gang out of placement until then: the
	// back-off after Nomad refused its registration.
	RetryAt    time.Time           `json:",omitempty"`
	Decision   *placement.Decision `json:",omitempty"`
	ReservedAt time.Time           `json:",omitempty"`
	StartedAt  time.Time           `json:",omitempty"`
	EndedAt    time.Time           `json:",omitempty"`
	Reason     string              `json:",omitempty"`
	Attempts   int                 `json:",omitempty"`
	// Booted holds, per Nomad allocation ID, the worker's boot report at
	// the barrier during the current attempt.
	Booted map[string]Boot `json:",omitempty"`
	// Adopted marks a gang registered with Nomad directly, bypassing
	// cohort: Nomad placed it, so it holds no reservation of cohort's
	// until it fails to complete and is requeued.
	Adopted bool `json:",omitempty"`
	// NomadIndex is the JobModifyIndex of the Nomad job of the current
	// attempt (cohort's registration, or the adopted one); 0 while the
	// attempt is not registered yet.
	NomadIndex uint64 `json:",omitempty"`
	// NomadVersion is the Nomad job version of that registration: its
	// allocations are the attempt's workers.
	NomadVersion uint64 `json:",omitempty"`
	// WorkerEnds holds, by worker name ("group[rank]"), when a worker's
	// allocation finished, where it finished before the gang ended: the
	// ledger bills each worker to its own end.
	WorkerEnds map[string]time.Time `json:",omitempty"`
	// Cleaned is set once an ended run's Nomad job is deregistered.
	Cleaned bool `json:",omitempty"`
	// Run counts the runs of this job ID, from 1; Previous holds the
	// ended runs before this one, oldest first, for their bills.
	Run      int   `json:",omitempty"`
	Previous []Job `json:",omitempty"`
}

// Boot is one worker's report at the start barrier.
type Boot struct {
	At time.Time
	// Instance names the task start that reported: the same allocation
	// reporting as another instance was restarted, and is refused.
	Instance string `json:",omitempty"`
	// Group and Rank place the worker in its gang (from Nomad's listing
	// of the allocation), Address is the worker's own IP (from its
	// node's report, when its driver gives one): the release hands every
	// worker the addresses of all, so that their names resolve without
	// a DNS round trip.
	Group   string `json:",omitempty"`
	Rank    int    `json:",omitempty"`
	Address string `json:",omitempty"`
}

// Key is the job's key in State.Jobs.
func (j Job) Key() string { return j.Spec.Key() }

// String summarises a job for logs and test failures.
func (j Job) String() string {
	s := fmt.Sprintf("%s run %d attempt %d: %s", j.Key(), j.Run, j.Attempts, j.Status)
	if j.Adopted {
		s += " (adopted)"
	}
	if j.NomadIndex != 0 {
		s += fmt.Sprintf(" nomad index %d version %d", j.NomadIndex, j.NomadVersion)
	}
	if len(j.Booted) > 0 {
		s += fmt.Sprintf(", %d booted", len(j.Booted))
	}
	if j.Cleaned {
		s += ", cleaned"
	}
	if j.Reason != "" {
		s += ": " + j.Reason
	}
	return s
}

// Ended says whether the job has finished or failed.
func (j *Job) Ended() bool { return j.Status == Finished || j.Status == Failed }

// Deadline is when a running job must be stopped.
func (j *Job) Deadline() time.Time { return j.StartedAt.Add(j.Spec.MaxRuntime) }

// Clone copies a job deeply enough that applying later commands to the
// state never changes the copy, and the copy may be read without the
// state's lock. Apply replaces Spec, Decision and Previous rather than
// editing them, so those are shared.
func (j *Job) Clone() Job {
	c := *j
	c.Booted = maps.Clone(j.Booted)
	c.WorkerEnds = maps.Clone(j.WorkerEnds)
	return c
}

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
	// OpRegistered records the Nomad job cohort registered for the
	// current attempt.
	OpRegistered Op = "registered"
	// OpBoot records that one worker (a Nomad allocation) booted and
	// waits at the start barrier.
	OpBoot Op = "boot"
	// OpAdopt records a gang found running on Nomad without having been
	// submitted to cohort; it enters as reserved with no reservation.
	OpAdopt Op = "adopt"
	// OpCleaned records that an ended run's Nomad job is deregistered.
	OpCleaned Op = "cleaned"
	// OpRefuse records a run that failed before it was ever queued (a
	// gang registered with Nomad directly that cohort will not run), in
	// one entry, so the refusal is never half recorded.
	OpRefuse Op = "refuse"
	// OpMember records a server's addresses.
	OpMember Op = "member"
	// OpForget drops a server removed from the group (Member.ID).
	OpForget Op = "forget"
	// OpLease grants or renews a node's worker subnet; OpRelease gives
	// one up (see leases.go).
	OpLease   Op = "lease"
	OpRelease Op = "release"
	// OpBatch applies several commands in one log entry, in order, each
	// on its own: one failing does not undo the others.
	OpBatch Op = "batch"
	// OpSecret sets the group's secret, once: the first one committed
	// stays.
	OpSecret Op = "secret"
	// OpPrune forgets the runs that ended before the command's Before
	// and whose Nomad jobs are gone: every replica drops the same ones,
	// as the cutoff is in the command, not in each replica's clock.
	OpPrune Op = "prune"
)

// Command is one log entry. JobID is the job's key.
type Command struct {
	Op       Op
	At       time.Time
	JobID    string              `json:",omitempty"`
	Job      *placement.Job      `json:",omitempty"`
	Nomad    json.RawMessage     `json:",omitempty"`
	Decision *placement.Decision `json:",omitempty"`
	Reason   string              `json:",omitempty"`
	Alloc    string              `json:",omitempty"` // OpBoot
	Instance string              `json:",omitempty"` // OpBoot
	// Boot is where the booted worker is (OpBoot: Group, Rank, Address).
	Boot *Boot `json:",omitempty"`
	// Index and Version are the Nomad job's JobModifyIndex and version
	// (OpRegistered, OpAdopt).
	Index   uint64 `json:",omitempty"`
	Version uint64 `json:",omitempty"`
	// Attempt guards OpRegistered (always) and OpStart and OpRequeue
	// (when set): they apply only to that attempt.
	Attempt int `json:",omitempty"`
	// Run guards OpCleaned (always) and OpStart, OpRequeue, OpFinish and
	// OpFail (when set): they apply only to that run.
	Run int `json:",omitempty"`
	// Allocs are, for OpStart, the allocations released: the booted
	// workers of the attempt that started. A report from any other
	// allocation is aborted.
	Allocs []string `json:",omitempty"`
	// RetryAt is the back-off of OpRequeue.
	RetryAt time.Time `json:",omitempty"`
	// Ends are the workers' own end times (OpFinish, OpFail).
	Ends     map[string]time.Time `json:",omitempty"`
	Member   *Member              `json:",omitempty"` // OpMember
	Commands []*Command           `json:",omitempty"` // OpBatch
	// Lease is the node asking (OpLease, OpRelease); Range and Prefix are
	// the worker range the servers are configured with, taken when the
	// first lease is granted.
	Lease  *Lease `json:",omitempty"`
	Range  string `json:",omitempty"`
	Prefix int    `json:",omitempty"`
	Secret []byte `json:",omitempty"` // OpSecret
	// Before is OpPrune's cutoff.
	Before time.Time `json:",omitempty"`
}

// Result is what Apply returns for a command: the job after it, or why
// the command did not apply.
type Result struct {
	Job   *Job
	Lease *Lease `json:",omitempty"`
	Err   string
	// Results answers an OpBatch, one per command, in order.
	Results []Result `json:",omitempty"`
}

// State is the whole replicated state. It is not safe for concurrent use;
// the FSM wrapper serialises access.
type State struct {
	Jobs    map[string]*Job
	NextSeq uint64
	// Members holds each server's addresses, so a follower can forward a
	// write to the leader's HTTP API.
	Members map[string]Member `json:",omitempty"`
	// Leases are the nodes' worker subnets.
	Leases *Leases `json:",omitempty"`
	// Secret is the server group's own key: the barrier tokens handed
	// to barrier tasks are derived from it. It lives only in the
	// servers' Raft log and snapshots.
	Secret []byte `json:",omitempty"`
	// Forgotten holds, for each job ID a prune forgot whole, its last run
	// number, so a later run of the ID goes on counting: a run's number is
	// part of its barrier token, which must never open another run's
	// barrier. An entry goes when the ID runs again.
	Forgotten map[string]int `json:",omitempty"`

	// live indexes the jobs the leader looks at on every pass (queued,
	// reserved, running, and ended but not cleaned up) by key, so a pass
	// costs what is live, not every job ever kept. Derived from Jobs:
	// never encoded, rebuilt on decode and copy.
	live map[Status]map[string]*Job
	// heldLog lists, in apply order, the keys of jobs whose holding may
	// have changed (they entered, left or changed while reserved or
	// running), for a reader that keeps what gangs hold by deltas (the
	// leader's inventory). Derived like live; heldGen names the log, and
	// a new one starts whenever live is rebuilt or the log outgrows what
	// is live, so a reader behind it reads every holding again.
	heldGen uint64
	heldLog []string
}

// heldGens numbers held logs across states.
var heldGens atomic.Uint64

// HeldCursor is a reader's place in the log of changed holdings.
type HeldCursor struct{ Gen, Seq uint64 }

// HeldSince calls fn with the key of each job whose holding may have
// changed since the cursor (a key may come more than once) and returns
// the cursor to read from next. all says the cursor is not into this
// log (fn is not called): the reader reads every holding with EachHeld.
func (s *State) HeldSince(c HeldCursor, fn func(key string)) (next HeldCursor, all bool) {
	if s.live == nil {
		return HeldCursor{}, true
	}
	next = HeldCursor{Gen: s.heldGen, Seq: uint64(len(s.heldLog))}
	if c.Gen != s.heldGen || c.Seq > next.Seq {
		return next, true
	}
	for _, key := range s.heldLog[c.Seq:] {
		fn(key)
	}
	return next, false
}

// Holds is the reservation key's job holds now, if it holds one.
func (s *State) Holds(key string) (*placement.Job, *placement.Decision, bool) {
	j, ok := s.Jobs[key]
	if !ok || !j.holdsRoom() {
		return nil, nil, false
	}
	return &j.Spec, j.Decision, true
}

// holdsRoom says whether the job holds a reservation: reserved or
// running, with a decision (an adopted gang has none: Nomad accounts for
// its allocations).
func (j *Job) holdsRoom() bool {
	return (j.Status == Reserved || j.Status == Running) && j.Decision != nil
}

// unclean is live's bucket for ended runs whose Nomad job is still
// registered.
const unclean Status = "unclean"

// reindex files the job under key in live (or nowhere).
func (s *State) reindex(key string) {
	if s.live == nil {
		s.rebuild()
		return
	}
	_, wasReserved := s.live[Reserved][key]
	_, wasRunning := s.live[Running][key]
	for _, m := range s.live {
		delete(m, key)
	}
	j, ok := s.Jobs[key]
	if wasReserved || wasRunning || (ok && (j.Status == Reserved || j.Status == Running)) {
		if len(s.heldLog) >= 4096+len(s.live[Reserved])+len(s.live[Running]) {
			s.heldGen, s.heldLog = heldGens.Add(1), nil
		}
		s.heldLog = append(s.heldLog, key)
	}
	if !ok {
		return
	}
	st := j.Status
	if j.Ended() {
		if j.Cleaned {
			return
		}
		st = unclean
	}
	if m := s.live[st]; m != nil {
		m[key] = j
	}
}

func (s *State) rebuild() {
	s.live = map[Status]map[string]*Job{Queued: {}, Reserved: {}, Running: {}, unclean: {}}
	s.heldGen, s.heldLog = heldGens.Add(1), nil
	for key := range s.Jobs {
		s.reindex(key)
	}
}

// Member is one cohort server.
type Member struct {
	ID, RaftAddr, HTTPAddr string
	// Codec is the newest log encoding the server reads (CodecNewest);
	// servers before it leave it out. The leader writes the binary
	// encoding only once every server's record says it reads it.
	Codec int `json:",omitempty"`
}

// LogCodec is the log encoding every one of the servers (by ID) has
// recorded that it reads: JSON unless each of them reads binary.
func (s *State) LogCodec(servers []string) int {
	if len(servers) == 0 {
		return CodecJSON
	}
	codec := CodecNewest
	for _, id := range servers {
		codec = min(codec, s.Members[id].Codec)
	}
	return codec
}

// New returns an empty state.
func New() *State {
	s := &State{Jobs: map[string]*Job{}, Members: map[string]Member{}}
	s.rebuild()
	return s
}

// Apply applies one command. Submitting a job that exists and has not
// ended is a no-op that returns the existing job, so a client may retry a
// submission whose answer it lost without creating the job twice;
// submitting one whose run ended starts its next run.
func (s *State) Apply(c *Command) Result {
	res := s.apply(c)
	if res.Job != nil {
		s.reindex(res.Job.Key())
	}
	return res
}

func (s *State) apply(c *Command) Result {
	switch c.Op {
	case OpPrune:
		return s.prune(c.Before)
	case OpBatch:
		out := Result{Results: make([]Result, len(c.Commands))}
		for i, sub := range c.Commands {
			if sub == nil || sub.Op == OpBatch {
				out.Results[i] = Result{Err: "nested or empty batch entry"}
				continue
			}
			out.Results[i] = s.Apply(sub)
		}
		return out
	case OpSecret:
		if len(c.Secret) < 32 {
			return Result{Err: "a secret of at least 32 bytes"}
		}
		if len(s.Secret) == 0 {
			s.Secret = append([]byte(nil), c.Secret...)
		}
		return Result{}
	case OpMember:
		if c.Member == nil || c.Member.ID == "" {
			return Result{Err: "member without an ID"}
		}
		if s.Members == nil {
			s.Members = map[string]Member{}
		}
		s.Members[c.Member.ID] = *c.Member
		return Result{}
	case OpForget:
		if c.Member == nil || c.Member.ID == "" {
			return Result{Err: "forget without a member ID"}
		}
		delete(s.Members, c.Member.ID)
		return Result{}
	case OpAdmit:
		if c.Job == nil {
			return Result{Err: "admit without a job"}
		}
		res := s.Apply(&Command{Op: OpSubmit, At: c.At, Job: c.Job, Nomad: c.Nomad})
		if res.Err != "" || res.Job.Status != Queued {
			return res
		}
		return s.Apply(&Command{Op: OpReserve, At: c.At, JobID: c.Job.Key(), Decision: c.Decision})
	case OpSubmit, OpAdopt:
		return s.submit(c)
	case OpLease:
		if (s.Leases == nil || len(s.Leases.ByNode) == 0) && c.Range != "" {
			s.Leases = &Leases{Range: c.Range, Prefix: c.Prefix, Index: s.leaseIndex()}
		}
		return s.lease(c)
	case OpRelease:
		return s.release(c)
	case OpRefuse:
		if c.Job == nil {
			return Result{Err: "refuse without a job"}
		}
		if old, ok := s.Jobs[c.Job.Key()]; ok && !old.Ended() {
			return Result{Job: old, Err: fmt.Sprintf("job %s has a live run; it is not refused", c.Job.Key())}
		}
		res := s.submit(&Command{Op: OpSubmit, At: c.At, Job: c.Job})
		j := res.Job
		j.Status, j.EndedAt, j.Reason = Failed, c.At, c.Reason
		return res
	}
	j, ok := s.Jobs[c.JobID]
	if !ok {
		return Result{Err: fmt.Sprintf("no job %q", c.JobID)}
	}
	if c.Run != 0 && c.Run != j.Run {
		return Result{Job: j, Err: fmt.Sprintf("job %s is at run %d: a command for run %d is stale", j.Key(), j.Run, c.Run)}
	}
	if c.Attempt != 0 && c.Attempt != j.Attempts {
		return Result{Job: j, Err: fmt.Sprintf("job %s is at attempt %d: a command for attempt %d is stale", j.Key(), j.Attempts, c.Attempt)}
	}
	switch c.Op {
	case OpReserve:
		if j.Status != Queued {
			return Result{Job: j, Err: fmt.Sprintf("job %s is %s, not queued", j.Key(), j.Status)}
		}
		if c.Decision == nil || len(c.Decision.Workers) != j.Spec.Size() {
			return Result{Job: j, Err: fmt.Sprintf("reservation for %s is not whole", j.Key())}
		}
		d := *c.Decision
		j.Status, j.Decision, j.ReservedAt, j.Booted = Reserved, &d, c.At, nil
		j.NomadIndex, j.NomadVersion, j.RetryAt = 0, 0, time.Time{}
		j.Attempts++
	case OpRegistered:
		if j.Status != Reserved || c.Attempt == 0 {
			return Result{Job: j, Err: fmt.Sprintf("job %s is %s at attempt %d: the registration of attempt %d is stale", j.Key(), j.Status, j.Attempts, c.Attempt)}
		}
		j.NomadIndex, j.NomadVersion = c.Index, c.Version
	case OpBoot:
		if j.Status != Reserved && j.Status != Running {
			return Result{Job: j, Err: fmt.Sprintf("job %s is %s: its workers no longer wait at the barrier", j.Key(), j.Status)}
		}
		if c.Alloc == "" {
			return Result{Job: j, Err: "boot without an allocation"}
		}
		// Only the first report of an allocation counts; a later one from
		// another instance (a restarted task) is refused by the verdict.
		if _, ok := j.Booted[c.Alloc]; !ok && j.Status == Reserved {
			if j.Booted == nil {
				j.Booted = map[string]Boot{}
			}
			b := Boot{At: c.At, Instance: c.Instance}
			if c.Boot != nil {
				b.Group, b.Rank, b.Address = c.Boot.Group, c.Boot.Rank, c.Boot.Address
			}
			j.Booted[c.Alloc] = b
		}
	case OpStart:
		if j.Status != Reserved {
			return Result{Job: j, Err: fmt.Sprintf("job %s is %s, not reserved", j.Key(), j.Status)}
		}
		j.Status, j.StartedAt = Running, c.At
		if c.Allocs != nil {
			// Only the released workers stay booted: a late report
			// from an allocation of another attempt is refused.
			keep := make(map[string]Boot, len(c.Allocs))
			for _, a := range c.Allocs {
				if b, ok := j.Booted[a]; ok {
					keep[a] = b
				}
			}
			j.Booted = keep
		}
		if j.Decision == nil && c.Decision != nil {
			// An adopted gang: where Nomad put its workers, for the
			// ledger and for placement from now on.
			d := *c.Decision
			j.Decision = &d
		}
	case OpFinish, OpFail:
		if j.Ended() {
			return Result{Job: j}
		}
		j.Status, j.EndedAt, j.Reason = Finished, c.At, c.Reason
		if c.Op == OpFail {
			j.Status = Failed
		}
		if len(c.Ends) > 0 {
			j.WorkerEnds = maps.Clone(c.Ends)
		}
	case OpCleaned:
		if j.Ended() && c.Run != 0 {
			j.Cleaned = true
		}
	case OpRequeue:
		if j.Status != Reserved {
			return Result{Job: j, Err: fmt.Sprintf("job %s is %s, not reserved", j.Key(), j.Status)}
		}
		// An adopted gang comes back as cohort's own: requeued, it is
		// placed and registered like any submitted gang.
		j.Status, j.Decision, j.Reason, j.Booted, j.Adopted, j.QueuedAt = Queued, nil, c.Reason, nil, false, c.At
		j.NomadIndex, j.NomadVersion, j.RetryAt = 0, 0, c.RetryAt
	default:
		return Result{Err: fmt.Sprintf("unknown op %q", c.Op)}
	}
	return Result{Job: j}
}

func (s *State) submit(c *Command) Result {
	if c.Job == nil || c.Job.ID == "" {
		return Result{Err: "submit without a job"}
	}
	key := c.Job.Key()
	// A known job is the same submission retried, unless its run has
	// ended: then, as with Nomad, registering it again runs it again.
	old, ok := s.Jobs[key]
	if ok && !old.Ended() {
		return Result{Job: old}
	}
	spec := *c.Job
	withDrivers(&spec, c.Nomad)
	spec.Seq = s.NextSeq
	s.NextSeq++
	j := &Job{Spec: spec, Nomad: c.Nomad, Status: Queued, SubmittedAt: c.At, QueuedAt: c.At, Run: s.NextRun(key)}
	delete(s.Forgotten, key)
	if ok {
		prev := *old
		// A past run is kept for its bill; its Nomad job is not needed
		// (and is most of its size).
		prev.Previous, prev.Nomad = nil, nil
		j.Previous = append(append([]Job(nil), old.Previous...), prev)
	}
	if c.Op == OpAdopt {
		j.Status, j.ReservedAt, j.Adopted, j.Attempts = Reserved, c.At, true, 1
		j.NomadIndex, j.NomadVersion = c.Index, c.Version
	}
	s.Jobs[key] = j
	return Result{Job: j}
}

// NextRun is the number the job ID's next run would get: its current
// run's while that goes on, else one past the last, kept or forgotten.
func (s *State) NextRun(key string) int {
	if j, ok := s.Jobs[key]; ok {
		if j.Ended() {
			return j.Run + 1
		}
		return j.Run
	}
	return s.Forgotten[key] + 1
}

// ByStatus lists jobs in a status in submission order. Queued, reserved
// and running jobs come from the index; ended ones from a scan of every
// job kept. (A State made other than by New, Clone or Unmarshal has no
// index, and is scanned.)
func (s *State) ByStatus(st Status) []*Job {
	var out []*Job
	if m, ok := s.live[st]; ok && st != unclean {
		for _, j := range m {
			out = append(out, j)
		}
	} else {
		out = s.scan(func(j *Job) bool { return j.Status == st })
	}
	sort.Slice(out, func(a, b int) bool { return out[a].Spec.Seq < out[b].Spec.Seq })
	return out
}

// Unclean lists the ended runs whose Nomad job is still registered.
func (s *State) Unclean() []*Job {
	var out []*Job
	if s.live == nil {
		out = s.scan(func(j *Job) bool { return j.Ended() && !j.Cleaned })
	}
	for _, j := range s.live[unclean] {
		out = append(out, j)
	}
	sort.Slice(out, func(a, b int) bool { return out[a].Spec.Seq < out[b].Spec.Seq })
	return out
}

func (s *State) scan(keep func(*Job) bool) []*Job {
	var out []*Job
	for _, j := range s.Jobs {
		if keep(j) {
			out = append(out, j)
		}
	}
	return out
}

// Prunable counts the jobs and past runs prune(before) would forget.
func (s *State) Prunable(before time.Time) int {
	n := 0
	for _, j := range s.Jobs {
		if forgetWhole(j, before) {
			n += 1 + len(j.Previous)
			continue
		}
		n += pastRunsBefore(j, before)
	}
	return n
}

// forgetWhole says whether prune forgets j, past runs and all: it ended
// before the cutoff and its Nomad job is gone.
func forgetWhole(j *Job, before time.Time) bool {
	return j.Ended() && j.Cleaned && j.EndedAt.Before(before)
}

// pastRunsBefore is how many of j's past runs, oldest first, ended before
// the cutoff: prune forgets those.
func pastRunsBefore(j *Job, before time.Time) int {
	n := 0
	for n < len(j.Previous) && j.Previous[n].EndedAt.Before(before) {
		n++
	}
	return n
}

// prune forgets what ended before the cutoff: jobs whose run ended then
// and whose Nomad job is deregistered, and earlier runs (bills) of any
// job that ended then. A job ID pruned whole goes on counting its runs
// (Forgotten).
func (s *State) prune(before time.Time) Result {
	if before.IsZero() {
		return Result{Err: "prune without a cutoff"}
	}
	for key, j := range s.Jobs {
		if forgetWhole(j, before) {
			if s.Forgotten == nil {
				s.Forgotten = map[string]int{}
			}
			s.Forgotten[key] = j.Run
			delete(s.Jobs, key)
			s.reindex(key)
			continue
		}
		if n := pastRunsBefore(j, before); n > 0 {
			// A new slice: copies of the job share the old one.
			j.Previous = append([]Job(nil), j.Previous[n:]...)
		}
	}
	return Result{}
}

// RunOf finds the job's run n among its current and kept past runs.
func (j *Job) RunOf(n int) (Job, bool) {
	if n == 0 || n == j.Run {
		return *j, true
	}
	for _, p := range j.Previous {
		if p.Run == n {
			return p, true
		}
	}
	return Job{}, false
}

// Holding lists what reserved and running jobs hold, with the latest time
// they can hold it, for placement. Adopted gangs hold no reservation:
// Nomad accounts for their allocations.
func (s *State) Holding(now time.Time) []placement.Running {
	var out []placement.Running
	for _, st := range []Status{Reserved, Running} {
		for _, j := range s.ByStatus(st) {
			if j.Decision == nil {
				continue
			}
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

// EachHeld calls fn for every reserved or running gang that holds a
// reservation, in no order, with its key, spec and decision, without
// copying them: fn must copy what it keeps past the state's lock. A new
// reservation is always a new Decision (commands replace one, never
// edit it), so the pointer tells a reader whether a holding changed.
func (s *State) EachHeld(fn func(key string, spec *placement.Job, d *placement.Decision)) {
	held := func(key string, j *Job) {
		if j.holdsRoom() {
			fn(key, &j.Spec, j.Decision)
		}
	}
	if s.live == nil {
		for key, j := range s.Jobs {
			held(key, j)
		}
		return
	}
	for _, st := range []Status{Reserved, Running} {
		for key, j := range s.live[st] {
			held(key, j)
		}
	}
}

// Clone copies the state deeply enough that later commands do not change
// the copy.
func (s *State) Clone() *State {
	// Secret is set once and never changed in place: the copy shares it.
	c := &State{Jobs: make(map[string]*Job, len(s.Jobs)), NextSeq: s.NextSeq, Members: maps.Clone(s.Members), Secret: s.Secret,
		Forgotten: maps.Clone(s.Forgotten)}
	if c.Members == nil {
		c.Members = map[string]Member{}
	}
	for id, j := range s.Jobs {
		cj := j.Clone()
		c.Jobs[id] = &cj
	}
	c.rebuild()
	if s.Leases != nil {
		ls := *s.Leases
		ls.ByNode = make(map[string]*Lease, len(s.Leases.ByNode))
		for n, l := range s.Leases.ByNode {
			ls.ByNode[n] = copyLease(l)
		}
		c.Leases = &ls
	}
	return c
}

func (s *State) leaseIndex() uint64 {
	if s.Leases == nil {
		return 0
	}
	return s.Leases.Index
}

// Marshal and Unmarshal are the snapshot format.
func (s *State) Marshal() ([]byte, error) { return json.Marshal(s) }

// Unmarshal replaces s with a snapshot's state.
func (s *State) Unmarshal(b []byte) error {
	n := New()
	if err := json.Unmarshal(b, n); err != nil {
		return fmt.Errorf("decoding state snapshot: %w", err)
	}
	for _, j := range n.Jobs {
		withDrivers(&j.Spec, j.Nomad)
	}
	n.rebuild()
	*s = *n
	return nil
}

// withDrivers gives a spec that came without its groups' task drivers
// (from a server before them: a JSON entry or snapshot of that version,
// or binary version 1) the drivers of its stored Nomad job, so it is
// placed where Nomad can place it. Every replica derives the same; a spec
// with drivers, the only kind new servers write, is left as it is.
func withDrivers(spec *placement.Job, nomadJob json.RawMessage) {
	if len(nomadJob) == 0 || len(spec.Groups) == 0 {
		return
	}
	for _, g := range spec.Groups {
		if g.Drivers != nil {
			return
		}
	}
	var nj api.Job
	if json.Unmarshal(nomadJob, &nj) != nil || len(nj.TaskGroups) != len(spec.Groups) {
		return
	}
	groups := append([]placement.Group(nil), spec.Groups...)
	for i, tg := range nj.TaskGroups {
		if tg != nil {
			groups[i].Drivers = jobspec.TaskDrivers(tg)
		}
	}
	spec.Groups = groups
}
