package nomad

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/api"
)

// The watcher follows Nomad's nodes and allocations through the event
// stream (topics Node and Allocation) and applies each change to its copy,
// instead of reading both lists again whenever anything changes: at
// 50,000 nodes a change costs decoding one object, not the whole cluster
// (BenchmarkChange). The copy starts from a full read of both lists, and
// the stream from the lists' index, so no change falls between the two;
// an event older than what the copy holds is dropped by its modify index. Allocations garbage collected by Nomad
// raise no event: the copy is read whole again every resyncEvery, and on
// any stream error.

// resyncEvery bounds how long a garbage-collected allocation stays in the
// copy (it is terminal there, so it holds nothing).
const resyncEvery = 5 * time.Minute

// streamTopics are what the watcher subscribes to.
var streamTopics = map[api.Topic][]string{api.TopicNode: {"*"}, api.TopicAllocation: {"*"}}

// cluster is the watcher's copy of Nomad's nodes and allocations, by ID.
// Lists for FreeNodes are built from it when a change made them stale.
type cluster struct {
	nodes  map[string]*api.NodeListStub
	allocs map[string]*api.AllocationListStub
	// jobIndex is, per job key, the highest ModifyIndex of its
	// allocations.
	jobIndex map[string]uint64

	nodeList  []*api.NodeListStub
	allocList []*api.AllocationListStub
	stale     bool
}

func newCluster(nodes []*api.NodeListStub, allocs []*api.AllocationListStub) *cluster {
	c := &cluster{nodes: make(map[string]*api.NodeListStub, len(nodes)), allocs: make(map[string]*api.AllocationListStub, len(allocs)),
		jobIndex: map[string]uint64{}, nodeList: nodes, allocList: allocs}
	for _, n := range nodes {
		c.nodes[n.ID] = n
	}
	for _, a := range allocs {
		c.allocs[a.ID] = a
		k := placement.Key(a.Namespace, a.JobID)
		c.jobIndex[k] = max(c.jobIndex[k], a.ModifyIndex)
	}
	return c
}

// lists are the node and allocation lists as Nomad's list endpoints would
// give them now (in no particular order).
func (c *cluster) lists() ([]*api.NodeListStub, []*api.AllocationListStub) {
	if c.stale {
		c.nodeList = make([]*api.NodeListStub, 0, len(c.nodes))
		for _, n := range c.nodes {
			c.nodeList = append(c.nodeList, n)
		}
		c.allocList = make([]*api.AllocationListStub, 0, len(c.allocs))
		for _, a := range c.allocs {
			c.allocList = append(c.allocList, a)
		}
		c.stale = false
	}
	return c.nodeList, c.allocList
}

// apply applies one event; it says whether it changed the copy.
func (c *cluster) apply(e *api.Event) (bool, error) {
	switch e.Topic {
	case api.TopicNode:
		n, err := e.Node()
		if err != nil || n == nil {
			return false, fmt.Errorf("decoding a node event: %v", err)
		}
		old, ok := c.nodes[n.ID]
		if ok && old.ModifyIndex > n.ModifyIndex {
			return false, nil // the copy is newer
		}
		if e.Type == "NodeDeregistration" {
			if !ok {
				return false, nil
			}
			delete(c.nodes, n.ID)
		} else {
			c.nodes[n.ID] = nodeStub(n)
		}
	case api.TopicAllocation:
		a, err := e.Allocation()
		if err != nil || a == nil {
			return false, fmt.Errorf("decoding an allocation event: %v", err)
		}
		old, ok := c.allocs[a.ID]
		if ok && old.ModifyIndex > a.ModifyIndex {
			return false, nil
		}
		s := allocStub(a)
		if s.AllocatedResources == nil && ok {
			// An allocation's resources never change: keep what the
			// list said if an event leaves them out.
			s.AllocatedResources = old.AllocatedResources
		}
		c.allocs[a.ID] = s
		k := placement.Key(a.Namespace, a.JobID)
		c.jobIndex[k] = max(c.jobIndex[k], a.ModifyIndex)
	default:
		return false, nil
	}
	c.stale = true
	return true, nil
}

