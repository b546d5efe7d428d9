package server

import (
	"errors"
	"net"
	"net/http/httptest"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/jobspec"
	"github.com/cohort-dev/cohort/scheduler/billing"
	"github.com/cohort-dev/cohort/scheduler/nomad"
	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/cohort-dev/cohort/scheduler/state"
	nomadapi "github.com/hashicorp/nomad/api"
)

// A gang that fits is placed, reserved and registered in its admission;
// its workers wait at the barrier until the last one boots; then all are
// released at once, and the gang runs from that moment.
func TestBarrierReleasesWholeGang(t *testing.T) {
	h := newHarness(t)
	j := h.submit(gang("sort", jobspec.DriverMicroVM, 3))
	if j.Status != state.Reserved || j.NomadIndex == 0 {
		t.Fatalf("admitted gang: %+v", j)
	}
	allocs := h.nomad.live("sort")
	if len(allocs) != 3 {
		t.Fatalf("%d allocations, want 3", len(allocs))
	}
	// The first worker's node leases a worker subnet; the workers give
	// their addresses, but for one (a barrier task knows none) and one
	// outside the worker range, which is not passed on.
	l, err := h.srv.Lease(api.LeaseRequest{Node: "n0", Address: "192.168.1.10"})
	if err != nil {
		t.Fatal(err)
	}
	base := strings.TrimSuffix(l.Subnet, "0/24")
	addrs := []string{base + "7", "", "192.168.99.9"}
	for i, a := range allocs[:2] {
		v, _ := h.srv.Boot("", "sort", api.BarrierRequest{Alloc: a.ID, Instance: "i-" + a.ID[:8], Address: addrs[i]})
		h.pass()
		if v.Status != api.BarrierWait || h.job("sort").Status != state.Reserved {
			t.Fatalf("after %d of 3 boots: verdict %+v, job %s", i+1, v, h.job("sort").Status)
		}
	}
	h.srv.Boot("", "sort", api.BarrierRequest{Alloc: allocs[2].ID, Instance: "i-" + allocs[2].ID[:8], Address: addrs[2]})
	h.advance(15 * time.Millisecond)
	h.pass()
	j = h.job("sort")
	if j.Status != state.Running || !j.StartedAt.Equal(t0.Add(15*time.Millisecond)) {
		t.Fatalf("after the last boot: %+v", j)
	}
	_, rank, _ := nomad.ParseWorkerName(strings.TrimPrefix(allocs[0].Name, "sort."))
	want := []api.BarrierPeer{{Group: "a", Rank: rank, Address: addrs[0]}}
	for _, a := range allocs {
		if v := h.verdict("sort", a.ID); v.Status != api.BarrierRelease || !reflect.DeepEqual(v.Peers, want) {
			t.Errorf("worker %s: %+v, want peers %+v", a.ID, v, want)
		}
	}
	if _, err := ParseBarrier(api.BarrierRequest{Alloc: allocs[0].ID, Address: "10.213.0.7; rm"}); err == nil {
		t.Error("a report with a malformed address was accepted")
	}
}

// Regression: a raw_exec gang whose workers exit at once ran again and
// again, because cohort waited to see all its workers running at one
// moment. Now its barrier task holds every worker until the gang is
// whole, the gang runs from the release, its fast exits end it, and it is
// registered once and billed.
func TestFastExitGangRunsOnce(t *testing.T) {
	h := newHarness(t)
	j := h.submit(gang("fast", jobspec.DriverRawExec, 4))
	reg := h.nomad.latest("fast")
	for _, tg := range reg.TaskGroups {
		if len(tg.Tasks) != 2 || tg.Tasks[0].Name != jobspec.BarrierTaskName || tg.Tasks[0].Lifecycle.Hook != "prestart" {
			t.Fatalf("group %s has no barrier task: %+v", *tg.Name, tg.Tasks)
		}
	}
	h.bootAll(j.Key())
	h.advance(10 * time.Millisecond)
	h.pass()
	if h.job("fast").Status != state.Running {
		t.Fatalf("not running after every barrier task reported: %+v", h.job("fast"))
	}
	// Released, every worker exits at once.
	end := t0.Add(12 * time.Millisecond)
	for _, a := range h.nomad.live("fast") {
		h.nomad.set(a, "complete", 0, end)
	}
	h.advance(50 * time.Millisecond)
	h.pass()
	j = h.job("fast")
	if j.Status != state.Finished || j.Reason != api.ReasonExited || !j.EndedAt.Equal(end) {
		t.Fatalf("after the fast exits: %+v", j)
	}
	// Long past its gang timeout nothing runs it again.
	for i := 0; i < 5; i++ {
		h.advance(time.Minute)
		h.pass()
	}
	if n := h.nomad.count("register fast"); n != 1 {
		t.Errorf("registered %d times, want once", n)
	}
	b := billing.For(&j, billing.DefaultPrices, t0.Add(time.Hour))
	if len(b.Lines) != 4 || b.Total <= 0 || b.Lines[0].EndMs-b.Lines[0].StartMs != 2 {
		t.Errorf("bill: %+v", b)
	}
	if !j.Cleaned || !deref(h.nomad.latest("fast").Stop) {
		t.Errorf("the ended run's nomad job is still registered (cleaned %v)", j.Cleaned)
	}
}

// A gang whose last worker cannot be placed by Nomad never releases any:
// the placed workers wait, and at the gang timeout the gang is requeued
// (its Nomad job stopped); after MaxAttempts it fails with the reason.
func TestGangTimeoutRequeuesThenFails(t *testing.T) {
	h := newHarness(t)
	key := h.submit(gang("partial", jobspec.DriverRawExec, 3)).Key()
	for attempt := 1; attempt <= MaxAttempts; attempt++ {
		live := h.nomad.live(key)
		if len(live) != 3 {
			t.Fatalf("attempt %d: %d allocations", attempt, len(live))
		}
		// Two of three report; the third never gets placed.
		for _, a := range live[:2] {
			h.srv.Boot("", "partial", api.BarrierRequest{Alloc: a.ID, Instance: "x"})
		}
		h.pass()
		if v := h.srv.verdict(key, api.BarrierRequest{Alloc: live[0].ID, Instance: "x"}); v.Status != api.BarrierWait {
			t.Fatalf("attempt %d: a worker was told %+v before its gang was whole", attempt, v)
		}
		h.advance(11 * time.Second)
		h.pass()
		j := h.job(key)
		if v := h.srv.verdict(key, api.BarrierRequest{Alloc: live[0].ID, Instance: "x"}); v.Status != api.BarrierAbort {
			t.Errorf("attempt %d: a waiting worker was told %+v after the gang timeout", attempt, v)
		}
		if attempt < MaxAttempts {
			if j.Status != state.Queued || !strings.Contains(j.Reason, "only 2 of 3 workers booted") {
				t.Fatalf("attempt %d: %+v", attempt, j)
			}
			if !deref(h.nomad.latest(key).Stop) {
				t.Fatalf("attempt %d: the nomad job was not stopped", attempt)
			}
			h.pass() // placed again
			continue
		}
		if j.Status != state.Failed || !strings.Contains(j.Reason, "did not start in 3 attempts") {
			t.Fatalf("after %d attempts: %+v", attempt, j)
		}
	}
	if n := h.nomad.count("register " + key); n != MaxAttempts {
		t.Errorf("registered %d times, want %d", n, MaxAttempts)
	}
}

