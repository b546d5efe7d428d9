package placement

import (
	"fmt"
	"math/rand"
	"reflect"
	"strings"
	"testing"
	"time"
)

var t0 = time.Unix(1_700_000_000, 0)

func node(id string, cpu, mem int) Node {
	return Node{ID: id, Datacenter: "dc1", Pool: "default", CPU: cpu, MemoryMB: mem, Devices: map[string]int{}}
}

func job(id string, prio int, seq uint64, rt time.Duration, groups ...Group) *Job {
	return &Job{ID: id, Priority: prio, Seq: seq, Datacenters: []string{"dc1"}, Pool: "default", MaxRuntime: rt, Groups: groups}
}

func TestWholeOrNothing(t *testing.T) {
	nodes := []Node{node("a", 1000, 1000), node("b", 1000, 1000)}
	big := job("big", 50, 1, time.Minute, Group{Name: "w", Count: 12, CPU: 100, MemoryMB: 200}) // 10 fit
	p := Schedule(t0, nodes, nil, []*Job{big})
	if len(p.Decisions) != 0 || p.Head != "big" {
		t.Fatalf("a 12-worker gang on room for 10 was placed: %+v", p)
	}
	small := job("small", 50, 1, time.Minute, Group{Name: "w", Count: 10, CPU: 100, MemoryMB: 200})
	p = Schedule(t0, nodes, nil, []*Job{small})
	if len(p.Decisions) != 1 || len(p.Decisions[0].Workers) != 10 {
		t.Fatalf("10 workers on room for 10: %+v", p)
	}
}

func TestBestFitAndDistinctHosts(t *testing.T) {
	nodes := []Node{node("roomy", 4000, 4000), node("tight", 600, 600)}
	j := job("j", 50, 1, time.Minute, Group{Name: "w", Count: 1, CPU: 500, MemoryMB: 500})
	p := Schedule(t0, nodes, nil, []*Job{j})
	if p.Decisions[0].Workers[0].Node != "tight" {
		t.Errorf("best fit chose %s, want tight", p.Decisions[0].Workers[0].Node)
	}
	d := job("d", 50, 1, time.Minute, Group{Name: "w", Count: 3, CPU: 100, MemoryMB: 100, DistinctHosts: true})
	if p := Schedule(t0, nodes, nil, []*Job{d}); len(p.Decisions) != 0 {
		t.Errorf("3 distinct-host workers placed on 2 nodes: %+v", p.Decisions)
	}
}

// TestDeviceNames: requests by type, vendor/type and model all draw on the
// same devices, so two requests under different names cannot both count
// one node's GPUs.
func TestDeviceNames(t *testing.T) {
	n := node("gpu", 8000, 8000)
	n.Devices["nvidia/gpu/A100"] = 2
	n.Devices["amd/gpu/MI250"] = 1
	fitsOn := func(devs ...map[string]int) bool {
		j := job("j", 50, 1, time.Minute)
		for i, d := range devs {
			j.Groups = append(j.Groups, Group{Name: fmt.Sprint("g", i), Count: 1, CPU: 10, MemoryMB: 10, Devices: d})
		}
		_, ok := newInventory([]Node{n}).place(j)
		return ok
	}
	cases := []struct {
		devs []map[string]int
		want bool
	}{
		{[]map[string]int{{"gpu": 3}}, true},
		{[]map[string]int{{"gpu": 4}}, false},
		{[]map[string]int{{"nvidia/gpu": 2}, {"nvidia/gpu/A100": 1}}, false},
		{[]map[string]int{{"gpu": 2}, {"nvidia/gpu": 1}}, true}, // the AMD one serves "gpu"
		{[]map[string]int{{"gpu": 2}, {"nvidia/gpu": 2}}, false},
		{[]map[string]int{{"gpu": 1, "nvidia/gpu/A100": 2}}, true},
		{[]map[string]int{{"amd/gpu": 1, "gpu": 2}}, true},
		{[]map[string]int{{"amd/gpu": 2}}, false},
		{[]map[string]int{{"fpga": 1}}, false},
	}
	for _, c := range cases {
		if got := fitsOn(c.devs...); got != c.want {
			t.Errorf("%v on 2 A100 + 1 MI250: fits = %v, want %v", c.devs, got, c.want)
		}
	}
}

