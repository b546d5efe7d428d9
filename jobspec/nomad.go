package jobspec

import (
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	"github.com/hashicorp/nomad/api"
)

// Meta keys under which the gang options travel inside a Nomad job, so that a
// job registered with Nomad directly (bypassing cohort) still carries them.
const (
	MetaGang        = "cohort.gang" // format version; its presence marks a gang
	MetaMaxRuntime  = "cohort.max_runtime"
	MetaGangTimeout = "cohort.gang_timeout"
	MetaAddress     = "cohort.address" // on each task group
	GangVersion     = "1"
)

// NodeIDAttr is Nomad's interpolation of a node's ID, which constraints
// on where workers go name.
const NodeIDAttr = "${node.unique.id}"

// TaskName is the name of the single task in every worker group.
const TaskName = "worker"

// Environment every worker sees, besides the program's own env.
const (
	EnvJob     = "COHORT_JOB"
	EnvGroup   = "COHORT_GROUP"
	EnvRank    = "COHORT_RANK"
	EnvSize    = "COHORT_SIZE"
	EnvAddress = "COHORT_ADDRESS"
	EnvConfig  = "COHORT_CONFIG"
	// EnvPeers names every worker of the gang, by group and rank: a JSON
	// list of {"Group", "Names"} in the job's group order, Names[r] being
	// the Consul name of the group's worker of rank r.
	EnvPeers = "COHORT_PEERS"
)

// Peer is one group's entry in COHORT_PEERS.
type Peer struct {
	Group string
	Names []string
}

// WorkerName is the Consul name of worker rank of the group addressed as
// address.
func WorkerName(address string, rank int) string {
	return fmt.Sprintf("w%d.%s.service.consul", rank, address)
}

// PeersEnv renders COHORT_PEERS for a gang's groups.
func PeersEnv(groups []GangGroup) string {
	ps := make([]Peer, len(groups))
	for i, g := range groups {
		ps[i] = Peer{Group: g.Name, Names: make([]string, g.Count)}
		for r := range ps[i].Names {
			ps[i].Names[r] = WorkerName(g.Address, r)
		}
	}
	b, _ := json.Marshal(ps) // strings only: it always marshals
	return string(b)
}

// ToNomad converts a parsed job into the Nomad batch job that runs it.
// Workers neither restart nor reschedule on their own: a gang whose worker
// fails is handled as a whole by the gang scheduler, never patched up one
// allocation at a time.
func ToNomad(j *Job) *api.Job {
	job := &api.Job{
		ID:          ptr(j.Name),
		Name:        ptr(j.Name),
		Type:        ptr(api.JobTypeBatch),
		Priority:    ptr(j.Priority),
		Datacenters: append([]string(nil), j.Datacenters...),
		NodePool:    ptr(j.NodePool),
		Meta: map[string]string{
			MetaGang:        GangVersion,
			MetaMaxRuntime:  j.MaxRuntime.String(),
			MetaGangTimeout: j.GangTimeout.String(),
		},
	}
	for _, g := range j.Groups {
		job.TaskGroups = append(job.TaskGroups, toTaskGroup(j, g))
	}
	return job
}

func toTaskGroup(j *Job, g *Group) *api.TaskGroup {
	tg := &api.TaskGroup{
		Name:  ptr(g.Name),
		Count: ptr(g.Count),
		Meta:  map[string]string{MetaAddress: g.Address},
		RestartPolicy: &api.RestartPolicy{
			Attempts: ptr(0),
			Mode:     ptr("fail"),
		},
		ReschedulePolicy: &api.ReschedulePolicy{
			Attempts:  ptr(0),
			Unlimited: ptr(false),
		},
	}
	if g.DistinctHosts {
		tg.Constraints = append(tg.Constraints, &api.Constraint{Operand: api.ConstraintDistinctHosts, RTarget: "true"})
	}
	if g.MaxPerNode > 0 {
		tg.Constraints = append(tg.Constraints, &api.Constraint{Operand: api.ConstraintDistinctProperty, LTarget: NodeIDAttr, RTarget: strconv.Itoa(g.MaxPerNode)})
	}
	if len(g.Ports) > 0 {
		net := &api.NetworkResource{}
		for _, p := range g.Ports {
			net.DynamicPorts = append(net.DynamicPorts, api.Port{Label: p.Label, To: p.To})
		}
		tg.Networks = []*api.NetworkResource{net}
	}

	task := &api.Task{
		Name:   TaskName,
		Driver: g.Driver,
		Config: taskConfig(g),
		Env:    taskEnv(j, g),
		Resources: &api.Resources{
			CPU:      ptr(g.Resources.CPU),
			MemoryMB: ptr(g.Resources.MemoryMB),
		},
		Meta: map[string]string{},
	}
	for _, d := range g.Resources.Devices {
		rd := &api.RequestedDevice{
			Name:  d.Name,
			Count: ptr(uint64(d.Count)),
		}
		for _, c := range d.Constraints {
			rd.Constraints = append(rd.Constraints, &api.Constraint{LTarget: c.Attribute, Operand: c.Operator, RTarget: c.Value})
		}
		task.Resources.Devices = append(task.Resources.Devices, rd)
	}
	if g.Program.Artifact != "" {
		task.Artifacts = []*api.TaskArtifact{{
			GetterSource: ptr(g.Program.Artifact),
			RelativeDest: ptr("local/"),
		}}
	}
	svc := &api.Service{
		Name:        g.Address,
		Tags:        []string{"w${NOMAD_ALLOC_INDEX}"},
		AddressMode: "auto",
		Provider:    "consul",
	}
	if g.Driver == DriverMicroVM {
		// The VM has its own address; advertise it, not the host's.
		svc.AddressMode = "driver"
	}
	if len(g.Ports) > 0 {
		svc.PortLabel = g.Ports[0].Label
	}
	task.Services = []*api.Service{svc}
	tg.Tasks = []*api.Task{task}
	return tg
}

