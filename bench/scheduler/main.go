// Command scheduler measures gang admission: 8-worker gangs placed on
// simulated inventories of 1,000 to 50,000 nodes, with the admission
// replicated through a 3-replica Raft group on loopback, against the same
// placement without Raft in the same run; and the time from killing the
// leader to the first admission by its successor. `make bench-scheduler`
// runs it.
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"runtime"
	"runtime/pprof"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cohort-dev/cohort/command"
	"github.com/cohort-dev/cohort/internal/gcfloor"
	leaderinv "github.com/cohort-dev/cohort/scheduler/inventory"
	"github.com/cohort-dev/cohort/scheduler/nomad"
	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/cohort-dev/cohort/scheduler/replica"
	"github.com/cohort-dev/cohort/scheduler/state"
	nomadapi "github.com/hashicorp/nomad/api"
)

// dirs are the replicas' data directories, removed at exit.
var dirs []string

var (
	sizes   = flag.String("sizes", "1000,5000,20000,50000", "simulated node counts, one figure set each")
	jobs    = flag.Int("jobs", 4000, "gangs admitted per figure (fewer where the cluster would fill: failover is measured with room left)")
	workers = flag.Int("workers", 8, "workers per gang")
	clients = flag.Int("clients", 32, "concurrent submitters")
	codec   = flag.Int("codec", state.CodecNewest, "the log encoding the servers say they read: 2 binary with task drivers, 1 binary, 0 JSON (as servers before the binary codec)")
	cpuprof = flag.String("cpuprofile", "", "write a CPU profile of the Raft admissions at the largest size here")
	memprof = flag.String("memprofile", "", "write a profile of what the Raft admissions at the largest size allocate here")
	gcFloor = flag.Int("gc-heap-floor-mb", command.DefaultGCHeapFloorMB, "the garbage collector's heap floor in MiB, as cohort server's -gc-heap-floor-mb (this process stands in for the servers); 0 for Go's default pacing")
)

func main() {
	flag.Parse()
	if *memprof != "" {
		runtime.MemProfileRate = 0 // nothing sampled before the admissions
	}
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench-scheduler:", err)
		os.Exit(1)
	}
}

func inventory(n int) []placement.Node {
	ns := make([]placement.Node, n)
	for i := range ns {
		ns[i] = placement.Node{ID: fmt.Sprintf("node-%05d", i), Datacenter: "dc1", Pool: "default",
			CPU: 32000, MemoryMB: 131072, Devices: map[string]int{}, Drivers: benchDrivers}
	}
	return ns
}

// benchDrivers are every simulated node's healthy task drivers; each
// gang's workers need one of them, so placement checks it per node.
var benchDrivers = placement.DriverSet([]string{"exec", "microvm", "raw_exec"})

func gang(i int) *placement.Job {
	return &placement.Job{ID: fmt.Sprintf("gang-%06d", i), Priority: 50, Datacenters: []string{"dc1"}, Pool: "default",
		MaxRuntime: time.Hour, Groups: []placement.Group{{Name: "w", Count: *workers, CPU: 1000, MemoryMB: 2048, Drivers: []string{"microvm"}}}}
}

// figures are one size's results.
type figures struct {
	nodes, jobs      int
	perS, noraft     float64 // placements per second
	p50, p99         float64 // admission latency, ms
	failover         time.Duration
	handover         time.Duration // a planned stop of the leader
	gcCycles         uint32        // collections while admitting
	cmdsPerEntry     float64
	entryMs          float64 // wall time per Raft entry while admitting
	inventoryKiB1000 float64
	server           serverFigures // the server's inventory work for one admission
}

