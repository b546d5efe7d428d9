package jobspec

import (
	"bytes"
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/nomad/api"
)

var testBarrier = &BarrierTask{Source: "http://10.0.0.1:4747/v1/barrier-task/cohort-barrier.tar.gz", Checksum: "sha256:00", Servers: []string{"http://10.0.0.2:4747", "http://10.0.0.1:4747"}}

func specJob(driver string) *api.Job {
	return ToNomad(&Job{Name: "j", Priority: 50, Datacenters: []string{"*"}, NodePool: "default", MaxRuntime: time.Minute, GangTimeout: 45 * time.Second,
		Groups: []*Group{{Name: "w", Count: 2, Address: "j-w", Driver: driver, Resources: Resources{CPU: 100, MemoryMB: 128}, Program: Program{Path: "/bin/true"}}}})
}

// What `cohort plan` makes is a normalized gang; a raw_exec one gains the
// barrier task, and normalizing again changes nothing.
func TestNormalizeIsIdempotent(t *testing.T) {
	for _, driver := range []string{DriverMicroVM, DriverRawExec, DriverExec} {
		out, notes, err := Normalize(specJob(driver), testBarrier)
		if err != nil || len(notes) != 0 {
			t.Fatalf("%s: %v %q", driver, err, notes)
		}
		tasks := out.TaskGroups[0].Tasks
		if driver == DriverMicroVM {
			if len(tasks) != 1 {
				t.Errorf("microvm gained tasks: %+v", tasks)
			}
		} else {
			bt := tasks[0]
			wantDriver := DriverRawExec
			if driver == DriverExec {
				wantDriver = DriverExec
			}
			if len(tasks) != 2 || bt.Name != BarrierTaskName || bt.Lifecycle.Hook != "prestart" || bt.Lifecycle.Sidecar || bt.Driver != wantDriver ||
				bt.Env[EnvServers] != "http://10.0.0.1:4747,http://10.0.0.2:4747" || bt.Env[EnvGangTimeout] != "45s" ||
				bt.Artifacts[0].GetterOptions["checksum"] != "sha256:00" {
				t.Errorf("%s barrier task: %+v", driver, bt)
			}
		}
		again, notes, err := Normalize(out, testBarrier)
		if err != nil || len(notes) != 0 || len(again.TaskGroups[0].Tasks) != len(tasks) {
			t.Errorf("%s: normalizing twice: %v %q", driver, err, notes)
		}
	}
}

// A hand-written job with only the gang meta becomes a gang, and every
// change is noted; the input is left as it was.
func TestNormalizeHandWritten(t *testing.T) {
	in := &api.Job{ID: ptr("hand"), Meta: map[string]string{MetaGang: "1", MetaMaxRuntime: "1m"},
		TaskGroups: []*api.TaskGroup{{Name: ptr("g"), Count: ptr(3),
			Networks: []*api.NetworkResource{{DynamicPorts: []api.Port{{Label: "rpc"}}}},
			Tasks: []*api.Task{{Name: "t", Driver: "docker", Env: map[string]string{"COHORT_RANK": "7"},
				Services: []*api.Service{{Name: "hand-g"}}}}}}}
	out, notes, err := Normalize(in, testBarrier)
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(notes, "\n")
	for _, want := range []string{"restarts turned off", "rescheduling turned off", `COHORT_RANK="7" replaced`, "tag w${NOMAD_ALLOC_INDEX} added"} {
		if !strings.Contains(joined, want) {
			t.Errorf("notes lack %q:\n%s", want, joined)
		}
	}
	tg := out.TaskGroups[0]
	if *out.Type != "batch" || *tg.RestartPolicy.Attempts != 0 || *tg.ReschedulePolicy.Attempts != 0 || tg.Tasks[0].Driver != DriverRawExec {
		t.Errorf("normalized: type %s restart %+v tasks %+v", *out.Type, tg.RestartPolicy, tg.Tasks)
	}
	if in.Type != nil || in.TaskGroups[0].RestartPolicy != nil || in.TaskGroups[0].Tasks[0].Env["COHORT_RANK"] != "7" {
		t.Error("Normalize changed its input")
	}
	// A service of another name gets the worker's own beside it, on the
	// group's first port.
	in.TaskGroups[0].Tasks[0].Services[0].Name = "other"
	out, _, _ = Normalize(in, testBarrier)
	if s := out.TaskGroups[0].Tasks[1].Services; len(s) != 2 || s[1].Name != "hand-g" || s[1].PortLabel != "rpc" {
		t.Errorf("services: %+v", s)
	}
}

