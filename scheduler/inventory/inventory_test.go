package inventory

import (
	"fmt"
	"math/rand"
	"reflect"
	"sort"
	"testing"

	"github.com/cohort-dev/cohort/scheduler/nomad"
	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/hashicorp/nomad/api"
)

// lists is a Source over Nomad's node and allocation lists, with a change
// log, computing every node's free capacity with nomad.FreeNodes.
type lists struct {
	nodes  map[string]*api.NodeListStub
	allocs map[string]*api.AllocationListStub
	gen    uint64
	log    []string
	reads  int
}

func (l *lists) all() ([]*api.NodeListStub, []*api.AllocationListStub) {
	var ns []*api.NodeListStub
	for _, n := range l.nodes {
		ns = append(ns, n)
	}
	var as []*api.AllocationListStub
	for _, a := range l.allocs {
		as = append(as, a)
	}
	return ns, as
}

func (l *lists) Inventory(skip map[string]bool) ([]placement.Node, error) {
	l.reads++
	ns, as := l.all()
	return nomad.FreeNodes(ns, as, skip), nil
}

func (l *lists) Changed(since nomad.Cursor, nodes, jobs []string, skip func(string) bool) (map[string]placement.Node, nomad.Cursor, bool) {
	now := nomad.Cursor{Gen: l.gen, Seq: uint64(len(l.log))}
	if since.Gen != l.gen || since.Seq > now.Seq {
		return nil, now, true
	}
	ids := append(append([]string(nil), l.log[since.Seq:]...), nodes...)
	for _, a := range l.allocs {
		for _, k := range jobs {
			if placement.Key(a.Namespace, a.JobID) == k {
				ids = append(ids, a.NodeID)
			}
		}
	}
	out := map[string]placement.Node{}
	for _, id := range ids {
		out[id] = placement.Node{}
		n := l.nodes[id]
		if n == nil {
			continue
		}
		var as []*api.AllocationListStub
		sk := map[string]bool{}
		for _, a := range l.allocs {
			if a.NodeID == id {
				as = append(as, a)
				k := placement.Key(a.Namespace, a.JobID)
				sk[k] = skip(k)
			}
		}
		if f := nomad.FreeNodes([]*api.NodeListStub{n}, as, sk); len(f) == 1 {
			out[id] = f[0]
		}
	}
	return out, now, false
}

func stub(id string, cpu, mem int64, gpus int) *api.NodeListStub {
	n := &api.NodeListStub{ID: id, Datacenter: "dc1", NodePool: "default", Status: "ready", SchedulingEligibility: "eligible",
		NodeResources: &api.NodeResources{Cpu: api.NodeCpuResources{CpuShares: cpu}, Memory: api.NodeMemoryResources{MemoryMB: mem}}}
	if gpus > 0 {
		d := &api.NodeDeviceResource{Vendor: "nvidia", Type: "gpu", Name: "H100"}
		for i := 0; i < gpus; i++ {
			d.Instances = append(d.Instances, &api.NodeDevice{ID: fmt.Sprint("g", i), Healthy: true})
		}
		n.NodeResources.Devices = []*api.NodeDeviceResource{d}
	}
	return n
}

func alloc(id, job, node string, cpu, mem int64) *api.AllocationListStub {
	return &api.AllocationListStub{ID: id, JobID: job, NodeID: node, ClientStatus: "running", DesiredStatus: "run",
		AllocatedResources: &api.AllocatedResources{Tasks: map[string]*api.AllocatedTaskResources{
			"t": {Cpu: api.AllocatedCpuResources{CpuShares: cpu}, Memory: api.AllocatedMemoryResources{MemoryMB: mem}},
		}}}
}

func sorted(ns []placement.Node) []placement.Node {
	sort.Slice(ns, func(a, b int) bool { return ns[a].ID < ns[b].ID })
	for i := range ns {
		if len(ns[i].Devices) == 0 {
			ns[i].Devices = nil
		}
	}
	return ns
}