func run() error {
	var ns []int
	for _, f := range strings.Split(*sizes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return fmt.Errorf("-sizes: %q is not a node count", f)
		}
		ns = append(ns, n)
	}
	fmt.Printf("sizes=%s\nworkers_per_gang=%d\nclients=%d\ncodec=%d\n", *sizes, *workers, *clients, *codec)
	if f, ok := gcfloor.Keep(uint64(*gcFloor) << 20); ok {
		defer f.Stop()
		fmt.Printf("gc_heap_floor_mb=%d\n", *gcFloor)
	} else {
		fmt.Printf("gc_heap_floor_mb=off\n")
	}
	// The disk's floor: one 4 KiB write and fsync where the replicas
	// keep their logs. Each Raft entry costs the leader's and a
	// follower's fsync, one after the other, plus the round trip and the
	// apply: raft_entry_ms over fsync_p50_ms says how near that floor
	// admission runs.
	fs, err := fsyncMs(os.TempDir(), 50)
	if err != nil {
		return err
	}
	fmt.Printf("fsync_p50_ms=%.2f\n", fs)
	byN := map[int]figures{}
	for i, n := range ns {
		f, err := runSize(n, (*cpuprof != "" || *memprof != "") && i == len(ns)-1)
		if err != nil {
			return fmt.Errorf("%d nodes: %w", n, err)
		}
		byN[n] = f
		fmt.Printf("jobs_%d=%d\n", n, f.jobs)
		fmt.Printf("placements_per_s_%d=%.0f\n", n, f.perS)
		fmt.Printf("placements_per_s_noraft_%d=%.0f\n", n, f.noraft)
		fmt.Printf("admit_p50_ms_%d=%.2f\n", n, f.p50)
		fmt.Printf("admit_p99_ms_%d=%.2f\n", n, f.p99)
		fmt.Printf("gc_cycles_admitting_%d=%d\n", n, f.gcCycles)
		fmt.Printf("failover_ms_%d=%d\n", n, f.failover.Milliseconds())
		fmt.Printf("handover_ms_%d=%d\n", n, f.handover.Milliseconds())
		fmt.Printf("commands_per_entry_%d=%.1f\n", n, f.cmdsPerEntry)
		fmt.Printf("raft_entry_ms_%d=%.2f\n", n, f.entryMs)
		fmt.Printf("inventory_kib_per_1000_nodes_%d=%.0f\n", n, f.inventoryKiB1000)
		fmt.Printf("server_admit_rebuilt_ms_%d=%.2f\n", n, f.server.rebuiltMs)
		fmt.Printf("server_admit_kept_ms_%d=%.3f\n", n, f.server.keptMs)
		fmt.Printf("server_admit_kept_p99_ms_%d=%.3f\n", n, f.server.keptP99Ms)
		fmt.Printf("server_inventory_first_read_ms_%d=%.2f\n", n, f.server.firstSyncMs)
		if f.server.keptMs > 0 {
			fmt.Printf("server_admit_rebuilt_vs_kept_%d=%.0fx\n", n, f.server.rebuiltMs/f.server.keptMs)
		}
		fmt.Printf("server_pass_waiting_rebuilt_ms_%d=%.2f\n", n, f.server.passRebuiltMs)
		fmt.Printf("server_pass_waiting_kept_ms_%d=%.4f\n", n, f.server.passKeptMs)
	}
	goal := func(name string, ok bool) {
		v := "missed"
		if ok {
			v = "met"
		}
		fmt.Printf("goal_%s=%s\n", name, v)
	}
	if a, b := byN[5000], byN[50000]; a.noraft > 0 && b.noraft > 0 {
		r := b.noraft / a.noraft
		fmt.Printf("scale_5k_to_50k=%.2f\n", r)
		goal("scale_5k_to_50k_ge_0.5", r >= 0.5)
	}
	if a, b := byN[5000], byN[50000]; a.server.rebuiltMs > 0 && b.server.keptMs > 0 && a.server.keptMs > 0 {
		fmt.Printf("server_admit_rebuilt_5k_to_50k=%.1fx\n", b.server.rebuiltMs/a.server.rebuiltMs)
		fmt.Printf("server_admit_kept_5k_to_50k=%.1fx\n", b.server.keptMs/a.server.keptMs)
	}
	if f, ok := byN[20000]; ok {
		goal("placements_ge_100000_per_s_20k", f.perS >= 100000)
		goal("admit_p99_le_5ms_20k", f.p99 <= 5)
		goal("failover_le_500ms_20k", f.failover <= 500*time.Millisecond)
	}
	return nil
}

