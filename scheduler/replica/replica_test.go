package replica

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/cohort-dev/cohort/scheduler/state"
)

// group is a 3-replica Raft group on loopback whose members can be killed
// and restarted on their data.
type group struct {
	t     *testing.T
	mu    sync.Mutex
	peers map[string]string
	dirs  map[string]string
	live  map[string]*Replica
	// tlsServer and tlsClient, when set, carry Raft over mutual TLS.
	tlsServer, tlsClient *tls.Config
	// bolt starts replicas on the BoltDB log of servers before the WAL.
	bolt bool
}

func newGroup(t *testing.T, n int) *group { return newGroupTLS(t, n, nil, nil) }

func newGroupTLS(t *testing.T, n int, server, client *tls.Config) *group {
	return startGroup(t, n, &group{tlsServer: server, tlsClient: client})
}

// startGroup starts n replicas configured as g says.
func startGroup(t *testing.T, n int, g *group) *group {
	g.t, g.peers, g.dirs, g.live = t, map[string]string{}, map[string]string{}, map[string]*Replica{}
	for i := 1; i <= n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		id := fmt.Sprintf("r%d", i)
		g.peers[id] = l.Addr().String()
		l.Close()
		g.dirs[id] = t.TempDir()
	}
	for id := range g.peers {
		g.start(id)
	}
	t.Cleanup(func() {
		g.mu.Lock()
		defer g.mu.Unlock()
		for _, r := range g.live {
			r.Shutdown()
		}
	})
	return g
}

func (g *group) start(id string) {
	r, err := Start(Config{ID: id, Bind: g.peers[id], DataDir: g.dirs[id], Peers: g.peers, Fast: true, TLSServer: g.tlsServer, TLSClient: g.tlsClient, boltLog: g.bolt})
	if err != nil {
		g.t.Fatalf("starting %s: %v", id, err)
	}
	g.mu.Lock()
	g.live[id] = r
	g.mu.Unlock()
}

func (g *group) kill(id string) {
	g.mu.Lock()
	r := g.live[id]
	delete(g.live, id)
	g.mu.Unlock()
	r.Shutdown()
}

func (g *group) leader() *Replica {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, r := range g.live {
		if r.IsLeader() {
			return r
		}
	}
	return nil
}

func (g *group) waitLeader(not string) *Replica {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if l := g.leader(); l != nil && l.ID != not {
			return l
		}
		time.Sleep(5 * time.Millisecond)
	}
	g.t.Fatal("no leader within 10s")
	return nil
}

// apply sends a command to whoever leads, retrying across elections.
func (g *group) apply(c *state.Command) (state.Result, time.Duration) {
	start := time.Now()
	for time.Since(start) < 20*time.Second {
		l := g.leader()
		if l == nil {
			time.Sleep(5 * time.Millisecond)
			continue
		}
		res, err := l.Apply(c, 2*time.Second)
		if err == nil {
			return res, time.Since(start)
		}
		if !errors.Is(err, ErrNotLeader) {
			time.Sleep(5 * time.Millisecond)
		}
	}
	g.t.Fatalf("command %s %s not applied within 20s", c.Op, c.JobID)
	return state.Result{}, 0
}

var inventory = func() []placement.Node {
	var ns []placement.Node
	for i := 0; i < 20; i++ {
		ns = append(ns, placement.Node{ID: fmt.Sprintf("n%02d", i), Datacenter: "dc1", Pool: "default", CPU: 4000, MemoryMB: 8192})
	}
	return ns
}()

// schedule is a leader's pass: place queued gangs on what reserved and
// running ones leave free, reserve, start, and finish those that ran.
func (g *group) schedule(l *Replica) {
	var queue []*placement.Job
	var holding []placement.Running
	var reserved, running []string
	now := time.Now()
	l.Read(func(s *state.State) {
		for _, j := range s.ByStatus(state.Queued) {
			spec := j.Spec
			queue = append(queue, &spec)
		}
		holding = s.Holding(now)
		for _, j := range s.ByStatus(state.Reserved) {
			reserved = append(reserved, j.Spec.ID)
		}
		for _, j := range s.ByStatus(state.Running) {
			if now.Sub(j.StartedAt) > 20*time.Millisecond {
				running = append(running, j.Spec.ID)
			}
		}
	})
	free := placement.Subtract(inventory, holding)
	plan := placement.Schedule(now, free, holding, queue)
	for _, d := range plan.Decisions {
		d := d
		l.Apply(&state.Command{Op: state.OpReserve, At: now, JobID: d.Job, Decision: &d}, time.Second)
	}
	for _, id := range reserved {
		l.Apply(&state.Command{Op: state.OpStart, At: now, JobID: id}, time.Second)
	}
	for _, id := range running {
		l.Apply(&state.Command{Op: state.OpFinish, At: now, JobID: id, Reason: "exited"}, time.Second)
	}
}

