package jobspec

import (
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/nomad/api"
)

func TestToNomad(t *testing.T) {
	job, err := ParseFile("testdata/full.hcl")
	if err != nil {
		t.Fatal(err)
	}
	nj := ToNomad(job)
	if *nj.ID != "sort" || *nj.Type != api.JobTypeBatch || *nj.Priority != 60 {
		t.Errorf("header = %s %s %d", *nj.ID, *nj.Type, *nj.Priority)
	}
	if len(nj.TaskGroups) != 2 {
		t.Fatalf("task groups = %d", len(nj.TaskGroups))
	}
	sorter := nj.TaskGroups[1]
	if *sorter.Count != 8 || sorter.Meta[MetaAddress] != "sort-sorter" {
		t.Errorf("sorter group = count %d meta %v", *sorter.Count, sorter.Meta)
	}
	if *sorter.RestartPolicy.Attempts != 0 || *sorter.ReschedulePolicy.Attempts != 0 {
		t.Error("a gang worker must neither restart nor reschedule on its own")
	}
	if len(sorter.Constraints) != 1 || sorter.Constraints[0].Operand != api.ConstraintDistinctHosts {
		t.Errorf("constraints = %+v", sorter.Constraints)
	}
	task := sorter.Tasks[0]
	if task.Driver != DriverMicroVM || task.Config["program"] != "local/sorter" {
		t.Errorf("task = %s %v", task.Driver, task.Config)
	}
	if len(task.Artifacts) != 1 || *task.Artifacts[0].GetterSource != "https://example.com/releases/sorter" {
		t.Errorf("artifacts = %+v", task.Artifacts)
	}
	if d := task.Resources.Devices; len(d) != 1 || d[0].Name != "nvidia/gpu" || *d[0].Count != 1 {
		t.Errorf("devices = %+v", d)
	}
	if task.Env[EnvRank] != "${NOMAD_ALLOC_INDEX}" || task.Env[EnvSize] != "8" {
		t.Errorf("env = %v", task.Env)
	}
	if task.Env[EnvConfig] != `{"partitions":"64","sort.buffer":"32MiB"}` {
		t.Errorf("config env = %q", task.Env[EnvConfig])
	}
	svc := task.Services[0]
	if svc.Name != "sort-sorter" || svc.AddressMode != "driver" || svc.PortLabel != "data" {
		t.Errorf("service = %+v", svc)
	}

	raw, err := ParseFile("testdata/minimal.hcl")
	if err != nil {
		t.Fatal(err)
	}
	rt := ToNomad(raw).TaskGroups[0].Tasks[0]
	if rt.Config["command"] != "/bin/echo" || rt.Services[0].AddressMode != "auto" {
		t.Errorf("raw_exec task = %v %+v", rt.Config, rt.Services[0])
	}
}

func TestGangRoundTrip(t *testing.T) {
	job, err := ParseFile("testdata/full.hcl")
	if err != nil {
		t.Fatal(err)
	}
	g, err := GangFromNomad(ToNomad(job))
	if err != nil {
		t.Fatal(err)
	}
	want := &Gang{
		MaxRuntime:  10 * time.Minute,
		GangTimeout: 45 * time.Second,
		Groups: []GangGroup{
			{Name: "coordinator", Count: 1, Address: "sort-coord"},
			{Name: "sorter", Count: 8, Address: "sort-sorter"},
		},
	}
	if !reflect.DeepEqual(g, want) {
		t.Errorf("gang = %+v, want %+v", g, want)
	}
	if g.Size() != 9 {
		t.Errorf("size = %d", g.Size())
	}
}

func TestGangFromNomadErrors(t *testing.T) {
	plain := &api.Job{ID: ptr("web")}
	if g, err := GangFromNomad(plain); g != nil || err != nil {
		t.Errorf("plain job: %v %v, want nil nil", g, err)
	}
	cases := map[string]map[string]string{
		"version":     {MetaGang: "9", MetaMaxRuntime: "1m"},
		"no runtime":  {MetaGang: "1"},
		"bad runtime": {MetaGang: "1", MetaMaxRuntime: "soon"},
		"neg timeout": {MetaGang: "1", MetaMaxRuntime: "1m", MetaGangTimeout: "-1s"},
	}
	for name, meta := range cases {
		j := &api.Job{ID: ptr("x"), Meta: meta, TaskGroups: []*api.TaskGroup{{Name: ptr("g")}}}
		if _, err := GangFromNomad(j); err == nil {
			t.Errorf("%s: want error", name)
		}
	}
	j := &api.Job{ID: ptr("x"), Meta: map[string]string{MetaGang: "1", MetaMaxRuntime: "1m"},
		TaskGroups: []*api.TaskGroup{{Name: ptr("g"), Count: ptr(0)}}}
	if _, err := GangFromNomad(j); err == nil || !strings.Contains(err.Error(), "count >= 1") {
		t.Errorf("zero count: %v", err)
	}
}

func TestFormatNomadHCL(t *testing.T) {
	job, err := ParseFile("testdata/full.hcl")
	if err != nil {
		t.Fatal(err)
	}
	out := string(FormatNomadHCL(ToNomad(job)))
	for _, want := range []string{
		`job "sort" {`,
		`"cohort.max_runtime"`,
		`group "sorter" {`,
		`COHORT_RANK`,
		`"$${NOMAD_ALLOC_INDEX}"`,
		`device "nvidia/gpu" {`,
		`operator = "distinct_hosts"`,
		`address_mode = "driver"`,
		`source      = "https://example.com/releases/sorter"`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}
