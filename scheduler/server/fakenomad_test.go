package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"strings"
	"sync"
	"time"

	"github.com/cohort-dev/cohort/jobspec"
	"github.com/cohort-dev/cohort/scheduler/nomad"
	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/hashicorp/go-hclog"
	nomadapi "github.com/hashicorp/nomad/api"
)

// fakeNomad is an in-memory Nomad for the leader loop's tests: it keeps
// registered jobs with their versions, and allocations the test moves
// through their states by hand. It records every call.
type fakeNomad struct {
	mu    sync.Mutex
	nodes []placement.Node
	// inventoryReads counts whole reads of the inventory.
	inventoryReads int
	jobs           map[string]*fakeJob // by placement key
	index          uint64
	seq            int

	// refuse, when set, makes Register answer as Nomad refusing the job;
	// unreachable makes every call fail as if Nomad were down.
	refuse       string
	unreachable  bool
	registerDown bool // only Register fails as if Nomad were down
	// registerGate, when set, holds Register until it is closed.
	registerGate chan struct{}

	calls []string // "register ns/id", "stop ns/id", ...

	// listWithoutResources lists allocations without their resources,
	// as a job's allocation list does where the event-fed copy does not
	// know them yet.
	listWithoutResources bool

	// vars are the Nomad variables written, by namespace and path.
	vars map[string]map[string]string

	// acl, when set, is the ACL system: tokens and what each may do.
	// Without it ACLs are off.
	acl map[string]fakeToken
}

// fakeToken is what one ACL token may do.
type fakeToken struct {
	management   bool
	submit, read map[string]bool // by namespace
	nodes        bool
	mount        map[string]bool // host volumes it may mount
}

func (f *fakeNomad) token(t string) (fakeToken, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("acl %s", t)
	if f.acl == nil {
		return fakeToken{management: true}, true
	}
	tok, ok := f.acl[t]
	return tok, ok
}

func (f *fakeNomad) CanSubmit(t string, job *nomadapi.Job) error {
	tok, _ := f.token(t)
	if tok.management || tok.submit[nomadNS(deref(job.Namespace))] {
		return nil
	}
	return fmt.Errorf("%w: submit-job on %s", nomad.ErrDenied, nomadNS(deref(job.Namespace)))
}

func (f *fakeNomad) CanMount(t string, job *nomadapi.Job) error {
	tok, _ := f.token(t)
	if tok.management {
		return nil
	}
	for _, tg := range job.TaskGroups {
		for _, v := range tg.Volumes {
			if !tok.mount[v.Source] {
				return fmt.Errorf("%w: host_volume %q", nomad.ErrDenied, v.Source)
			}
		}
	}
	return nil
}

func (f *fakeNomad) CanReadJob(t, ns string) error {
	tok, _ := f.token(t)
	if tok.management || tok.read[nomadNS(ns)] || tok.submit[nomadNS(ns)] {
		return nil
	}
	return fmt.Errorf("%w: read-job on %s", nomad.ErrDenied, nomadNS(ns))
}

func (f *fakeNomad) CanReadNodes(t string) error {
	if tok, _ := f.token(t); tok.management || tok.nodes {
		return nil
	}
	return fmt.Errorf("%w: node read", nomad.ErrDenied)
}

func (f *fakeNomad) IsManagement(t string) error {
	if tok, _ := f.token(t); tok.management {
		return nil
	}
	return fmt.Errorf("%w: management", nomad.ErrDenied)
}

func (f *fakeNomad) ACLsEnabled() (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.acl != nil, nil
}

type fakeJob struct {
	versions []*nomadapi.Job // index = version
	allocs   []*nomadapi.AllocationListStub
}

func newFakeNomad(nodes ...placement.Node) *fakeNomad {
	return &fakeNomad{nodes: nodes, jobs: map[string]*fakeJob{}}
}

func (f *fakeNomad) record(format string, args ...any) {
	f.calls = append(f.calls, fmt.Sprintf(format, args...))
}

// count is how many recorded calls start with prefix.
func (f *fakeNomad) count(prefix string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, c := range f.calls {
		if strings.HasPrefix(c, prefix) {
			n++
		}
	}
	return n
}

var errDown = errors.New("dial tcp 127.0.0.1:4646: connect: connection refused")

func (f *fakeNomad) Watch(ctx context.Context, _ hclog.Logger) { <-ctx.Done() }

func (f *fakeNomad) Inventory(skip map[string]bool) ([]placement.Node, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.inventoryReads++
	if f.unreachable {
		return nil, errDown
	}
	out := make([]placement.Node, len(f.nodes))
	copy(out, f.nodes)
	return out, nil
}