// Jobs that cannot be gangs are refused, each with what to change.
func TestNormalizeRefusals(t *testing.T) {
	mod := func(f func(*api.Job)) *api.Job { j := specJob(DriverMicroVM); f(j); return j }
	for _, c := range []struct {
		job     *api.Job
		barrier *BarrierTask
		want    string
	}{
		{mod(func(j *api.Job) { j.Type = ptr("service") }), nil, `set type = "batch"`},
		{mod(func(j *api.Job) { j.Periodic = &api.PeriodicConfig{} }), nil, "remove the periodic"},
		{mod(func(j *api.Job) { delete(j.Meta, MetaMaxRuntime) }), nil, "maximum runtime"},
		{mod(func(j *api.Job) { j.ID = ptr("a b") }), nil, "space or a slash"},
		{mod(func(j *api.Job) { j.ID = ptr(strings.Repeat("x", 129)) }), nil, "at most 128"},
		{mod(func(j *api.Job) { j.ID = ptr("bell\a") }), nil, "unprintable"},
		{mod(func(j *api.Job) { j.Namespace = ptr("no/slash") }), nil, "not a valid Nomad namespace"},
		{mod(func(j *api.Job) { j.Meta = nil }), nil, "not a cohort gang"},
		{mod(func(j *api.Job) { j.TaskGroups[0].Tasks = nil }), nil, "has no task"},
		{mod(func(j *api.Job) {
			j.TaskGroups[0].Tasks = append(j.TaskGroups[0].Tasks, &api.Task{Name: "log-shipper"})
		}), nil, "put each in a group of its own"},
		{mod(func(j *api.Job) { j.TaskGroups[0].Tasks[0].Lifecycle = &api.TaskLifecycle{Hook: "prestart"} }), nil, "remove its lifecycle block"},
		{specJob(DriverRawExec), nil, "no barrier task to add"},
		{mod(func(j *api.Job) {
			j.TaskGroups[0].Tasks[0].Resources.Devices = []*api.RequestedDevice{{Name: "gpu", Constraints: []*api.Constraint{{LTarget: "${device.attr.memory}", Operand: "version", RTarget: ">= 1"}}}}
		}), nil, `device constraint operator "version" is not supported`},
		{mod(func(j *api.Job) {
			j.TaskGroups[0].Tasks[0].Resources.Devices = []*api.RequestedDevice{{Name: "gpu", Constraints: []*api.Constraint{{LTarget: "${device.attr.memory}", Operand: ">", RTarget: "${device.attr.bar1}"}}}}
		}), nil, `is not a literal`},
	} {
		_, _, err := Normalize(c.job, c.barrier)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error saying %q", *c.job.ID, err, c.want)
		}
	}
}

