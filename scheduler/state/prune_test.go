package state

import (
	"encoding/json"
	"fmt"
	"math/rand"
	"reflect"
	"sort"
	"testing"
	"time"
)

// runOnce submits, reserves, starts and finishes one run of id at t; cleaned
// marks its Nomad job deregistered.
func runOnce(t *testing.T, s *State, id string, at time.Time, cleaned bool) *Job {
	t.Helper()
	for _, c := range []*Command{
		{Op: OpSubmit, At: at, Job: spec(id, 1)},
		{Op: OpReserve, At: at, JobID: id, Decision: decision(id, 1)},
		{Op: OpStart, At: at, JobID: id},
		{Op: OpFinish, At: at.Add(time.Second), JobID: id},
	} {
		if r := s.Apply(c); r.Err != "" {
			t.Fatalf("%s %s: %s", c.Op, id, r.Err)
		}
	}
	j := s.Jobs[id]
	if cleaned {
		if r := s.Apply(&Command{Op: OpCleaned, JobID: id, Run: j.Run}); r.Err != "" {
			t.Fatal(r.Err)
		}
	}
	return j
}

func TestPruneForgetsWhatEndedBeforeTheCutoff(t *testing.T) {
	s := New()
	day := 24 * time.Hour
	runOnce(t, s, "old", t0, true)               // ended long ago, cleaned: forgotten
	runOnce(t, s, "unclean", t0, false)          // its Nomad job still there: kept
	runOnce(t, s, "recent", t0.Add(9*day), true) // ended after the cutoff: kept
	// A job with three runs: the two old ones go, the last stays.
	runOnce(t, s, "rerun", t0, true)
	runOnce(t, s, "rerun", t0.Add(time.Hour), true)
	runOnce(t, s, "rerun", t0.Add(9*day), true)
	s.Apply(&Command{Op: OpSubmit, At: t0.Add(9 * day), Job: spec("live", 1)})

	cutoff := t0.Add(7 * day)
	if n := s.Prunable(cutoff); n != 3 {
		t.Errorf("prunable = %d, want 3 (old, and two runs of rerun)", n)
	}
	if r := s.Apply(&Command{Op: OpPrune, At: t0.Add(14 * day)}); r.Err == "" {
		t.Error("a prune without a cutoff was applied")
	}
	if r := s.Apply(&Command{Op: OpPrune, At: t0.Add(14 * day), Before: cutoff}); r.Err != "" {
		t.Fatal(r.Err)
	}
	var keys []string
	for k := range s.Jobs {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	if want := []string{"live", "recent", "rerun", "unclean"}; !reflect.DeepEqual(keys, want) {
		t.Errorf("jobs kept = %v, want %v", keys, want)
	}
	rr := s.Jobs["rerun"]
	if rr.Run != 3 || len(rr.Previous) != 0 {
		t.Errorf("rerun at run %d keeps %d past runs, want run 3 and none", rr.Run, len(rr.Previous))
	}
	if _, ok := rr.RunOf(1); ok {
		t.Error("a pruned run is still found")
	}
	if j, ok := rr.RunOf(3); !ok || j.Run != 3 {
		t.Errorf("the current run is not found: %v %+v", ok, j)
	}
	if n := s.Prunable(cutoff); n != 0 {
		t.Errorf("%d still prunable after the prune", n)
	}
	if got := s.Unclean(); len(got) != 1 || got[0].Key() != "unclean" {
		t.Errorf("unclean = %v", got)
	}
	// An ID forgotten whole goes on counting its runs: a run's number
	// is in its barrier token, which must not open the forgotten run's.
	if got := s.NextRun("old"); got != 2 {
		t.Errorf("the next run of a forgotten ID is %d, want 2", got)
	}
	c := s.Clone()
	if r := s.Apply(&Command{Op: OpSubmit, At: t0.Add(14 * day), Job: spec("old", 1)}); r.Job.Run != 2 || len(r.Job.Previous) != 0 {
		t.Errorf("resubmitted after its prune: run %d, %d past", r.Job.Run, len(r.Job.Previous))
	}
	if _, ok := s.Forgotten["old"]; ok {
		t.Error("a forgotten ID that runs again is still listed as forgotten")
	}
	if c.Forgotten["old"] != 1 {
		t.Error("a copy of the state shares its forgotten IDs")
	}
}

// TestRerunKeepsNoNomadJobPerPastRun: past runs keep what their bills
// need, not a copy of the Nomad job each.
func TestRerunKeepsNoNomadJobPerPastRun(t *testing.T) {
	s := New()
	runOnce(t, s, "j", t0, true)
	s.Apply(&Command{Op: OpSubmit, At: t0.Add(time.Hour), Job: spec("j", 1), Nomad: json.RawMessage(`{"ID":"j"}`)})
	j := s.Jobs["j"]
	if len(j.Previous) != 1 || j.Previous[0].Nomad != nil || j.Previous[0].Run != 1 {
		t.Fatalf("past runs = %+v", j.Previous)
	}
}

// TestLiveIndexMatchesScan applies random commands and checks after each
// that the index answers as a scan of every job does, also on copies and
// on a decoded snapshot.
func TestLiveIndexMatchesScan(t *testing.T) {
	r := rand.New(rand.NewSource(4))
	s := New()
	ops := []Op{OpSubmit, OpReserve, OpStart, OpFinish, OpFail, OpRequeue, OpCleaned, OpAdmit, OpRefuse, OpPrune}
	for step := 0; step < 5000; step++ {
		id := fmt.Sprintf("j%d", r.Intn(40))
		at := t0.Add(time.Duration(step) * time.Minute)
		c := &Command{Op: ops[r.Intn(len(ops))], At: at, JobID: id}
		switch c.Op {
		case OpSubmit, OpAdmit, OpRefuse:
			c.Job = spec(id, 1)
			c.Decision = decision(id, 1)
		case OpReserve:
			c.Decision = decision(id, 1)
		case OpCleaned:
			if j, ok := s.Jobs[id]; ok {
				c.Run = j.Run
			}
		case OpPrune:
			c.Before = at.Add(-time.Duration(r.Intn(600)) * time.Minute)
		}
		if r.Intn(10) == 0 {
			c = &Command{Op: OpBatch, Commands: []*Command{c, {Op: OpFinish, At: at, JobID: id}}}
		}
		s.Apply(c)
		checkLive(t, step, s)
	}
	checkLive(t, -1, s.Clone())
	checkLive(t, -2, snapshotOf(t, s))
}

func checkLive(t *testing.T, step int, s *State) {
	t.Helper()
	keys := func(js []*Job) []string {
		var out []string
		for _, j := range js {
			out = append(out, j.Key())
		}
		sort.Strings(out)
		return out
	}
	for _, st := range []Status{Queued, Reserved, Running, Finished, Failed} {
		got := keys(s.ByStatus(st))
		want := keys(s.scan(func(j *Job) bool { return j.Status == st }))
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("step %d: %s: index %v, scan %v", step, st, got, want)
		}
	}
	got := keys(s.Unclean())
	want := keys(s.scan(func(j *Job) bool { return j.Ended() && !j.Cleaned }))
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("step %d: unclean: index %v, scan %v", step, got, want)
	}
}