// TestViewMatchesRebuild drives a View through random sequences of what
// happens to a leader's inventory: Nomad's nodes come, change and go,
// other jobs' allocations start and end, gangs are admitted (placed into
// the View's own inventory, then held), reserved anew, and end, with
// their allocations in Nomad outliving them. After every step the View
// must equal the inventory rebuilt from scratch, node for node, and place
// the next gang as the rebuilt one would; it must not have read the whole
// inventory again but when the source's log said so.
func TestViewMatchesRebuild(t *testing.T) {
	r := rand.New(rand.NewSource(11))
	for iter := 0; iter < 40; iter++ {
		l := &lists{nodes: map[string]*api.NodeListStub{}, allocs: map[string]*api.AllocationListStub{}, gen: 1}
		for i := 0; i < 1+r.Intn(12); i++ {
			l.nodes[fmt.Sprint("n", i)] = stub(fmt.Sprint("n", i), 4000, 8192, r.Intn(3))
		}
		v := New(l)
		type gang struct {
			job *placement.Job
			d   *placement.Decision
		}
		holding := map[string]gang{}
		synced := map[string]*placement.Decision{} // as of the last Sync
		// sync gives the View every holding, or (at random) only those
		// changed since the last Sync, as the server does from the
		// state's log.
		sync := func() (*placement.Inventory, error) {
			var hs []Held
			complete := r.Intn(2) == 0
			for k, g := range holding {
				if !complete && synced[k] == g.d {
					continue
				}
				h := Held{Key: k, Decision: g.d}
				if !v.Knows(k, g.d) {
					h.Job = g.job
				}
				hs = append(hs, h)
			}
			for k := range synced {
				if _, ok := holding[k]; !ok && !complete {
					hs = append(hs, Held{Key: k})
				}
			}
			synced = map[string]*placement.Decision{}
			for k, g := range holding {
				synced[k] = g.d
			}
			return v.Sync(hs, complete)
		}
		seq := 0
		for step := 0; step < 80; step++ {
			seq++
			node := fmt.Sprint("n", r.Intn(16))
			readsBefore := l.reads
			op := r.Intn(9)
			switch op {
			case 0: // a node joins or changes
				l.nodes[node] = stub(node, int64(2000*(1+r.Intn(3))), 8192, r.Intn(3))
				l.log = append(l.log, node)
			case 1: // a node leaves or drains
				if n := l.nodes[node]; n != nil && r.Intn(2) == 0 {
					c := *n
					c.Drain = true
					l.nodes[node] = &c
				} else {
					delete(l.nodes, node)
				}
				l.log = append(l.log, node)
			case 2: // another job's allocation starts
				id := fmt.Sprint("a", seq)
				l.allocs[id] = alloc(id, fmt.Sprint("other", r.Intn(3)), node, 500, 1024)
				l.log = append(l.log, node)
			case 3: // an allocation ends
				for id, a := range l.allocs {
					c := *a
					c.ClientStatus = "complete"
					l.allocs[id] = &c
					l.log = append(l.log, a.NodeID)
					break
				}
			case 4: // a gang ends; its allocations in Nomad live on
				for k := range holding {
					delete(holding, k)
					break
				}
			case 5: // a gang's allocations start on its reserved nodes (or,
				// left from an earlier attempt, anywhere)
				for k, g := range holding {
					for i, w := range g.d.Workers {
						id := fmt.Sprintf("%s-%d-%d", k, seq, i)
						on := w.Node
						if r.Intn(3) == 0 {
							on = node
						}
						l.allocs[id] = alloc(id, k, on, int64(g.job.Groups[0].CPU), int64(g.job.Groups[0].MemoryMB))
						l.log = append(l.log, on)
					}
					break
				}
			case 6: // the source's log restarts: the View reads all
				l.gen++
				l.log = nil
			default: // a gang is admitted into the View, then held
				inv, err := sync()
				if err != nil {
					t.Fatal(err)
				}
				key := fmt.Sprint("g", r.Intn(6))
				if _, ok := holding[key]; ok {
					break
				}
				j := &placement.Job{ID: key, Groups: []placement.Group{{Name: "w", Count: 1 + r.Intn(4), CPU: 500 * (1 + r.Intn(3)), MemoryMB: 1024 * (1 + r.Intn(3))}}}
				if r.Intn(4) == 0 {
					j.Groups[0].Devices = map[string]int{"gpu": 1}
				}
				if d, ok := inv.Place(j); ok {
					holding[key] = gang{j, &d}
					v.Placed(key, j, &d)
					synced[key] = &d // the View holds it now
					// Sometimes it ends before the View syncs again.
					if r.Intn(4) == 0 {
						delete(holding, key)
					}
				}
			}
			inv, err := sync()
			if err != nil {
				t.Fatal(err)
			}
			if step > 0 && op != 6 && l.reads != readsBefore {
				t.Fatalf("iter %d step %d: read the whole inventory with the log intact", iter, step)
			}
			skip := map[string]bool{}
			var run []placement.Running
			for k, g := range holding {
				skip[k] = true
				run = append(run, placement.Running{Job: g.job, Decision: *g.d})
			}
			ns, as := l.all()
			want := sorted(placement.Subtract(nomad.FreeNodes(ns, as, skip), run))
			if got := sorted(inv.Nodes()); !reflect.DeepEqual(got, want) {
				t.Fatalf("iter %d step %d: kept\n%+v\nrebuilt\n%+v", iter, step, got, want)
			}
			probe := &placement.Job{ID: "probe", Groups: []placement.Group{{Name: "w", Count: 1 + r.Intn(5), CPU: 500, MemoryMB: 1024}}}
			dk, okk := inv.Place(probe)
			dw, okw := placement.Place(want, probe)
			if okk != okw || !reflect.DeepEqual(dk, dw) {
				t.Fatalf("iter %d step %d: kept placed %v %+v, rebuilt %v %+v", iter, step, okk, dk, okw, dw)
			}
			if okk {
				inv.Release(probe, dk)
			}
		}
	}
}

