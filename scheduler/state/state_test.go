package state

import (
	"fmt"
	"math/rand"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/scheduler/placement"
)

var t0 = time.Unix(1_700_000_000, 0).UTC()

func spec(id string, workers int) *placement.Job {
	return &placement.Job{ID: id, Priority: 50, MaxRuntime: time.Minute,
		Groups: []placement.Group{{Name: "w", Count: workers, CPU: 100, MemoryMB: 128}}}
}

// snapshotOf is s taken through a snapshot: marshalled, then read into a
// new state.
func snapshotOf(t *testing.T, s *State) *State {
	t.Helper()
	b, err := s.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	r := New()
	if err := r.Unmarshal(b); err != nil {
		t.Fatal(err)
	}
	return r
}

func decision(id string, workers int) *placement.Decision {
	d := &placement.Decision{Job: id}
	for i := 0; i < workers; i++ {
		d.Workers = append(d.Workers, placement.Worker{Group: "w", Index: i, Node: "n1"})
	}
	return d
}

func TestLifecycle(t *testing.T) {
	s := New()
	must := func(c *Command) *Job {
		t.Helper()
		r := s.Apply(c)
		if r.Err != "" {
			t.Fatalf("%s: %s", c.Op, r.Err)
		}
		return r.Job
	}
	must(&Command{Op: OpSubmit, At: t0, Job: spec("a", 2)})
	if r := s.Apply(&Command{Op: OpReserve, JobID: "a", Decision: decision("a", 1)}); !strings.Contains(r.Err, "not whole") {
		t.Errorf("a partial reservation was accepted: %+v", r)
	}
	if r := s.Apply(&Command{Op: OpStart, JobID: "a"}); r.Err == "" {
		t.Error("a queued job started without a reservation")
	}
	must(&Command{Op: OpReserve, At: t0, JobID: "a", Decision: decision("a", 2)})
	must(&Command{Op: OpRequeue, JobID: "a", Reason: "nomad could not place"})
	if j := s.Jobs["a"]; j.Status != Queued || j.Decision != nil {
		t.Fatalf("requeue left %+v", j)
	}
	must(&Command{Op: OpReserve, At: t0, JobID: "a", Decision: decision("a", 2)})
	j := must(&Command{Op: OpStart, At: t0.Add(time.Second), JobID: "a"})
	if j.Status != Running || !j.Deadline().Equal(t0.Add(61*time.Second)) || j.Attempts != 2 {
		t.Errorf("running job = %+v", j)
	}
	if h := s.Holding(t0); len(h) != 1 || !h[0].Ends.Equal(j.Deadline()) {
		t.Errorf("holding = %+v", h)
	}
	must(&Command{Op: OpFinish, At: t0.Add(time.Minute), JobID: "a", Reason: "deadline"})
	must(&Command{Op: OpFinish, At: t0.Add(2 * time.Minute), JobID: "a"}) // idempotent
	if j := s.Jobs["a"]; j.Status != Finished || j.Reason != "deadline" || !j.EndedAt.Equal(t0.Add(time.Minute)) {
		t.Errorf("finished job = %+v", j)
	}
}

func TestSubmitIsIdempotent(t *testing.T) {
	s := New()
	s.Apply(&Command{Op: OpSubmit, At: t0, Job: spec("a", 1)})
	s.Apply(&Command{Op: OpSubmit, At: t0, Job: spec("b", 1)})
	r := s.Apply(&Command{Op: OpSubmit, At: t0.Add(time.Hour), Job: spec("a", 5)})
	if len(s.Jobs) != 2 || r.Job.Spec.Groups[0].Count != 1 || s.Jobs["b"].Spec.Seq != 1 {
		t.Errorf("resubmission changed state: %+v", s.Jobs)
	}
}

func TestSnapshotRoundTrip(t *testing.T) {
	s := New()
	s.Apply(&Command{Op: OpSubmit, At: t0, Job: spec("a", 2)})
	s.Apply(&Command{Op: OpReserve, At: t0, JobID: "a", Decision: decision("a", 2)})
	s.Apply(&Command{Op: OpSubmit, At: t0, Job: spec("b", 1)})
	r := snapshotOf(t, s)
	// The log of changed holdings is derived, and each copy names its own.
	s.heldGen, s.heldLog, r.heldGen, r.heldLog = 0, nil, 0, nil
	if !reflect.DeepEqual(s, r) {
		t.Errorf("restored state differs:\n%+v\n%+v", s, r)
	}
}