// Changed follows Inventory: the fake's nodes never change and carry no
// allocations, so after a whole read it reports only the nodes asked
// for. An unreachable Nomad asks for a whole read, which then fails.
func (f *fakeNomad) Changed(since nomad.Cursor, nodes, jobs []string, _ func(string) bool) (map[string]placement.Node, nomad.Cursor, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	cur := nomad.Cursor{Gen: 1}
	if f.unreachable || since != cur {
		return nil, cur, true
	}
	out := map[string]placement.Node{}
	for _, id := range nodes {
		out[id] = placement.Node{}
		for _, n := range f.nodes {
			if n.ID == id {
				c := n
				c.Devices = maps.Clone(n.Devices)
				out[id] = c
			}
		}
	}
	return out, cur, false
}

func (f *fakeNomad) Capacity() ([]placement.Node, error) { return f.Inventory(nil) }

func (f *fakeNomad) GangJobs() []nomad.GangJob {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []nomad.GangJob
	for _, j := range f.jobs {
		cur := j.versions[len(j.versions)-1]
		if cur.Meta[jobspec.MetaGang] == "" {
			continue
		}
		out = append(out, nomad.GangJob{Namespace: deref(cur.Namespace), ID: *cur.ID, Stop: deref(cur.Stop), JobModifyIndex: *cur.JobModifyIndex})
	}
	return out
}

func (f *fakeNomad) Validate(job *nomadapi.Job) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.unreachable {
		return errDown
	}
	return nil
}

func keyOf(job *nomadapi.Job) string {
	ns := deref(job.Namespace)
	if ns == "default" {
		ns = ""
	}
	return placement.Key(ns, *job.ID)
}

func (f *fakeNomad) Register(job *nomadapi.Job) (nomad.Registration, error) {
	f.mu.Lock()
	gate := f.registerGate
	f.mu.Unlock()
	if gate != nil {
		<-gate
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("register %s", keyOf(job))
	if f.unreachable || f.registerDown {
		return nomad.Registration{}, errDown
	}
	if f.refuse != "" {
		return nomad.Registration{}, &nomad.RefusedError{Status: 400, Err: errors.New(f.refuse)}
	}
	reg := f.put(job)
	f.place(keyOf(job))
	return reg, nil
}

// put stores a new version of a job.
func (f *fakeNomad) put(job *nomadapi.Job) nomad.Registration {
	b, _ := json.Marshal(job)
	var cp nomadapi.Job
	json.Unmarshal(b, &cp)
	key := keyOf(&cp)
	j := f.jobs[key]
	if j == nil {
		j = &fakeJob{}
		f.jobs[key] = j
	}
	f.index++
	v := uint64(len(j.versions))
	cp.Version, cp.JobModifyIndex, cp.Stop, cp.Status = &v, &f.index, ptrTo(false), ptrTo("running")
	j.versions = append(j.versions, &cp)
	return nomad.Registration{Index: f.index, Version: v}
}

// place makes the allocations of a job's latest version, pending, on the
// node each group's constraint names.
func (f *fakeNomad) place(key string) {
	j := f.jobs[key]
	cur := j.versions[len(j.versions)-1]
	for _, tg := range cur.TaskGroups {
		nodes := []string{""}
		for _, c := range tg.Constraints {
			if c.LTarget == "${node.unique.id}" && (c.Operand == "=" || c.Operand == nomadapi.ConstraintSetContainsAny) {
				nodes = strings.Split(c.RTarget, ",")
			}
		}
		for i := 0; i < deref(tg.Count); i++ {
			f.seq++
			j.allocs = append(j.allocs, &nomadapi.AllocationListStub{
				ID:         fmt.Sprintf("%08d-0000-4000-8000-%012d", f.seq, f.seq),
				Name:       fmt.Sprintf("%s.%s[%d]", *cur.ID, *tg.Name, i),
				Namespace:  deref(cur.Namespace),
				JobID:      *cur.ID,
				TaskGroup:  *tg.Name,
				NodeID:     nodes[i%len(nodes)],
				NodeName:   "name-" + nodes[i%len(nodes)],
				JobVersion: *cur.Version, ClientStatus: "pending", DesiredStatus: "run",
			})
		}
	}
}

// adopt stores a job registered with Nomad directly and places it.
func (f *fakeNomad) adopt(job *nomadapi.Job) nomad.Registration {
	f.mu.Lock()
	defer f.mu.Unlock()
	reg := f.put(job)
	f.place(keyOf(job))
	return reg
}

func (f *fakeNomad) Job(ns, id string) (*nomadapi.Job, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.unreachable {
		return nil, errDown
	}
	j := f.jobs[placement.Key(ns, id)]
	if j == nil {
		return nil, fmt.Errorf("%w: %s", nomad.ErrNoJob, id)
	}
	b, _ := json.Marshal(j.versions[len(j.versions)-1])
	var cp nomadapi.Job
	json.Unmarshal(b, &cp)
	return &cp, nil
}

func (f *fakeNomad) Allocs(ns, id string, version uint64) (nomad.Allocs, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("allocs %s", placement.Key(ns, id))
	a := nomad.Allocs{Live: map[string]bool{}}
	if f.unreachable {
		return a, errDown
	}
	j := f.jobs[placement.Key(ns, id)]
	if j == nil {
		a.Missing = true
		return a, nil
	}
	cur := j.versions[len(j.versions)-1]
	a.Stopped, a.JobModifyIndex = deref(cur.Stop), *cur.JobModifyIndex
	stubs := j.allocs
	if f.listWithoutResources {
		stubs = nil
		for _, s := range j.allocs {
			cp := *s
			cp.AllocatedResources = nil
			stubs = append(stubs, &cp)
		}
	}
	return nomad.CountAllocs(a, version, stubs), nil
}

func (f *fakeNomad) AllocIndex(ns, id string) uint64 { return 0 }

func (f *fakeNomad) AllocDevices(ns, id string) (map[string]int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("alloc devices %s", id)
	for _, j := range f.jobs {
		for _, a := range j.allocs {
			if a.ID == id {
				if a.AllocatedResources == nil {
					return nil, nil
				}
				devs := map[string]int{}
				for _, t := range a.AllocatedResources.Tasks {
					for _, d := range t.Devices {
						devs[d.Vendor+"/"+d.Type+"/"+d.Name] += len(d.DeviceIDs)
					}
				}
				return devs, nil
			}
		}
	}
	return nil, fmt.Errorf("no allocation %s", id)
}

func (f *fakeNomad) PutBarrierToken(ns, id, token string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("put barrier token %s %s", ns, id)
	if f.unreachable {
		return errDown
	}
	if f.vars == nil {
		f.vars = map[string]map[string]string{}
	}
	path, _ := jobspec.BarrierTokenPath(id)
	if f.vars[ns+" "+path] == nil {
		f.vars[ns+" "+path] = map[string]string{}
	}
	f.vars[ns+" "+path][jobspec.BarrierTokenItem] = token
	return nil
}

func (f *fakeNomad) DropBarrierToken(ns, id, token string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("drop barrier token %s %s", ns, id)
	if f.unreachable {
		return errDown
	}
	path, _ := jobspec.BarrierTokenPath(id)
	if f.vars[ns+" "+path][jobspec.BarrierTokenItem] != token {
		return nil
	}
	delete(f.vars[ns+" "+path], jobspec.BarrierTokenItem)
	if len(f.vars[ns+" "+path]) == 0 {
		delete(f.vars, ns+" "+path)
	}
	return nil
}

// variable is one variable's items as last written.
func (f *fakeNomad) variable(ns, path string) map[string]string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return maps.Clone(f.vars[ns+" "+path])
}