func TestConstraints(t *testing.T) {
	gpu := node("gpu", 1000, 1000)
	gpu.Devices["nvidia/gpu"] = 2
	other := node("other", 8000, 8000)
	other.Datacenter = "dc2"
	nodes := []Node{node("plain", 8000, 8000), gpu, other}
	j := job("g", 50, 1, time.Minute, Group{Name: "w", Count: 2, CPU: 100, MemoryMB: 100, Devices: map[string]int{"nvidia/gpu": 1}})
	p := Schedule(t0, nodes, nil, []*Job{j})
	if len(p.Decisions) != 1 {
		t.Fatal("gpu job not placed")
	}
	for _, w := range p.Decisions[0].Workers {
		if w.Node != "gpu" {
			t.Errorf("gpu worker on %s", w.Node)
		}
	}
	dc := job("dc", 50, 1, time.Minute, Group{Name: "w", Count: 1, CPU: 9000, MemoryMB: 100})
	dc.Datacenters = []string{"dc2"}
	if ok, why := Feasible(nodes, dc); ok || !strings.Contains(why, "the most free of 1 eligible nodes was other with 8000 MHz") {
		t.Errorf("Feasible = %v %q", ok, why)
	}
}

func TestPriorityThenFIFO(t *testing.T) {
	nodes := []Node{node("a", 1000, 1000)}
	g := Group{Name: "w", Count: 1, CPU: 1000, MemoryMB: 1000}
	first := job("first", 50, 1, time.Minute, g)
	urgent := job("urgent", 90, 2, time.Minute, g)
	p := Schedule(t0, nodes, nil, []*Job{first, urgent})
	if len(p.Decisions) != 1 || p.Decisions[0].Job != "urgent" || p.Head != "first" {
		t.Errorf("plan = %+v", p)
	}
}

// TestBackfill: a small short job may jump the blocked head; a small long
// job that would take what the head needs may not.
func TestBackfill(t *testing.T) {
	nodes := []Node{node("a", 1000, 1000), node("b", 1000, 1000)}
	holder := job("holder", 50, 0, 10*time.Minute, Group{Name: "w", Count: 1, CPU: 1000, MemoryMB: 1000})
	run := []Running{{Job: holder, Decision: Decision{Job: "holder", Workers: []Worker{{Group: "w", Index: 0, Node: "a"}}}, Ends: t0.Add(10 * time.Minute)}}
	nodes[0].CPU, nodes[0].MemoryMB = 0, 0 // held by holder
	head := job("head", 50, 1, time.Hour, Group{Name: "w", Count: 2, CPU: 1000, MemoryMB: 1000})
	short := job("short", 50, 2, 5*time.Minute, Group{Name: "w", Count: 1, CPU: 1000, MemoryMB: 1000})
	long := job("long", 50, 3, time.Hour, Group{Name: "w", Count: 1, CPU: 1000, MemoryMB: 1000})
	p := Schedule(t0, nodes, run, []*Job{head, long, short})
	if p.Head != "head" || !p.HeadStart.Equal(t0.Add(10*time.Minute)) {
		t.Fatalf("head %s at %v", p.Head, p.HeadStart)
	}
	if len(p.Decisions) != 1 || p.Decisions[0].Job != "short" {
		t.Errorf("backfilled %+v, want only short", p.Decisions)
	}
}

// The properties below run on random inventories and queues.

// sameSchedule schedules on an indexed inventory and on one that scans
// every node, fails unless both decide the same, and returns the plan.
func sameSchedule(t *testing.T, iter int, nodes []Node, running []Running, queue []*Job) Plan {
	t.Helper()
	p := schedule(t0, nodes, running, queue, true)
	if q := schedule(t0, nodes, running, queue, false); !reflect.DeepEqual(p, q) {
		t.Fatalf("iter %d: the index and the scan disagree:\nindexed %+v\nscanned %+v", iter, p, q)
	}
	return p
}