func TestAdmitSubmitsAndReserves(t *testing.T) {
	s := New()
	r := s.Apply(&Command{Op: OpAdmit, At: t0, Job: spec("a", 2), Decision: decision("a", 2)})
	if r.Err != "" || r.Job.Status != Reserved || r.Job.Decision == nil {
		t.Fatalf("admit = %+v", r)
	}
	if r := s.Apply(&Command{Op: OpAdmit, At: t0, Job: spec("b", 2), Decision: decision("b", 1)}); r.Err == "" {
		t.Error("admit with a partial decision was accepted")
	}
	if s.Jobs["b"].Status != Queued {
		t.Errorf("a refused reservation should leave the job queued, got %s", s.Jobs["b"].Status)
	}
}

func TestBarrierAndAdoption(t *testing.T) {
	s := New()
	if r := s.Apply(&Command{Op: OpAdopt, At: t0, Job: spec("direct", 2), Index: 7, Version: 2}); r.Err != "" || r.Job.Status != Reserved || !r.Job.Adopted || r.Job.NomadIndex != 7 || r.Job.NomadVersion != 2 {
		t.Fatalf("adopt: %+v", r)
	}
	if h := s.Holding(t0); len(h) != 0 {
		t.Errorf("an adopted gang holds a reservation: %+v", h)
	}
	s.Apply(&Command{Op: OpBoot, At: t0, JobID: "direct", Alloc: "a1", Instance: "i1"})
	s.Apply(&Command{Op: OpBoot, At: t0.Add(time.Second), JobID: "direct", Alloc: "a1", Instance: "i2"})
	if got := s.Jobs["direct"].Booted; len(got) != 1 || !got["a1"].At.Equal(t0) || got["a1"].Instance != "i1" {
		t.Errorf("a repeated boot report changed the record: %v", got)
	}
	// Requeued, the adopted gang is cohort's own and forgets its boots.
	s.Apply(&Command{Op: OpRequeue, At: t0, JobID: "direct", Reason: "gang timeout"})
	j := s.Jobs["direct"]
	if j.Status != Queued || j.Adopted || len(j.Booted) != 0 || j.NomadIndex != 0 {
		t.Errorf("after requeue: %+v", j)
	}
	if r := s.Apply(&Command{Op: OpBoot, At: t0, JobID: "direct", Alloc: "stale"}); r.Err == "" {
		t.Error("a queued gang accepted a boot report")
	}
	s.Apply(&Command{Op: OpReserve, At: t0, JobID: "direct", Decision: decision("direct", 2)})
	s.Apply(&Command{Op: OpBoot, At: t0, JobID: "direct", Alloc: "b1"})
	s.Apply(&Command{Op: OpStart, At: t0, JobID: "direct"})
	s.Apply(&Command{Op: OpBoot, At: t0, JobID: "direct", Alloc: "late"})
	if _, ok := s.Jobs["direct"].Booted["late"]; ok {
		t.Error("a worker booting after the gang started was recorded as part of it")
	}
}

// A clone does not change when the state goes on applying commands.
func TestCloneIsIndependent(t *testing.T) {
	s := New()
	s.Apply(&Command{Op: OpAdopt, At: t0, Job: spec("a", 2)})
	s.Apply(&Command{Op: OpBoot, At: t0, JobID: "a", Alloc: "x"})
	c := s.Clone()
	before, _ := c.Marshal()
	s.Apply(&Command{Op: OpBoot, At: t0, JobID: "a", Alloc: "y"})
	s.Apply(&Command{Op: OpStart, At: t0, JobID: "a"})
	s.Apply(&Command{Op: OpSubmit, At: t0, Job: spec("b", 1)})
	s.Apply(&Command{Op: OpMember, Member: &Member{ID: "s1"}})
	after, _ := c.Marshal()
	if string(before) != string(after) {
		t.Errorf("the clone changed:\nbefore %s\nafter  %s", before, after)
	}
}

// A job ID submitted again while its run goes on is a retry; once the run
// has ended it is a new run, and the ended one is kept for its bill.
func TestRerunAfterEnd(t *testing.T) {
	s := New()
	s.Apply(&Command{Op: OpSubmit, At: t0, Job: spec("a", 1)})
	if r := s.Apply(&Command{Op: OpSubmit, At: t0.Add(time.Second), Job: spec("a", 1)}); r.Job.Run != 1 || !r.Job.SubmittedAt.Equal(t0) {
		t.Fatalf("a retried submission made a new run: %+v", r.Job)
	}
	s.Apply(&Command{Op: OpReserve, At: t0, JobID: "a", Decision: decision("a", 1)})
	s.Apply(&Command{Op: OpStart, At: t0, JobID: "a"})
	s.Apply(&Command{Op: OpFinish, At: t0.Add(time.Minute), JobID: "a", Reason: "every worker exited"})
	r := s.Apply(&Command{Op: OpSubmit, At: t0.Add(2 * time.Minute), Job: spec("a", 1)})
	if r.Job.Run != 2 || r.Job.Status != Queued || len(r.Job.Previous) != 1 {
		t.Fatalf("rerun: %+v", r.Job)
	}
	if p := r.Job.Previous[0]; p.Run != 1 || p.Status != Finished || !p.EndedAt.Equal(t0.Add(time.Minute)) {
		t.Errorf("the ended run was not kept: %+v", p)
	}
	s.Apply(&Command{Op: OpFail, At: t0.Add(3 * time.Minute), JobID: "a", Reason: "gang timeout"})
	r = s.Apply(&Command{Op: OpAdopt, At: t0.Add(4 * time.Minute), Job: spec("a", 1)})
	if r.Job.Run != 3 || r.Job.Status != Reserved || len(r.Job.Previous) != 2 || r.Job.Previous[1].Status != Failed {
		t.Errorf("adopting an ended job's new run: %+v", r.Job)
	}
}