// BenchmarkLeaderReads is what a leader pass reads from the state (queued,
// reserved and running jobs, ended runs not cleaned up, what gangs hold)
// with 100,000 finished jobs kept and 100 live ones: through the index,
// and by scanning every job as the pass did before.
func BenchmarkLeaderReads(b *testing.B) {
	s := New()
	for i := 0; i < 100_000; i++ {
		id := fmt.Sprintf("done%06d", i)
		s.Apply(&Command{Op: OpAdmit, At: t0, Job: spec(id, 1), Decision: decision(id, 1)})
		s.Apply(&Command{Op: OpStart, At: t0, JobID: id})
		s.Apply(&Command{Op: OpFinish, At: t0, JobID: id})
		s.Apply(&Command{Op: OpCleaned, JobID: id, Run: 1})
	}
	for i := 0; i < 100; i++ {
		id := fmt.Sprintf("live%03d", i)
		s.Apply(&Command{Op: OpAdmit, At: t0, Job: spec(id, 1), Decision: decision(id, 1)})
		if i%2 == 0 {
			s.Apply(&Command{Op: OpStart, At: t0, JobID: id})
		}
	}
	b.Run("indexed", func(b *testing.B) {
		for b.Loop() {
			s.ByStatus(Queued)
			s.ByStatus(Reserved)
			s.ByStatus(Running)
			s.Unclean()
			s.Holding(t0)
		}
	})
	b.Run("scan", func(b *testing.B) {
		for b.Loop() {
			for _, st := range []Status{Queued, Reserved, Running, Reserved, Running} {
				s.scan(func(j *Job) bool { return j.Status == st })
			}
			s.scan(func(j *Job) bool { return j.Ended() && !j.Cleaned })
		}
	})
}
