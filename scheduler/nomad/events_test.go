package nomad

import (
	"encoding/json"
	"fmt"
	"math/rand"
	"reflect"
	"sort"
	"testing"

	"github.com/hashicorp/nomad/api"
)

// event is what the stream delivers for v (an *api.Node or
// *api.Allocation): its JSON payload, decoded as the API client decodes
// it.
func event(t testing.TB, typ string, index uint64, v any) *api.Event {
	t.Helper()
	e := &api.Event{Type: typ, Index: index}
	var key string
	switch v.(type) {
	case *api.Node:
		e.Topic, key = api.TopicNode, "Node"
	case *api.Allocation:
		e.Topic, key = api.TopicAllocation, "Allocation"
	}
	b, err := json.Marshal(map[string]any{key: v})
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &e.Payload); err != nil {
		t.Fatal(err)
	}
	return e
}

func fullNode(s *api.NodeListStub) *api.Node {
	return &api.Node{ID: s.ID, Datacenter: s.Datacenter, NodePool: s.NodePool, Status: s.Status,
		SchedulingEligibility: s.SchedulingEligibility, NodeResources: s.NodeResources,
		ReservedResources: s.ReservedResources, ModifyIndex: s.ModifyIndex}
}

func fullAlloc(s *api.AllocationListStub) *api.Allocation {
	return &api.Allocation{ID: s.ID, Namespace: s.Namespace, JobID: s.JobID, NodeID: s.NodeID,
		ClientStatus: s.ClientStatus, DesiredStatus: s.DesiredStatus, AllocatedResources: s.AllocatedResources,
		ModifyIndex: s.ModifyIndex}
}

func free(c *cluster) []string {
	n, a := c.lists()
	var out []string
	for _, f := range FreeNodes(n, a, nil) {
		out = append(out, fmt.Sprintf("%s %d %d %v", f.ID, f.CPU, f.MemoryMB, f.Devices))
	}
	sort.Strings(out)
	return out
}