// A registration is recorded only for the attempt that made it: a late
// answer for an earlier attempt must not mark a later one registered.
func TestRegisteredGuardsAttempt(t *testing.T) {
	s := New()
	s.Apply(&Command{Op: OpAdmit, At: t0, Job: spec("a", 1), Decision: decision("a", 1)})
	if r := s.Apply(&Command{Op: OpRegistered, JobID: "a", Index: 10, Version: 0, Attempt: 1}); r.Err != "" || r.Job.NomadIndex != 10 {
		t.Fatalf("registered: %+v", r)
	}
	s.Apply(&Command{Op: OpRequeue, At: t0, JobID: "a", Reason: "timeout", RetryAt: t0.Add(time.Second)})
	if j := s.Jobs["a"]; j.NomadIndex != 0 || !j.RetryAt.Equal(t0.Add(time.Second)) {
		t.Errorf("requeue kept the registration or lost the back-off: %+v", j)
	}
	s.Apply(&Command{Op: OpReserve, At: t0, JobID: "a", Decision: decision("a", 1)})
	if r := s.Apply(&Command{Op: OpRegistered, JobID: "a", Index: 11, Attempt: 1}); r.Err == "" || s.Jobs["a"].NomadIndex != 0 {
		t.Errorf("a stale registration was recorded for attempt 2: %+v", s.Jobs["a"])
	}
	if !s.Jobs["a"].RetryAt.IsZero() {
		t.Error("reserve kept the back-off")
	}
}

// An ended run is cleaned once; a cleanup for another run does nothing.
func TestCleanedGuardsRun(t *testing.T) {
	s := New()
	s.Apply(&Command{Op: OpSubmit, At: t0, Job: spec("a", 1)})
	if r := s.Apply(&Command{Op: OpCleaned, JobID: "a", Run: 1}); r.Job.Cleaned {
		t.Error("a queued job was marked cleaned")
	}
	s.Apply(&Command{Op: OpFinish, At: t0, JobID: "a", Reason: "stopped", Ends: map[string]time.Time{"w[0]": t0}})
	s.Apply(&Command{Op: OpCleaned, JobID: "a", Run: 2})
	if s.Jobs["a"].Cleaned {
		t.Error("a cleanup of run 2 marked run 1")
	}
	s.Apply(&Command{Op: OpCleaned, JobID: "a", Run: 1})
	if j := s.Jobs["a"]; !j.Cleaned || !j.WorkerEnds["w[0]"].Equal(t0) {
		t.Errorf("after cleanup: %+v", j)
	}
}

// Jobs of the same ID in two namespaces are two jobs.
func TestNamespacesKeyJobs(t *testing.T) {
	s := New()
	a, b := spec("same", 1), spec("same", 2)
	b.Namespace = "team-b"
	s.Apply(&Command{Op: OpSubmit, At: t0, Job: a})
	s.Apply(&Command{Op: OpSubmit, At: t0, Job: b})
	if len(s.Jobs) != 2 || s.Jobs["same"].Spec.Size() != 1 || s.Jobs["team-b/same"].Spec.Size() != 2 {
		t.Errorf("jobs = %+v", s.Jobs)
	}
}

// Only the workers released with the gang stay booted: a late report from
// an allocation of another attempt, recorded while the gang was reserved,
// is dropped at the start, so it is never released.
func TestStartKeepsOnlyReleasedWorkers(t *testing.T) {
	s := New()
	s.Apply(&Command{Op: OpAdmit, At: t0, Job: spec("a", 1), Decision: decision("a", 1)})
	s.Apply(&Command{Op: OpBoot, At: t0, JobID: "a", Alloc: "current"})
	s.Apply(&Command{Op: OpBoot, At: t0, JobID: "a", Alloc: "stale"})
	if r := s.Apply(&Command{Op: OpStart, At: t0, JobID: "a", Run: 1, Attempt: 2, Allocs: []string{"current"}}); r.Err == "" {
		t.Error("a start for another attempt applied")
	}
	s.Apply(&Command{Op: OpStart, At: t0, JobID: "a", Run: 1, Attempt: 1, Allocs: []string{"current"}})
	if b := s.Jobs["a"].Booted; len(b) != 1 || b["stale"] != (Boot{}) {
		t.Errorf("booted after start: %v", b)
	}
}