func randomCase(r *rand.Rand) ([]Node, []Running, []*Job) {
	var nodes []Node
	for i := 0; i < 1+r.Intn(12); i++ {
		n := node(fmt.Sprintf("n%02d", i), 500*(1+r.Intn(8)), 512*(1+r.Intn(8)))
		if r.Intn(4) == 0 {
			n.Devices["nvidia/gpu/A100"] = 1 + r.Intn(4)
		}
		if r.Intn(6) == 0 {
			n.Devices["amd/gpu/MI250"] = 1 + r.Intn(2)
		}
		if r.Intn(5) == 0 {
			n.Datacenter = "dc2"
		}
		// Task drivers: some nodes' unknown (any group may use them), the
		// others' a set of a few.
		sets := []string{"", DriverSet([]string{"raw_exec", "exec"}), DriverSet([]string{"microvm", "raw_exec"}), DriverSet(nil)}
		n.Drivers = sets[r.Intn(len(sets))]
		nodes = append(nodes, n)
	}
	mk := func(id string, seq uint64) *Job {
		j := job(id, 10*(1+r.Intn(5)), seq, time.Duration(1+r.Intn(60))*time.Minute)
		for g := 0; g < 1+r.Intn(3); g++ {
			grp := Group{Name: fmt.Sprintf("g%d", g), Count: 1 + r.Intn(6), CPU: 100 * (1 + r.Intn(10)), MemoryMB: 128 * (1 + r.Intn(8)), DistinctHosts: r.Intn(4) == 0}
			switch r.Intn(4) {
			case 0:
				grp.Drivers = []string{"microvm"}
			case 1:
				grp.Drivers = []string{"exec", "raw_exec"}
			}
			if r.Intn(5) == 0 {
				// Requests name devices at any level, as Nomad's do.
				names := []string{"gpu", "nvidia/gpu", "nvidia/gpu/A100", "amd/gpu"}
				grp.Devices = map[string]int{names[r.Intn(len(names))]: 1 + r.Intn(2)}
				if r.Intn(3) == 0 {
					grp.Devices[names[r.Intn(len(names))]]++
				}
			}
			j.Groups = append(j.Groups, grp)
		}
		if r.Intn(6) == 0 {
			j.Datacenters = []string{"*"}
		}
		return j
	}
	// Some jobs already run: place them for real so nodes show them.
	inv := newInventory(nodes)
	var running []Running
	for i := 0; i < r.Intn(4); i++ {
		j := mk(fmt.Sprintf("r%d", i), uint64(i))
		if d, ok := inv.place(j); ok {
			running = append(running, Running{Job: j, Decision: d, Ends: t0.Add(time.Duration(1+r.Intn(90)) * time.Minute)})
		}
	}
	var queue []*Job
	for i := 0; i < r.Intn(10); i++ {
		queue = append(queue, mk(fmt.Sprintf("q%d", i), uint64(100+i)))
	}
	return inv.nodes, running, queue
}

func TestPropertyNoOvercommitWholeGangs(t *testing.T) {
	r := rand.New(rand.NewSource(1))
	for iter := 0; iter < 3000; iter++ {
		nodes, running, queue := randomCase(r)
		p := sameSchedule(t, iter, nodes, running, queue)
		inv := newInventory(nodes)
		byID := map[string]*Job{}
		for _, j := range queue {
			byID[j.ID] = j
		}
		seen := map[string]bool{}
		for _, d := range p.Decisions {
			j := byID[d.Job]
			if j == nil || seen[d.Job] {
				t.Fatalf("iter %d: decision for unknown or repeated job %s", iter, d.Job)
			}
			seen[d.Job] = true
			if len(d.Workers) != j.Size() {
				t.Fatalf("iter %d: job %s placed %d of %d workers", iter, j.ID, len(d.Workers), j.Size())
			}
			perGroup := map[string]map[string]int{}
			for _, w := range d.Workers {
				if perGroup[w.Group] == nil {
					perGroup[w.Group] = map[string]int{}
				}
				perGroup[w.Group][w.Node]++
				n := &inv.nodes[inv.index[w.Node]]
				if !eligible(n, j) {
					t.Fatalf("iter %d: %s on ineligible node %s", iter, j.ID, w.Node)
				}
				for _, g := range j.Groups {
					if g.Name == w.Group && !hasDrivers(n, &g) {
						t.Fatalf("iter %d: %s/%s on node %s without its drivers %v (%q)", iter, j.ID, g.Name, w.Node, g.Drivers, n.Drivers)
					}
				}
			}
			for _, g := range j.Groups {
				total := 0
				for node, c := range perGroup[g.Name] {
					total += c
					if g.DistinctHosts && c > 1 {
						t.Fatalf("iter %d: %s/%s has %d workers on %s despite distinct_hosts", iter, j.ID, g.Name, c, node)
					}
				}
				if total != g.Count {
					t.Fatalf("iter %d: %s/%s has %d of %d workers", iter, j.ID, g.Name, total, g.Count)
				}
			}
			inv.applyDecision(j, d, 1)
		}
		for _, n := range inv.nodes {
			if n.CPU < 0 || n.MemoryMB < 0 {
				t.Fatalf("iter %d: node %s over-committed: %d MHz %d MiB", iter, n.ID, n.CPU, n.MemoryMB)
			}
			for dev, c := range n.Devices {
				if c < 0 {
					t.Fatalf("iter %d: node %s over-committed on %s", iter, n.ID, dev)
				}
			}
		}
	}
}