// A gang is stopped at its deadline, and billed until then.
func TestDeadlineStopsGang(t *testing.T) {
	h := newHarness(t)
	key := h.started(gang("bounded", jobspec.DriverMicroVM, 2))
	h.advance(59 * time.Second)
	h.pass()
	if h.job(key).Status != state.Running {
		t.Fatal("stopped before its deadline")
	}
	h.advance(time.Second + 5*time.Millisecond)
	h.pass()
	j := h.job(key)
	if j.Status != state.Finished || !strings.Contains(j.Reason, "max_runtime reached (stopped 5 ms after") {
		t.Fatalf("at the deadline: %+v", j)
	}
	if !deref(h.nomad.latest(key).Stop) || !j.Cleaned {
		t.Error("the nomad job was not stopped at the deadline")
	}
}

// Regression: a gang that lost a worker after release ran on, and was
// billed, until max_runtime. Now the others are stopped at once; the lost
// worker is billed to its own end, the others to the stop.
func TestLostWorkerStopsGang(t *testing.T) {
	h := newHarness(t)
	key := h.started(gang("lossy", jobspec.DriverMicroVM, 3))
	live := h.nomad.live(key)
	h.advance(time.Second)
	h.nomad.set(live[1], "failed", 3, t0.Add(500*time.Millisecond))
	h.pass()
	j := h.job(key)
	if j.Status != state.Failed || !strings.Contains(j.Reason, "worker a[1] (exit 3) failed while the gang ran") {
		t.Fatalf("after a worker failed: %+v", j)
	}
	if !deref(h.nomad.latest(key).Stop) {
		t.Fatal("the other workers were not stopped")
	}
	b := billing.For(&j, billing.DefaultPrices, t0.Add(time.Hour))
	for _, l := range b.Lines {
		want := j.EndedAt.UnixMilli()
		if l.Index == 1 {
			want = t0.Add(500 * time.Millisecond).UnixMilli()
		}
		if l.EndMs != want {
			t.Errorf("worker a[%d] billed to %d, want %d", l.Index, l.EndMs, want)
		}
	}
}

// Regression: `nomad job stop` of a gang was ignored; cohort kept it
// running and billed, or requeued a reserved one and registered it again.
func TestStopThroughNomad(t *testing.T) {
	for _, stage := range []string{"reserved", "running"} {
		t.Run(stage, func(t *testing.T) {
			h := newHarness(t)
			var key string
			if stage == "running" {
				key = h.started(gang("g", jobspec.DriverMicroVM, 2))
			} else {
				key = h.submit(gang("g", jobspec.DriverMicroVM, 2)).Key()
			}
			h.nomad.Stop("", "g") // the user, through Nomad
			h.advance(time.Second)
			h.pass()
			j := h.job(key)
			if j.Status != state.Finished || !strings.Contains(j.Reason, "stopped through Nomad") {
				t.Fatalf("after nomad job stop: %+v", j)
			}
			h.advance(time.Minute)
			h.pass()
			if n := h.nomad.count("register g"); n != 1 {
				t.Errorf("registered %d times after the user stopped it", n)
			}
		})
	}
}

// A user's stop ends a gang at every stage, and leaves no Nomad job
// running: queued, reserved while its registration is in flight, booting,
// running.
func TestStopAtEveryStage(t *testing.T) {
	t.Run("queued", func(t *testing.T) {
		h := newHarness(t, node("n1", 1000, 1024))
		h.started(gang("big", jobspec.DriverMicroVM, 2))
		key := h.submit(gang("waiting", jobspec.DriverMicroVM, 2)).Key()
		if h.job(key).Status != state.Queued {
			t.Fatal("not queued")
		}
		if _, err := h.srv.Stop(key); err != nil {
			t.Fatal(err)
		}
		h.srv.Stop("big")
		h.pass()
		if j := h.job(key); j.Status != state.Finished || j.Reason != "stopped by request" {
			t.Fatalf("%+v", j)
		}
		if h.nomad.count("register waiting") != 0 {
			t.Error("a gang stopped in the queue was registered")
		}
	})
	t.Run("registering", func(t *testing.T) {
		// Regression: Stop did not serialise with registration; a stop
		// landing while a registration was in flight left the Nomad job
		// registered for a finished gang.
		h := newHarness(t)
		gate := make(chan struct{})
		h.nomad.set2(func() { h.nomad.registerGate = gate })
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			h.srv.Submit(gang("racy", jobspec.DriverMicroVM, 2))
		}()
		for h.nomad.count("register") == 0 && len(h.srv.jobKeys()) == 0 {
			time.Sleep(time.Millisecond)
		}
		stopped := make(chan error, 1)
		go func() { _, err := h.srv.Stop("racy"); stopped <- err }()
		time.Sleep(20 * time.Millisecond)
		close(gate)
		wg.Wait()
		if err := <-stopped; err != nil {
			t.Fatal(err)
		}
		h.pass()
		if j := h.job("racy"); j.Status != state.Finished {
			t.Fatalf("%+v", j)
		}
		if latest := h.nomad.latest("racy"); latest != nil && !deref(latest.Stop) {
			t.Error("the nomad job of the stopped gang is still registered")
		}
	})
	t.Run("booting", func(t *testing.T) {
		h := newHarness(t)
		key := h.submit(gang("booting", jobspec.DriverMicroVM, 2)).Key()
		live := h.nomad.live(key)
		h.srv.Boot("", "booting", api.BarrierRequest{Alloc: live[0].ID, Instance: "x"})
		h.srv.Stop(key)
		if v := h.srv.verdict(key, api.BarrierRequest{Alloc: live[0].ID, Instance: "x"}); v.Status != api.BarrierAbort {
			t.Errorf("a waiting worker of a stopped gang was told %+v", v)
		}
		if !deref(h.nomad.latest(key).Stop) {
			t.Error("nomad job not stopped")
		}
	})
	t.Run("running", func(t *testing.T) {
		h := newHarness(t)
		key := h.started(gang("running", jobspec.DriverMicroVM, 2))
		h.advance(3 * time.Second)
		j, err := h.srv.Stop(key)
		if err != nil || j.Status != state.Finished || !j.Cleaned || !deref(h.nomad.latest(key).Stop) {
			t.Fatalf("stop: %v %+v", err, j)
		}
		if b := billing.For(&j, billing.DefaultPrices, t0.Add(time.Hour)); b.Lines[0].EndMs-b.Lines[0].StartMs != 3000 {
			t.Errorf("billed %d ms, want 3000", b.Lines[0].EndMs-b.Lines[0].StartMs)
		}
	})
}