// A refusal records a failed run in one entry, and never over a live one.
func TestRefuse(t *testing.T) {
	s := New()
	if r := s.Apply(&Command{Op: OpRefuse, At: t0, Job: spec("d", 1), Reason: "unheld"}); r.Err != "" || r.Job.Status != Failed || r.Job.Reason != "unheld" {
		t.Fatalf("refuse: %+v", r)
	}
	s.Apply(&Command{Op: OpSubmit, At: t0, Job: spec("d", 1)})
	if r := s.Apply(&Command{Op: OpRefuse, At: t0, Job: spec("d", 1), Reason: "again"}); r.Err == "" || s.Jobs["d"].Status != Queued {
		t.Errorf("a refusal replaced a live run: %+v", s.Jobs["d"])
	}
}

// TestHeldSinceFollowsHoldings applies random lifecycle commands to a few
// jobs and keeps, as the leader's inventory does, what each gang holds
// from the log of changed holdings alone (reading every holding only when
// the log says so): after every command it must equal what EachHeld
// lists, reservation for reservation.
func TestHeldSinceFollowsHoldings(t *testing.T) {
	r := rand.New(rand.NewSource(9))
	s := New()
	kept := map[string]*placement.Decision{}
	var cur HeldCursor
	at := t0
	ops := []Op{OpSubmit, OpAdmit, OpReserve, OpStart, OpFinish, OpRequeue, OpFail, OpCleaned, OpPrune}
	for step := 0; step < 3000; step++ {
		at = at.Add(time.Second)
		id := fmt.Sprint("j", r.Intn(5))
		c := &Command{Op: ops[r.Intn(len(ops))], At: at, JobID: id, Job: spec(id, 2), Decision: decision(id, 2), Reason: "test", Before: at}
		s.Apply(c)
		if r.Intn(200) == 0 {
			s = s.Clone() // a restore: a new log
		}
		var all bool
		touched := map[string]bool{}
		if cur, all = s.HeldSince(cur, func(key string) { touched[key] = true }); all {
			kept = map[string]*placement.Decision{}
			s.EachHeld(func(key string, _ *placement.Job, _ *placement.Decision) { touched[key] = true })
		}
		for key := range touched {
			delete(kept, key)
			if _, d, ok := s.Holds(key); ok {
				kept[key] = d
			}
		}
		want := map[string]*placement.Decision{}
		s.EachHeld(func(key string, _ *placement.Job, d *placement.Decision) { want[key] = d })
		if !reflect.DeepEqual(kept, want) {
			t.Fatalf("step %d (%s %s): kept %v, holding %v", step, c.Op, id, kept, want)
		}
	}
}

// TestSpecsFromBeforeDriversGetThem: a spec written without its groups'
// task drivers (by a server before them, in JSON or binary version 1, or
// in an older snapshot) takes them from its stored Nomad job, on every
// replica alike, so placement honours them for the gang's whole life; a
// spec that has them keeps its own.
func TestSpecsFromBeforeDriversGetThem(t *testing.T) {
	nomadJob := []byte(`{"ID":"old","TaskGroups":[{"Name":"w","Tasks":[{"Name":"cohort-barrier","Driver":"raw_exec"},{"Name":"worker","Driver":"raw_exec"}]}]}`)
	s := New()
	if r := s.Apply(&Command{Op: OpSubmit, At: t0, Job: spec("old", 1), Nomad: nomadJob}); r.Err != "" {
		t.Fatal(r.Err)
	}
	if got := s.Jobs["old"].Spec.Groups[0].Drivers; !reflect.DeepEqual(got, []string{"raw_exec"}) {
		t.Fatalf("a spec without drivers, after submission: %v", got)
	}
	withOwn := spec("new", 1)
	withOwn.Groups[0].Drivers = []string{"microvm"}
	if r := s.Apply(&Command{Op: OpSubmit, At: t0, Job: withOwn, Nomad: nomadJob}); r.Err != "" {
		t.Fatal(r.Err)
	}
	if got := s.Jobs["new"].Spec.Groups[0].Drivers; !reflect.DeepEqual(got, []string{"microvm"}) {
		t.Fatalf("a spec with its own drivers: %v", got)
	}

	// A snapshot of a server before drivers: its specs have none.
	s.Jobs["old"].Spec.Groups[0].Drivers = nil
	restored := snapshotOf(t, s)
	if got := restored.Jobs["old"].Spec.Groups[0].Drivers; !reflect.DeepEqual(got, []string{"raw_exec"}) {
		t.Fatalf("a spec without drivers, after a restore: %v", got)
	}
}