func (f *fakeNomad) Stop(ns, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	key := placement.Key(ns, id)
	f.record("stop %s", key)
	if f.unreachable {
		return errDown
	}
	j := f.jobs[key]
	if j == nil {
		return nil
	}
	cur := *j.versions[len(j.versions)-1]
	if deref(cur.Stop) {
		return nil
	}
	f.index++
	v := uint64(len(j.versions))
	cur.Version, cur.JobModifyIndex, cur.Stop, cur.Status = &v, ptrTo(f.index), ptrTo(true), ptrTo("dead")
	j.versions = append(j.versions, &cur)
	for _, a := range j.allocs {
		a.DesiredStatus = "stop"
		if a.ClientStatus == "pending" || a.ClientStatus == "running" {
			a.ClientStatus = "complete"
		}
	}
	return nil
}

// live lists the pending or running allocations of a job's latest
// registration that placed any.
func (f *fakeNomad) live(key string) []*nomadapi.AllocationListStub {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []*nomadapi.AllocationListStub
	if j := f.jobs[key]; j != nil {
		for _, a := range j.allocs {
			if a.ClientStatus == "pending" || a.ClientStatus == "running" {
				out = append(out, a)
			}
		}
	}
	return out
}

// set moves an allocation to a client status; a finished one gets its
// main task's exit code and finish time.
func (f *fakeNomad) set(a *nomadapi.AllocationListStub, status string, exit int, at time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	a.ClientStatus = status
	a.ModifyIndex++
	if status == "complete" || status == "failed" {
		a.TaskStates = map[string]*nomadapi.TaskState{
			"worker": {State: "dead", FinishedAt: at, Events: []*nomadapi.TaskEvent{{Type: nomadapi.TaskTerminated, ExitCode: exit}}},
		}
	}
}

// latest is the latest version of a job as Nomad holds it.
func (f *fakeNomad) latest(key string) *nomadapi.Job {
	f.mu.Lock()
	defer f.mu.Unlock()
	if j := f.jobs[key]; j != nil {
		return j.versions[len(j.versions)-1]
	}
	return nil
}

func (f *fakeNomad) set2(fn func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn()
}

func ptrTo[T any](v T) *T { return &v }
