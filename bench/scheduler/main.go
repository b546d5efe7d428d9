// Command scheduler measures gang admission: 8-worker gangs placed on a
// simulated 5,000-node inventory, with the admission replicated through a
// 3-replica Raft group on loopback, against the same placement without
// Raft in the same run; and the time from killing the leader to the first
// admission by its successor. `make bench-scheduler` runs it.
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"runtime/pprof"
	"sort"
	"sync"
	"time"

	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/cohort-dev/cohort/scheduler/replica"
	"github.com/cohort-dev/cohort/scheduler/state"
)

// dirs are the replicas' data directories, removed at exit.
var dirs []string

var (
	nodes   = flag.Int("nodes", 5000, "simulated nodes")
	jobs    = flag.Int("jobs", 4000, "gangs admitted per figure")
	workers = flag.Int("workers", 8, "workers per gang")
	clients = flag.Int("clients", 32, "concurrent submitters")
	cpuprof = flag.String("cpuprofile", "", "write a CPU profile of the Raft admissions here")
)

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench-scheduler:", err)
		os.Exit(1)
	}
}

func inventory() []placement.Node {
	ns := make([]placement.Node, *nodes)
	for i := range ns {
		ns[i] = placement.Node{ID: fmt.Sprintf("node-%05d", i), Datacenter: "dc1", Pool: "default",
			CPU: 32000, MemoryMB: 131072, Devices: map[string]int{}}
	}
	return ns
}

func gang(i int) *placement.Job {
	return &placement.Job{ID: fmt.Sprintf("gang-%06d", i), Priority: 50, Datacenters: []string{"dc1"}, Pool: "default",
		MaxRuntime: time.Hour, Groups: []placement.Group{{Name: "w", Count: *workers, CPU: 1000, MemoryMB: 2048}}}
}

