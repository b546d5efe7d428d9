package nomad

import (
	"encoding/json"
	"encoding/pem"
	"errors"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/tlsutil"
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
		Drivers:           map[string]*api.DriverInfo{"raw_exec": {Detected: true, Healthy: true}},
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
		{ID: "a", Datacenter: "dc1", Pool: "default", CPU: 1600, MemoryMB: 3584, Devices: map[string]int{}, Drivers: ",raw_exec,"},
		{ID: "b", Datacenter: "dc1", Pool: "default", CPU: 3400, MemoryMB: 7168, Devices: map[string]int{"nvidia/gpu/A100": 2}, Drivers: ",raw_exec,"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("FreeNodes:\n got %+v\nwant %+v", got, want)
	}
	capacity := FreeNodes(nodes, nil, nil)
	if capacity[1].CPU != 3900 || capacity[1].Devices["nvidia/gpu/A100"] != 3 {
		t.Errorf("capacity of b: %+v", capacity[1])
	}
}

// Device attributes reach placement as text with units, per kind.
func TestFreeNodesDeviceAttributes(t *testing.T) {
	d := gpus("nvidia", "H100 80GB HBM3", 2, 0)
	mem, width, mig := int64(81559), int64(16), false
	d.Attributes = map[string]*api.Attribute{
		"memory":     {IntVal: &mem, Unit: "MiB"},
		"pcie_width": {IntVal: &width},
		"mig_mode":   {BoolVal: &mig},
	}
	got := FreeNodes([]*api.NodeListStub{stubNode("g", "ready", 4000, 8192, d)}, nil, nil)
	if len(got) != 1 {
		t.Fatalf("nodes = %+v", got)
	}
	a := got[0].DeviceAttrs["nvidia/gpu/H100 80GB HBM3"]
	for k, want := range map[string]string{"memory": "81559MiB", "pcie_width": "16", "mig_mode": "false"} {
		if a[k] == nil || a[k].GoString() != want {
			t.Errorf("attribute %s = %v, want %s", k, a[k], want)
		}
	}
	if _, ok := a["memory"].GetInt(); !ok {
		t.Error("memory is no longer an integer with a unit")
	}
}

// Allocations of other versions are another attempt's; the worker's exit
// code is its main task's, not the barrier task's; a worker finished when
// its last task did.
func TestCountAllocs(t *testing.T) {
	at := time.Unix(1_700_000_000, 0)
	stubs := []*api.AllocationListStub{
		{ID: "old", JobVersion: 1, ClientStatus: "failed"},
		{ID: "a", Name: "j.w[0]", TaskGroup: "w", JobVersion: 2, ClientStatus: "complete", TaskStates: map[string]*api.TaskState{
			"cohort-barrier": {FinishedAt: at, Events: []*api.TaskEvent{{Type: api.TaskTerminated, ExitCode: 0}}},
			"worker":         {FinishedAt: at.Add(time.Second), Events: []*api.TaskEvent{{Type: api.TaskTerminated, ExitCode: 3}}},
		}},
		{ID: "b", JobVersion: 2, ClientStatus: "running", TaskStates: map[string]*api.TaskState{
			"cohort-barrier": {FinishedAt: at}, "worker": {},
		}},
	}
	a := CountAllocs(Allocs{}, 2, stubs)
	if a.Failed != 0 || a.Complete != 1 || a.Running != 1 || !a.Live["b"] || a.Live["a"] {
		t.Fatalf("counts %+v", a)
	}
	w := a.Workers[0]
	if w.ExitCode == nil || *w.ExitCode != 3 || !w.FinishedAt.Equal(at.Add(time.Second)) {
		t.Errorf("finished worker %+v", w)
	}
	if !a.Workers[1].FinishedAt.IsZero() {
		t.Errorf("a running worker has a finish time: %+v", a.Workers[1])
	}
}

