package nomad

import (
	"encoding/json"
	"fmt"
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