// TestPropertyBackfillNeverDelaysHead: the head's guaranteed start, computed
// with every backfilled job holding its resources to its deadline, is no
// later than it was before any backfill.
func TestPropertyBackfillNeverDelaysHead(t *testing.T) {
	r := rand.New(rand.NewSource(2))
	checked := 0
	for iter := 0; iter < 3000; iter++ {
		nodes, running, queue := randomCase(r)
		p := sameSchedule(t, iter, nodes, running, queue)
		if p.Head == "" || p.HeadStart.IsZero() {
			continue
		}
		q := append([]*Job(nil), queue...)
		Order(q)
		byID := map[string]*Job{}
		for _, j := range q {
			byID[j.ID] = j
		}
		inv := newInventory(nodes)
		run := append([]Running(nil), running...)
		for _, d := range p.Decisions {
			j := byID[d.Job]
			inv.applyDecision(j, d, 1)
			run = append(run, Running{Job: j, Decision: d, Ends: t0.Add(j.MaxRuntime)})
		}
		head := byID[p.Head]
		start, _, ok := reserve(inv, run, head)
		if !ok || start.After(p.HeadStart) {
			t.Fatalf("iter %d: backfill delayed head %s from %v to %v (ok=%v)", iter, head.ID, p.HeadStart, start, ok)
		}
		checked++
	}
	if checked < 100 {
		t.Fatalf("only %d cases had a blocked head; the generator is too easy", checked)
	}
}

// max_per_node spreads a group: best fit would pack all twelve workers on
// one node; at most four go on each.
func TestMaxPerNode(t *testing.T) {
	nodes := []Node{{ID: "a", CPU: 10000, MemoryMB: 10000}, {ID: "b", CPU: 10000, MemoryMB: 10000}, {ID: "c", CPU: 10000, MemoryMB: 10000}}
	j := &Job{ID: "sort", Groups: []Group{{Name: "s", Count: 12, CPU: 100, MemoryMB: 128, MaxPerNode: 4}}}
	d, ok := NewInventory(nodes).Place(j)
	if !ok {
		t.Fatal("did not place")
	}
	per := map[string]int{}
	for _, w := range d.Workers {
		per[w.Node]++
	}
	if per["a"] != 4 || per["b"] != 4 || per["c"] != 4 {
		t.Errorf("per node %v", per)
	}
	j.Groups[0].Count = 13
	if _, ok := NewInventory(nodes).Place(j); ok {
		t.Error("13 workers at most 4 per node on 3 nodes were placed")
	}
}

func TestDriverSet(t *testing.T) {
	set := DriverSet([]string{"raw_exec", "exec", "docker"})
	if set != ",docker,exec,raw_exec," {
		t.Fatalf("DriverSet = %q", set)
	}
	for d, want := range map[string]bool{"exec": true, "raw_exec": true, "docker": true, "raw": false, "xec": false, "dock": false, "": false, "exec,raw_exec": false} {
		if got := containsDriver(set, d); got != want {
			t.Errorf("containsDriver(%q, %q) = %v, want %v", set, d, got, want)
		}
	}
	if none := DriverSet(nil); none != "," || containsDriver(none, "exec") {
		t.Errorf("DriverSet(nil) = %q", none)
	}
}