// TestViewNeedsNewSpecs: a holding the View does not know, sent without
// its spec, is an error, and the View reads all at the next Sync.
func TestViewNeedsNewSpecs(t *testing.T) {
	l := &lists{nodes: map[string]*api.NodeListStub{"n0": stub("n0", 4000, 8192, 0)}, allocs: map[string]*api.AllocationListStub{}, gen: 1}
	v := New(l)
	if _, err := v.Sync(nil, true); err != nil {
		t.Fatal(err)
	}
	d := &placement.Decision{Job: "g", Workers: []placement.Worker{{Group: "w", Node: "n0"}}}
	if _, err := v.Sync([]Held{{Key: "g", Decision: d}}, false); err == nil {
		t.Fatal("a new holding without its spec was taken")
	}
	job := &placement.Job{ID: "g", Groups: []placement.Group{{Name: "w", Count: 1, CPU: 1000, MemoryMB: 1024}}}
	inv, err := v.Sync([]Held{{Key: "g", Job: job, Decision: d}}, false)
	if err != nil {
		t.Fatal(err)
	}
	if ns := inv.Nodes(); len(ns) != 1 || ns[0].CPU != 3000 || ns[0].MemoryMB != 7168 || l.reads != 2 {
		t.Fatalf("after the refused holding: %+v, %d whole reads", ns, l.reads)
	}
}