// nodeStub is what the node list gives for n, with resources.
func nodeStub(n *api.Node) *api.NodeListStub {
	return &api.NodeListStub{
		ID: n.ID, Name: n.Name, Datacenter: n.Datacenter, NodePool: n.NodePool, NodeClass: n.NodeClass,
		Status: n.Status, StatusDescription: n.StatusDescription, Drain: n.Drain,
		SchedulingEligibility: n.SchedulingEligibility, NodeResources: n.NodeResources,
		ReservedResources: n.ReservedResources, CreateIndex: n.CreateIndex, ModifyIndex: n.ModifyIndex,
	}
}

// allocStub is what the allocation list gives for a, with resources.
func allocStub(a *api.Allocation) *api.AllocationListStub {
	s := &api.AllocationListStub{
		ID: a.ID, EvalID: a.EvalID, Name: a.Name, Namespace: a.Namespace, NodeID: a.NodeID, NodeName: a.NodeName,
		JobID: a.JobID, TaskGroup: a.TaskGroup, AllocatedResources: a.AllocatedResources,
		DesiredStatus: a.DesiredStatus, DesiredDescription: a.DesiredDescription,
		ClientStatus: a.ClientStatus, ClientDescription: a.ClientDescription,
		CreateIndex: a.CreateIndex, ModifyIndex: a.ModifyIndex, CreateTime: a.CreateTime, ModifyTime: a.ModifyTime,
	}
	if a.Job != nil && a.Job.Version != nil {
		s.JobVersion = *a.Job.Version
	}
	return s
}

// followCluster keeps c's copy current until ctx ends: read the lists
// whole, subscribe from their index, then apply events; on an error, or
// every resyncEvery, start over.
func (c *Client) followCluster(ctx context.Context, log hclog.Logger) {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := c.followOnce(ctx)
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			backoff = 100 * time.Millisecond
			continue // a periodic read of the whole lists
		}
		log.Warn("following nomad's event stream failed; reading the lists again", "error", err, "in", backoff)
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

func (c *Client) followOnce(ctx context.Context) error {
	sctx, cancel := context.WithTimeout(ctx, resyncEvery)
	defer cancel()
	nodes, nm, err := c.api.Nodes().List((&api.QueryOptions{Params: resources}).WithContext(sctx))
	if err != nil {
		return fmt.Errorf("listing nodes: %w", err)
	}
	allocs, am, err := c.api.Allocations().List((&api.QueryOptions{Params: resources, Namespace: "*"}).WithContext(sctx))
	if err != nil {
		return fmt.Errorf("listing allocations: %w", err)
	}
	cl := newCluster(nodes, allocs)
	c.mu.Lock()
	c.cluster = cl
	c.mu.Unlock()
	// The stream starts at the older of the lists' indexes (or as near
	// it as Nomad's event buffer goes back): a change made while the
	// lists were read is replayed, and what the copy already holds is
	// dropped by its modify index. Index 0 would mean "from now", so 1 is
	// the floor. Namespace "*": the stream sends only the namespace asked
	// for otherwise. (Nomad may answer a subscription only with its first
	// event or heartbeat, up to 10 s later; the copy serves meanwhile.)
	from := max(min(nm.LastIndex, am.LastIndex), 1)
	events, err := c.api.EventStream().Stream(sctx, streamTopics, from, &api.QueryOptions{Namespace: "*"})
	if err != nil {
		return fmt.Errorf("subscribing to nodes and allocations: %w", refused(err))
	}
	for batch := range events {
		if batch.Err != nil {
			if sctx.Err() != nil {
				return nil // time to read the lists again
			}
			return fmt.Errorf("reading the event stream: %w", batch.Err)
		}
		c.mu.Lock()
		for i := range batch.Events {
			if _, err := cl.apply(&batch.Events[i]); err != nil {
				c.mu.Unlock()
				return err
			}
		}
		c.mu.Unlock()
	}
	if sctx.Err() != nil {
		return nil
	}
	return errors.New("the event stream closed")
}