// TestEventsKeepTheCopy: the copy that events keep gives the inventory
// that reading both lists again would give, after allocations are placed,
// finish and are replayed out of order, and nodes come, change and go.
func TestEventsKeepTheCopy(t *testing.T) {
	n1 := stubNode("n1", "ready", 4000, 8192)
	n1.ModifyIndex = 10
	a1 := stubAlloc("j", "n1", "running", "run", 1000, 1024)
	a1.ID, a1.ModifyIndex = "a1", 11
	c := newCluster([]*api.NodeListStub{n1}, []*api.AllocationListStub{a1})
	want := func(step string, lines ...string) {
		t.Helper()
		if got := free(c); !reflect.DeepEqual(got, lines) {
			t.Fatalf("%s: inventory %q, want %q", step, got, lines)
		}
	}
	apply := func(e *api.Event) bool {
		t.Helper()
		changed, err := c.apply(e)
		if err != nil {
			t.Fatal(err)
		}
		return changed
	}
	want("listed", "n1 2900 7168 map[]")

	// A new allocation, then its end; a replay of its start (older)
	// changes nothing.
	a2 := stubAlloc("k", "n1", "running", "run", 500, 512)
	a2.ID, a2.ModifyIndex = "a2", 12
	apply(event(t, "AllocationUpdated", 12, fullAlloc(a2)))
	want("placed", "n1 2400 6656 map[]")
	done := *a2
	done.ClientStatus, done.ModifyIndex = "complete", 13
	apply(event(t, "AllocationUpdated", 13, fullAlloc(&done)))
	want("finished", "n1 2900 7168 map[]")
	if apply(event(t, "AllocationUpdated", 12, fullAlloc(a2))) {
		t.Error("a replayed, older allocation event was applied")
	}
	want("replayed", "n1 2900 7168 map[]")

	// An event that leaves the resources out keeps what the list said.
	stopping := *a1
	stopping.AllocatedResources, stopping.DesiredStatus, stopping.ModifyIndex = nil, "stop", 14
	apply(event(t, "AllocationUpdateDesiredStatus", 14, fullAlloc(&stopping)))
	want("stopping, still running", "n1 2900 7168 map[]")

	// A node joins; one drains; one leaves.
	g := gpus("nvidia", "A100", 2, 0)
	width := int64(16)
	g.Attributes = map[string]*api.Attribute{"pcie_link_width": {IntVal: &width}}
	n2 := stubNode("n2", "ready", 2000, 4096, g)
	n2.ModifyIndex = 15
	apply(event(t, "NodeRegistration", 15, fullNode(n2)))
	want("joined", "n1 2900 7168 map[]", "n2 1900 4096 map[nvidia/gpu/A100:2]")
	// Device attributes come through (constraints on them depend on it).
	nl, _ := c.lists()
	for _, f := range FreeNodes(nl, nil, nil) {
		if f.ID == "n2" {
			if a := f.DeviceAttrs["nvidia/gpu/A100"]["pcie_link_width"]; a == nil || a.Int == nil || *a.Int != 16 {
				t.Errorf("a device attribute from an event: %+v", a)
			}
		}
	}
	drained := *n2
	drained.SchedulingEligibility, drained.ModifyIndex = "ineligible", 16
	apply(event(t, "NodeDrain", 16, fullNode(&drained)))
	want("drained", "n1 2900 7168 map[]")
	apply(event(t, "NodeDeregistration", 17, fullNode(n1)))
	want("left")
	if idx := c.jobIndex["k"]; idx != 13 {
		t.Errorf("job k's allocation marker = %d, want 13", idx)
	}
	if c.allocs["a1"].JobVersion != 0 || c.unsure {
		t.Fatalf("version %d, unsure %v", c.allocs["a1"].JobVersion, c.unsure)
	}

	// Events carry no job: the listed version stays.
	c.allocs["a1"].JobVersion = 4
	again := stopping
	again.ModifyIndex = 18
	apply(event(t, "AllocationUpdated", 18, fullAlloc(&again)))
	if v := c.allocs["a1"].JobVersion; v != 4 {
		t.Errorf("job version after an event = %d, want the listed 4", v)
	}
	// A running allocation first seen without its resources: the copy
	// cannot count it, and asks for the lists again.
	blind := stubAlloc("m", "n2", "running", "run", 0, 0)
	blind.ID, blind.ModifyIndex, blind.AllocatedResources = "a3", 19, nil
	apply(event(t, "AllocationUpdated", 19, fullAlloc(blind)))
	if !c.unsure {
		t.Error("an allocation without resources was taken as counted")
	}
}

