package nomad

import (
	"reflect"
	"testing"

	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/hashicorp/nomad/api"
)

func stubNode(id, status string, cpu, mem int64, devs ...*api.NodeDeviceResource) *api.NodeListStub {
	return &api.NodeListStub{
		ID: id, Datacenter: "dc1", NodePool: "default", Status: status, SchedulingEligibility: "eligible",
		NodeResources: &api.NodeResources{
			Cpu: api.NodeCpuResources{CpuShares: cpu}, Memory: api.NodeMemoryResources{MemoryMB: mem}, Devices: devs,
		},
		ReservedResources: &api.NodeReservedResources{Cpu: api.NodeReservedCpuResources{CpuShares: 100}},
	}
}

func gpus(vendor, model string, healthy, sick int) *api.NodeDeviceResource {
	d := &api.NodeDeviceResource{Vendor: vendor, Type: "gpu", Name: model}
	for i := 0; i < healthy+sick; i++ {
		d.Instances = append(d.Instances, &api.NodeDevice{ID: model + string(rune('a'+i)), Healthy: i < healthy})
	}
	return d
}

func stubAlloc(job, node, client, desired string, cpu, mem int64, devIDs ...string) *api.AllocationListStub {
	t := &api.AllocatedTaskResources{Cpu: api.AllocatedCpuResources{CpuShares: cpu}, Memory: api.AllocatedMemoryResources{MemoryMB: mem}}
	if len(devIDs) > 0 {
		t.Devices = []*api.AllocatedDeviceResource{{Vendor: "nvidia", Type: "gpu", Name: "A100", DeviceIDs: devIDs}}
	}
	return &api.AllocationListStub{JobID: job, NodeID: node, ClientStatus: client, DesiredStatus: desired,
		AllocatedResources: &api.AllocatedResources{Tasks: map[string]*api.AllocatedTaskResources{"t": t}}}
}

func TestFreeNodes(t *testing.T) {
	nodes := []*api.NodeListStub{
		stubNode("b", "ready", 4000, 8192, gpus("nvidia", "A100", 3, 1)),
		stubNode("a", "ready", 2000, 4096),
		stubNode("down", "down", 9000, 9000),
	}
	allocs := []*api.AllocationListStub{
		stubAlloc("other", "b", "running", "run", 500, 1024, "A100a"),
		stubAlloc("other", "b", "complete", "run", 500, 1024),      // ended: holds nothing
		stubAlloc("other", "a", "running", "stop", 300, 512),       // stopping: still holds
		stubAlloc("other", "a", "complete", "stop", 300, 512),      // stopped
		stubAlloc("cohort-own", "b", "running", "run", 1000, 1000), // skipped: cohort counts it
		stubAlloc("other", "down", "running", "run", 1, 1),
	}
	got := FreeNodes(nodes, allocs, map[string]bool{"cohort-own": true})
	want := []placement.Node{
		{ID: "a", Datacenter: "dc1", Pool: "default", CPU: 1600, MemoryMB: 3584, Devices: map[string]int{}},
		{ID: "b", Datacenter: "dc1", Pool: "default", CPU: 3400, MemoryMB: 7168, Devices: map[string]int{"nvidia/gpu/A100": 2}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("FreeNodes:\n got %+v\nwant %+v", got, want)
	}
	capacity := FreeNodes(nodes, nil, nil)
	if capacity[1].CPU != 3900 || capacity[1].Devices["nvidia/gpu/A100"] != 3 {
		t.Errorf("capacity of b: %+v", capacity[1])
	}
}