// Regression: a job Nomad refused was requeued without counting an
// attempt, with its queue time reset, for ever: two Raft writes and a
// Nomad call every 20 ms. Now each refusal is an attempt, retried with a
// growing back-off, and the gang fails with Nomad's reason.
func TestRegistrationRefusedCountsAttempts(t *testing.T) {
	h := newHarness(t)
	h.nomad.set2(func() { h.nomad.refuse = "constraint on an unknown attribute" })
	key := h.submit(gang("refused", jobspec.DriverMicroVM, 1)).Key()
	j := h.job(key)
	if j.Status != state.Queued || j.Attempts != 1 || !strings.Contains(j.Reason, "nomad refused its registration (attempt 1 of 3; retrying in 1s)") {
		t.Fatalf("after the first refusal: %+v", j)
	}
	for i := 0; i < 20; i++ { // 400 ms of passes inside the back-off
		h.advance(20 * time.Millisecond)
		h.pass()
	}
	if n := h.nomad.count("register"); n != 1 {
		t.Fatalf("%d registrations within the back-off", n)
	}
	h.advance(time.Second)
	h.pass()
	if j := h.job(key); j.Attempts != 2 || !strings.Contains(j.Reason, "retrying in 2s") {
		t.Fatalf("after the second refusal: %+v", j)
	}
	h.advance(2 * time.Second)
	h.pass()
	j = h.job(key)
	if j.Status != state.Failed || !strings.Contains(j.Reason, "nomad refused its registration 3 times; the last time:") ||
		!strings.Contains(j.Reason, "constraint on an unknown attribute") {
		t.Fatalf("after three refusals: %+v", j)
	}
	if n := h.nomad.count("register"); n != 3 {
		t.Errorf("%d registrations, want 3", n)
	}
}

// Nomad out of reach is not a refusal: the reserved gang is registered
// once Nomad answers again, within its gang timeout, as attempt 1.
func TestRegistrationRetriedWhileNomadDown(t *testing.T) {
	h := newHarness(t)
	h.nomad.set2(func() { h.nomad.registerDown = true })
	key := h.submit(gang("patient", jobspec.DriverMicroVM, 1)).Key()
	for i := 0; i < 3; i++ {
		h.advance(time.Second)
		h.pass()
	}
	if j := h.job(key); j.Status != state.Reserved || j.NomadIndex != 0 || j.Attempts != 1 {
		t.Fatalf("while nomad is down: %+v", j)
	}
	h.nomad.set2(func() { h.nomad.registerDown = false })
	h.advance(time.Second)
	h.pass()
	if j := h.job(key); j.Status != state.Reserved || j.NomadIndex == 0 || j.Attempts != 1 {
		t.Fatalf("once nomad is back: %+v", j)
	}
}

// Regression: a restarted task reported an allocation already booted and
// was released alone in the middle of its gang. Now another instance of a
// booted allocation is aborted, whatever the gang's stage.
func TestRestartedWorkerAborted(t *testing.T) {
	h := newHarness(t)
	key := h.submit(gang("restart", jobspec.DriverMicroVM, 2)).Key()
	live := h.nomad.live(key)
	h.srv.Boot("", "restart", api.BarrierRequest{Alloc: live[0].ID, Instance: "first"})
	v, _ := h.srv.Boot("", "restart", api.BarrierRequest{Alloc: live[0].ID, Instance: "first"})
	if v.Status != api.BarrierWait {
		t.Fatalf("a repeated report was told %+v", v)
	}
	v, _ = h.srv.Boot("", "restart", api.BarrierRequest{Alloc: live[0].ID, Instance: "second"})
	if v.Status != api.BarrierAbort || !strings.Contains(v.Reason, "was restarted") {
		t.Fatalf("a restarted worker was told %+v", v)
	}
	h.srv.Boot("", "restart", api.BarrierRequest{Alloc: live[1].ID, Instance: "other"})
	h.pass()
	if v := h.srv.verdict(key, api.BarrierRequest{Alloc: live[0].ID, Instance: "second"}); v.Status != api.BarrierAbort {
		t.Errorf("after release, the restarted instance was told %+v", v)
	}
	if v := h.srv.verdict(key, api.BarrierRequest{Alloc: live[0].ID, Instance: "first"}); v.Status != api.BarrierRelease {
		t.Errorf("the first instance was told %+v", v)
	}
}