// A job's allocation list carries no resources, so the devices each
// worker holds come from the event-fed copy: an adopted gang's decision
// is built from them.
func TestAllocsKnowWorkersDevices(t *testing.T) {
	// As Nomad lists a job's allocations: no resources.
	listed := []*api.AllocationListStub{
		{ID: "a1", Name: "j.w[0]", TaskGroup: "w", JobID: "j", NodeID: "n1", JobVersion: 0, ClientStatus: "running", DesiredStatus: "run"},
		{ID: "a2", Name: "j.w[1]", TaskGroup: "w", JobID: "j", NodeID: "n1", JobVersion: 0, ClientStatus: "running", DesiredStatus: "run"},
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/job/j":
			json.NewEncoder(w).Encode(api.Job{ID: ptr("j"), JobModifyIndex: ptr(uint64(7))})
		case "/v1/job/j/allocations":
			json.NewEncoder(w).Encode(listed)
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	c, err := New(Config{Address: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	a, err := c.Allocs("", "j", 0)
	if err != nil || len(a.Workers) != 2 || a.Workers[0].Devices != nil {
		t.Fatalf("without a copy: %v %+v", err, a.Workers)
	}

	// The copy knows a1 with two GPUs and a2 without its resources yet.
	withGPUs := stubAlloc("j", "n1", "running", "run", 500, 512, "GPU-0", "GPU-1")
	withGPUs.ID = "a1"
	bare := &api.AllocationListStub{ID: "a2", JobID: "j", NodeID: "n1", ClientStatus: "running", DesiredStatus: "run"}
	c.cluster = newCluster([]*api.NodeListStub{stubNode("n1", "ready", 4000, 8192, gpus("nvidia", "A100", 2, 0))}, []*api.AllocationListStub{withGPUs, bare})
	c.watching = true
	a, err = c.Allocs("", "j", 0)
	if err != nil {
		t.Fatal(err)
	}
	if got := a.Workers[0].Devices; !reflect.DeepEqual(got, map[string]int{"nvidia/gpu/A100": 2}) {
		t.Errorf("a1's devices: %v", got)
	}
	if got := a.Workers[1].Devices; got != nil {
		t.Errorf("a2's devices, unknown to the copy: %v", got)
	}
}

// Nomad refusing a job is a 4xx; a 5xx (no cluster leader, a failing
// proxy) or a rate limit is Nomad out of reach for now, and must not cost
// a gang an attempt.
func TestRefusedOnlyFor4xx(t *testing.T) {
	for _, c := range []struct {
		code    int
		refused bool
	}{{400, true}, {403, true}, {500, false}, {502, false}, {503, false}, {429, false}} {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(c.code)
			w.Write([]byte("nope"))
		}))
		cl, _ := New(Config{Address: srv.URL})
		id := "j"
		_, err := cl.Register(&api.Job{ID: &id})
		var re *RefusedError
		if err == nil || errors.As(err, &re) != c.refused {
			t.Errorf("HTTP %d: %v (refused %v, want %v)", c.code, err, errors.As(err, &re), c.refused)
		}
		srv.Close()
	}
}