// TestThousandJobsTwoLeaderKills: 1,000 gangs are submitted while the
// leader is killed twice (each time the old leader comes back on its data).
// Every replica ends with every job exactly once, and no gang ever held a
// partial reservation.
func TestThousandJobsTwoLeaderKills(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: skipping the 1,000-job failover run")
	}
	g := newGroup(t, 3)
	g.waitLeader("")

	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		var term string
		for {
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
			l := g.leader()
			if l == nil {
				continue
			}
			if l.ID != term {
				// A new leader acts only on everything committed before it.
				if l.Barrier(2*time.Second) != nil {
					continue
				}
				term = l.ID
			}
			g.schedule(l)
		}
	}()

	const total = 1000
	var failovers []time.Duration
	for i := 0; i < total; i++ {
		if i == 300 || i == 650 {
			old := g.waitLeader("")
			killed := time.Now()
			g.kill(old.ID)
			g.waitLeader(old.ID)
			_, _ = g.apply(&state.Command{Op: state.OpSubmit, At: time.Now(), Job: gang(i)})
			failovers = append(failovers, time.Since(killed))
			g.start(old.ID)
			continue
		}
		g.apply(&state.Command{Op: state.OpSubmit, At: time.Now(), Job: gang(i)})
	}
	// Let the scheduler drain the queue, then stop it.
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		done := 0
		g.waitLeader("").Read(func(s *state.State) { done = len(s.ByStatus(state.Finished)) })
		if done == total {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	l := g.waitLeader("")
	if err := l.Barrier(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	want := l.AppliedIndex()
	t.Logf("failover (leader killed -> first admission by the new leader): %v", failovers)

	g.mu.Lock()
	reps := make([]*Replica, 0, len(g.live))
	for _, r := range g.live {
		reps = append(reps, r)
	}
	g.mu.Unlock()
	if len(reps) != 3 {
		t.Fatalf("%d live replicas, want 3", len(reps))
	}
	for _, r := range reps {
		deadline := time.Now().Add(10 * time.Second)
		for r.AppliedIndex() < want && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		r.Read(func(s *state.State) {
			if len(s.Jobs) != total {
				t.Errorf("%s has %d jobs, want %d", r.ID, len(s.Jobs), total)
			}
			seqs := make([]int, 0, total)
			for i := 0; i < total; i++ {
				j, ok := s.Jobs[fmt.Sprintf("job-%04d", i)]
				if !ok {
					t.Errorf("%s lost job-%04d", r.ID, i)
					continue
				}
				seqs = append(seqs, int(j.Spec.Seq))
				if j.Status != state.Finished {
					t.Errorf("%s: job-%04d is %s, want finished", r.ID, i, j.Status)
				}
				if j.Decision == nil || len(j.Decision.Workers) != j.Spec.Size() {
					t.Errorf("%s: job-%04d ran with a partial or no reservation", r.ID, i)
				}
			}
			sort.Ints(seqs)
			for i, s := range seqs {
				if s != i {
					t.Errorf("%s: submission sequence has a gap or duplicate at %d", r.ID, i)
					break
				}
			}
		})
	}
}

func gang(i int) *placement.Job {
	return &placement.Job{
		ID: fmt.Sprintf("job-%04d", i), Priority: 50, MaxRuntime: time.Minute,
		Datacenters: []string{"dc1"}, Pool: "default",
		Groups: []placement.Group{{Name: "w", Count: 8, CPU: 500, MemoryMB: 1024}},
	}
}

// Raft's timeouts default to hashicorp/raft's own (production); bad ones
// are refused before Raft starts.
func TestTimeouts(t *testing.T) {
	if DefaultTimeouts.Heartbeat != time.Second || DefaultTimeouts.Election != time.Second || DefaultTimeouts.LeaderLease != 500*time.Millisecond {
		t.Errorf("defaults %+v", DefaultTimeouts)
	}
	for _, bad := range []Timeouts{
		{Heartbeat: time.Millisecond, Election: time.Second, LeaderLease: time.Millisecond, Commit: time.Millisecond},
		{Heartbeat: time.Second, Election: time.Second, LeaderLease: 2 * time.Second, Commit: time.Millisecond},
		{Heartbeat: time.Second, Election: 500 * time.Millisecond, LeaderLease: 100 * time.Millisecond, Commit: time.Millisecond},
	} {
		if _, err := Start(Config{ID: "x", InMemory: true, Timeouts: bad}); err == nil {
			t.Errorf("timeouts %+v were accepted", bad)
		}
	}
	if err := LANTimeouts.Validate(); err != nil {
		t.Error(err)
	}
}

// An in-memory replica is a group of one that leads and applies.
func TestInMemoryReplica(t *testing.T) {
	r, err := Start(Config{ID: "mem", InMemory: true, Timeouts: Timeouts{Heartbeat: 20 * time.Millisecond, Election: 20 * time.Millisecond, LeaderLease: 10 * time.Millisecond, Commit: time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Shutdown()
	for deadline := time.Now().Add(5 * time.Second); !r.IsLeader(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no leader")
		}
	}
	res, err := r.Apply(&state.Command{Op: state.OpSubmit, At: time.Unix(1, 0), Job: &placement.Job{ID: "a"}}, time.Second)
	if err != nil || res.Err != "" || res.Job.Status != state.Queued {
		t.Fatalf("apply: %v %+v", err, res)
	}
}