// Regression: a hand-written Nomad job with only the gang meta kept
// Nomad's batch defaults (3 restarts, 1 reschedule) and gave its workers
// empty COHORT_RANK, COHORT_SIZE and COHORT_ADDRESS. Admission now
// normalizes it and says what it changed.
func TestHandWrittenJobNormalized(t *testing.T) {
	h := newHarness(t)
	job := &nomadapi.Job{
		ID: ptrTo("hand"), Datacenters: []string{"dc1"},
		Meta: map[string]string{jobspec.MetaGang: "1", jobspec.MetaMaxRuntime: "1m"},
		TaskGroups: []*nomadapi.TaskGroup{{
			Name: ptrTo("w"), Count: ptrTo(3),
			RestartPolicy: &nomadapi.RestartPolicy{Attempts: ptrTo(3)},
			Tasks: []*nomadapi.Task{{Name: "main", Driver: jobspec.DriverMicroVM,
				Config:    map[string]any{"program": "/bin/worker"},
				Resources: &nomadapi.Resources{CPU: ptrTo(100), MemoryMB: ptrTo(128)}}},
		}},
	}
	sub, err := h.srv.Submit(job)
	if err != nil {
		t.Fatal(err)
	}
	if len(sub.Notes) < 3 {
		t.Errorf("notes: %q", sub.Notes)
	}
	reg := h.nomad.latest("hand")
	tg := reg.TaskGroups[0]
	if deref(reg.Type) != "batch" || deref(tg.RestartPolicy.Attempts) != 0 || deref(tg.ReschedulePolicy.Attempts) != 0 || deref(tg.ReschedulePolicy.Unlimited) {
		t.Errorf("registered job keeps per-worker restarts: type %s restart %+v reschedule %+v", deref(reg.Type), tg.RestartPolicy, tg.ReschedulePolicy)
	}
	env := tg.Tasks[0].Env
	if env["COHORT_RANK"] != "${NOMAD_ALLOC_INDEX}" || env["COHORT_SIZE"] != "3" || env["COHORT_ADDRESS"] != "hand-w" || env["COHORT_JOB"] != "hand" {
		t.Errorf("env: %v", env)
	}
	if s := tg.Tasks[0].Services; len(s) != 1 || s[0].Name != "hand-w" || s[0].Tags[0] != "w${NOMAD_ALLOC_INDEX}" || s[0].AddressMode != "driver" {
		t.Errorf("services: %+v", s)
	}
	// Submitting the normalized job again changes nothing more.
	if _, notes, _ := jobspec.Normalize(reg, must(h.srv.barrierTaskFor("default/hand"))); len(notes) != 0 {
		t.Errorf("normalizing the registered job again: %q", notes)
	}
}

// Jobs that cannot be gangs are refused with what to change, and leave
// nothing in the state.
func TestAdmissionRefusals(t *testing.T) {
	h := newHarness(t)
	service := gang("svc", jobspec.DriverMicroVM, 1)
	service.Type = ptrTo("service")
	twoTasks := gang("two", jobspec.DriverMicroVM, 1)
	twoTasks.TaskGroups[0].Tasks = append(twoTasks.TaskGroups[0].Tasks, &nomadapi.Task{Name: "sidecar", Driver: "raw_exec"})
	badID := gang("x", jobspec.DriverMicroVM, 1)
	badID.ID = ptrTo("has/slash")
	huge := gang("huge", jobspec.DriverMicroVM, 1)
	huge.TaskGroups[0].Tasks[0].Resources.MemoryMB = ptrTo(1 << 30)
	for _, c := range []struct {
		job  *nomadapi.Job
		want string
	}{
		{service, `set type = "batch"`},
		{twoTasks, "put each in a group of its own"},
		{badID, "contains a space or a slash"},
		{huge, "cannot fit even on the empty cluster"},
	} {
		_, err := h.srv.Submit(c.job)
		if !errors.Is(err, ErrRejected) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want a rejection saying %q", deref(c.job.ID), err, c.want)
		}
	}
	if keys := h.srv.jobKeys(); len(keys) != 0 {
		t.Errorf("rejected jobs left %v in the state", keys)
	}
	// A raw_exec gang on a server without a barrier task is refused.
	h.srv.barrierTask = nil
	if _, err := h.srv.Submit(gang("raw", jobspec.DriverRawExec, 1)); !errors.Is(err, ErrRejected) || !strings.Contains(err.Error(), "barrier task") {
		t.Errorf("raw_exec without a barrier task: %v", err)
	}
}

// Namespaces travel on every call and key the jobs: the same ID in two
// namespaces is two gangs.
func TestNamespacedGangs(t *testing.T) {
	h := newHarness(t)
	a := gang("same", jobspec.DriverMicroVM, 1)
	b := gang("same", jobspec.DriverMicroVM, 1)
	b.Namespace = ptrTo("team-b")
	h.submit(a)
	h.submit(b)
	if h.job("same").Spec.Namespace != "" || h.job("team-b/same").Spec.Namespace != "team-b" {
		t.Fatal("namespaces not kept")
	}
	if h.nomad.latest("team-b/same") == nil || h.nomad.latest("same") == nil {
		t.Fatal("not both registered in their namespaces")
	}
	h.runAll("team-b/same")
	h.bootAll("team-b/same")
	h.pass()
	if h.job("team-b/same").Status != state.Running || h.job("same").Status != state.Reserved {
		t.Fatalf("team-b/same %s, same %s", h.job("team-b/same").Status, h.job("same").Status)
	}
	h.srv.Stop("team-b/same")
	if !deref(h.nomad.latest("team-b/same").Stop) || deref(h.nomad.latest("same").Stop) {
		t.Error("stop reached the wrong namespace")
	}
}

// A worker that runs to completion is billed to its own end; the bill of
// a gang whose workers all exited ends with its last worker, not when the
// leader noticed.
func TestBillEndsAtAllocationFinish(t *testing.T) {
	h := newHarness(t)
	key := h.started(gang("ends", jobspec.DriverMicroVM, 2))
	live := h.nomad.live(key)
	h.nomad.set(live[0], "complete", 0, t0.Add(time.Second))
	h.advance(3 * time.Second)
	h.pass()
	h.nomad.set(live[1], "complete", 0, t0.Add(2*time.Second))
	h.advance(time.Second)
	h.pass()
	j := h.job(key)
	if j.Status != state.Finished || !j.EndedAt.Equal(t0.Add(2*time.Second)) {
		t.Fatalf("%+v", j)
	}
	b := billing.For(&j, billing.DefaultPrices, t0.Add(time.Hour))
	if b.Lines[0].EndMs != t0.Add(time.Second).UnixMilli() || b.Lines[1].EndMs != t0.Add(2*time.Second).UnixMilli() {
		t.Errorf("lines end at %d and %d", b.Lines[0].EndMs, b.Lines[1].EndMs)
	}
}

// Regression: job views iterated a job's boots outside the state's lock
// while boots were applied: a data race, and "concurrent map iteration and
// map write" without -race. Views and passes now read copies.
func TestJobViewsRaceWithBoots(t *testing.T) {
	h := newHarness(t, node("big", 40*500, 40*512))
	key := h.submit(gang("racing", jobspec.DriverMicroVM, 40)).Key()
	handler := h.srv.Handler()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < 2; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				rec := httptest.NewRecorder()
				handler.ServeHTTP(rec, httptest.NewRequest("GET", "/v1/job/racing?workers=1", nil))
				h.srv.Pass()
			}
		}()
	}
	for _, a := range h.nomad.live(key) {
		h.srv.Boot("", "racing", api.BarrierRequest{Alloc: a.ID, Instance: "i"})
	}
	close(stop)
	wg.Wait()
	h.pass()
	if h.job(key).Status != state.Running {
		t.Errorf("after 40 boots: %s", h.job(key).Status)
	}
}