// fsyncMs is the median time of n writes of 4 KiB, each fsynced, to a
// file in dir.
func fsyncMs(dir string, n int) (float64, error) {
	f, err := os.CreateTemp(dir, "cohort-bench-fsync-")
	if err != nil {
		return 0, err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	buf := make([]byte, 4096)
	var ms []float64
	for range n {
		t0 := time.Now()
		if _, err := f.Write(buf); err != nil {
			return 0, err
		}
		if err := f.Sync(); err != nil {
			return 0, err
		}
		ms = append(ms, float64(time.Since(t0).Microseconds())/1000)
	}
	sort.Float64s(ms)
	return ms[len(ms)/2], nil
}

// runSize measures one cluster size: placement alone, then admissions
// through a fresh 3-replica group, then a failover.
func runSize(n int, profile bool) (figures, error) {
	// Each node holds 32 workers (CPU bound); leave a quarter of the
	// cluster free, so the failover admission has room.
	jobsN := min(*jobs, n*32/(*workers)*3/4)
	f := figures{nodes: n, jobs: jobsN}

	// The inventory's memory: what building it allocates (bytes
	// allocated only grow, so the other goroutines' garbage collection
	// cannot make the figure negative).
	nodes := inventory(n)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	inv := placement.NewInventory(nodes)
	runtime.ReadMemStats(&after)
	f.inventoryKiB1000 = float64(after.TotalAlloc-before.TotalAlloc) / 1024 / (float64(n) / 1000)
	f.server = serverAdmission(n)
	// Its lists and copies are garbage now: collected here, not during
	// the admissions timed below.
	runtime.GC()

	// Without Raft: placement alone, one gang after another, until the
	// cluster is three quarters full; then every gang is released. The
	// median of 5 rounds, as one round takes only milliseconds.
	var rounds []float64
	gangs := make([]*placement.Job, jobsN)
	for i := range gangs {
		gangs[i] = gang(i)
	}
	ds := make([]placement.Decision, jobsN)
	for range 5 {
		t0 := time.Now()
		for i, g := range gangs {
			d, ok := inv.Place(g)
			if !ok {
				return f, fmt.Errorf("gang %d did not fit", i)
			}
			ds[i] = d
		}
		rounds = append(rounds, float64(jobsN**workers)/time.Since(t0).Seconds())
		for i, g := range gangs {
			inv.Release(g, ds[i])
		}
	}
	sort.Float64s(rounds)
	f.noraft = rounds[len(rounds)/2]

	// With Raft: submit and reserve are both committed by a 3-replica group.
	reps, leader, err := group()
	if err != nil {
		return f, err
	}
	batchers := map[*replica.Replica]*replica.Batcher{}
	defer func() {
		for _, b := range batchers {
			b.Close()
		}
		for _, r := range reps {
			r.Shutdown()
		}
		for _, d := range dirs {
			os.RemoveAll(d)
		}
		dirs = nil
	}()
	// Each server records itself, as cohort servers do when they start:
	// the leader writes the binary log once every member reads it.
	for _, r := range reps {
		m := state.Member{ID: r.ID, RaftAddr: r.Addr(), Codec: *codec}
		if res, err := leader().Apply(&state.Command{Op: state.OpMember, At: time.Now(), Member: &m}, 5*time.Second); err != nil || res.Err != "" {
			return f, fmt.Errorf("recording member %s: %v %s", r.ID, err, res.Err)
		}
	}
	inv = placement.NewInventory(nodes)
	var mu sync.Mutex
	// Admissions are committed through the leader's batcher, as the
	// server commits them.
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
	if profile && *memprof != "" {
		// Every allocation sampled, from here: the admissions' own.
		runtime.MemProfileRate = 1
		defer func() {
			if pf, err := os.Create(*memprof); err == nil {
				pprof.Lookup("allocs").WriteTo(pf, 0)
				pf.Close()
			}
		}()
	}
	if profile && *cpuprof != "" {
		pf, err := os.Create(*cpuprof)
		if err != nil {
			return f, err
		}
		pprof.StartCPUProfile(pf)
		defer pprof.StopCPUProfile()
	}
	lat := make([]float64, jobsN)
	var gcBefore, gcAfter runtime.MemStats
	runtime.ReadMemStats(&gcBefore)
	next := make(chan int)
	errs := make(chan error, *clients)
	var wg sync.WaitGroup
	t0 := time.Now()
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
	failed := make(chan struct{})
	go func() { wg.Wait(); close(failed) }()
feed:
	for i := 0; i < jobsN; i++ {
		select {
		case next <- i:
		case <-failed: // every client stopped on an error
			break feed
		}
	}
	close(next)
	wg.Wait()
	elapsed := time.Since(t0)
	runtime.ReadMemStats(&gcAfter)
	f.gcCycles = gcAfter.NumGC - gcBefore.NumGC
	select {
	case err := <-errs:
		return f, err
	default:
	}
	sort.Float64s(lat)
	f.perS = float64(jobsN**workers) / elapsed.Seconds()
	f.p50, f.p99 = lat[len(lat)/2], lat[len(lat)*99/100]
	var entries, cmds uint64
	for _, b := range batchers {
		e, c := b.Stats()
		entries, cmds = entries+e, cmds+c
	}
	if entries > 0 {
		f.cmdsPerEntry = float64(cmds) / float64(entries)
		f.entryMs = float64(elapsed.Microseconds()) / 1000 / float64(entries)
	}

	// Failover: kill the leader, time the first admission by the next one.
	// Then a planned stop of that one (as cohort server does on SIGTERM):
	// it hands over before it stops.
	seq := jobsN
	if f.failover, err = afterLeader(admit, leader, &seq, func(r *replica.Replica) error {
		r.Shutdown()
		return nil
	}); err != nil {
		return f, fmt.Errorf("after killing the leader: %w", err)
	}
	if f.handover, err = afterLeader(admit, leader, &seq, func(r *replica.Replica) error {
		return r.TransferLeadership(5 * time.Second)
	}); err != nil {
		return f, fmt.Errorf("after the leader handed over: %w", err)
	}
	return f, nil
}

// afterLeader does stop to the leader and times the first admission
// committed by another.
func afterLeader(admit func(*placement.Job) (time.Duration, error), leader func() *replica.Replica, next *int, stop func(*replica.Replica) error) (time.Duration, error) {
	old := leader()
	t0 := time.Now()
	if err := stop(old); err != nil {
		return 0, err
	}
	for ; ; *next++ {
		l := leader()
		if l == nil || l == old {
			time.Sleep(time.Millisecond)
			continue
		}
		if _, err := admit(gang(*next)); err == nil {
			*next++
			return time.Since(t0), nil
		}
		if time.Since(t0) > 30*time.Second {
			return 0, fmt.Errorf("no admission within 30s")
		}
	}
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

// serverAdmission measures the inventory work cohort server does for
// each admission, at n nodes with 4 other jobs' allocations on each, two
// ways in the same run:
//   - rebuilt: the free nodes computed from the copy of Nomad's node and
//     allocation lists, what gangs hold subtracted, one placement over the
//     result (the server's path before the kept inventory), median of 5;
//   - kept: the leader's inventory kept by deltas (scheduler/inventory)
//     over the event-fed copy of Nomad's lists: before each admission one
//     allocation ends in Nomad and the gang admitted before is held, then
//     the View syncs and places (median and p99 of 300 admissions), and
//     the first, whole read of the View on its own.
func serverAdmission(n int) (s serverFigures) {
	healthy := &nomadapi.DriverInfo{Detected: true, Healthy: true}
	drivers := map[string]*nomadapi.DriverInfo{"exec": healthy, "microvm": healthy, "raw_exec": healthy}
	nodes := make([]*nomadapi.NodeListStub, n)
	for i := range nodes {
		nodes[i] = &nomadapi.NodeListStub{
			ID: fmt.Sprintf("node-%06d", i), Datacenter: "dc1", NodePool: "default", Status: "ready", SchedulingEligibility: "eligible",
			NodeResources: &nomadapi.NodeResources{Cpu: nomadapi.NodeCpuResources{CpuShares: 32000}, Memory: nomadapi.NodeMemoryResources{MemoryMB: 131072}},
			Drivers:       drivers,
		}
	}
	allocs := make([]*nomadapi.AllocationListStub, 4*n)
	for i := range allocs {
		allocs[i] = &nomadapi.AllocationListStub{
			ID: fmt.Sprintf("alloc-%07d", i), JobID: fmt.Sprintf("job-%d", i/8), NodeID: nodes[i%n].ID,
			ClientStatus: "running", DesiredStatus: "run", ModifyIndex: 1,
			AllocatedResources: &nomadapi.AllocatedResources{Tasks: map[string]*nomadapi.AllocatedTaskResources{
				"t": {Cpu: nomadapi.AllocatedCpuResources{CpuShares: 1000}, Memory: nomadapi.AllocatedMemoryResources{MemoryMB: 2048}},
			}},
		}
	}
	var ms []float64
	for i := range 5 {
		t0 := time.Now()
		free := nomad.FreeNodes(nodes, allocs, map[string]bool{})
		if _, ok := placement.Place(placement.Subtract(free, nil), gang(i)); !ok {
			return s
		}
		ms = append(ms, float64(time.Since(t0).Nanoseconds())/1e6)
	}
	sort.Float64s(ms)
	s.rebuiltMs = ms[len(ms)/2]

	cp := nomad.NewCopy(nodes, allocs)
	v := leaderinv.New(cp)
	t0 := time.Now()
	if _, err := v.Sync(nil, true); err != nil {
		return s
	}
	s.firstSyncMs = float64(time.Since(t0).Nanoseconds()) / 1e6
	// What changed in the state since the last admission: the gang it
	// admitted, now held.
	var held []leaderinv.Held
	ms = ms[:0]
	for i := range 300 {
		ended := &nomadapi.Allocation{ID: allocs[i].ID, JobID: allocs[i].JobID, NodeID: allocs[i].NodeID,
			ClientStatus: "complete", DesiredStatus: "run", ModifyIndex: 2}
		if err := cp.Apply(&nomadapi.Event{Topic: nomadapi.TopicAllocation, Type: "AllocationUpdated", Index: 2,
			Payload: map[string]any{"Allocation": ended}}); err != nil {
			return s
		}
		g := gang(i)
		t0 := time.Now()
		inv, err := v.Sync(held, false)
		if err != nil {
			return s
		}
		d, ok := inv.Place(g)
		ms = append(ms, float64(time.Since(t0).Nanoseconds())/1e6)
		if !ok {
			return s
		}
		held = []leaderinv.Held{{Key: g.Key(), Job: g, Decision: &d}}
	}
	sort.Float64s(ms)
	s.keptMs, s.keptP99Ms = ms[len(ms)/2], ms[len(ms)*99/100]

	// A leader pass while the queue's head waits for room it cannot have
	// yet (it needs more memory than any node has free): the pass the
	// server ran before (the inventory rebuilt, then a scheduling pass),
	// against the kept inventory synced and the head tried on it.
	head := &placement.Job{ID: "waiting-head", Priority: 90, Datacenters: []string{"dc1"}, Pool: "default", MaxRuntime: time.Hour,
		Groups: []placement.Group{{Name: "w", Count: 1, CPU: 1000, MemoryMB: 200_000}}}
	ms = ms[:0]
	for range 5 {
		t0 := time.Now()
		free := nomad.FreeNodes(nodes, allocs, map[string]bool{})
		if plan := placement.Schedule(time.Now(), free, nil, []*placement.Job{head, gang(-1)}); len(plan.Decisions) != 1 {
			return s
		}
		ms = append(ms, float64(time.Since(t0).Nanoseconds())/1e6)
	}
	sort.Float64s(ms)
	s.passRebuiltMs = ms[len(ms)/2]
	ms = ms[:0]
	for range 50 {
		t0 := time.Now()
		inv, err := v.Sync(nil, false)
		if err != nil {
			return s
		}
		if _, ok := inv.Place(head); ok {
			return s
		}
		ms = append(ms, float64(time.Since(t0).Nanoseconds())/1e6)
	}
	sort.Float64s(ms)
	s.passKeptMs = ms[len(ms)/2]
	return s
}

// serverFigures are serverAdmission's results, in ms.
type serverFigures struct {
	rebuiltMs, keptMs, keptP99Ms, firstSyncMs float64
	passRebuiltMs, passKeptMs                 float64 // a pass while the head waits
}