// TestWorkersGoWhereTheirDriverIs: a worker goes only to a node where its
// task driver is healthy, though a node without it fits tighter; a gang
// whose driver no node has waits, and says so.
func TestWorkersGoWhereTheirDriverIs(t *testing.T) {
	tight := node("tight", 1000, 1024) // the best fit, without microvm
	tight.Drivers = DriverSet([]string{"raw_exec"})
	roomy := node("roomy", 8000, 8192)
	roomy.Drivers = DriverSet([]string{"microvm", "raw_exec"})
	unknown := node("unknown", 8000, 8192) // an inventory made by hand: any driver
	vm := job("vm", 50, 1, time.Minute, Group{Name: "w", Count: 2, CPU: 500, MemoryMB: 512, Drivers: []string{"microvm"}})
	d, ok := Place([]Node{tight, roomy}, vm)
	if !ok {
		t.Fatal("not placed")
	}
	for _, w := range d.Workers {
		if w.Node != "roomy" {
			t.Fatalf("a microvm worker on %s, which has no microvm driver: %+v", w.Node, d.Workers)
		}
	}
	raw := job("raw", 50, 2, time.Minute, Group{Name: "w", Count: 2, CPU: 500, MemoryMB: 512, Drivers: []string{"raw_exec"}})
	if d, ok := Place([]Node{tight, roomy}, raw); !ok || d.Workers[0].Node != "tight" {
		t.Fatalf("a raw_exec gang should take the tightest node: %+v %v", d, ok)
	}
	// Where no node has the driver, the gang does not fit, and says why;
	// it is feasible all the same (a driver may turn healthy any moment),
	// so it waits rather than being refused.
	if _, ok := Place([]Node{tight}, vm); ok {
		t.Fatal("a microvm gang placed where no node has the microvm driver")
	}
	if why := Shortfall([]Node{tight}, vm); !strings.Contains(why, "group w needs a healthy microvm driver, which no node in its datacenters and pool has (of 1 node there)") {
		t.Fatalf("why a gang whose driver no node has waits: %q", why)
	}
	if ok, why := Feasible([]Node{tight}, vm); !ok {
		t.Fatalf("a gang whose driver no node has now is refused: %q", why)
	}
	if _, ok := Place([]Node{tight, unknown}, vm); !ok {
		t.Fatal("a node whose drivers are not known takes any")
	}
}

// TestNoHeadWithoutItsDrivers: a gang no node has the drivers for is not
// the head (its start cannot be reserved, and backfill would go
// unchecked behind it); the gang after it is, and backfill protects that
// one. Shortfall names the driver that is missing, and the barrier task
// it is for.
func TestNoHeadWithoutItsDrivers(t *testing.T) {
	n := node("n1", 4000, 4096)
	n.Drivers = DriverSet([]string{"raw_exec"})
	running := job("running", 50, 0, time.Hour, Group{Name: "w", Count: 1, CPU: 3000, MemoryMB: 3000, Drivers: []string{"raw_exec"}})
	d, ok := Place([]Node{n}, running)
	if !ok {
		t.Fatal("the running gang does not fit")
	}
	free := newInventory([]Node{n})
	free.applyDecision(running, d, 1)
	nodes := free.nodes
	vm := job("vm", 90, 1, time.Hour, Group{Name: "w", Count: 1, CPU: 100, MemoryMB: 100, Drivers: []string{"microvm"}})
	big := job("big", 50, 2, time.Hour, Group{Name: "w", Count: 1, CPU: 2000, MemoryMB: 2000, Drivers: []string{"raw_exec"}})
	for _, indexed := range []bool{false, true} {
		p := schedule(t0, nodes, []Running{{Job: running, Decision: d, Ends: t0.Add(time.Hour)}}, []*Job{vm, big}, indexed)
		if p.Head != big.Key() || len(p.Decisions) != 0 {
			t.Errorf("indexed %v: head %q with %d decisions; want the gang after the microvm one as head", indexed, p.Head, len(p.Decisions))
		}
	}
	docker := job("docker", 50, 3, time.Hour, Group{Name: "w", Count: 1, CPU: 100, MemoryMB: 100, Drivers: []string{"docker", "raw_exec"}})
	bare := node("n2", 4000, 4096)
	bare.Drivers = DriverSet([]string{"docker"})
	if why := Shortfall([]Node{bare}, docker); !strings.Contains(why, "needs a healthy raw_exec driver (for cohort's barrier task)") {
		t.Errorf("a docker gang on nodes without raw_exec: %q", why)
	}
}