// TestViewOverNomadCopy drives a View from nomad's own event-fed copy
// (the one the server reads): random node and allocation events, nodes
// moving between datacenters and pools, gangs holding and letting go,
// their allocations anywhere. After every step the View must equal the
// copy's whole inventory less what the gangs hold.
func TestViewOverNomadCopy(t *testing.T) {
	r := rand.New(rand.NewSource(13))
	for iter := 0; iter < 30; iter++ {
		cp := nomad.NewCopy(nil, nil)
		v := New(cp)
		index := uint64(1)
		event := func(topic api.Topic, typ, key string, obj any) {
			index++
			if err := cp.Apply(&api.Event{Topic: topic, Type: typ, Index: index, Payload: map[string]any{key: obj}}); err != nil {
				t.Fatal(err)
			}
		}
		type gang struct {
			job *placement.Job
			d   *placement.Decision
		}
		holding := map[string]gang{}
		synced := map[string]*placement.Decision{}
		allocs := map[string]*api.Allocation{}
		for step := 0; step < 120; step++ {
			node := fmt.Sprint("n", r.Intn(10))
			switch op := r.Intn(8); op {
			case 0, 1:
				s := stub(node, int64(2000*(1+r.Intn(3))), 8192, r.Intn(2))
				s.Datacenter, s.NodePool = []string{"dc1", "dc2"}[r.Intn(2)], []string{"default", "gpu"}[r.Intn(2)]
				typ := "NodeRegistration"
				switch r.Intn(5) {
				case 0:
					typ = "NodeDeregistration"
				case 1:
					s.SchedulingEligibility = "ineligible"
				}
				event(api.TopicNode, typ, "Node", &api.Node{ID: s.ID, Datacenter: s.Datacenter, NodePool: s.NodePool, Status: s.Status,
					SchedulingEligibility: s.SchedulingEligibility, NodeResources: s.NodeResources, ModifyIndex: index + 1})
			case 2, 3:
				job := fmt.Sprint("other", r.Intn(3))
				if r.Intn(2) == 0 {
					job = fmt.Sprint("g", r.Intn(4)) // a gang's, from any run
				}
				a := alloc(fmt.Sprint("a", step), job, node, 500, 1024)
				full := &api.Allocation{ID: a.ID, JobID: a.JobID, NodeID: a.NodeID, ClientStatus: a.ClientStatus,
					DesiredStatus: a.DesiredStatus, AllocatedResources: a.AllocatedResources, ModifyIndex: index + 1}
				allocs[a.ID] = full
				event(api.TopicAllocation, "AllocationUpdated", "Allocation", full)
			case 4:
				for _, a := range allocs {
					c := *a
					c.ClientStatus, c.ModifyIndex = "complete", index+1
					allocs[a.ID] = &c
					event(api.TopicAllocation, "AllocationUpdated", "Allocation", &c)
					break
				}
			case 5:
				for k := range holding {
					delete(holding, k)
					break
				}
			default:
				inv, err := v.Sync(nil, false)
				if err != nil {
					t.Fatal(err)
				}
				key := fmt.Sprint("g", r.Intn(4))
				if _, ok := holding[key]; ok {
					break
				}
				j := &placement.Job{ID: key, Datacenters: []string{"*"}, Groups: []placement.Group{{Name: "w", Count: 1 + r.Intn(4), CPU: 500, MemoryMB: 1024}}}
				if d, ok := inv.Place(j); ok {
					holding[key] = gang{j, &d}
					v.Placed(key, j, &d)
					synced[key] = &d
				}
			}
			var hs []Held
			for k, g := range holding {
				if synced[k] != g.d {
					hs = append(hs, Held{Key: k, Job: g.job, Decision: g.d})
				}
			}
			for k := range synced {
				if _, ok := holding[k]; !ok {
					hs = append(hs, Held{Key: k})
				}
			}
			synced = map[string]*placement.Decision{}
			for k, g := range holding {
				synced[k] = g.d
			}
			inv, err := v.Sync(hs, false)
			if err != nil {
				t.Fatal(err)
			}
			skip := map[string]bool{}
			var run []placement.Running
			for k, g := range holding {
				skip[k] = true
				run = append(run, placement.Running{Job: g.job, Decision: *g.d})
			}
			whole, _ := cp.Inventory(skip)
			want := sorted(placement.Subtract(whole, run))
			if got := sorted(inv.Nodes()); !reflect.DeepEqual(got, want) {
				t.Fatalf("iter %d step %d: kept\n%+v\nwhole\n%+v", iter, step, got, want)
			}
		}
	}
}
