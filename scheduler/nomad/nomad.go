// Package nomad is the gang scheduler's edge to a Nomad cluster: the
// inventory of nodes with what every allocation (cohort's or not) leaves
// free, registering a reserved gang pinned to its nodes, watching its
// allocations and stopping it.
package nomad

import (
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/hashicorp/nomad/api"
)

// Client wraps the Nomad API.
type Client struct{ api *api.Client }

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

// Inventory lists ready, eligible nodes with their free capacity: total
// minus the node's reserved share minus every non-terminal allocation,
// except those of the jobs in skip (cohort's own, which the scheduler
// accounts for from its reservations, placed or not yet).
func (c *Client) Inventory(skip map[string]bool) ([]placement.Node, error) {
	return c.nodes(skip, true)
}

// Capacity lists ready, eligible nodes as if no allocation ran on them:
// what a job can at most ever get.
func (c *Client) Capacity() ([]placement.Node, error) { return c.nodes(nil, false) }

func (c *Client) nodes(skip map[string]bool, countAllocs bool) ([]placement.Node, error) {
	stubs, _, err := c.api.Nodes().List(nil)
	if err != nil {
		return nil, fmt.Errorf("listing nodes: %w", err)
	}
	var out []placement.Node
	for _, s := range stubs {
		if s.Status != "ready" || s.Drain || s.SchedulingEligibility != "eligible" {
			continue
		}
		n, _, err := c.api.Nodes().Info(s.ID, nil)
		if err != nil {
			return nil, fmt.Errorf("reading node %s: %w", s.ID, err)
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
				for _, name := range deviceNames(d.Vendor, d.Type, d.Name) {
					pn.Devices[name] += healthy
				}
			}
		}
		if r := n.ReservedResources; r != nil {
			pn.CPU -= int(r.Cpu.CpuShares)
			pn.MemoryMB -= int(r.Memory.MemoryMB)
		}
		if !countAllocs {
			out = append(out, pn)
			continue
		}
		allocs, _, err := c.api.Nodes().Allocations(n.ID, nil)
		if err != nil {
			return nil, fmt.Errorf("reading allocations of %s: %w", n.ID, err)
		}
		for _, a := range allocs {
			if skip[a.JobID] || a.ServerTerminalStatus() || a.ClientTerminalStatus() || a.AllocatedResources == nil {
				continue
			}
			for _, t := range a.AllocatedResources.Tasks {
				pn.CPU -= int(t.Cpu.CpuShares)
				pn.MemoryMB -= int(t.Memory.MemoryMB)
				for _, d := range t.Devices {
					for _, name := range deviceNames(d.Vendor, d.Type, d.Name) {
						pn.Devices[name] -= len(d.DeviceIDs)
					}
				}
			}
		}
		out = append(out, pn)
	}
	sort.Slice(out, func(a, b int) bool { return out[a].ID < out[b].ID })
	return out, nil
}

// deviceNames are the names a request may use for a device: its type, its
// vendor/type, and its vendor/type/model.
func deviceNames(vendor, typ, model string) []string {
	return []string{typ, vendor + "/" + typ, vendor + "/" + typ + "/" + model}
}

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
