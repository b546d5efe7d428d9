package server

import (
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/jobspec"
	"github.com/cohort-dev/cohort/scheduler/billing"
	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/cohort-dev/cohort/scheduler/replica"
	"github.com/cohort-dev/cohort/scheduler/state"
	nomadapi "github.com/hashicorp/nomad/api"
)

// harness is one cohort server over Raft's in-memory store and transport
// and a fake Nomad, with a clock the test moves. Tests drive the leader
// loop one Pass at a time.
type harness struct {
	t     testing.TB
	srv   *Server
	r     *replica.Replica
	nomad *fakeNomad

	mu  sync.Mutex
	now time.Time
}

var t0 = time.Date(2026, 11, 26, 10, 0, 0, 0, time.UTC)

// testTimeouts make a group of one lead within tens of milliseconds.
var testTimeouts = replica.Timeouts{Heartbeat: 20 * time.Millisecond, Election: 20 * time.Millisecond, LeaderLease: 10 * time.Millisecond, Commit: time.Millisecond}

func node(id string, cpu, mem int) placement.Node {
	return placement.Node{ID: id, Datacenter: "dc1", Pool: "default", CPU: cpu, MemoryMB: mem, Devices: map[string]int{}}
}

func newHarness(t testing.TB, nodes ...placement.Node) *harness {
	t.Helper()
	return newHarnessWith(t, nil, nodes...)
}

// newHarnessWith is newHarness with the server's configuration changed by
// adjust.
func newHarnessWith(t testing.TB, adjust func(*Config), nodes ...placement.Node) *harness {
	t.Helper()
	if len(nodes) == 0 {
		nodes = []placement.Node{node("n1", 4000, 4096), node("n2", 4000, 4096)}
	}
	r, err := replica.Start(replica.Config{ID: "s1", InMemory: true, Timeouts: testTimeouts})
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{t: t, r: r, nomad: newFakeNomad(nodes...), now: t0}
	// A barrier task program: any ELF file will do for the archive.
	prog := filepath.Join(t.TempDir(), "cohort-barrier")
	os.WriteFile(prog, []byte("\x7fELF fake program"), 0o755)
	cfg := Config{Prices: billing.DefaultPrices, BarrierTaskPath: prog, Now: h.clock}
	if adjust != nil {
		adjust(&cfg)
	}
	srv, err := New(r, h.nomad, cfg)
	if err != nil {
		t.Fatal(err)
	}
	srv.Advertise("127.0.0.1:4747")
	h.srv = srv
	t.Cleanup(func() {
		srv.Close()
		r.Shutdown()
	})
	deadline := time.Now().Add(5 * time.Second)
	for !r.IsLeader() {
		if time.Now().After(deadline) {
			t.Fatal("the in-memory replica did not become leader")
		}
		time.Sleep(time.Millisecond)
	}
	if err := r.Barrier(time.Second); err != nil {
		t.Fatal(err)
	}
	return h
}

func (h *harness) clock() time.Time {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.now
}

// advance moves the clock.
func (h *harness) advance(d time.Duration) {
	h.mu.Lock()
	h.now = h.now.Add(d)
	h.mu.Unlock()
}

// pass runs one leader pass and fails the test on its error.
func (h *harness) pass() {
	h.t.Helper()
	if err := h.srv.Pass(); err != nil {
		h.t.Fatalf("pass: %v", err)
	}
}

// job reads a job of the state.
func (h *harness) job(key string) state.Job {
	h.t.Helper()
	j, ok := h.srv.job(key)
	if !ok {
		h.t.Fatalf("no job %s", key)
	}
	return j
}

// gang is a Nomad job of count workers per group on driver, as `cohort
// plan` makes it.
func gang(id, driver string, counts ...int) *nomadapi.Job {
	spec := &jobspec.Job{Name: id, Priority: 50, Datacenters: []string{"*"}, NodePool: "default",
		MaxRuntime: time.Minute, GangTimeout: 10 * time.Second}
	for i, n := range counts {
		name := string(rune('a' + i))
		spec.Groups = append(spec.Groups, &jobspec.Group{Name: name, Count: n, Address: id + "-" + name, Driver: driver,
			Resources: jobspec.Resources{CPU: 500, MemoryMB: 512}, Program: jobspec.Program{Path: "/bin/true"}})
	}
	return jobspec.ToNomad(spec)
}

// submit admits a job and fails the test if it is refused.
func (h *harness) submit(job *nomadapi.Job) state.Job {
	h.t.Helper()
	sub, err := h.srv.Submit(job)
	if err != nil {
		h.t.Fatalf("submit: %v", err)
	}
	return sub.Job
}

// bootAll reports every live allocation of a job at the barrier and
// returns the verdicts.
func (h *harness) bootAll(key string) map[string]api.BarrierResponse {
	h.t.Helper()
	out := map[string]api.BarrierResponse{}
	ns, id := splitKey(key)
	for _, a := range h.nomad.live(key) {
		v, err := h.srv.Boot(ns, id, api.BarrierRequest{Alloc: a.ID, Instance: "i-" + a.ID[:8]})
		if err != nil {
			h.t.Fatalf("boot %s: %v", a.ID, err)
		}
		out[a.ID] = v
	}
	return out
}

// verdict asks the barrier again for one allocation.
func (h *harness) verdict(key, alloc string) api.BarrierResponse {
	return h.srv.verdict(key, api.BarrierRequest{Alloc: alloc, Instance: "i-" + alloc[:8]})
}

// runAll marks every live allocation of a job running.
func (h *harness) runAll(key string) {
	for _, a := range h.nomad.live(key) {
		h.nomad.set(a, "running", 0, time.Time{})
	}
}

// started submits a job, registers it, boots every worker and releases
// the gang, and returns its key.
func (h *harness) started(job *nomadapi.Job) string {
	h.t.Helper()
	j := h.submit(job)
	key := j.Key()
	h.runAll(key)
	h.bootAll(key)
	h.pass()
	if got := h.job(key); got.Status != state.Running {
		h.t.Fatalf("%s is %s after every worker booted: %s", key, got.Status, got.Reason)
	}
	return key
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