// The per-node counts of a reservation reach Nomad exactly.
func TestRegisteredPinnedToReservation(t *testing.T) {
	h := newHarness(t, node("n1", 2000, 4096), node("n2", 500, 4096))
	h.submit(gang("spread", jobspec.DriverMicroVM, 4)) // 500 MHz each: 3 on n1, 1 on n2
	reg := h.nomad.latest("spread")
	if len(reg.TaskGroups) != 4 {
		t.Fatalf("an uneven reservation was registered as %d groups, want one per worker", len(reg.TaskGroups))
	}
	ranks := map[string]bool{}
	for _, tg := range reg.TaskGroups {
		ranks[tg.Tasks[0].Env["COHORT_RANK"]] = true
		if deref(tg.Count) != 1 || tg.Constraints[len(tg.Constraints)-1].Operand != "=" {
			t.Errorf("group %s: count %d constraints %+v", *tg.Name, deref(tg.Count), tg.Constraints)
		}
	}
	if len(ranks) != 4 || !ranks["0"] || !ranks["3"] {
		t.Errorf("ranks %v", ranks)
	}
	// The workers, named by their groups, are the gang's.
	key := "spread"
	h.runAll(key)
	h.bootAll(key)
	h.pass()
	j := h.job(key)
	if j.Status != state.Running {
		t.Fatalf("%+v", j)
	}
	a, _ := h.nomad.Allocs("", "spread", j.NomadVersion)
	views := workerViews(&j, a)
	for _, v := range views {
		if v.State != "running" || v.Alloc == "" {
			t.Errorf("worker view %+v", v)
		}
	}
}

// gpuGang is gang with every worker asking for one NVIDIA GPU.
func gpuGang(id string, count int) *nomadapi.Job {
	spec := &jobspec.Job{Name: id, Priority: 50, Datacenters: []string{"*"}, NodePool: "default",
		MaxRuntime: time.Minute, GangTimeout: 10 * time.Second,
		Groups: []*jobspec.Group{{Name: "a", Count: count, Address: id + "-a", Driver: jobspec.DriverMicroVM,
			Resources: jobspec.Resources{CPU: 500, MemoryMB: 512, Devices: []jobspec.Device{{Name: "nvidia/gpu", Count: 1}}},
			Program:   jobspec.Program{Path: "/bin/true"}}}}
	return jobspec.ToNomad(spec)
}

// An adopted gang's decision carries the devices Nomad gave its workers.
// The decision stands for the gang's allocations in the inventory, so a
// GPU it left out looked free, and the next GPU gang was placed on it
// (Nomad would then leave that gang pending until its gang timeout).
func TestAdoptedGangHoldsItsDevices(t *testing.T) {
	t.Run("listed", func(t *testing.T) { testAdoptedGangHoldsItsDevices(t, false) })
	// The copy does not know the workers' resources yet: Nomad is asked.
	t.Run("asked", func(t *testing.T) { testAdoptedGangHoldsItsDevices(t, true) })
}

func testAdoptedGangHoldsItsDevices(t *testing.T, unlisted bool) {
	n1 := node("n1", 4000, 4096)
	n1.Devices = map[string]int{"nvidia/gpu/H100": 2}
	h := newHarness(t, n1)
	h.nomad.listWithoutResources = unlisted
	h.nomad.adopt(gpuGang("direct", 2))
	h.nomad.set2(func() {
		for i, a := range h.nomad.jobs["direct"].allocs {
			a.NodeID = "n1"
			a.AllocatedResources = &nomadapi.AllocatedResources{Tasks: map[string]*nomadapi.AllocatedTaskResources{
				"worker": {Devices: []*nomadapi.AllocatedDeviceResource{{Vendor: "nvidia", Type: "gpu", Name: "H100", DeviceIDs: []string{"GPU-" + strconv.Itoa(i)}}}}}}
		}
	})
	h.pass() // the watcher's list shows it
	h.runAll("direct")
	h.bootAll("direct")
	h.pass()
	j := h.job("direct")
	if j.Status != state.Running || !j.Adopted || j.Decision == nil || len(j.Decision.Workers) != 2 {
		t.Fatalf("%+v", j)
	}
	for _, w := range j.Decision.Workers {
		if w.Node != "n1" || w.Devices["nvidia/gpu/H100"] != 1 {
			t.Fatalf("adopted worker %+v: want node n1 holding one nvidia/gpu/H100", w)
		}
	}
	// Both GPUs are taken: a gang that wants one waits, though the CPU
	// and memory it asks for are free.
	h.submit(gpuGang("next", 1))
	h.pass()
	if j := h.job("next"); j.Status != state.Queued {
		t.Fatalf("a gang wanting a GPU while an adopted gang holds both: %s, want queued", j.Status)
	}
	// Once the adopted gang ends, its GPUs are free again.
	for _, a := range h.nomad.live("direct") {
		h.nomad.set(a, "complete", 0, h.clock())
	}
	h.pass()
	h.pass()
	if j := h.job("next"); j.Status != state.Reserved {
		t.Fatalf("after the adopted gang ended: %s, want reserved", j.Status)
	}
}

