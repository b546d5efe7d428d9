// Package nomad is the gang scheduler's edge to a Nomad cluster: the
// inventory of nodes with what every allocation (cohort's or not) leaves
// free, registering a reserved gang pinned to its nodes, watching its
// allocations and stopping it.
package nomad

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/hashicorp/nomad/api"
)

// Client wraps the Nomad API.
type Client struct {
	api *api.Client

	mu     sync.Mutex
	nodes  []*api.NodeListStub
	allocs []*api.AllocationListStub
	// jobIndex is, per job, the highest ModifyIndex among its
	// allocations in allocs: it moves whenever one of them changes.
	jobIndex map[string]uint64
	// watching is set while Watch keeps nodes and allocs current.
	watching bool
}

// New connects to Nomad at addr ("" means $NOMAD_ADDR or the default).
func New(addr string) (*Client, error) {
	cfg := api.DefaultConfig()
	if addr != "" {
		cfg.Address = addr
	}
	c, err := api.NewClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("nomad client: %w", err)
	}
	return &Client{api: c}, nil
}

// resources asks list endpoints for each entry's resources.
var resources = map[string]string{"resources": "true"}

// snapshot returns the node and allocation lists: the watcher's, or read
// now.
func (c *Client) snapshot() ([]*api.NodeListStub, []*api.AllocationListStub, error) {
	c.mu.Lock()
	if c.watching && c.nodes != nil && c.allocs != nil {
		n, a := c.nodes, c.allocs
		c.mu.Unlock()
		return n, a, nil
	}
	c.mu.Unlock()
	nodes, _, err := c.api.Nodes().List(&api.QueryOptions{Params: resources})
	if err != nil {
		return nil, nil, fmt.Errorf("listing nodes: %w", err)
	}
	allocs, _, err := c.api.Allocations().List(&api.QueryOptions{Params: resources, Namespace: "*"})
	if err != nil {
		return nil, nil, fmt.Errorf("listing allocations: %w", err)
	}
	return nodes, allocs, nil
}

// Watch keeps the node and allocation lists current with Nomad's blocking
// queries until ctx ends, so a scheduling pass reads its inventory from
// memory instead of asking Nomad for every node.
func (c *Client) Watch(ctx context.Context, log hclog.Logger) {
	c.mu.Lock()
	c.watching = true
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.watching, c.nodes, c.allocs, c.jobIndex = false, nil, nil, nil
		c.mu.Unlock()
	}()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		follow(ctx, log.Named("nodes"), func(q *api.QueryOptions) (uint64, error) {
			q.Params = resources
			ns, meta, err := c.api.Nodes().List(q.WithContext(ctx))
			if err != nil {
				return 0, err
			}
			c.mu.Lock()
			c.nodes = ns
			c.mu.Unlock()
			return meta.LastIndex, nil
		})
	}()
	go func() {
		defer wg.Done()
		follow(ctx, log.Named("allocations"), func(q *api.QueryOptions) (uint64, error) {
			q.Params, q.Namespace = resources, "*"
			as, meta, err := c.api.Allocations().List(q.WithContext(ctx))
			if err != nil {
				return 0, err
			}
			idx := make(map[string]uint64, len(as))
			for _, a := range as {
				idx[a.JobID] = max(idx[a.JobID], a.ModifyIndex)
			}
			c.mu.Lock()
			c.allocs, c.jobIndex = as, idx
			c.mu.Unlock()
			return meta.LastIndex, nil
		})
	}()
	wg.Wait()
}

// follow repeats a blocking query from the last index it saw.
func follow(ctx context.Context, log hclog.Logger, query func(*api.QueryOptions) (uint64, error)) {
	var index uint64
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		next, err := query(&api.QueryOptions{WaitIndex: index, WaitTime: 5 * time.Minute})
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			log.Warn("blocking query failed; retrying", "error", err, "in", backoff)
			select {
			case <-ctx.Done():
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 5*time.Second)
			continue
		}
		backoff = 100 * time.Millisecond
		if next < index {
			next = 0 // the index went back (a new cluster): start over
		}
		index = next
	}
}

