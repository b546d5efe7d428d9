package nomad

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/api"
)

// The watcher follows Nomad's nodes and allocations through the event
// stream (topics Node and Allocation) and applies each change to its copy,
// instead of reading both lists again whenever anything changes: at
// 50,000 nodes a change costs decoding one object, not the whole cluster
// (BenchmarkChange). The copy is read whole once the subscription is up,
// so no change falls between the two; an event older than the copy is
// dropped by its modify index. Allocations garbage collected by Nomad
// raise no event: the copy is read whole again every resyncEvery, and
// after any stream error.

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
	// unsure is set when an event could not be applied in full (an
	// allocation first seen without its resources): the lists are read
	// whole again.
	unsure bool
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
		var n *api.Node
		if err := payload(e, "Node", &n); err != nil || n == nil {
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
		var a *api.Allocation
		if err := payload(e, "Allocation", &a); err != nil || a == nil {
			return false, fmt.Errorf("decoding an allocation event: %v", err)
		}
		old, ok := c.allocs[a.ID]
		if ok && old.ModifyIndex > a.ModifyIndex {
			return false, nil
		}
		s := allocStub(a)
		if ok {
			// An allocation's resources never change, and events
			// carry no job (so no version): keep what the list said.
			if s.AllocatedResources == nil {
				s.AllocatedResources = old.AllocatedResources
			}
			if a.Job == nil {
				s.JobVersion = old.JobVersion
			}
		} else if s.AllocatedResources == nil && !terminal(s) {
			c.unsure = true
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

// payload decodes an event's object by its JSON names. (The API client's
// own decoding goes by Go field names, and so loses every field whose JSON
// name differs: a device attribute's value, for one.)
func payload(e *api.Event, key string, v any) error {
	b, err := json.Marshal(e.Payload[key])
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
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

// followCluster keeps c's copy current until ctx ends: subscribe, read
// the lists whole, then apply events; on a stream error, start over. A
// Nomad that refuses the subscription (its event broker off, or a token
// without node:read or read-job in every namespace) is followed with
// blocking queries on the two lists instead.
func (c *Client) followCluster(ctx context.Context, log hclog.Logger) {
	var b backoff
	for ctx.Err() == nil {
		err := c.followOnce(ctx)
		if ctx.Err() != nil {
			return
		}
		var re *RefusedError
		if errors.As(err, &re) {
			log.Warn("nomad refused the event stream; following nodes and allocations with blocking queries, which read both lists whole on every change", "error", err)
			c.followLists(ctx, log)
			return
		}
		log.Warn("following nomad's event stream failed; starting over", "error", err, "in", b.next())
		b.wait(ctx)
	}
}

func (c *Client) followOnce(ctx context.Context) error {
	// Until the stream is up, Inventory asks Nomad itself.
	c.setCluster(nil)
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Subscribed from the oldest event Nomad still buffers (index 1;
	// index 0 would wait for the next change or the heartbeat, 30 s
	// away), in all namespaces (the stream sends only the namespace asked
	// for otherwise). Stream returns once Nomad sends its first event:
	// the subscription exists then, so every change after the lists are
	// read below arrives on it, and what the lists already hold (the
	// replayed past included) is dropped by its modify index.
	events, err := c.api.EventStream().Stream(sctx, streamTopics, 1, &api.QueryOptions{Namespace: "*"})
	if err != nil {
		return fmt.Errorf("subscribing to nodes and allocations: %w", refused(err))
	}
	cl, err := c.readCluster(sctx)
	if err != nil {
		return err
	}
	c.setCluster(cl)
	// The lists are read whole again now and then, in this goroutine so
	// that no event is applied to a copy the new read then replaces:
	// Nomad raises no event when it garbage-collects an allocation.
	resync := time.NewTicker(resyncEvery)
	defer resync.Stop()
	for {
		select {
		case batch, ok := <-events:
			if !ok {
				return errors.New("the event stream closed")
			}
			if batch.Err != nil {
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
			if !cl.unsure {
				continue
			}
		case <-resync.C:
		}
		if cl, err = c.readCluster(sctx); err != nil {
			return err
		}
		c.setCluster(cl)
	}
}

func (c *Client) setCluster(cl *cluster) {
	c.mu.Lock()
	c.cluster = cl
	c.mu.Unlock()
}

// readCluster reads the node and allocation lists whole.
func (c *Client) readCluster(ctx context.Context) (*cluster, error) {
	nodes, allocs, err := c.readLists(ctx)
	if err != nil {
		return nil, err
	}
	return newCluster(nodes, allocs), nil
}

// followLists follows both lists with blocking queries, each change read
// whole: the way without the event stream.
func (c *Client) followLists(ctx context.Context, log hclog.Logger) {
	var (
		mu     sync.Mutex
		nodes  []*api.NodeListStub
		allocs []*api.AllocationListStub
	)
	publish := func() {
		if nodes != nil && allocs != nil {
			c.setCluster(newCluster(nodes, allocs))
		}
	}
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
			mu.Lock()
			nodes = ns
			publish()
			mu.Unlock()
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
			mu.Lock()
			allocs = as
			publish()
			mu.Unlock()
			return meta.LastIndex, nil
		})
	}()
	wg.Wait()
}