func taskConfig(g *Group) map[string]any {
	args := append([]string{}, g.Program.Args...)
	if g.Driver == DriverMicroVM {
		return map[string]any{"program": g.Program.Path, "args": args}
	}
	return map[string]any{"command": g.Program.Path, "args": args}
}

func taskEnv(j *Job, g *Group) map[string]string {
	env := make(map[string]string, len(g.Program.Env)+6)
	for k, v := range g.Program.Env {
		env[k] = v
	}
	env[EnvJob] = j.Name
	env[EnvGroup] = g.Name
	env[EnvRank] = "${NOMAD_ALLOC_INDEX}"
	env[EnvSize] = strconv.Itoa(g.Count)
	env[EnvAddress] = g.Address
	var groups []GangGroup
	for _, o := range j.Groups {
		groups = append(groups, GangGroup{Name: o.Name, Count: o.Count, Address: o.Address})
	}
	env[EnvPeers] = PeersEnv(groups)
	if len(g.Config) > 0 {
		b, _ := json.Marshal(g.Config) // a map of strings always marshals
		env[EnvConfig] = string(b)
	}
	return env
}

// Gang is what the gang scheduler needs to know about a Nomad job.
type Gang struct {
	MaxRuntime  time.Duration
	GangTimeout time.Duration
	Groups      []GangGroup
}

// GangGroup is one worker group of a gang.
type GangGroup struct {
	Name    string
	Count   int
	Address string
}

// Size is the number of workers that must all run for the gang to run.
func (g *Gang) Size() int {
	n := 0
	for _, gg := range g.Groups {
		n += gg.Count
	}
	return n
}

// GangFromNomad reads the gang options back from a Nomad job. It returns
// (nil, nil) for a job that is not a cohort gang, and an error when the job
// claims to be one but its options are malformed.
func GangFromNomad(job *api.Job) (*Gang, error) {
	if job == nil || job.Meta[MetaGang] == "" {
		return nil, nil
	}
	if v := job.Meta[MetaGang]; v != GangVersion {
		return nil, fmt.Errorf("job meta %s=%q: this cohort understands version %s", MetaGang, v, GangVersion)
	}
	g := &Gang{GangTimeout: DefaultGangTimeout}
	var err error
	if g.MaxRuntime, err = metaDuration(job.Meta, MetaMaxRuntime, true); err != nil {
		return nil, err
	}
	if t, err := metaDuration(job.Meta, MetaGangTimeout, false); err != nil {
		return nil, err
	} else if t > 0 {
		g.GangTimeout = t
	}
	for _, tg := range job.TaskGroups {
		name := deref(tg.Name)
		count := 1
		if tg.Count != nil {
			count = *tg.Count
		}
		if count < 1 {
			return nil, fmt.Errorf("group %q: a gang group needs count >= 1, got %d", name, count)
		}
		addr := tg.Meta[MetaAddress]
		if addr == "" {
			addr = deref(job.ID) + "-" + name
		}
		g.Groups = append(g.Groups, GangGroup{Name: name, Count: count, Address: addr})
	}
	if len(g.Groups) == 0 {
		return nil, fmt.Errorf("gang job %q has no task groups", deref(job.ID))
	}
	return g, nil
}

func metaDuration(meta map[string]string, key string, required bool) (time.Duration, error) {
	s, ok := meta[key]
	if !ok {
		if required {
			return 0, fmt.Errorf("job meta %s is missing: a gang needs a maximum runtime", key)
		}
		return 0, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("job meta %s=%q: want a positive duration such as \"10m\"", key, s)
	}
	return d, nil
}

func ptr[T any](v T) *T { return &v }

func deref[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}