// BenchmarkChange is the cost of one allocation change at 50,000 nodes
// and 200,000 allocations: applying its event to the copy, against
// decoding the whole allocation list again as the watcher did before.
// Building the inventory afterwards (FreeNodes) is the same either way.
func BenchmarkChange(b *testing.B) {
	const nodes, allocs = 50_000, 200_000
	ns := make([]*api.NodeListStub, nodes)
	for i := range ns {
		ns[i] = stubNode(fmt.Sprintf("node-%05d", i), "ready", 32000, 131072)
	}
	as := make([]*api.AllocationListStub, allocs)
	for i := range as {
		as[i] = stubAlloc(fmt.Sprintf("job-%d", i/8), ns[i%nodes].ID, "running", "run", 1000, 2048)
		as[i].ID, as[i].ModifyIndex = fmt.Sprintf("alloc-%06d", i), uint64(i+1)
	}
	listJSON, err := json.Marshal(as)
	if err != nil {
		b.Fatal(err)
	}
	c := newCluster(ns, as)
	changed := fullAlloc(as[0])
	changed.ClientStatus = "complete"
	b.Run("event", func(b *testing.B) {
		i := uint64(allocs)
		for b.Loop() {
			i++
			changed.ModifyIndex = i
			e := event(b, "AllocationUpdated", i, changed)
			if _, err := c.apply(e); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("relist", func(b *testing.B) {
		for b.Loop() {
			var got []*api.AllocationListStub
			if err := json.Unmarshal(listJSON, &got); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// TestChangedFollowsTheCopy applies random node and allocation events to
// a copy and checks, after each, what a reader kept by Changed relies on:
// every node whose free capacity moved is in the change log since the
// reader's cursor, and one node's free capacity computed from its own
// allocations, with any set of jobs left out, is what FreeNodes computes
// from both lists whole.
func TestChangedFollowsTheCopy(t *testing.T) {
	r := rand.New(rand.NewSource(5))
	for iter := 0; iter < 30; iter++ {
		var ns []*api.NodeListStub
		for i := 0; i < 1+r.Intn(6); i++ {
			ns = append(ns, stubNode(fmt.Sprintf("n%d", i), "ready", 4000, 8192))
		}
		c := newCluster(ns, nil)
		byID := func(skip map[string]bool) map[string]string {
			nl, al := c.lists()
			out := map[string]string{}
			for _, f := range FreeNodes(nl, al, skip) {
				out[f.ID] = fmt.Sprintf("%+v", f)
			}
			return out
		}
		_, cur, _ := c.changes(Cursor{})
		index := uint64(100)
		allocs := map[string]*api.AllocationListStub{}
		for step := 0; step < 60; step++ {
			before := byID(nil)
			index++
			node := fmt.Sprintf("n%d", r.Intn(8))
			switch op := r.Intn(6); {
			case op == 0:
				n := stubNode(node, []string{"ready", "ready", "down"}[r.Intn(3)], int64(2000*(1+r.Intn(3))), 8192)
				n.ModifyIndex = index
				typ := "NodeRegistration"
				if r.Intn(4) == 0 {
					typ = "NodeDeregistration"
				}
				if _, err := c.apply(event(t, typ, index, fullNode(n))); err != nil {
					t.Fatal(err)
				}
			case op < 4 || len(allocs) == 0:
				a := stubAlloc(fmt.Sprintf("job%d", r.Intn(4)), node, "running", "run", 500, 512)
				a.ID, a.ModifyIndex = fmt.Sprintf("a%d", step), index
				allocs[a.ID] = a
				if _, err := c.apply(event(t, "AllocationUpdated", index, fullAlloc(a))); err != nil {
					t.Fatal(err)
				}
			default:
				var a *api.AllocationListStub
				for _, x := range allocs {
					a = x
					break
				}
				ended := *a
				ended.ClientStatus, ended.DesiredStatus, ended.ModifyIndex = []string{"complete", "running", "failed"}[r.Intn(3)], "stop", index
				if _, err := c.apply(event(t, "AllocationUpdated", index, fullAlloc(&ended))); err != nil {
					t.Fatal(err)
				}
			}
			after := byID(nil)
			changed, next, all := c.changes(cur)
			if all {
				t.Fatalf("iter %d step %d: the log restarted under a reader one event behind", iter, step)
			}
			in := map[string]bool{}
			for _, id := range changed {
				in[id] = true
			}
			for id := range mergeKeys(before, after) {
				if before[id] != after[id] && !in[id] {
					t.Fatalf("iter %d step %d: node %s changed (%s → %s) but is not in the log %v", iter, step, id, before[id], after[id], changed)
				}
			}
			cur = next
			skip := map[string]bool{}
			for j := 0; j < 4; j++ {
				if r.Intn(2) == 0 {
					skip[fmt.Sprintf("job%d", j)] = true
				}
			}
			whole := byID(skip)
			for i := 0; i < 8; i++ {
				id := fmt.Sprintf("n%d", i)
				pn, ok := c.free(id, func(k string) bool { return skip[k] })
				got := ""
				if ok {
					got = fmt.Sprintf("%+v", pn)
				}
				if got != whole[id] {
					t.Fatalf("iter %d step %d: node %s alone %q, from the lists %q", iter, step, id, got, whole[id])
				}
			}
			for j := 0; j < 4; j++ {
				k := fmt.Sprintf("job%d", j)
				want := map[string]bool{}
				for _, a := range c.allocs {
					if a.JobID == k {
						want[a.NodeID] = true
					}
				}
				got := map[string]bool{}
				for id := range c.jobNodes[k] {
					got[id] = true
				}
				if !reflect.DeepEqual(got, want) && len(got)+len(want) > 0 {
					t.Fatalf("iter %d step %d: job %s on %v, its allocations on %v", iter, step, k, got, want)
				}
			}
		}
	}
}

func mergeKeys(a, b map[string]string) map[string]bool {
	out := map[string]bool{}
	for k := range a {
		out[k] = true
	}
	for k := range b {
		out[k] = true
	}
	return out
}

// TestChangeLogRestarts: a log grown past the cluster's size starts over
// under a new generation, and a reader behind it is told to read all.
func TestChangeLogRestarts(t *testing.T) {
	c := newCluster([]*api.NodeListStub{stubNode("n1", "ready", 4000, 8192)}, nil)
	_, cur, _ := c.changes(Cursor{})
	for i := 0; i < 2000; i++ {
		n := stubNode("n1", "ready", int64(4000+i), 8192)
		n.ModifyIndex = uint64(i + 1)
		if _, err := c.apply(event(t, "NodeUpdate", n.ModifyIndex, fullNode(n))); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, all := c.changes(cur); !all {
		t.Fatal("a reader 2,000 changes behind on a one-node cluster was not told to read all")
	}
	if len(c.changed) > 1025 {
		t.Fatalf("the log holds %d entries for one node", len(c.changed))
	}
	_, now, _ := c.changes(Cursor{})
	if got, _, all := c.changes(now); all || len(got) != 0 {
		t.Fatalf("a current reader: %v, all %v", got, all)
	}
}

// TestNodesKnowTheirDrivers: a node's task drivers are those Nomad would
// place a task of on it, detected and healthy, from the node list and from
// a node's event alike.
func TestNodesKnowTheirDrivers(t *testing.T) {
	drivers := map[string]*api.DriverInfo{
		"raw_exec": {Detected: true, Healthy: true},
		"exec":     {Detected: true, Healthy: true},
		"microvm":  {Detected: true, Healthy: false, HealthDescription: "no /dev/kvm"},
		"docker":   {Detected: false},
	}
	listed := stubNode("n1", "ready", 4000, 4096)
	listed.Drivers = drivers
	if got := FreeNodes([]*api.NodeListStub{listed}, nil, nil); len(got) != 1 || got[0].Drivers != ",exec,raw_exec," {
		t.Fatalf("from the node list: %+v", got)
	}
	cp := NewCopy(nil, nil)
	n := &api.Node{ID: "n2", Datacenter: "dc1", NodePool: "default", Status: "ready", SchedulingEligibility: "eligible",
		NodeResources: &api.NodeResources{Cpu: api.NodeCpuResources{CpuShares: 4000}, Memory: api.NodeMemoryResources{MemoryMB: 4096}},
		Drivers:       drivers, ModifyIndex: 2}
	if err := cp.Apply(event(t, "NodeRegistration", 2, n)); err != nil {
		t.Fatal(err)
	}
	inv, err := cp.Inventory(nil)
	if err != nil || len(inv) != 1 || inv[0].Drivers != ",exec,raw_exec," {
		t.Fatalf("from a node's event: %v %+v", err, inv)
	}
	// A node that lists no drivers (registered before their first
	// fingerprint) has none: Nomad places nothing there.
	bare := stubNode("n3", "ready", 4000, 4096)
	bare.Drivers = nil
	if got := FreeNodes([]*api.NodeListStub{bare}, nil, nil); len(got) != 1 || got[0].Drivers != "," {
		t.Fatalf("a node listing no drivers: %+v", got)
	}
	// Its microvm driver turns healthy.
	drivers["microvm"] = &api.DriverInfo{Detected: true, Healthy: true}
	n.ModifyIndex = 3
	if err := cp.Apply(event(t, "NodeRegistration", 3, n)); err != nil {
		t.Fatal(err)
	}
	if inv, _ := cp.Inventory(nil); len(inv) != 1 || inv[0].Drivers != ",exec,microvm,raw_exec," {
		t.Fatalf("after the driver turned healthy: %+v", inv)
	}
}