// Gangs registered with Nomad directly: a normalized microvm gang is
// adopted where Nomad put it; an unnormalized one is taken over and
// queued as cohort's own; one whose workers start unheld is stopped and
// recorded as failed.
func TestDirectRegistrations(t *testing.T) {
	t.Run("adopted", func(t *testing.T) {
		h := newHarness(t)
		h.nomad.adopt(gang("direct", jobspec.DriverMicroVM, 2))
		h.pass() // the watcher's list shows it
		j := h.job("direct")
		if j.Status != state.Reserved || !j.Adopted {
			t.Fatalf("%+v", j)
		}
		h.runAll("direct")
		h.bootAll("direct")
		h.pass()
		if j := h.job("direct"); j.Status != state.Running || j.Decision == nil || len(j.Decision.Workers) != 2 {
			t.Fatalf("%+v", j)
		}
	})
	t.Run("taken over", func(t *testing.T) {
		h := newHarness(t)
		job := gang("loose", jobspec.DriverMicroVM, 2)
		job.TaskGroups[0].RestartPolicy = &nomadapi.RestartPolicy{Attempts: ptrTo(3), Mode: ptrTo("fail")}
		h.nomad.adopt(job)
		first := h.nomad.live("loose")
		v, err := h.srv.Boot("", "loose", api.BarrierRequest{Alloc: first[0].ID, Instance: "x"})
		if err != nil || v.Status != api.BarrierAbort || !strings.Contains(v.Reason, "took the gang over") {
			t.Fatalf("boot of an unnormalized direct gang: %v %+v", err, v)
		}
		if j := h.job("loose"); j.Adopted || j.Status != state.Queued {
			t.Fatalf("taken over: %+v", j)
		}
		h.pass() // stops the direct registration, places and registers cohort's own
		j := h.job("loose")
		if j.Status != state.Reserved || j.NomadIndex == 0 {
			t.Fatalf("after the pass: %+v", j)
		}
		reg := h.nomad.latest("loose")
		if deref(reg.TaskGroups[0].RestartPolicy.Attempts) != 0 || reg.Meta[jobspec.MetaRun] != "1" {
			t.Error("cohort's registration keeps the restarts or lacks its run")
		}
		if first[0].DesiredStatus != "stop" {
			t.Error("the direct registration's workers were not stopped")
		}
	})
	// Regression (found in review): the watcher's path to a gang to take
	// over ran admission inside the pass, which holds schedMu: the leader
	// loop deadlocked.
	t.Run("taken over by the pass", func(t *testing.T) {
		h := newHarness(t)
		job := gang("watched", jobspec.DriverMicroVM, 2)
		job.TaskGroups[0].ReschedulePolicy = &nomadapi.ReschedulePolicy{Attempts: ptrTo(1)}
		h.nomad.adopt(job)
		done := make(chan struct{})
		go func() { h.srv.Pass(); h.srv.Pass(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("the leader loop deadlocked taking a gang over")
		}
		if j := h.job("watched"); j.Status != state.Reserved || j.Adopted {
			t.Fatalf("%+v", j)
		}
	})
	// A late registration of an ended run (a deposed leader's) is stopped,
	// never taken for a new gang.
	t.Run("late registration of an ended run", func(t *testing.T) {
		h := newHarness(t)
		key := h.started(gang("late", jobspec.DriverMicroVM, 1))
		stale := *h.nomad.latest(key)
		h.srv.Stop(key)
		h.nomad.adopt(&stale) // lands after the stop, as a live job
		h.pass()
		if j := h.job(key); j.Run != 1 || j.Status != state.Finished {
			t.Fatalf("the late registration made a run: %+v", j)
		}
		if !deref(h.nomad.latest(key).Stop) {
			t.Error("the late registration was not stopped")
		}
	})
	t.Run("fake barrier task", func(t *testing.T) {
		h := newHarness(t)
		job := gang("fake", jobspec.DriverRawExec, 1)
		job.TaskGroups[0].Tasks = append([]*nomadapi.Task{{Name: jobspec.BarrierTaskName, Driver: "raw_exec",
			Lifecycle: &nomadapi.TaskLifecycle{Hook: "prestart"}, Config: map[string]any{"command": "/bin/true"}}}, job.TaskGroups[0].Tasks...)
		h.nomad.adopt(job)
		h.pass()
		if j := h.job("fake"); j.Status != state.Failed || !strings.Contains(j.Reason, "start without waiting") {
			t.Fatalf("a fake barrier task was trusted: %+v", j)
		}
	})
	t.Run("unheld", func(t *testing.T) {
		h := newHarness(t)
		h.nomad.adopt(gang("raw", jobspec.DriverRawExec, 2)) // no barrier task
		h.pass()
		j := h.job("raw")
		if j.Status != state.Failed || !strings.Contains(j.Reason, "Submit it through cohort") {
			t.Fatalf("%+v", j)
		}
		if !deref(h.nomad.latest("raw").Stop) {
			t.Error("not stopped")
		}
		h.advance(time.Minute)
		h.pass()
		if h.nomad.count("register raw") != 0 {
			t.Error("cohort ran it again")
		}
	})
	t.Run("stale worker of an ended run", func(t *testing.T) {
		h := newHarness(t)
		key := h.started(gang("over", jobspec.DriverMicroVM, 1))
		old := h.nomad.live(key)[0]
		h.srv.Stop(key)
		v, _ := h.srv.Boot("", "over", api.BarrierRequest{Alloc: old.ID, Instance: "late"})
		if v.Status != api.BarrierAbort {
			t.Errorf("a late report of an ended run was told %+v", v)
		}
		if j := h.job(key); j.Run != 1 {
			t.Errorf("a late report started run %d", j.Run)
		}
	})
}

func (s *Server) jobKeys() []string {
	var keys []string
	s.r.Read(func(st *state.State) {
		for k := range st.Jobs {
			keys = append(keys, k)
		}
	})
	return keys
}

// Regression: an admission whose Raft commit timed out for its caller may
// still commit, leaving a reserved gang that nothing registers. The leader
// loop registers every reserved gang that is not registered yet.
func TestCommittedAdmissionWithoutRegistration(t *testing.T) {
	h := newHarness(t)
	job := gang("orphan", jobspec.DriverMicroVM, 2)
	norm, _, err := h.srv.Normalize(job)
	if err != nil {
		t.Fatal(err)
	}
	g, _ := jobspec.GangFromNomad(norm)
	spec := gangSpec(norm, g)
	d := h.srv.placeNow(t0, spec)
	if d == nil {
		t.Fatal("does not fit")
	}
	if _, err := h.srv.apply(&state.Command{Op: state.OpAdmit, At: t0, Job: spec, Nomad: mustJSON(norm), Decision: d}); err != nil {
		t.Fatal(err)
	}
	if h.nomad.latest("orphan") != nil {
		t.Fatal("registered before the pass")
	}
	h.pass()
	if j := h.job("orphan"); j.NomadIndex == 0 || h.nomad.latest("orphan") == nil {
		t.Fatalf("the pass did not register it: %+v", j)
	}
}

// Regression: a finished run left its Nomad job registered, so submitting
// the same gang again registered an identical job that Nomad did not act
// on. The ended run is deregistered, and the next run is placed and runs.
func TestResubmittedGangRunsAgain(t *testing.T) {
	h := newHarness(t)
	key := h.started(gang("again", jobspec.DriverMicroVM, 2))
	for _, a := range h.nomad.live(key) {
		h.nomad.set(a, "complete", 0, t0)
	}
	h.pass()
	if j := h.job(key); j.Status != state.Finished || !j.Cleaned {
		t.Fatalf("run 1: %+v", j)
	}
	j := h.submit(gang("again", jobspec.DriverMicroVM, 2))
	if j.Run != 2 || j.Status != state.Reserved || len(h.nomad.live(key)) != 2 {
		t.Fatalf("run 2: %+v, %d live allocations", j, len(h.nomad.live(key)))
	}
	h.runAll(key)
	h.bootAll(key)
	h.pass()
	if j := h.job(key); j.Status != state.Running || j.Run != 2 || len(j.Previous) != 1 {
		t.Fatalf("run 2: %+v", j)
	}
}

// Regression (found in review): a worker of an earlier attempt that lives
// on (its node cut off from Nomad but not from cohort) and reports while
// the next attempt boots was released with that attempt. Only the
// attempt's own booted workers are released.
func TestStaleWorkerNeverReleased(t *testing.T) {
	h := newHarness(t)
	key := h.submit(gang("stale", jobspec.DriverMicroVM, 2)).Key()
	old := h.nomad.live(key)[0]
	h.advance(11 * time.Second)
	h.pass() // gang timeout: requeued and placed again
	h.pass()
	if j := h.job(key); j.Attempts != 2 || j.Status != state.Reserved {
		t.Fatalf("%v", j)
	}
	// The old worker still runs and reports, late, during attempt 2.
	h.srv.Boot("", "stale", api.BarrierRequest{Alloc: old.ID, Instance: "old"})
	h.runAll(key)
	h.bootAll(key)
	h.pass()
	if j := h.job(key); j.Status != state.Running {
		t.Fatalf("%v", j)
	}
	if v := h.srv.verdict(key, api.BarrierRequest{Alloc: old.ID, Instance: "old"}); v.Status != api.BarrierAbort {
		t.Errorf("the stale worker of attempt 1 was told %+v", v)
	}
}

// TestRetentionForgetsEndedRuns: once an ended run's Nomad job is gone and
// the retention has passed, the leader has every server forget it, at
// most once a minute; a run inside the retention and a live gang stay.
func TestRetentionForgetsEndedRuns(t *testing.T) {
	h := newHarnessWith(t, func(c *Config) { c.Retention = time.Hour })
	old := h.started(gang("old", jobspec.DriverMicroVM, 1))
	h.advance(time.Minute + time.Millisecond) // its max_runtime
	h.pass()
	if j := h.job(old); !j.Ended() || !j.Cleaned {
		t.Fatalf("not ended and cleaned: %+v", j)
	}
	h.advance(50 * time.Minute)
	recent := h.started(gang("recent", jobspec.DriverMicroVM, 1))
	h.advance(time.Minute + time.Millisecond)
	h.pass()
	live := h.started(gang("live", jobspec.DriverMicroVM, 1))
	h.advance(10 * time.Minute) // old ended 61 min ago, recent 10 min ago
	h.pass()
	h.r.Read(func(st *state.State) {
		if _, ok := st.Jobs[old]; ok {
			t.Error("a run past retention is still kept")
		}
		for _, k := range []string{recent, live} {
			if _, ok := st.Jobs[k]; !ok {
				t.Errorf("%s was forgotten", k)
			}
		}
	})
	if rec := h.serve(httptest.NewRequest("GET", "/v1/job/old/bill", nil)); rec.Code != 404 {
		t.Errorf("the bill of a forgotten run: %d %s", rec.Code, rec.Body)
	}
}

// A worker of a group split across nodes (one task group per worker,
// "group[rank]") is placed by its group and rank, not by its task
// group's name; an address is kept only inside the node's worker subnet,
// and never while no worker range is leased.
func TestPlaceBoot(t *testing.T) {
	h := newHarness(t)
	split := nomad.Worker{Alloc: "x", Name: "sort.sort[3][0]", TaskGroup: "sort[3]"}
	if b := h.srv.placeBoot("sort", split, "10.213.0.9", ""); b == nil || b.Group != "sort" || b.Rank != 3 || b.Address != "" {
		t.Errorf("split group, no leases: %+v", b)
	}
	l, err := h.srv.Lease(api.LeaseRequest{Node: "n0", Address: "192.168.1.10"})
	if err != nil {
		t.Fatal(err)
	}
	_, subnet, _ := net.ParseCIDR(l.Subnet)
	inside := subnet.IP.To4()
	inside[3] = 9
	other := append(net.IP(nil), inside...)
	other[2]++
	plain := nomad.Worker{Alloc: "y", Name: "sort.map[2]", TaskGroup: "map"}
	for _, tc := range []struct {
		node, address, want string
	}{
		{"n0", inside.String(), inside.String()},
		{"n0", other.String(), ""},           // another node's subnet
		{"", other.String(), other.String()}, // no certificate: the range
		{"", "192.168.99.9", ""},
	} {
		b := h.srv.placeBoot("sort", plain, tc.address, tc.node)
		if b == nil || b.Group != "map" || b.Rank != 2 || b.Address != tc.want {
			t.Errorf("node %q address %s: %+v, want address %q", tc.node, tc.address, b, tc.want)
		}
	}
}

// TestAdmissionFollowsHoldings: admissions place on the leader's kept
// inventory, which must learn of every gang that comes to hold room and
// of every one that stops: a gang that fills the cluster is placed on
// arrival, the next waits, and once the first is stopped a gang of the
// same size is placed on arrival in the room it left, through the
// state's log of changed holdings alone.
func TestAdmissionFollowsHoldings(t *testing.T) {
	h := newHarness(t)
	if j := h.submit(gang("a", "microvm", 16)); j.Status != state.Reserved {
		t.Fatalf("a gang that fits the empty cluster is %s on arrival", j.Status)
	}
	if _, err := h.srv.Stop("a"); err != nil {
		t.Fatal(err)
	}
	if j := h.submit(gang("b", "microvm", 16)); j.Status != state.Reserved {
		t.Fatalf("a gang that fits the room a stopped gang left is %s on arrival: %s", j.Status, j.Reason)
	}
	if j := h.submit(gang("c", "microvm", 1)); j.Status != state.Queued {
		t.Fatalf("a gang beside a gang that fills the cluster is %s on arrival", j.Status)
	}
	if n := h.srv.view.FullReads(); n != 1 {
		t.Errorf("the kept inventory was read whole %d times over three admissions", n)
	}
}

// TestPassesWhileNothingFits: while the queue's gangs wait for room, the
// leader's passes find that none fits on the kept inventory and read
// nothing whole; once room frees, a pass places the head without a whole
// read either.
func TestPassesWhileNothingFits(t *testing.T) {
	h := newHarness(t)
	h.submit(gang("a", "microvm", 16))
	if j := h.submit(gang("b", "microvm", 4)); j.Status != state.Queued {
		t.Fatalf("b is %s beside a gang that fills the cluster", j.Status)
	}
	reads := h.nomad.inventoryReads
	for i := 0; i < 5; i++ {
		h.pass()
	}
	if got := h.nomad.inventoryReads - reads; got != 0 {
		t.Errorf("5 passes with nothing that fits read the inventory whole %d times", got)
	}
	if _, err := h.srv.Stop("a"); err != nil {
		t.Fatal(err)
	}
	h.pass()
	if j := h.job("b"); j.Status != state.Reserved {
		t.Fatalf("b is %s after the gang that filled the cluster stopped: %s", j.Status, j.Reason)
	}
	if got := h.nomad.inventoryReads - reads; got != 0 {
		t.Errorf("placing the head read the inventory whole %d times", got)
	}
}

// TestBackfillSeesGangsEndedInThePass: a gang that ends in a pass gives
// its room back once, not twice. One node of 16 slots: x holds 12 and
// ends (its workers exit) in the pass that schedules; y holds 4 for an
// hour; the head needs 14, so it starts when y ends; b needs 4 for three
// hours, which would leave the head 12 at y's end: b must wait. Counting
// x's room both as free now and as released at x's deadline would let b
// in and delay the head by hours.
func TestBackfillSeesGangsEndedInThePass(t *testing.T) {
	h := newHarness(t, node("n1", 8000, 8192))
	withRuntime := func(job *nomadapi.Job, runtime string, priority int) *nomadapi.Job {
		job.Meta[jobspec.MetaMaxRuntime] = runtime
		job.Priority = &priority
		return job
	}
	x := h.started(gang("x", jobspec.DriverMicroVM, 12))
	h.advance(10 * time.Second)
	h.started(withRuntime(gang("y", jobspec.DriverMicroVM, 4), "1h", 50))
	if j := h.submit(withRuntime(gang("head", jobspec.DriverMicroVM, 14), "1h", 80)); j.Status != state.Queued {
		t.Fatalf("head is %s on a full node", j.Status)
	}
	if j := h.submit(withRuntime(gang("b", jobspec.DriverMicroVM, 4), "3h", 50)); j.Status != state.Queued {
		t.Fatalf("b is %s on a full node", j.Status)
	}
	for _, a := range h.nomad.live(x) {
		h.nomad.set(a, "complete", 0, h.clock())
	}
	h.advance(50 * time.Millisecond)
	h.pass()
	if j := h.job(x); j.Status != state.Finished {
		t.Fatalf("x is %s after its workers exited", j.Status)
	}
	if j := h.job("b"); j.Status != state.Queued {
		t.Fatalf("b is %s: backfilled past the head's start, which it delays", j.Status)
	}
}

// TestGangsGoWhereTheirDriverIs: a node without a gang's task driver is
// passed over though it fits tighter (Nomad could not place the workers
// cohort pinned there, and the gang would wait out its timeout), and a
// gang whose driver no node has waits in the queue, saying so.
func TestGangsGoWhereTheirDriverIs(t *testing.T) {
	tight := node("n1", 1000, 1024)
	tight.Drivers = placement.DriverSet([]string{"raw_exec"})
	roomy := node("n2", 8000, 8192)
	roomy.Drivers = placement.DriverSet([]string{"microvm", "raw_exec"})
	h := newHarness(t, tight, roomy)
	vm := h.submit(gang("vm", jobspec.DriverMicroVM, 2))
	if got := vm.Spec.Groups[0].Drivers; !reflect.DeepEqual(got, []string{"microvm"}) {
		t.Errorf("the microvm gang's drivers: %v", got)
	}
	if vm.Status != state.Reserved {
		t.Fatalf("the microvm gang: %s", vm.Status)
	}
	for _, w := range vm.Decision.Workers {
		if w.Node != "n2" {
			t.Fatalf("a microvm worker pinned to %s, which has no microvm driver: %+v", w.Node, vm.Decision.Workers)
		}
	}
	// A raw_exec gang (its barrier task raw_exec too) takes the tightest.
	raw := h.submit(gang("raw", jobspec.DriverRawExec, 1))
	if got := raw.Spec.Groups[0].Drivers; !reflect.DeepEqual(got, []string{"raw_exec"}) {
		t.Errorf("the raw_exec gang's drivers: %v", got)
	}
	if raw.Status != state.Reserved || raw.Decision.Workers[0].Node != "n1" {
		t.Fatalf("the raw_exec gang: %s %+v", raw.Status, raw.Decision)
	}

	// A group with a Connect sidecar needs the proxy's driver too.
	tg := &nomadapi.TaskGroup{Tasks: []*nomadapi.Task{{Driver: "raw_exec"}}, Services: []*nomadapi.Service{
		{Name: "a", Connect: &nomadapi.ConsulConnect{SidecarService: &nomadapi.ConsulSidecarService{}}},
		{Name: "b", Connect: &nomadapi.ConsulConnect{Native: true}},
	}}
	if got := jobspec.TaskDrivers(tg); !reflect.DeepEqual(got, []string{"docker", "raw_exec"}) {
		t.Errorf("a group with a Connect sidecar needs %v", got)
	}
	tg.Services[0].Connect.SidecarTask = &nomadapi.SidecarTask{Driver: "exec"}
	if got := jobspec.TaskDrivers(tg); !reflect.DeepEqual(got, []string{"exec", "raw_exec"}) {
		t.Errorf("a group whose sidecar task runs on exec needs %v", got)
	}

	// Where no node has its driver now, it waits (a driver may turn
	// healthy any moment, as Nomad too would wait), and the queue says
	// why.
	h2 := newHarness(t, tight)
	if j := h2.submit(gang("vm", jobspec.DriverMicroVM, 1)); j.Status != state.Queued {
		t.Fatalf("a microvm gang on a cluster without the microvm driver: %s", j.Status)
	}
	h2.pass()
	if why := h2.srv.waitText(caller{}, h2.srv.waiting()["vm"]); !strings.Contains(why, "needs a healthy microvm driver, which no node in its datacenters and pool has") {
		t.Fatalf("why the microvm gang waits: %q", why)
	}
}