// A group holds what Nomad counts: the larger of its prestart tasks and
// its main tasks, plus prestart sidecars.
func TestGroupResources(t *testing.T) {
	out, _, _ := Normalize(specJob(DriverRawExec), testBarrier)
	cpu, mem, _ := GroupResources(out.TaskGroups[0])
	if cpu != 100 || mem != 128 {
		t.Errorf("with the barrier task: %d MHz %d MiB, want the worker's 100 and 128", cpu, mem)
	}
	tg := &api.TaskGroup{Tasks: []*api.Task{
		{Resources: &api.Resources{CPU: ptr(300), MemoryMB: ptr(64)}, Lifecycle: &api.TaskLifecycle{Hook: "prestart"}},
		{Resources: &api.Resources{CPU: ptr(100), MemoryMB: ptr(256)}},
		{Resources: &api.Resources{CPU: ptr(10), MemoryMB: ptr(10)}, Lifecycle: &api.TaskLifecycle{Hook: "prestart", Sidecar: true}},
	}}
	if cpu, mem, _ := GroupResources(tg); cpu != 310 || mem != 266 {
		t.Errorf("mixed lifecycles: %d MHz %d MiB, want 310 and 266", cpu, mem)
	}
	// The Connect proxies Nomad injects count as prestart sidecars, with
	// Nomad's resources unless the sidecar task sets its own; a native
	// service gets none. Their drivers are the group's too.
	tg.Services = []*api.Service{
		{Name: "a", Connect: &api.ConsulConnect{SidecarService: &api.ConsulSidecarService{}}},
		{Name: "b", Connect: &api.ConsulConnect{SidecarService: &api.ConsulSidecarService{},
			SidecarTask: &api.SidecarTask{Driver: "exec", Resources: &api.Resources{CPU: ptr(50)}}}},
		{Name: "c", Connect: &api.ConsulConnect{Native: true}},
	}
	if cpu, mem, _ := GroupResources(tg); cpu != 310+250+50 || mem != 266+128+300 {
		t.Errorf("with two Connect proxies: %d MHz %d MiB, want %d and %d", cpu, mem, 310+250+50, 266+128+300)
	}
	tg.Tasks[0].Driver, tg.Tasks[1].Driver = "raw_exec", "raw_exec"
	if d := TaskDrivers(tg); !reflect.DeepEqual(d, []string{"docker", "exec", "raw_exec"}) {
		t.Errorf("the group's drivers with two Connect proxies: %v", d)
	}
}

// FuzzNormalize feeds arbitrary Nomad jobs (as API JSON) to Normalize: it
// must not crash, must leave its input alone, and a job it accepts must be
// normalized for good: normalizing the result again changes nothing.
func FuzzNormalize(f *testing.F) {
	for _, d := range []string{DriverMicroVM, DriverRawExec, "docker"} {
		b, _ := json.Marshal(specJob(d))
		f.Add(b)
	}
	f.Add([]byte(`{"ID":"hand","Meta":{"cohort.gang":"1","cohort.max_runtime":"1m"},"TaskGroups":[{"Name":"g","Count":3,"Tasks":[{"Name":"t","Driver":"exec","Env":{"COHORT_RANK":"9"}}]}]}`))
	f.Add([]byte(`{"ID":"x","Type":"batch","Meta":{"cohort.gang":"1","cohort.max_runtime":"5s","cohort.gang_timeout":"-1s"}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var job api.Job
		if json.Unmarshal(b, &job) != nil {
			return
		}
		before, _ := json.Marshal(&job)
		out, _, err := Normalize(&job, testBarrier)
		after, _ := json.Marshal(&job)
		if !bytes.Equal(before, after) {
			t.Fatalf("Normalize changed its input")
		}
		if err != nil {
			return
		}
		again, notes, err := Normalize(out, testBarrier)
		if err != nil || len(notes) != 0 {
			t.Fatalf("normalizing a normalized job: %v %q", err, notes)
		}
		x, _ := json.Marshal(out)
		y, _ := json.Marshal(again)
		if !bytes.Equal(x, y) {
			t.Fatalf("normalizing twice differs:\n%s\n%s", x, y)
		}
	})
}

// A barrier token's variable is the job's own, where Nomad can hold it.
func TestBarrierTokenPath(t *testing.T) {
	for _, c := range []struct{ job, want string }{
		{"sort", "nomad/jobs/sort"},
		{"a-b_c~1", "nomad/jobs/a-b_c~1"},
		{"my.job", ""},                 // Nomad refuses dots
		{"a b", ""},                    // and spaces
		{"a/b", ""},                    // a slash would name a group's path
		{strings.Repeat("j", 118), ""}, // past 128 bytes
		{strings.Repeat("j", 117), "nomad/jobs/" + strings.Repeat("j", 117)}, // 128
	} {
		got, ok := BarrierTokenPath(c.job)
		if got != c.want || ok != (c.want != "") {
			t.Errorf("BarrierTokenPath(%q) = %q, %t; want %q", c.job, got, ok, c.want)
		}
	}
}