// Inventory lists ready, eligible nodes with their free capacity: total
// minus the node's reserved share minus every non-terminal allocation,
// except those of the jobs in skip (cohort's own, which the scheduler
// accounts for from its reservations, placed or not yet). It reads the
// watcher's cache when Watch runs, and asks Nomad otherwise.
func (c *Client) Inventory(skip map[string]bool) ([]placement.Node, error) {
	nodes, allocs, err := c.snapshot()
	if err != nil {
		return nil, err
	}
	return FreeNodes(nodes, allocs, skip), nil
}

// Capacity lists ready, eligible nodes as if no allocation ran on them:
// what a job can at most ever get.
func (c *Client) Capacity() ([]placement.Node, error) {
	nodes, _, err := c.snapshot()
	if err != nil {
		return nil, err
	}
	return FreeNodes(nodes, nil, nil), nil
}

// FreeNodes computes the inventory from Nomad's node and allocation lists
// (both read with resources=true). Devices are counted per kind,
// "vendor/type/model", whatever name requests use for them.
func FreeNodes(nodes []*api.NodeListStub, allocs []*api.AllocationListStub, skip map[string]bool) []placement.Node {
	idx := map[string]int{}
	var out []placement.Node
	for _, n := range nodes {
		if n.Status != "ready" || n.Drain || n.SchedulingEligibility != "eligible" {
			continue
		}
		pn := placement.Node{ID: n.ID, Datacenter: n.Datacenter, Pool: n.NodePool, Devices: map[string]int{}}
		if r := n.NodeResources; r != nil {
			pn.CPU = int(r.Cpu.CpuShares)
			pn.MemoryMB = int(r.Memory.MemoryMB)
			for _, d := range r.Devices {
				healthy := 0
				for _, inst := range d.Instances {
					if inst.Healthy {
						healthy++
					}
				}
				pn.Devices[deviceKind(d.Vendor, d.Type, d.Name)] += healthy
			}
		}
		if r := n.ReservedResources; r != nil {
			pn.CPU -= int(r.Cpu.CpuShares)
			pn.MemoryMB -= int(r.Memory.MemoryMB)
		}
		idx[n.ID] = len(out)
		out = append(out, pn)
	}
	for _, a := range allocs {
		i, ok := idx[a.NodeID]
		if !ok || skip[a.JobID] || a.AllocatedResources == nil || terminal(a) {
			continue
		}
		pn := &out[i]
		for _, t := range a.AllocatedResources.Tasks {
			pn.CPU -= int(t.Cpu.CpuShares)
			pn.MemoryMB -= int(t.Memory.MemoryMB)
			for _, d := range t.Devices {
				pn.Devices[deviceKind(d.Vendor, d.Type, d.Name)] -= len(d.DeviceIDs)
			}
		}
	}
	sort.Slice(out, func(a, b int) bool { return out[a].ID < out[b].ID })
	return out
}

// terminal says whether an allocation no longer holds its resources.
func terminal(a *api.AllocationListStub) bool {
	switch a.DesiredStatus {
	case "stop", "evict":
		return a.ClientStatus != "running" && a.ClientStatus != "pending"
	}
	switch a.ClientStatus {
	case "complete", "failed", "lost":
		return true
	}
	return false
}

// deviceKind names a kind of device as placement counts it.
func deviceKind(vendor, typ, model string) string { return vendor + "/" + typ + "/" + model }