func run() error {
	fmt.Printf("nodes=%d\nworkers_per_gang=%d\njobs=%d\nclients=%d\n", *nodes, *workers, *jobs, *clients)

	// Without Raft: placement alone, one gang after another.
	inv := placement.NewInventory(inventory())
	t0 := time.Now()
	for i := 0; i < *jobs; i++ {
		if _, ok := inv.Place(gang(i)); !ok {
			return fmt.Errorf("gang %d did not fit", i)
		}
	}
	noraft := float64(*jobs**workers) / time.Since(t0).Seconds()

	// With Raft: submit and reserve are both committed by a 3-replica group.
	reps, leader, err := group()
	if err != nil {
		return err
	}
	defer func() {
		for _, r := range reps {
			r.Shutdown()
		}
		for _, d := range dirs {
			os.RemoveAll(d)
		}
	}()
	inv = placement.NewInventory(inventory())
	var mu sync.Mutex
	// Admissions are committed through the leader's batcher, as the
	// server commits them.
	batchers := map[*replica.Replica]*replica.Batcher{}
	commit := func(c *state.Command) (state.Result, error) {
		l := leader()
		if l == nil {
			return state.Result{}, replica.ErrNotLeader
		}
		mu.Lock()
		b, ok := batchers[l]
		if !ok {
			b = replica.NewBatcher(l)
			batchers[l] = b
		}
		mu.Unlock()
		return b.Apply(c)
	}
	// An admission places the gang on the leader's inventory and commits
	// it, submitted and reserved, in one Raft entry.
	admit := func(j *placement.Job) (time.Duration, error) {
		start := time.Now()
		mu.Lock()
		d, ok := inv.Place(j)
		mu.Unlock()
		if !ok {
			return 0, fmt.Errorf("gang %s did not fit", j.ID)
		}
		if res, err := commit(&state.Command{Op: state.OpAdmit, At: start, Job: j, Decision: &d}); err != nil || res.Err != "" {
			mu.Lock()
			inv.Release(j, d)
			mu.Unlock()
			return 0, fmt.Errorf("admit: %v %s", err, res.Err)
		}
		return time.Since(start), nil
	}
	if *cpuprof != "" {
		f, err := os.Create(*cpuprof)
		if err != nil {
			return err
		}
		pprof.StartCPUProfile(f)
		defer pprof.StopCPUProfile()
	}
	lat := make([]float64, *jobs)
	next := make(chan int)
	errs := make(chan error, *clients)
	var wg sync.WaitGroup
	t0 = time.Now()
	for c := 0; c < *clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				d, err := admit(gang(i))
				if err != nil {
					errs <- err
					return
				}
				lat[i] = float64(d.Microseconds()) / 1000
			}
		}()
	}
	for i := 0; i < *jobs; i++ {
		next <- i
	}
	close(next)
	wg.Wait()
	elapsed := time.Since(t0)
	select {
	case err := <-errs:
		return err
	default:
	}
	sort.Float64s(lat)
	perS := float64(*jobs) / elapsed.Seconds()

	// Failover: kill the leader, time the first admission by the next one.
	old := leader()
	killed := time.Now()
	old.Shutdown()
	var failover time.Duration
	for i := *jobs; ; i++ {
		l := leader()
		if l == nil || l == old {
			time.Sleep(time.Millisecond)
			continue
		}
		if _, err := admit(gang(i)); err == nil {
			failover = time.Since(killed)
			break
		}
		if time.Since(killed) > 30*time.Second {
			return fmt.Errorf("no admission within 30s of killing the leader")
		}
	}

	fmt.Printf("admissions_per_s=%.0f\n", perS)
	fmt.Printf("placements_per_s=%.0f\n", perS*float64(*workers))
	fmt.Printf("placements_per_s_noraft=%.0f\n", noraft)
	fmt.Printf("raft_vs_noraft=%.2fx\n", perS*float64(*workers)/noraft)
	fmt.Printf("admit_p50_ms=%.2f\n", lat[len(lat)/2])
	fmt.Printf("admit_p99_ms=%.2f\n", lat[len(lat)*99/100])
	fmt.Printf("failover_ms=%d\n", failover.Milliseconds())
	goal := func(name string, ok bool) {
		v := "missed"
		if ok {
			v = "met"
		}
		fmt.Printf("goal_%s=%s\n", name, v)
	}
	goal("placements_ge_10000_per_s", perS*float64(*workers) >= 10000)
	goal("admit_p99_le_20ms", lat[len(lat)*99/100] <= 20)
	goal("failover_le_2000ms", failover <= 2*time.Second)
	return nil
}

// group starts three replicas on loopback and returns a function that
// finds the current leader.
func group() ([]*replica.Replica, func() *replica.Replica, error) {
	peers := map[string]string{}
	for i := 1; i <= 3; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, nil, err
		}
		peers[fmt.Sprintf("r%d", i)] = l.Addr().String()
		l.Close()
	}
	var reps []*replica.Replica
	for id, addr := range peers {
		dir, err := os.MkdirTemp("", "cohort-bench-raft-")
		if err != nil {
			return nil, nil, err
		}
		dirs = append(dirs, dir)
		r, err := replica.Start(replica.Config{ID: id, Bind: addr, DataDir: dir, Peers: peers, Fast: true})
		if err != nil {
			return nil, nil, err
		}
		reps = append(reps, r)
	}
	leader := func() *replica.Replica {
		for _, r := range reps {
			if r.IsLeader() {
				return r
			}
		}
		return nil
	}
	deadline := time.Now().Add(10 * time.Second)
	for leader() == nil {
		if time.Now().After(deadline) {
			return nil, nil, fmt.Errorf("no leader")
		}
		time.Sleep(5 * time.Millisecond)
	}
	return reps, func() *replica.Replica {
		l := leader()
		for l == nil {
			time.Sleep(time.Millisecond)
			l = leader()
		}
		return l
	}, nil
}