// Nomad's TLS settings as its CLI reads them: a directory of CA
// certificates verifies Nomad's certificate as one file does, skipping
// verification trusts any, and neither trusts one signed by another CA.
func TestNomadTLSSettings(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok")) }))
	defer srv.Close()
	dir := t.TempDir()
	pemBytes := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	if err := os.WriteFile(filepath.Join(dir, "nomad-ca.pem"), pemBytes, 0o600); err != nil {
		t.Fatal(err)
	}
	get := func(cfg Config) error {
		tc, err := cfg.TLS()
		if err != nil {
			return err
		}
		c := &http.Client{Transport: &http.Transport{TLSClientConfig: tc}, Timeout: 5 * time.Second}
		resp, err := c.Get(srv.URL)
		if err == nil {
			resp.Body.Close()
		}
		return err
	}
	if err := get(Config{CAPath: dir}); err != nil {
		t.Errorf("a CA directory holding Nomad's CA: %v", err)
	}
	if err := get(Config{CACert: filepath.Join(dir, "nomad-ca.pem")}); err != nil {
		t.Errorf("Nomad's CA file: %v", err)
	}
	if err := get(Config{SkipVerify: true}); err != nil {
		t.Errorf("verification skipped: %v", err)
	}
	other := t.TempDir()
	otherCA, err := tlsutil.NewCA("other CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(other, "ca.pem"), otherCA.CertPEM, 0o600)
	if err := get(Config{CAPath: other}); err == nil {
		t.Error("a certificate of another CA was trusted")
	}
	ac := Config{CAPath: dir, SkipVerify: true}.apiConfig("")
	if ac.TLSConfig == nil || ac.TLSConfig.CAPath != dir || !ac.TLSConfig.Insecure {
		t.Errorf("the API client's TLS settings: %+v", ac.TLSConfig)
	}
}

// fakeVars is Nomad's variables API for one path, with check-and-set.
type fakeVars struct {
	mu        sync.Mutex
	v         *api.Variable // nil: absent
	index     uint64
	forbidden bool
	// meddle, when set, runs once before the next write is checked, as
	// a write by someone else between cohort's read and its write.
	meddle func(v *api.Variable)
}

func (f *fakeVars) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.forbidden {
		http.Error(w, "Permission denied", http.StatusForbidden)
		return
	}
	if r.Method != http.MethodGet && f.meddle != nil {
		if f.v == nil {
			f.v = &api.Variable{Path: "nomad/jobs/j", Items: map[string]string{}}
		}
		f.meddle(f.v)
		f.meddle = nil
		f.index++
		f.v.ModifyIndex = f.index
	}
	cur := uint64(0)
	if f.v != nil {
		cur = f.v.ModifyIndex
	}
	cas, _ := strconv.ParseUint(r.URL.Query().Get("cas"), 10, 64)
	switch r.Method {
	case http.MethodGet:
		if f.v == nil {
			http.Error(w, "variable not found", http.StatusNotFound)
			return
		}
		json.NewEncoder(w).Encode(f.v)
	case http.MethodPut, http.MethodDelete:
		if cas != cur {
			w.WriteHeader(http.StatusConflict)
			json.NewEncoder(w).Encode(f.v)
			return
		}
		if r.Method == http.MethodDelete {
			f.v = nil
			w.WriteHeader(http.StatusNoContent)
			return
		}
		var in api.Variable
		json.NewDecoder(r.Body).Decode(&in)
		f.index++
		in.ModifyIndex = f.index
		f.v = &in
		json.NewEncoder(w).Encode(f.v)
	}
}

func (f *fakeVars) items() map[string]string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.v == nil {
		return nil
	}
	return maps.Clone(f.v.Items)
}

// The barrier token is one item of the job's own variable: cohort keeps
// the job's other items, even one written between its read and its
// write, drops only its own run's token, and tells a refused read from an
// absent variable.
func TestBarrierTokenItem(t *testing.T) {
	f := &fakeVars{}
	srv := httptest.NewServer(f)
	defer srv.Close()
	c, err := New(Config{Address: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.PutBarrierToken("", "j", "t1"); err != nil {
		t.Fatal(err)
	}
	if got := f.items(); !reflect.DeepEqual(got, map[string]string{"cohort_barrier_token": "t1"}) {
		t.Fatalf("after the first put: %v", got)
	}
	f.meddle = func(v *api.Variable) { v.Items["theirs"] = "kept" }
	if err := c.PutBarrierToken("", "j", "t2"); err != nil {
		t.Fatal(err)
	}
	if got := f.items(); !reflect.DeepEqual(got, map[string]string{"cohort_barrier_token": "t2", "theirs": "kept"}) {
		t.Fatalf("after a put that met another write: %v", got)
	}
	if err := c.DropBarrierToken("", "j", "t1"); err != nil { // an older run's
		t.Fatal(err)
	}
	if got := f.items(); got["cohort_barrier_token"] != "t2" {
		t.Fatalf("an older run's drop took the current token: %v", got)
	}
	if err := c.DropBarrierToken("", "j", "t2"); err != nil {
		t.Fatal(err)
	}
	if got := f.items(); !reflect.DeepEqual(got, map[string]string{"theirs": "kept"}) {
		t.Fatalf("after the drop: %v", got)
	}
	f.meddle = func(v *api.Variable) { delete(v.Items, "theirs") }
	if err := c.PutBarrierToken("", "j", "t3"); err != nil {
		t.Fatal(err)
	}
	if err := c.DropBarrierToken("", "j", "t3"); err != nil {
		t.Fatal(err)
	}
	if got := f.items(); got != nil {
		t.Fatalf("a variable left with nothing in it: %v", got)
	}

	f.forbidden = true
	err = c.PutBarrierToken("", "j", "t4")
	var re *RefusedError
	if !errors.As(err, &re) || re.Status != 403 {
		t.Fatalf("a refused read: %v, want a refusal (403)", err)
	}
}