// Register submits a reserved gang to Nomad with each group pinned to the
// nodes its workers were reserved on, so Nomad places them inside the
// reservation or not at all.
func (c *Client) Register(job *api.Job, d *placement.Decision) error {
	nodes := map[string]map[string]bool{}
	for _, w := range d.Workers {
		if nodes[w.Group] == nil {
			nodes[w.Group] = map[string]bool{}
		}
		nodes[w.Group][w.Node] = true
	}
	for _, tg := range job.TaskGroups {
		set := nodes[*tg.Name]
		if len(set) == 0 {
			return fmt.Errorf("group %s has no reserved nodes", *tg.Name)
		}
		ids := make([]string, 0, len(set))
		for id := range set {
			ids = append(ids, id)
		}
		sort.Strings(ids)
		tg.Constraints = append(tg.Constraints, &api.Constraint{
			LTarget: "${node.unique.id}", Operand: api.ConstraintSetContainsAny, RTarget: strings.Join(ids, ","),
		})
	}
	if _, _, err := c.api.Jobs().Register(job, nil); err != nil {
		return fmt.Errorf("registering %s with nomad: %w", *job.ID, err)
	}
	return nil
}

// Allocs summarises a job's allocations by client status.
type Allocs struct {
	Running, Pending, Complete, Failed, Lost int
	// Live holds the IDs of the allocations still pending or running:
	// the only ones whose boot reports count toward the start barrier.
	Live map[string]bool
	// Workers is each allocation's state, for progress reports.
	Workers []Worker
}

// Worker is one allocation of a gang as Nomad reports it.
type Worker struct {
	Alloc    string
	Name     string // job.group[index]
	Node     string
	Status   string // Nomad's client status
	ExitCode *int   `json:",omitempty"`
}

// ErrNoJob means Nomad does not know the job.
var ErrNoJob = errors.New("no such nomad job")

// Job reads a job as registered with Nomad.
func (c *Client) Job(id string) (*api.Job, error) {
	j, _, err := c.api.Jobs().Info(id, nil)
	if err != nil {
		if strings.Contains(err.Error(), "404") {
			return nil, fmt.Errorf("%w: %s", ErrNoJob, id)
		}
		return nil, fmt.Errorf("reading nomad job %s: %w", id, err)
	}
	return j, nil
}

// AllocIndex is a job's allocation change marker from the watcher: while
// it stays the same, none of the job's allocations changed. Without a
// running watcher it is 0, which means unknown.
func (c *Client) AllocIndex(jobID string) uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.watching || c.jobIndex == nil {
		return 0
	}
	// A job with no allocations yet still gets a marker, distinct from
	// "unknown".
	return c.jobIndex[jobID] + 1
}

// Allocs counts the allocations of a job's current version. A gang that
// was stopped and registered again keeps the same job ID; the allocations
// of its earlier attempts must not count toward (or against) this one.
func (c *Client) Allocs(jobID string) (Allocs, error) {
	a := Allocs{Live: map[string]bool{}}
	job, err := c.Job(jobID)
	if errors.Is(err, ErrNoJob) {
		return a, nil
	}
	if err != nil {
		return a, err
	}
	stubs, _, err := c.api.Jobs().Allocations(jobID, false, nil)
	if err != nil {
		return a, err
	}
	for _, s := range stubs {
		if job.Version != nil && s.JobVersion != *job.Version {
			continue
		}
		w := Worker{Alloc: s.ID, Name: s.Name, Node: s.NodeID, Status: s.ClientStatus}
		for _, ts := range s.TaskStates {
			if ts.FinishedAt.IsZero() {
				continue
			}
			for _, ev := range ts.Events {
				if ev.Type == api.TaskTerminated {
					code := ev.ExitCode
					w.ExitCode = &code
				}
			}
		}
		a.Workers = append(a.Workers, w)
		switch s.ClientStatus {
		case "running":
			a.Running++
			a.Live[s.ID] = true
		case "pending":
			a.Pending++
			a.Live[s.ID] = true
		case "complete":
			a.Complete++
		case "failed":
			a.Failed++
		case "lost":
			a.Lost++
		}
	}
	return a, nil
}

// Stop deregisters a job, stopping all its workers.
func (c *Client) Stop(jobID string) error {
	if _, _, err := c.api.Jobs().Deregister(jobID, false, nil); err != nil {
		return fmt.Errorf("stopping %s: %w", jobID, err)
	}
	return nil
}
